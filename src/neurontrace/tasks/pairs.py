"""Clean/counterfactual prompt pairs in the Marks et al. JSONL format, with checks against a tokenizer.

One pair per line: ``{"clean_prefix": ..., "patch_prefix": ..., "clean_answer": ..., "patch_answer": ...}``
and an optional ``"case"`` label. Per-position attribution needs the two prefixes to have equal token length
and each answer to be one token; :func:`check_pairs` says which pair breaks that, :func:`filter_pairs` drops it.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neurontrace.errors import DatasetError, TokenizationError
from neurontrace.io import text_lines, write_text_atomic
from neurontrace.tokens import _tokenizer_of, encode, single_token_id

FIELDS = ("clean_prefix", "patch_prefix", "clean_answer", "patch_answer")


@dataclass(frozen=True)
class Pair:
    """A prompt and its counterfactual, each with the answer the model should give.

    Attributes:
        clean_prefix: the prompt the behaviour is traced on, e.g. ``"The keys near the cabinet"``.
        patch_prefix: the counterfactual prompt, e.g. ``"The key near the cabinet"``.
        clean_answer: the expected next token after ``clean_prefix``, e.g. ``" are"``.
        patch_answer: the expected next token after ``patch_prefix``, e.g. ``" is"``.
        case: an optional label of the pair's condition (e.g. ``"plural_singular"``), used to balance sets.
        slots: optional template slots: consecutive pieces of ``clean_prefix`` joined by single spaces, e.g.
            ``("The", "keys", "next to", "the", "cabinet")``. Pairs with as many slots align slot by slot
            (``--nodes slots``) whatever their token lengths. Not part of a pair's identity.
    """

    clean_prefix: str
    patch_prefix: str
    clean_answer: str
    patch_answer: str
    case: str | None = None
    slots: tuple[str, ...] | None = field(default=None, compare=False)
    source: str | None = field(default=None, compare=False, repr=False)  # "file:line" when read from a file

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of this pair (``case`` and ``slots`` only when set)."""
        out: dict[str, Any] = {name: getattr(self, name) for name in FIELDS}
        if self.case is not None:
            out["case"] = self.case
        if self.slots is not None:
            out["slots"] = list(self.slots)
        return out


# ------------------------------------------------------------------ files


def _pair_from_line(line: str, where: str) -> Pair:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{where}: invalid JSON ({e.msg}); each line must be one JSON object") from None
    if not isinstance(obj, dict):
        raise DatasetError(
            f"{where}: expected a JSON object, got {type(obj).__name__}; each line must be one pair object"
        )
    values = {}
    for name in FIELDS:
        if name not in obj:
            raise DatasetError(f"{where}: missing field {name!r}; each pair needs {', '.join(FIELDS)}")
        value = obj[name]
        if not isinstance(value, str) or value == "":
            got = repr(value) if isinstance(value, str) else type(value).__name__
            raise DatasetError(f"{where}: field {name!r} must be a non-empty string, got {got}")
        values[name] = value
    case = obj.get("case")
    if case is not None and not isinstance(case, str):
        raise DatasetError(f"{where}: field 'case' must be a string or absent, got {type(case).__name__}")
    slots = obj.get("slots")
    if slots is not None:
        if not isinstance(slots, list) or not all(isinstance(x, str) and x for x in slots):
            raise DatasetError(f"{where}: field 'slots' must be a list of non-empty strings or absent")
        if " ".join(slots) != values["clean_prefix"]:
            raise DatasetError(
                f"{where}: the slots {slots!r} joined by spaces must give the clean_prefix "
                f"{values['clean_prefix']!r}"
            )
        slots = tuple(slots)
    return Pair(**values, case=case, slots=slots, source=where)


def load_pairs(path: str | os.PathLike) -> list[Pair]:
    """Read pairs from a JSONL file; any bad line is an error naming the file, line and field.

    Blank lines are skipped; keys other than the four fields and ``case`` are ignored.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a dataset file" if path.is_dir() else "no such dataset file"
        raise DatasetError(f"{what}: {path}; give a JSONL file with one pair per line")
    try:
        lines = text_lines(path)  # split on \n only; bytes that are not UTF-8 name their line
    except OSError as e:
        raise DatasetError(f"cannot read dataset file {path}: {e.strerror}") from None
    pairs = [_pair_from_line(line, f"{path}:{number}") for number, line in lines if line.strip()]
    if not pairs:
        raise DatasetError(f"the dataset {path} is empty; it needs at least one pair, one JSON object a line")
    return pairs


def save_pairs(path: str | os.PathLike, pairs: Sequence[Pair]) -> Path:
    """Write pairs as JSONL, atomically (the file is the old one or the complete new one)."""
    if not pairs:
        raise DatasetError(f"no pairs to write to {path}; a dataset needs at least one pair")
    lines = [json.dumps(p.to_dict(), ensure_ascii=False) for p in pairs]
    return write_text_atomic(path, "\n".join(lines) + "\n")


# ------------------------------------------------------------- tokenizer


def check_pairs(pairs: Sequence[Pair], tokenizer: Any, *, same_length: bool = True) -> None:
    """Raise on the first pair whose answers are not single tokens or whose prefixes differ in token length.

    ``tokenizer`` is a tokenizer or a model with one. ``same_length=False`` skips the length check (for
    metrics that do not align positions).
    """
    if not pairs:
        raise DatasetError("no pairs to check; a dataset needs at least one pair")
    tok = _tokenizer_of(tokenizer)
    for i, pair in enumerate(pairs):
        for name in ("clean_answer", "patch_answer"):
            try:
                single_token_id(tok, getattr(pair, name))
            except TokenizationError as e:
                raise TokenizationError(f"pair {i}: {name}: {e}") from None
        if same_length:
            clean = encode(tok, pair.clean_prefix)
            patch = encode(tok, pair.patch_prefix)
            if len(clean) != len(patch):
                raise TokenizationError(
                    f"pair {i} has unequal token lengths: clean_prefix {pair.clean_prefix!r} is {len(clean)} "
                    f"tokens, patch_prefix {pair.patch_prefix!r} is {len(patch)}; per-position attribution "
                    "needs equal lengths (drop such pairs with filter_pairs)"
                )


REASON_ANSWER = "an answer is not one token"
REASON_UNEQUAL = "clean and counterfactual prefixes differ in token length"
REASON_LENGTH = "another token length than the most common one"


@dataclass
class FilterReport:
    """What :func:`filter_report` kept and why it dropped the rest (every dropped pair has one reason)."""

    kept: list[Pair]
    total: int
    dropped: dict[str, int]
    lengths: dict[int, int]  # prefix token length -> usable pairs of that length (before any length cut)

    @property
    def n_kept(self) -> int:
        return len(self.kept)

    def describe(self, what: str = "pairs") -> str:
        """One line, e.g. ``kept 212 of 400 pairs; dropped 188: another token length than the most common one``."""
        text = f"kept {self.n_kept} of {self.total} {what}"
        if self.dropped:
            reasons = ", ".join(f"{n} ({reason})" for reason, n in self.dropped.items())
            text += f"; dropped {self.total - self.n_kept}: {reasons}"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "kept": self.n_kept,
            "dropped": dict(self.dropped),
            "lengths": {str(k): v for k, v in sorted(self.lengths.items())},
        }


def filter_report(pairs: Sequence[Pair], tokenizer: Any, *, one_length: bool = True) -> FilterReport:
    """The pairs with single-token answers and equal clean/patch token lengths, in their order, with the count
    of every pair dropped and its reason.

    With ``one_length`` only pairs of the most common prefix length are kept (ties: the shortest), so every
    position lines up across the whole set.
    """
    tok = _tokenizer_of(tokenizer)
    n_tokens: dict[tuple[str, bool], int] = {}

    def length(text: str, special: bool) -> int:
        key = (text, special)
        if key not in n_tokens:
            n_tokens[key] = len(tok.encode(text, add_special_tokens=special))
        return n_tokens[key]

    dropped: Counter[str] = Counter()
    kept: list[tuple[Pair, int]] = []
    for pair in pairs:
        if length(pair.clean_answer, False) != 1 or length(pair.patch_answer, False) != 1:
            dropped[REASON_ANSWER] += 1
            continue
        n = length(pair.clean_prefix, True)
        if n > 0 and n == length(pair.patch_prefix, True):
            kept.append((pair, n))
        else:
            dropped[REASON_UNEQUAL] += 1
    counts = Counter(n for _, n in kept)
    if one_length and kept:
        best = min(counts, key=lambda n: (-counts[n], n))
        if len(counts) > 1:
            dropped[REASON_LENGTH] += sum(c for n, c in counts.items() if n != best)
        kept = [(p, n) for p, n in kept if n == best]
    return FilterReport([p for p, _ in kept], len(pairs), dict(dropped), dict(counts))


def filter_pairs(pairs: Sequence[Pair], tokenizer: Any, *, one_length: bool = True) -> list[Pair]:
    """The pairs with single-token answers and equal clean/patch token lengths, in their order.

    With ``one_length`` only pairs of the most common prefix length are kept (ties: the shortest), so every
    position lines up across the whole set. :func:`filter_report` also says what was dropped and why.
    """
    return filter_report(pairs, tokenizer, one_length=one_length).kept

"""Tokenisation helpers: left-padded batches with position bookkeeping, single-token answers, equal-length pairs.

Positions are always *prompt-relative*: position 0 is a prompt's first token whatever padding its batch row has,
and negative positions count from the prompt's end (-1 is the last token). ``Batch.column`` maps them to
columns of the padded tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from neurontrace.errors import TokenizationError


@dataclass
class Batch:
    """Token ids of several prompts, left-padded to one length.

    Attributes:
        input_ids: ``[B, T]`` token ids (pad columns hold ``pad_id``).
        attention_mask: ``[B, T]`` 1 for real tokens, 0 for padding.
        prompts: the prompt strings when the batch was made from text.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompts: list[str] | None = None

    @classmethod
    def from_ids(
        cls, ids: Sequence[Sequence[int]], *, pad_id: int = 0, prompts: list[str] | None = None
    ) -> Batch:
        """Left-pad lists of token ids into a batch."""
        if len(ids) == 0:
            raise TokenizationError("no prompts given; pass at least one prompt")
        for i, row in enumerate(ids):
            if len(row) == 0:
                raise TokenizationError(f"prompt {i} has no tokens; give a non-empty prompt")
        width = max(len(r) for r in ids)
        input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, row in enumerate(ids):
            input_ids[i, width - len(row) :] = torch.as_tensor(list(row), dtype=torch.long)
            mask[i, width - len(row) :] = 1
        return cls(input_ids=input_ids, attention_mask=mask, prompts=prompts)

    # ------------------------------------------------------------ bookkeeping
    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def width(self) -> int:
        return self.input_ids.shape[1]

    @property
    def lengths(self) -> torch.Tensor:
        """Real (unpadded) length of each prompt, ``[B]``."""
        return self.attention_mask.sum(dim=1)

    @property
    def pad(self) -> torch.Tensor:
        """Number of left-padding columns of each row, ``[B]``."""
        return self.width - self.lengths

    @property
    def position_ids(self) -> torch.Tensor:
        """Position ids that start at 0 on each prompt's first real token (pads get 0)."""
        return (self.attention_mask.cumsum(dim=1) - 1).clamp(min=0)

    def column(self, row: int, position: int) -> int:
        """Padded column of prompt-relative ``position`` in ``row``."""
        length = int(self.lengths[row])
        if not -length <= position < length:
            raise TokenizationError(f"position {position} is outside prompt {row}, which has {length} tokens")
        return int(self.pad[row]) + (position % length)

    def ids(self, row: int) -> list[int]:
        """The unpadded token ids of one prompt."""
        return self.input_ids[row, int(self.pad[row]) :].tolist()

    def to(self, device: torch.device | str) -> Batch:
        if self.input_ids.device == torch.device(device):
            return self
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.prompts)

    def select(self, rows: Sequence[int] | slice) -> Batch:
        """A sub-batch (padding is kept as it is)."""
        prompts = None
        if self.prompts is not None:
            prompts = self.prompts[rows] if isinstance(rows, slice) else [self.prompts[r] for r in rows]
        return Batch(self.input_ids[rows], self.attention_mask[rows], prompts)

    def unpad(self, tensor: torch.Tensor, row: int) -> torch.Tensor:
        """Drop the padding columns of ``row`` from a ``[B, T, ...]`` tensor aligned with this batch."""
        return tensor[row, int(self.pad[row]) :]


def _tokenizer_of(model_or_tokenizer: Any) -> Any:
    tok = getattr(model_or_tokenizer, "tokenizer", model_or_tokenizer)
    if tok is None or not callable(getattr(tok, "encode", None)):
        raise TokenizationError("this model has no tokenizer; build batches with Batch.from_ids(...)")
    return tok


def pad_id_of(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


def encode(model_or_tokenizer: Any, text: str, *, add_special_tokens: bool = True) -> list[int]:
    """Token ids of one prompt; an empty prompt is an error."""
    if not isinstance(text, str):
        raise TokenizationError(f"a prompt must be a string, got {type(text).__name__}")
    if text == "":
        raise TokenizationError("the prompt is empty; give some text to run the model on")
    tok = _tokenizer_of(model_or_tokenizer)
    ids = tok.encode(text, add_special_tokens=add_special_tokens)
    if len(ids) == 0:
        raise TokenizationError(f"the prompt {text!r} tokenises to no tokens")
    return list(ids)


def tokenize(
    model_or_tokenizer: Any, prompts: str | Sequence[str], *, add_special_tokens: bool = True
) -> Batch:
    """Tokenise one prompt or a list into a left-padded :class:`Batch`."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise TokenizationError("no prompts given; pass at least one prompt")
    tok = _tokenizer_of(model_or_tokenizer)
    ids = [encode(tok, p, add_special_tokens=add_special_tokens) for p in prompts]
    return Batch.from_ids(ids, pad_id=pad_id_of(tok), prompts=prompts)


def token_strings(model_or_tokenizer: Any, ids: Sequence[int]) -> list[str]:
    tok = _tokenizer_of(model_or_tokenizer)
    return [tok.decode([int(i)]) for i in ids]


def single_token_id(model_or_tokenizer: Any, answer: str) -> int:
    """The id of an answer that must be exactly one token (e.g. ``" are"``), or a clear error."""
    if not isinstance(answer, str) or answer == "":
        raise TokenizationError("the answer is empty; give the answer token, usually with a leading space")
    tok = _tokenizer_of(model_or_tokenizer)
    ids = tok.encode(answer, add_special_tokens=False)
    if len(ids) == 1:
        return int(ids[0])
    pieces = token_strings(tok, ids)
    hint = ""
    if not answer.startswith(" ") and len(tok.encode(" " + answer, add_special_tokens=False)) == 1:
        hint = f"; did you mean {' ' + answer!r} with a leading space?"
    raise TokenizationError(
        f"answer {answer!r} must be one token but is {len(ids)} tokens {pieces}{hint} "
        "(use a single-token answer, or a multi-token metric)"
    )


def tokenize_pairs(
    model_or_tokenizer: Any,
    clean: Sequence[str],
    patch: Sequence[str],
    *,
    add_special_tokens: bool = True,
) -> tuple[Batch, Batch]:
    """Tokenise clean/counterfactual prompt pairs; each pair must have equal token length.

    The two batches then share one padding layout, so a column in one is the same position in the other.
    """
    clean, patch = list(clean), list(patch)
    if len(clean) != len(patch):
        raise TokenizationError(f"got {len(clean)} clean prompts but {len(patch)} counterfactual prompts")
    if not clean:
        raise TokenizationError("no prompt pairs given; pass at least one pair")
    tok = _tokenizer_of(model_or_tokenizer)
    clean_ids = [encode(tok, p, add_special_tokens=add_special_tokens) for p in clean]
    patch_ids = [encode(tok, p, add_special_tokens=add_special_tokens) for p in patch]
    for i, (a, b) in enumerate(zip(clean_ids, patch_ids, strict=True)):
        if len(a) != len(b):
            raise TokenizationError(
                f"pair {i} has unequal token lengths: clean {clean[i]!r} is {len(a)} tokens "
                f"{token_strings(tok, a)}, counterfactual {patch[i]!r} is {len(b)} tokens "
                f"{token_strings(tok, b)}; per-position attribution needs equal lengths"
            )
    pad_id = pad_id_of(tok)
    return (
        Batch.from_ids(clean_ids, pad_id=pad_id, prompts=clean),
        Batch.from_ids(patch_ids, pad_id=pad_id, prompts=patch),
    )

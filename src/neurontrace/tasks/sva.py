"""Subject-verb agreement (SVA) pairs, generated from templates in the Marks et al. format.

Four tasks; in each the counterfactual flips the number of one noun, which flips the verb that agrees with it:

- ``simple``: "The author" -> " is" / "The authors" -> " are"; case = the clean subject's number.
- ``nounpp``: across a prepositional phrase, "The authors near the lamp" -> " are"; the patch flips the
  subject; case = subject number _ attractor number.
- ``rc``: across a relative clause, "The authors that the editor likes" -> " are" (the main verb agrees with
  the main subject; the embedded verb with the embedded noun); the patch flips the subject; case = subject
  number _ embedded-noun number.
- ``pp_mixed``: as ``nounpp`` with one-, two- and three-word prepositions ("near", "next to", "in front of"),
  so prompts have several token lengths (evaluated with position-summed nodes); case as ``nounpp``.
- ``within_rc``: inside the relative clause, "The authors that the editors" -> " do" (agreeing with the
  embedded subject); the patch flips the embedded noun; case = main-noun number _ embedded-noun number.

Every pair is grammatical by construction; the word lists are the project's own, all with regular plurals.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from neurontrace.errors import DatasetError, NeurontraceError
from neurontrace.tasks.pairs import Pair, filter_pairs, save_pairs

SVA_TASKS = ("simple", "nounpp", "rc", "within_rc", "pp_mixed")

MIXED_LENGTH_TASKS = ("pp_mixed",)
"""Tasks whose prompts have several token lengths by design (the tokenizer filter keeps every length)."""

MAX_PAIRS = 10_000
"""Largest set :func:`generate_sva` returns when no ``n`` is given."""


def _plural(noun: str) -> str:
    return noun + "es" if noun.endswith(("s", "x", "z", "ch", "sh")) else noun + "s"


def _nouns(words: str) -> tuple[tuple[str, str], ...]:
    return tuple((w, _plural(w)) for w in words.split())


# (singular, plural) pairs. Subjects and embedded nouns are people (they can like, know, ... someone) and the
# two lists are disjoint, so a relative clause never repeats its head noun; PP objects are things.
SUBJECT_NOUNS = _nouns(
    "author pilot nurse student painter trainer officer senator manager writer worker engineer soldier "
    "player dentist tenant cousin neighbor customer visitor citizen tourist scientist professor judge "
    "sister brother captain actor gardener clerk runner"
)
EMBEDDED_NOUNS = _nouns(
    "reporter editor sailor guest coach king queen surgeon critic hunter chemist director producer cook "
    "client owner buyer designer investor partner"
)
OBJECT_NOUNS = _nouns(
    "lamp door wall fence house bench bridge bottle box tower gate boat train clock phone building statue "
    "garden machine computer"
)
PREPOSITIONS = ("near", "behind", "beside", "by", "under", "outside")
# One-, two- and three-word prepositions of the mixed-length task (about half of them one word).
MIXED_PREPOSITIONS = (
    "near",
    "behind",
    "beside",
    "under",
    "next to",
    "across from",
    "close to",
    "in front of",
)
# Transitive verbs of the relative clause: (singular, plural).
TRANSITIVE_VERBS = (
    ("likes", "like"),
    ("knows", "know"),
    ("loves", "love"),
    ("helps", "help"),
    ("trusts", "trust"),
    ("meets", "meet"),
    ("visits", "visit"),
    ("calls", "call"),
)
# The answers: (singular, plural), with the leading space of a next token.
AGREEING_VERBS = ((" is", " are"), (" has", " have"), (" does", " do"), (" goes", " go"))

NUMBERS = ("singular", "plural")
_SG, _PL = 0, 1


def _cases(two_nouns: bool) -> tuple[str, ...]:
    if not two_nouns:
        return NUMBERS
    return tuple(f"{a}_{b}" for a in NUMBERS for b in NUMBERS)


def _simple() -> Iterator[Pair]:
    for subj in SUBJECT_NOUNS:
        for verb in AGREEING_VERBS:
            for s in (_SG, _PL):
                yield Pair(
                    clean_prefix=f"The {subj[s]}",
                    patch_prefix=f"The {subj[1 - s]}",
                    clean_answer=verb[s],
                    patch_answer=verb[1 - s],
                    case=NUMBERS[s],
                )


def _nounpp(prepositions: Sequence[str] = PREPOSITIONS) -> Iterator[Pair]:
    for subj in SUBJECT_NOUNS:
        for prep in prepositions:
            for obj in OBJECT_NOUNS:
                for verb in AGREEING_VERBS:
                    for s in (_SG, _PL):
                        for o in (_SG, _PL):
                            yield Pair(
                                clean_prefix=f"The {subj[s]} {prep} the {obj[o]}",
                                patch_prefix=f"The {subj[1 - s]} {prep} the {obj[o]}",
                                clean_answer=verb[s],
                                patch_answer=verb[1 - s],
                                case=f"{NUMBERS[s]}_{NUMBERS[o]}",
                                slots=("The", subj[s], prep, "the", obj[o]),
                            )


def _rc() -> Iterator[Pair]:
    for subj in SUBJECT_NOUNS:
        for emb in EMBEDDED_NOUNS:
            for tv in TRANSITIVE_VERBS:
                for verb in AGREEING_VERBS:
                    for s in (_SG, _PL):
                        for e in (_SG, _PL):
                            clause = f"that the {emb[e]} {tv[e]}"
                            yield Pair(
                                clean_prefix=f"The {subj[s]} {clause}",
                                patch_prefix=f"The {subj[1 - s]} {clause}",
                                clean_answer=verb[s],
                                patch_answer=verb[1 - s],
                                case=f"{NUMBERS[s]}_{NUMBERS[e]}",
                            )


def _within_rc() -> Iterator[Pair]:
    for subj in SUBJECT_NOUNS:
        for emb in EMBEDDED_NOUNS:
            for verb in AGREEING_VERBS:
                for s in (_SG, _PL):
                    for e in (_SG, _PL):
                        yield Pair(
                            clean_prefix=f"The {subj[s]} that the {emb[e]}",
                            patch_prefix=f"The {subj[s]} that the {emb[1 - e]}",
                            clean_answer=verb[e],
                            patch_answer=verb[1 - e],
                            case=f"{NUMBERS[s]}_{NUMBERS[e]}",
                        )


_GENERATORS: dict[str, tuple[Callable[[], Iterator[Pair]], tuple[str, ...]]] = {
    "simple": (_simple, _cases(two_nouns=False)),
    "nounpp": (_nounpp, _cases(two_nouns=True)),
    "rc": (_rc, _cases(two_nouns=True)),
    "within_rc": (_within_rc, _cases(two_nouns=True)),
    "pp_mixed": (lambda: _nounpp(MIXED_PREPOSITIONS), _cases(two_nouns=True)),
}


def _task(task: str) -> tuple[Callable[[], Iterator[Pair]], tuple[str, ...]]:
    if task not in _GENERATORS:
        raise NeurontraceError(f"unknown SVA task {task!r}; choose one of {', '.join(SVA_TASKS)}")
    return _GENERATORS[task]


def generate_sva(task: str, *, n: int | None = None, seed: int = 0, tokenizer: Any = None) -> list[Pair]:
    """Subject-verb agreement pairs of ``task``, balanced over its cases and shuffled.

    Deterministic for a ``seed``. Without ``n``, as many as the cases allow in balance, at most
    :data:`MAX_PAIRS`. With a ``tokenizer`` (or a model), only pairs with single-token answers and equal
    clean/patch token lengths, all of one length, are used, so positions align across the set (tasks in
    :data:`MIXED_LENGTH_TASKS` keep every length).
    """
    make, cases = _task(task)
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise NeurontraceError(f"n must be a positive number of pairs, got {n!r}")
    pairs = list(make())
    if tokenizer is not None:
        pairs = filter_pairs(pairs, tokenizer, one_length=task not in MIXED_LENGTH_TASKS)
    by_case: dict[str, list[Pair]] = {c: [] for c in cases}
    for p in pairs:
        by_case[p.case].append(p)
    per_case = min(len(group) for group in by_case.values())
    available = per_case * len(cases)
    if available == 0:
        raise DatasetError(
            f"no {task} pairs survive the tokenizer's checks for every case; "
            "its answers or nouns split into several tokens"
        )
    if n is None:
        n = min(available, MAX_PAIRS - MAX_PAIRS % len(cases))
    elif n > available:
        raise DatasetError(
            f"task {task} has only {available} pairs balanced over its {len(cases)} cases"
            f"{' after tokenizer filtering' if tokenizer is not None else ''}; ask for n <= {available}"
        )
    rng = random.Random(seed)
    out: list[Pair] = []
    for i, case in enumerate(cases):
        quota = n // len(cases) + (1 if i < n % len(cases) else 0)
        out.extend(rng.sample(by_case[case], quota))
    rng.shuffle(out)
    return out


def train_test_split(
    pairs: Sequence[Pair], *, test_fraction: float = 0.2, seed: int = 0
) -> tuple[list[Pair], list[Pair]]:
    """Split pairs into shuffled train and test lists, keeping each case's share in both (deterministic)."""
    if not 0.0 < test_fraction < 1.0:
        raise NeurontraceError(f"test_fraction must be between 0 and 1 (exclusive), got {test_fraction}")
    groups: dict[str | None, list[Pair]] = {}
    for p in pairs:
        groups.setdefault(p.case, []).append(p)
    rng = random.Random(seed)
    train: list[Pair] = []
    test: list[Pair] = []
    for group in groups.values():
        group = list(group)
        rng.shuffle(group)
        k = round(len(group) * test_fraction)
        test.extend(group[:k])
        train.extend(group[k:])
    if not train or not test:
        raise DatasetError(
            f"splitting {len(pairs)} pairs with test_fraction {test_fraction} leaves an empty "
            f"{'test' if not test else 'train'} set; give more pairs or another test_fraction"
        )
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def write_sva(
    task: str,
    out_dir: str | os.PathLike,
    *,
    n: int | None = None,
    seed: int = 0,
    tokenizer: Any = None,
    test_fraction: float = 0.2,
) -> tuple[Path, Path]:
    """Generate ``task`` and write ``{task}_train.jsonl`` and ``{task}_test.jsonl`` in ``out_dir``, atomically.

    Returns the two paths (train, test).
    """
    pairs = generate_sva(task, n=n, seed=seed, tokenizer=tokenizer)
    train, test = train_test_split(pairs, test_fraction=test_fraction, seed=seed)
    out_dir = Path(out_dir)
    return (
        save_pairs(out_dir / f"{task}_train.jsonl", train),
        save_pairs(out_dir / f"{task}_test.jsonl", test),
    )

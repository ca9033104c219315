"""Tasks and datasets: clean/counterfactual pairs (Marks et al. JSONL) and the subject-verb agreement generators."""

from __future__ import annotations

from neurontrace.tasks.pairs import (
    FilterReport,
    Pair,
    check_pairs,
    filter_pairs,
    filter_report,
    load_pairs,
    save_pairs,
)
from neurontrace.tasks.sva import SVA_TASKS, generate_sva, train_test_split, write_sva

__all__ = [
    "SVA_TASKS",
    "FilterReport",
    "Pair",
    "check_pairs",
    "filter_pairs",
    "filter_report",
    "generate_sva",
    "load_pairs",
    "save_pairs",
    "train_test_split",
    "write_sva",
]

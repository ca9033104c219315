"""``neurontrace tasks``: write the project's own task datasets (SVA) as train/test JSONL files."""

from __future__ import annotations

import argparse

from neurontrace.errors import NeurontraceError
from neurontrace.tasks import SVA_TASKS, write_sva

TASK_NAMES = tuple(f"sva-{t.replace('_', '-')}" for t in SVA_TASKS)


def sva_task(name: str) -> str:
    """``sva-within-rc`` -> ``within_rc``; a clear error for unknown names."""
    if name not in TASK_NAMES:
        raise NeurontraceError(f"unknown task {name!r}; choose one of {', '.join(TASK_NAMES)}")
    return name.removeprefix("sva-").replace("-", "_")


def run_tasks(args: argparse.Namespace) -> None:
    tokenizer = None
    if args.model:
        from neurontrace.commands._common import model_from_args

        tokenizer = model_from_args(args).tokenizer
    train, test = write_sva(
        sva_task(args.task),
        args.out,
        n=args.n,
        seed=args.seed,
        tokenizer=tokenizer,
        test_fraction=args.test_fraction,
    )
    print(f"wrote {train} and {test}")

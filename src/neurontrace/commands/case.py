"""``neurontrace case``: run a case study and write its report folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from neurontrace.commands._common import model_from_args
from neurontrace.errors import NeurontraceError


def run_case(args: argparse.Namespace) -> None:
    from neurontrace.casestudies.addition import run_addition

    try:
        low, high = (int(v) for v in args.operands.split("-"))
    except ValueError:
        raise NeurontraceError(f"--operands must look like 10-29, got {args.operands!r}") from None
    if not 0 <= low < high <= 99 or high - low < 3:
        raise NeurontraceError("--operands must be a range of at least 4 values within 0-99, e.g. 10-29")
    model = model_from_args(args)
    out = Path(args.out or f"results/case-{args.study}")
    report = run_addition(model, operands=range(low, high + 1), out=out, method=args.method)
    print(f"{report.n_prompts} prompts, teacher-forced accuracy {report.accuracy:.1%}")
    for name, counts in report.selective.items():
        print(f"  {name}: {sum(counts.values())} selective (neuron, class) pairs")
    print(f"Report: {out / 'report.md'}")


def add_case_parser(sub, add_model_args) -> None:
    p = sub.add_parser(
        "case",
        help="case studies (addition: neurons selective for the sum's digits)",
        description=(
            "addition: 'What is {x} + {y}? {x} + {y} =' over a grid of operands; RelP attribution of the answer's "
            "log-probability; per-class AUROC of every neuron for sum mod 10, sum mod 2 and the tens digit; a "
            "report folder with tables, heatmaps and JSON. The default 10-29 keeps every prompt and answer the "
            "same token length (mixed lengths confound the tens digit with answer length); 0-99 is the full grid."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_args(p)
    p.add_argument("study", choices=["addition"])
    p.add_argument("--operands", default="10-29", help="operand range LOW-HIGH (CPU default: a 20 x 20 grid)")
    p.add_argument("--method", default="relp", choices=["relp", "atp", "ig-inputs"])
    p.add_argument("--out", help="report folder (default results/case-STUDY)")

"""``neurontrace case``: run a case study (addition, capitals, antonyms) and write its report folder."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from neurontrace.commands._common import model_from_args
from neurontrace.errors import NeurontraceError
from neurontrace.io import check_folder_writable


def _operands(text: str) -> range:
    try:
        low, high = (int(v) for v in text.split("-"))
    except ValueError:
        raise NeurontraceError(f"--operands must look like 10-29, got {text!r}") from None
    if not 0 <= low < high <= 99 or high - low < 3:
        raise NeurontraceError("--operands must be a range of at least 4 values within 0-99, e.g. 10-29")
    return range(low, high + 1)


def run_case(args: argparse.Namespace) -> None:
    operands = _operands(args.operands) if args.study == "addition" else None
    languages = [g.strip() for g in args.languages.split(",") if g.strip()]
    out = Path(args.out or f"results/case-{args.study}")
    check_folder_writable(out, what="--out")  # a file in the way or a read-only disk: before the model loads
    model = model_from_args(args)
    start = time.perf_counter()
    if args.study == "addition":
        from neurontrace.casestudies.addition import run_addition

        report = run_addition(model, operands=operands, out=out, method=args.method)
        print(f"{report.n_prompts} prompts, teacher-forced accuracy {report.accuracy:.1%}")
        for name, counts in report.selective.items():
            print(f"  {name}: {sum(counts.values())} selective (neuron, class) pairs")
    elif args.study == "capitals":
        from neurontrace.casestudies.capitals import run_capitals

        report = run_capitals(model, out=out, n_states=args.states, method=args.method)
        for name, acc in report.accuracy.items():
            print(f"  {name}: next token right on {acc:.0%} of {report.n_states} prompts")
        for name, s in report.steering.items():
            print(
                f"  {name} state-neuron swap: answer becomes the other state's capital in {s['switched']:.0%} of "
                f"{s['pairs']} pairs (random-neuron control {s['switched_control']:.0%})"
            )
    else:
        from neurontrace.casestudies.antonyms import run_antonyms

        report = run_antonyms(model, out=out, languages=languages, method=args.method)
        print("  answer right: " + ", ".join(f"{g} {a:.0%}" for g, a in report.accuracy.items()))
        for name, counts in report.selective.items():
            print(f"  {name}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    print(f"Done in {time.perf_counter() - start:.0f} s. Report: {out / 'report.md'}")


def add_case_parser(sub, add_model_args) -> None:
    p = sub.add_parser(
        "case",
        help="case studies: addition, two-hop capitals, multilingual antonyms (report folders)",
        description=(
            "addition: 'What is {x} + {y}? {x} + {y} =' over a grid of operands; per-class AUROC of every neuron's "
            "RelP attribution for sum mod 10, sum mod 2 and the tens digit (the default 10-29 keeps every prompt "
            "and answer one token length; 0-99 is the full grid). "
            "capitals: 'What is the capital of the state containing {city}?' for one city per US state, plus the "
            "one-hop prompts; city, state, 'say a capital' and 'say {capital}' neurons; swapping the state neurons "
            "of two prompts and how often the answer follows. "
            "antonyms: 'What is the opposite of {word}?' in several languages; language-specific versus shared "
            "concept and attribute neurons; steering the strongest shared one in every language. "
            "Each writes report.md, plots, JSON, and an attribution graph (JSON + offline HTML viewer)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_args(p)
    p.add_argument("study", choices=["addition", "capitals", "antonyms"])
    p.add_argument(
        "--operands", default="10-29", help="addition: operand range LOW-HIGH (CPU default 20 x 20)"
    )
    p.add_argument("--states", type=int, default=None, help="capitals: the first N states (default all 50)")
    p.add_argument(
        "--languages", default="en,fr,de,es,it,pt", help="antonyms: comma-separated language codes"
    )
    p.add_argument("--method", default="relp", choices=["relp", "atp", "ig-inputs"])
    p.add_argument("--out", help="report folder (default results/case-STUDY)")

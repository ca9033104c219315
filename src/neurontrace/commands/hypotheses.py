"""``neurontrace hypotheses``: which neurons' attribution separates labelled classes of prompts (per-class AUROC)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from neurontrace.commands._common import model_from_args
from neurontrace.errors import DatasetError
from neurontrace.io import check_writable, text_lines


def read_labelled(path: str | Path, label_key: str) -> tuple[list[str], list[str], list]:
    """Prompts, answers and labels from a JSONL file with ``prompt``, ``answer`` and ``label_key`` on each line."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"no such file: {path}")
    prompts, answers, labels = [], [], []
    for number, line in text_lines(path):  # split on "\n" only: a JSON string may hold U+2028
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompts.append(row["prompt"])
            answers.append(row["answer"])
            labels.append(row[label_key])
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise DatasetError(
                f"{path}:{number}: each line must be a JSON object with 'prompt', 'answer' and {label_key!r} ({exc})"
            ) from None
    if not prompts:
        raise DatasetError(f"{path} has no examples")
    return prompts, answers, [tuple(x) if isinstance(x, list) else x for x in labels]


def run_hypotheses(args: argparse.Namespace) -> None:
    from neurontrace.circuits.hypotheses import attribute_prompts, score_hypotheses

    prompts, answers, labels = read_labelled(args.data, args.label)
    check_writable(args.out, what="--out")  # before the model loads
    model = model_from_args(args)
    result = attribute_prompts(
        model, prompts, answers, method=args.method, batch_size=args.batch_size, progress=True
    )
    scores = score_hypotheses(result, labels, high=args.high, low=args.low)
    out = Path(args.out)
    scores.save(out)
    chosen = scores.selective()
    print(
        f"{len(prompts)} prompts, {len(scores.classes)} classes; {len(chosen)} selective (neuron, class) pairs"
    )
    print("| neuron | class | AUROC | in-class mean (share of metric) | out-of-class mean (share) |")
    print("|---|---|---|---|---|")
    share = lambda v: "n/a" if v is None else f"{v:+.3f}"  # noqa: E731
    for s in chosen[: args.top]:
        print(
            f"| {s.node} | {s.class_label} | {s.auroc:.3f} | {s.in_class_mean:+.4f} ({share(s.in_class_share)}) | "
            f"{s.out_class_mean:+.4f} ({share(s.out_class_share)}) |"
        )
    print(f"Scores: {out}")


def add_hypotheses_parser(sub, add_model_args) -> None:
    p = sub.add_parser(
        "hypotheses",
        help="per-class AUROC of every neuron's attribution over labelled prompts (selective neurons)",
        description=(
            "Attribute each prompt's answer (teacher-forced log-probability, RelP by default), sum each neuron's "
            "attribution over positions, and score every neuron per class with one-vs-rest AUROC (a neuron that "
            "does not fire on a prompt counts as 0). Selective: AUROC >= --high (higher in class) or <= --low. "
            'Input: JSONL lines like {"prompt": "What is 13 + 24? 13 + 24 =", "answer": " 37", "label": 7}.'
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_args(p)
    p.add_argument("data", help="JSONL file of labelled prompts")
    p.add_argument("--label", default="label", help="the key of the class label in each line")
    p.add_argument("--method", default="relp", choices=["relp", "atp", "ig-inputs"])
    p.add_argument("--high", type=float, default=0.9)
    p.add_argument("--low", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--top", type=int, default=20, help="rows of the printed table")
    p.add_argument("--out", default="results/hypotheses.json", help="where the scores are written (JSON)")

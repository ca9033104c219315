"""``neurontrace evaluate``: trace circuits on a task and prove them with faithfulness/completeness curves."""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import time
from pathlib import Path

from neurontrace import distributed
from neurontrace.commands._common import model_from_args
from neurontrace.commands.tasks import sva_task
from neurontrace.errors import NeurontraceError
from neurontrace.evaluation.report import write_report
from neurontrace.evaluation.runner import EvaluationRun, run_evaluation
from neurontrace.tasks import filter_pairs, generate_sva, load_pairs, train_test_split


def _split_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def load_data(args: argparse.Namespace, tokenizer) -> tuple[list, list, str]:
    """(train, test, description) from --task or --dataset/--test-dataset, filtered for the tokenizer."""
    n_train, n_test = args.n_train, args.n_test
    if (args.task is None) == (args.dataset is None):
        raise NeurontraceError("give either --task (e.g. sva-nounpp) or --dataset FILE.jsonl")
    if args.task is not None:
        task = sva_task(args.task)
        pairs = generate_sva(task, n=n_train + n_test, seed=args.seed, tokenizer=tokenizer)
        train, test = train_test_split(pairs, test_fraction=n_test / (n_train + n_test), seed=args.seed)
        return train, test, f"{args.task} (neurontrace generator, seed {args.seed})"
    pairs = filter_pairs(load_pairs(args.dataset), tokenizer)
    if args.test_dataset:
        test = filter_pairs(load_pairs(args.test_dataset), tokenizer)
        train = pairs
    else:
        train, test = train_test_split(pairs, test_fraction=0.2, seed=args.seed)
    rng = random.Random(args.seed)
    train = rng.sample(train, min(n_train, len(train)))
    test = rng.sample(test, min(n_test, len(test)))
    if not train or not test:
        raise NeurontraceError(
            f"{args.dataset}: no usable pairs for this tokenizer (single-token answers, equal lengths)"
        )
    return train, test, f"{args.dataset}" + (f" / {args.test_dataset}" if args.test_dataset else "")


def run_evaluate(args: argparse.Namespace) -> None:
    if args.n_train < 1 or args.n_test < 1 or args.points < 1:
        raise NeurontraceError("--n-train, --n-test and --points must be at least 1")
    out = Path(args.out)
    if args.fresh and out.exists() and distributed.is_main():
        shutil.rmtree(out)
    distributed.barrier()  # under torchrun: the others look at --out only once it is cleared
    model = model_from_args(args)
    train, test, description = load_data(args, model.tokenizer)
    run = EvaluationRun(
        model=model.name,
        data=description,
        methods=_split_list(args.methods),
        bases=_split_list(args.bases),
        ablation=args.ablation,
        nodes=args.nodes,
        n_train=len(train),
        n_test=len(test),
        steps=args.steps,
        points=args.points,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    run.validate()
    log = lambda msg: print(msg, file=sys.stderr, flush=True) if distributed.is_main() else None  # noqa: E731
    log(f"[neurontrace] evaluating {', '.join(run.methods)} on {', '.join(run.bases)}: {len(train)} train / "
        f"{len(test)} test pairs of {description}; results in {out}")  # fmt: skip
    start = time.perf_counter()
    curves = run_evaluation(model, run, train=train, test=test, out=out, log=log)
    if not distributed.is_main():
        return
    notes = [
        f"Model: {model.name} ({model.adapter.family}, {model.n_layers} layers x {model.d_ff} neurons). "
        f"Data: {description}; {len(train)} train pairs (attribution), {len(test)} test pairs (evaluation).",
        f"Ablation: {run.ablation}. Nodes: {run.nodes}. Total time {time.perf_counter() - start:.0f} s.",
    ]
    report = write_report(
        curves, out, title=f"Circuits for {description.split(' ')[0]} on {model.name}", notes=notes
    )
    print((out / "report.md").read_text().split("![")[0].rstrip())
    print(f"\nReport: {report}\nPlot:   {out / 'faithfulness.png'}")


def add_evaluate_parser(sub, add_model_args) -> None:
    p = sub.add_parser(
        "evaluate",
        help="trace circuits on a task and measure faithfulness/completeness curves (the main job)",
        description=(
            "Attribute the task's metric (logit difference) on the train split with each method and basis, select "
            "circuits over a threshold sweep, and measure on the test split how faithful (near 1 is good) and how "
            "complete (near 0 is good) each circuit is when everything outside it is ablated. Writes JSON curves, "
            "a PNG plot and a markdown summary to --out; an interrupted run resumes there."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_args(p)
    p.add_argument(
        "--task", help="sva-simple, sva-nounpp, sva-rc or sva-within-rc (the project's generators)"
    )
    p.add_argument(
        "--dataset", help="a JSONL dataset of pairs (Marks format); split 80/20 unless --test-dataset"
    )
    p.add_argument("--test-dataset", help="a separate JSONL test set")
    p.add_argument(
        "--methods",
        default="relp,atp,random",
        help="comma list of relp, atp, ig, ig-inputs, exact, delta, random",
    )
    p.add_argument(
        "--bases", default="neurons,mlp-out,resid", help="comma list of neurons, mlp-out, resid, attn-out"
    )
    p.add_argument("--ablation", default="mean", choices=["mean", "zero", "resample"])
    p.add_argument("--nodes", default="per-position", choices=["per-position", "summed"])
    p.add_argument("--n-train", type=int, default=128, help="train pairs (attribution)")
    p.add_argument("--n-test", type=int, default=64, help="test pairs (evaluation)")
    p.add_argument("--steps", type=int, default=16, help="integrated-gradients steps")
    p.add_argument(
        "--points", type=int, default=30, help="thresholds in the sweep: [0] + logspace(-6, 0, POINTS)"
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/evaluate", help="results folder")
    p.add_argument("--fresh", action="store_true", help="delete --out first instead of resuming")

"""``neurontrace evaluate``: trace circuits on a task and prove them with faithfulness/completeness curves."""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neurontrace import distributed
from neurontrace.commands._common import (
    add_node_args,
    add_rule_args,
    model_from_args,
    rules_from_args,
    rules_given,
)
from neurontrace.commands.tasks import sva_task
from neurontrace.errors import NeurontraceError
from neurontrace.evaluation.report import write_report
from neurontrace.evaluation.runner import EvaluationRun, dictionary_fingerprint, is_dictionary, run_evaluation
from neurontrace.tasks import FilterReport, filter_report, generate_sva, load_pairs, train_test_split
from neurontrace.tasks.pairs import REASON_LENGTH


def _split_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


ONE_LENGTH_SHARE = 0.95
"""``--nodes auto`` keeps per-position nodes when at least this share of the usable pairs has one token length."""


@dataclass
class Data:
    """The pairs of every seed's split, how nodes align, and what was kept or dropped (and why)."""

    splits: dict[int, tuple[list, list]]
    description: str
    nodes: str
    kept: dict[str, Any] = field(default_factory=dict)  # for config.json and report.md
    message: str = ""


REASON_SLOTS = "another number of template slots than the most common one"


def _resolve_nodes(requested: str, report: FilterReport) -> str:
    """auto: per-position when >= 95% of the usable pairs share one token length, else slots when every pair
    has template slots, else summed."""
    if requested != "auto":
        return requested
    lengths = report.lengths
    if not lengths or max(lengths.values()) >= ONE_LENGTH_SHARE * sum(lengths.values()):
        return "per-position"
    return "slots" if all(p.slots is not None for p in report.kept) else "summed"


def _filtered(pairs: list, tokenizer, nodes: str, name: str) -> tuple[FilterReport, str]:
    probe = filter_report(pairs, tokenizer, one_length=False)
    nodes = _resolve_nodes(nodes, probe)
    report = filter_report(pairs, tokenizer, one_length=True) if nodes == "per-position" else probe
    if nodes == "slots" and report.kept:
        missing = sum(p.slots is None for p in report.kept)
        if missing:
            raise NeurontraceError(
                f"{name}: {missing} of {report.n_kept} pairs have no 'slots' list; --nodes slots needs slots in "
                "every pair (use --nodes summed for free-form pairs)"
            )
        counts = Counter(len(p.slots) for p in report.kept)
        best = max(counts, key=lambda k: (counts[k], -k))
        if len(counts) > 1:
            report.dropped[REASON_SLOTS] = sum(c for k, c in counts.items() if k != best)
            report.kept = [p for p in report.kept if len(p.slots) == best]
    if not report.kept:
        raise NeurontraceError(
            f"{name}: no usable pairs for this tokenizer ({report.describe()}); answers must be one token and "
            "clean/counterfactual prefixes of equal token length"
        )
    return report, nodes


def load_data(args: argparse.Namespace, tokenizer) -> Data:
    """Every seed's (train, test) from --task or --dataset/--test-dataset, filtered for the tokenizer, with the
    node alignment (--nodes auto: per-position when >= 95% of the pairs share one token length, else summed)."""
    seeds = [args.seed + i for i in range(args.seeds)]
    if (args.task is None) == (args.dataset is None):
        raise NeurontraceError("give either --task (e.g. sva-nounpp) or --dataset FILE.jsonl")
    if args.task is not None:
        task = sva_task(args.task)
        n_train = 128 if args.n_train is None else args.n_train
        n_test = 64 if args.n_test is None else args.n_test
        splits = {}
        for seed in seeds:
            pairs = generate_sva(task, n=n_train + n_test, seed=seed, tokenizer=tokenizer)
            splits[seed] = train_test_split(pairs, test_fraction=n_test / (n_train + n_test), seed=seed)
        report, nodes = _filtered(splits[seeds[0]][0] + splits[seeds[0]][1], tokenizer, args.nodes, args.task)
        message = f"{args.task}: {n_train + n_test} generated pairs per seed; " + report.describe()
        if nodes == "per-position" and report.n_kept < report.total:
            raise NeurontraceError(f"{args.task}: prompts of several token lengths; use --nodes summed")
        kept = {"source": "generator", **report.to_dict()}
        return Data(
            splits, f"{args.task} (neurontrace generator, seeds {seeds[0]}-{seeds[-1]})", nodes, kept, message
        )
    report, nodes = _filtered(load_pairs(args.dataset), tokenizer, args.nodes, args.dataset)
    messages = [f"{args.dataset}: {report.describe()}"]
    kept = {"dataset": report.to_dict()}
    test_report = None
    if args.test_dataset:
        test_report, _ = _filtered(load_pairs(args.test_dataset), tokenizer, nodes, args.test_dataset)
        messages.append(f"{args.test_dataset}: {test_report.describe()}")
        kept["test_dataset"] = test_report.to_dict()
    if nodes == "per-position" and report.dropped.get(REASON_LENGTH):
        messages.append("use --nodes summed to keep every length")
    splits = {}
    for seed in seeds:
        if test_report is not None:
            train, test = list(report.kept), list(test_report.kept)
        else:
            train, test = train_test_split(report.kept, test_fraction=0.2, seed=seed)
        rng = random.Random(seed)
        train = rng.sample(train, min(args.n_train or len(train), len(train)))
        test = rng.sample(test, min(args.n_test or len(test), len(test)))
        splits[seed] = (train, test)
    name = f"{args.dataset}" + (f" / {args.test_dataset}" if args.test_dataset else "")
    return Data(splits, name, nodes, kept, "; ".join(messages))


MARKER = ".neurontrace-evaluation"
"""Written by ``evaluate`` in its results folder before the run: the folder is an evaluation's, so ``--fresh``
may clear it even when its ``config.json`` was damaged."""
WRITTEN = ("config.json", "curves.json", "curves", "attributions", "report.md", "faithfulness.png", MARKER)
"""What an evaluation writes in its folder: all that ``--fresh`` deletes (with their temporary files)."""
CONFIG_KEYS = frozenset(
    ("model", "data", "methods", "bases", "ablation", "nodes", "n_train", "n_test", "steps", "points", "seed")
)
"""Keys the ``config.json`` of every version has held (EvaluationRun's first fields): how a results folder is
recognised, also one written before the marker existed. A model's config.json has none of methods/bases/ablation."""


def _folder_state(out: Path) -> tuple[str, str]:
    """What ``out`` holds, and why: ``new`` (nothing there, or an empty folder), ``ours`` (an evaluation's
    results), ``damaged`` (ours, with a config.json that cannot be read), ``foreign`` (a config.json that is not
    an evaluation's: a model folder, say) or ``other`` (files, none of them an evaluation's config)."""
    if not out.exists():
        return "new", ""
    if not out.is_dir():
        raise NeurontraceError(f"--out {out} is a file, not a results folder; choose another --out")
    config, marked = out / "config.json", (out / MARKER).is_file()
    if not config.exists():
        if marked:
            return "ours", "a run started here and wrote no config.json yet"
        return ("other", "no config.json") if any(out.iterdir()) else ("new", "")
    try:
        settings = json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON (a truncated write), absurdly nested
        why = (f"not JSON: {exc.msg} at line {exc.lineno}" if isinstance(exc, json.JSONDecodeError)
               else "not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else "not JSON")  # fmt: skip
        if marked:
            return "damaged", why
        return "foreign", (f"holds a config.json that is {why} and no evaluation marker ({MARKER}), so "
                           "neurontrace cannot tell that it wrote this folder")  # fmt: skip
    if isinstance(settings, dict) and settings.keys() >= CONFIG_KEYS:
        return "ours", ""
    return (
        "foreign",
        "holds a config.json that is not an evaluation's (a model folder's?): not a results folder",
    )


def check_out(out: Path, *, fresh: bool) -> None:
    """Everything about ``--out`` that can be known before the model loads, in one line each, changing nothing:
    a file in the way, a folder where files cannot be created (read-only: an ``OSError``), a folder neurontrace
    did not write, or a config.json too damaged to resume from."""
    from neurontrace.io import check_folder_writable

    state, why = _folder_state(out)
    check_folder_writable(out, what="--out")
    if state == "foreign":
        raise NeurontraceError(
            f"--out {out} {why}; nothing was {'deleted' if fresh else 'changed'}: choose an empty or new --out"
        )
    if state == "other" and fresh:
        raise NeurontraceError(
            f"--fresh: {out} is not an evaluation results folder (no config.json); nothing was deleted. "
            "Choose an empty or new --out"
        )
    if state == "damaged" and not fresh:
        raise NeurontraceError(
            f"{out / 'config.json'} is damaged ({why}), so the run there cannot be resumed: pass --fresh to "
            "start over (it deletes only what the evaluation wrote), or choose another --out"
        )


def _clear_for_fresh(out: Path) -> None:
    """``--fresh``: delete what an evaluation wrote in ``out`` (:data:`WRITTEN`), only when ``out`` is an
    evaluation's folder (:data:`MARKER`, or a config.json of ours); anything else there is kept, and said."""
    state, _ = _folder_state(out)
    if state == "new":
        return
    if state not in ("ours", "damaged"):  # check_out refused it already; checked again before deleting
        raise NeurontraceError(f"--fresh: {out} is not an evaluation results folder; nothing was deleted")
    kept = []
    for entry in sorted(out.iterdir()):
        if entry.name in WRITTEN or entry.name.startswith(tuple(f".{name}." for name in WRITTEN)):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        else:
            kept.append(entry.name)
    if kept:
        shown = ", ".join(kept[:5]) + (f" and {len(kept) - 5} more" if len(kept) > 5 else "")
        print(f"[neurontrace] --fresh: kept {shown} in {out} (not written by an evaluation)", file=sys.stderr)


def _mark(out: Path) -> None:
    """Write :data:`MARKER` in ``out`` (made if need be): this folder holds an evaluation's results."""
    from neurontrace import __version__
    from neurontrace.io import write_text_atomic

    if not (out / MARKER).is_file():
        marker = {"written_by": "neurontrace evaluate", "version": __version__}
        write_text_atomic(out / MARKER, json.dumps(marker) + "\n")


def _check_inputs(args: argparse.Namespace) -> None:
    """The task name and the dataset files' syntax (every line a pair), before the model loads."""
    if (args.task is None) == (args.dataset is None):
        raise NeurontraceError("give either --task (e.g. sva-nounpp) or --dataset FILE.jsonl")
    if args.task is not None:
        sva_task(args.task)
    for path in (args.dataset, args.test_dataset):
        if path is not None:
            load_pairs(path)


def run_evaluate(args: argparse.Namespace) -> None:
    if (args.n_train is not None and args.n_train < 1) or (args.n_test is not None and args.n_test < 1):
        raise NeurontraceError("--n-train and --n-test must be at least 1")
    if args.points < 1 or args.seeds < 1:
        raise NeurontraceError("--points and --seeds must be at least 1")
    try:
        levels = [float(x) for x in _split_list(args.levels)]
    except ValueError:
        raise NeurontraceError(f"--levels must be numbers such as 0.8,0.9, got {args.levels!r}") from None
    out = Path(args.out)
    settings = dict(
        methods=_split_list(args.methods), bases=_split_list(args.bases), ablation=args.ablation, steps=args.steps,
        points=args.points, batch_size=args.batch_size, seed=args.seed, seeds=args.seeds, grid=args.grid,
        levels=levels, scan_limit=args.scan_limit, error_nodes=args.error_nodes, **_attribution_settings(args),
        select=_split_list(args.select), full_passes=args.full_passes,
    )  # fmt: skip
    # every argument, input file and --out is checked before the model loads (which may take minutes)
    nodes = "summed" if args.nodes == "auto" else args.nodes  # auto is resolved from the data, after the load
    EvaluationRun(model=args.model, data="", nodes=nodes, **settings).validate()
    _check_inputs(args)
    if distributed.is_main():
        check_out(out, fresh=args.fresh)
    model = model_from_args(args)
    data = load_data(args, model.tokenizer)
    first_train, first_test = data.splits[args.seed]
    run = EvaluationRun(
        model=model.name,
        data=data.description,
        nodes=data.nodes,
        n_train=len(first_train),
        n_test=len(first_test),
        extra={"pairs": data.kept},
        **settings,
    )
    dictionaries = {b: dictionary_fingerprint(b) for b in run.bases if is_dictionary(b)}
    if dictionaries:
        run.extra["dictionaries"] = dictionaries  # resuming with a retrained dictionary is another run
    run.validate()
    if distributed.is_main():
        if args.fresh:
            _clear_for_fresh(out)  # after every argument was checked; only what an evaluation wrote
        _mark(out)
    distributed.barrier()  # under torchrun: the others look at --out only once it is cleared
    log = lambda msg: print(msg, file=sys.stderr, flush=True) if distributed.is_main() else None  # noqa: E731
    log(f"[neurontrace] {data.message}; nodes: {data.nodes}")
    log(f"[neurontrace] evaluating {', '.join(run.methods)} on {', '.join(run.bases)}: {len(first_train)} train / "
        f"{len(first_test)} test pairs of {data.description} x {args.seeds} seed(s); results in {out}")  # fmt: skip
    start = time.perf_counter()
    curves = run_evaluation(model, run, splits=data.splits, out=out, log=log)
    if not distributed.is_main():
        return
    notes = [
        f"Model: {model.name} ({model.adapter.family}, {model.n_layers} layers x {model.d_ff} neurons). "
        f"Data: {data.description}; {len(first_train)} train pairs (attribution), {len(first_test)} test pairs "
        f"(evaluation) per seed; seeds {', '.join(map(str, run.seed_list))}.",
        f"Pairs: {data.message}.",
        f"Ablation: {run.ablation}. Nodes: {run.nodes}. Grid: {run.grid} ({run.points} points). "
        f"Total time {time.perf_counter() - start:.0f} s.",
    ]
    report = write_report(
        curves, out, title=f"Circuits for {data.description.split(' ')[0]} on {model.name}", notes=notes
    )
    print((out / "report.md").read_text().split("![")[0].rstrip())
    print(f"\nReport: {report}\nPlot:   {out / 'faithfulness.png'}")


def _attribution_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The run's RelP rules (recorded unless they are the default), blacklist and suffix length."""
    from neurontrace.attribution.blacklist import load_blacklist
    from neurontrace.attribution.replacement import RelPRules

    relp = "relp" in _split_list(args.methods) or "edges" in _split_list(getattr(args, "select", "nodes"))
    if rules_given(args) and not relp:
        raise NeurontraceError(
            "--rules, --norm, --attention, --identity and --gate set RelP's rules; add relp to --methods or "
            "drop them"
        )
    rules = rules_from_args(args)
    blacklist = None if args.blacklist is None else load_blacklist(args.blacklist).to_list()
    return {
        "rules": None if rules == RelPRules() else rules.to_dict(),
        "blacklist": blacklist,
        "suffix_length": args.suffix_length,
    }


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
        "--bases",
        default="neurons,mlp-out,resid",
        help="comma list of neurons, mlp-out, resid, attn-out, sae:DIR (SAELens folders, e.g. from "
        "`neurontrace train-sae`) and transcoder:DIR (circuit-tracer transcoders)",
    )
    p.add_argument(
        "--error-nodes",
        default="count",
        choices=["count", "keep", "ablate"],
        help="a dictionary basis's error nodes (one per layer and position): count = nodes like any latent "
        "(Marks et al.), keep = never ablated and not counted, ablate = always ablated and not counted",
    )
    p.add_argument(
        "--select",
        default="nodes",
        help="how circuits are selected, a comma list: nodes = each method's top nodes by |score| (every "
        "--methods x --bases curve); edges = the neurons with a strong incoming and a strong outgoing edge in "
        "the attribution graphs of the train prompts (one graph per prompt, RelP; the threshold sweeps edge-weight "
        "percentiles), one 'relp-edges / neurons' curve on the same test set, ablation and metric; "
        "e.g. nodes,edges for both",
    )
    p.add_argument("--ablation", default="mean", choices=["mean", "zero", "resample"])
    p.add_argument(
        "--nodes",
        default="auto",
        choices=["auto", "per-position", "summed", "slots"],
        help="per-position: (layer, position, unit) nodes, prompts of one token length; summed: (layer, unit) "
        "nodes over every position, any lengths; slots: (layer, template slot, unit) nodes, any lengths, for "
        "pairs with 'slots' (the generators write them); auto: per-position when >= 95%% of the pairs share one "
        "length, else slots when every pair has them, else summed",
    )
    p.add_argument(
        "--n-train",
        type=int,
        default=None,
        help="train pairs per seed (default: 128 for --task, all for --dataset)",
    )
    p.add_argument(
        "--n-test",
        type=int,
        default=None,
        help="test pairs per seed (default: 64 for --task, all for --dataset)",
    )
    p.add_argument("--steps", type=int, default=16, help="integrated-gradients steps")
    p.add_argument(
        "--points", type=int, default=32, help="thresholds in the log grid: [0] + logspace(-6, 0, POINTS)"
    )
    p.add_argument(
        "--grid",
        default="log",
        choices=["log", "paper"],
        help="threshold grid: log (--points), or paper: [0] + logspace(-6, 0, 30) + [inf, -1]",
    )
    p.add_argument(
        "--levels", default="0.8,0.9", help="faithfulness levels whose exact smallest circuit is searched"
    )
    p.add_argument(
        "--scan-limit",
        type=int,
        default=64,
        help="most forwards of the upward scan of a level's bracket; wider brackets report the bisection "
        "crossing (an upper bound, marked <=)",
    )
    p.add_argument(
        "--full-passes",
        action="store_true",
        help="run every ablation pass in full, without the shortcuts that give the same metric up to rounding "
        "(the shared first tokens run once, MLPs on their kept neurons only, two logits per prompt): slower, "
        "and the curves then do not depend on how circuits share a pass",
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="train/test splits (seeds SEED, SEED+1, ...): intervals over seeds",
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/evaluate", help="results folder")
    add_rule_args(p)
    add_node_args(p, center=False)  # the metric is the logit difference, which centring does not change
    p.add_argument(
        "--fresh",
        action="store_true",
        help="replace the results in --out instead of resuming: in a folder an evaluation wrote (its "
        f"{MARKER} or config.json), only what it wrote is deleted; any other folder is refused",
    )

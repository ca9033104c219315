"""``neurontrace attribute``: score neurons for one prompt, or for a dataset of pairs (writes a result file)."""

from __future__ import annotations

import argparse
from pathlib import Path

from neurontrace import distributed
from neurontrace.attribution.api import attribute, remove_checkpoint, verify_top
from neurontrace.attribution.metrics import check_centred
from neurontrace.attribution.result import AttributionResult, NodeScore
from neurontrace.commands._common import model_from_args, rules_from_args, rules_given
from neurontrace.errors import NeurontraceError
from neurontrace.io import check_writable
from neurontrace.sites import check_site
from neurontrace.tasks import load_pairs

EXACT_NODE_LIMIT = 20_000


def format_table(nodes: list[NodeScore], exact: list[float] | None = None) -> str:
    header = f"  {'#':>3}  {'neuron':<14} {'pos':>4}  {'token':<16} {'activation':>11} {'score':>11}"
    lines = [header + (f" {'exact':>11}" if exact is not None else "")]
    for rank, n in enumerate(nodes, 1):
        pos = "all" if n.position is None else str(n.position)
        token = "" if n.token is None else repr(n.token)
        line = f"  {rank:>3}  {n.id:<14} {pos:>4}  {token[:16]:<16} {n.activation:>+11.4f} {n.score:>+11.5f}"
        if exact is not None:
            line += f" {exact[rank - 1]:>+11.5f}"
        lines.append(line)
    return "\n".join(lines)


def run_attribute(args: argparse.Namespace) -> None:
    if (args.prompt is None) == (args.dataset is None):
        raise NeurontraceError("give either --prompt (one example) or --dataset FILE.jsonl")
    if args.top < 1:
        raise NeurontraceError("--top must be at least 1")
    if args.dataset is not None and not Path(args.dataset).is_file():
        raise NeurontraceError(f"no such dataset file: {args.dataset}")
    check_site(args.site)  # an unknown site or a dictionary that is not there stops before the model loads
    if args.dataset is not None:
        load_pairs(args.dataset)  # a line that is not a pair stops before the model loads
    if args.center_logits:  # the metric attribute() will choose, checked before the model loads
        contrast = args.contrast is not None or args.dataset is not None
        check_centred(args.metric or ("logit-diff" if contrast else "logit" if args.answer else "topk"))
    out = None
    if args.out or args.dataset:
        out = Path(args.out or f"results/attribution-{args.method}.safetensors")
        check_writable(out, what="--out")  # before any compute
    if args.method != "relp" and rules_given(args):
        raise NeurontraceError(
            f"--rules, --norm, --attention, --identity and --gate set RelP's rules; --method {args.method} "
            "does not use them (drop them or use --method relp)"
        )
    rules = rules_from_args(args)
    model = model_from_args(args)
    if args.method == "exact" and args.prompt is not None:
        n_nodes = model.n_layers * model.d_ff * len(model.tokenize(args.prompt).ids(0))
        if n_nodes > EXACT_NODE_LIMIT:
            raise NeurontraceError(
                f"exact patching of all {n_nodes} nodes needs one forward each; use --method relp --verify K to "
                "patch only the top K nodes exactly"
            )
    common = dict(
        method=args.method,
        metric=args.metric,
        site=args.site,
        baseline=args.baseline,
        rules=rules,
        steps=args.steps,
        ig_rule=args.ig_rule,
        batch_size=args.batch_size,
        progress=True,
        center_logits=args.center_logits,
        suffix_length=args.suffix_length,
        blacklist=args.blacklist,
    )
    if args.prompt is not None:
        result = attribute(
            model,
            prompt=args.prompt,
            answer=args.answer,
            contrast=args.contrast,
            counterfactual=args.counterfactual,
            **common,
        )
    else:
        checkpoint = out.with_name(out.name + ".partial")
        result = attribute(model, dataset=args.dataset, checkpoint=checkpoint, keep_checkpoint=True, **common)
    m = result.metric_clean
    print(
        f"Model: {model.name}   method: {args.method}   site: {args.site}   metric: {result.meta['metric']}"
        + ("   centred logits" if args.center_logits else "")
    )
    if result.meta.get("rules"):
        print("RelP rules: " + ", ".join(f"{k}={v}" for k, v in result.meta["rules"].items()))
    if args.prompt is not None:
        line = f"metric on the prompt: {float(m[0]):+.4f}"
        if result.metric_patch is not None:
            line += f"   on the counterfactual: {float(result.metric_patch[0]):+.4f}"
        print(line)
        print(f"sign: a score estimates {result.meta['sign']}\n")
        nodes = result.top(args.top, per_position=True)
        exact = None
        if args.verify:
            nodes = nodes[: max(args.top, args.verify)]
            exact = verify_top(
                model,
                result,
                k=len(nodes),
                prompt=args.prompt,
                answer=args.answer,
                contrast=args.contrast,
                counterfactual=args.counterfactual,
            )
        print(format_table(nodes, exact))
    else:
        print(f"{result.n_examples} examples, mean metric {float(m.mean()):+.4f}")
        per_position = result.mean_scores is not None
        print(
            "Top neurons (mean over examples"
            + (", per position):" if per_position else ", summed over positions):")
        )
        print(format_table(result.top(args.top, per_position=per_position)))
    if out is not None:
        if distributed.is_main():
            try:
                path = result.save(out)
            except OSError as exc:
                kept = f"; the finished run is kept in {checkpoint}: rerun the same command to save it" if (
                    args.dataset is not None) else ""  # fmt: skip
                raise OSError(
                    exc.errno, f"could not write the result: {exc.strerror or exc}{kept}", str(out)
                ) from None
            print(f"\nwrote {path}")
        if args.dataset is not None:
            distributed.barrier()
            remove_checkpoint(checkpoint)  # only once the result is safely in place


def load_result(path: str) -> AttributionResult:
    return AttributionResult.load(path)

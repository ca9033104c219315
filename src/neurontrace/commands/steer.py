"""``neurontrace steer``: scale, set, add to or patch neurons and print how the prediction and the text change.

Building the parser imports nothing heavy (no torch), so that ``cli.py`` can add it to every invocation.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING

from neurontrace.errors import NeurontraceError
from neurontrace.io import check_writable, write_text_atomic
from neurontrace.neurons import parse_neurons

if TYPE_CHECKING:  # pragma: no cover
    from neurontrace.steering.steer import SteerResult, SweepResult

MODES = (
    "scale",
    "set",
    "add",
    "patch",
)  # = neurontrace.steering.steer.MODES (this module must not import torch)


def add_steer_parser(
    sub: argparse._SubParsersAction, add_model_args: Callable[[argparse.ArgumentParser], None]
):
    """Add the ``steer`` sub-command to ``sub``; ``add_model_args`` adds the common model options."""
    p = sub.add_parser(
        "steer",
        help="scale, set, add to or patch neurons; show the next-token and generated-text change",
        description=(
            "Steer neurons on one prompt and print the top next tokens before and after, the change of chosen "
            "answers, KL(before || after) and, with --generate, the greedy continuation before and after. "
            "'@pos' pins a neuron to one prompt position (-1 = the prompt's last token, also while generating); "
            "without it the edit applies at every position, generated tokens included. --mode scale --value 0 "
            "ablates; patch takes the neurons' values from --from-prompt."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_args(p)
    p.add_argument("--prompt", "-p", help="the prompt text (default with --graph: the graph's prompt)")
    p.add_argument(
        "--neurons",
        "-n",
        help="neurons to steer, e.g. 'L12/N345,L20/N7@-1' (@pos pins one prompt position); or give --cluster",
    )
    p.add_argument(
        "--cluster",
        metavar="FILE_OR_NAME",
        help="steer a whole cluster with one --value: a JSON file of nodes (['L3/N7@2', '12_345_3', ...] or "
        "{'name': ..., 'nodes': [...]}) or the label (or a unique part of it) of a supernode of --graph; prints "
        "the activation ratio after/before of every other supernode of --graph",
    )
    p.add_argument(
        "--graph",
        metavar="GRAPH.json",
        help="with --cluster: a graph file of `neurontrace graph` (its supernodes, else ones found on it, are the "
        "clusters; its prompt is the default --prompt)",
    )
    p.add_argument("--mode", default="scale", choices=MODES, help="scale (multiply), set, add, or patch")
    p.add_argument(
        "--site",
        default="neurons",
        help="the basis the units belong to: neurons (default), mlp_out, attn_out, resid, or a dictionary "
        "sae:DIR / transcoder:DIR (then L5/N3 is latent 3 of layer 5)",
    )
    p.add_argument("--value", type=float, default=0.0, help="the multiplier / value (unused by patch)")
    p.add_argument("--from-prompt", help="patch: the prompt whose activations are patched in")
    p.add_argument(
        "--answers",
        action="append",
        default=[],
        metavar="TOKENS",
        help="single-token answers to follow, comma-separated, e.g. ' are, is' (mind the leading space); repeatable",
    )
    p.add_argument("--top", type=int, default=10, help="how many next tokens to show")
    p.add_argument("--generate", type=int, default=0, metavar="N", help="also generate N tokens greedily")
    p.add_argument(
        "--sweep",
        metavar="VALUES",
        help="also sweep the value, e.g. 0,0.5,1,2,4 (write --sweep=-1,0,1 for a first negative value)",
    )
    p.add_argument(
        "--plot", metavar="FILE.png", help="with --sweep: plot answer probabilities against the value"
    )
    p.add_argument("--json", dest="json_out", metavar="FILE", help="also write the result as JSON to FILE")
    return p


def _answers(specs: list[str]) -> list[str]:
    out = []
    for spec in specs:
        out += [spec] if spec.strip() == "," else [a for a in spec.split(",") if a.strip()]
    return out


def _floats(spec: str) -> list[float]:
    try:
        values = [float(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise NeurontraceError(
            f"cannot read sweep values {spec!r}; write numbers separated by commas"
        ) from None
    if not values:
        raise NeurontraceError("--sweep needs at least one value, e.g. 0,0.5,1,2,4")
    return values


def format_steer(result: SteerResult) -> str:
    how = (
        f"{result.mode} {result.value:g}"
        if result.value is not None
        else f"patch from {result.from_prompt!r}"
    )
    lines = [
        f"Prompt: {result.prompt!r} ({len(result.tokens)} tokens)",
        f"Steering {', '.join(result.neurons)}: {how}",
        "",
        f"  {'#':>2}  {'before':<18} {'p':>7} {'logit':>8}   {'after':<18} {'p':>7} {'logit':>8}",
    ]
    for rank, (b, a) in enumerate(zip(result.top_before, result.top_after, strict=True), 1):
        lines.append(
            f"  {rank:>2}  {b.token!r:<18} {b.prob:7.4f} {b.logit:8.3f}   {a.token!r:<18} {a.prob:7.4f} {a.logit:8.3f}"
        )
    if result.answers:
        lines += ["", f"  {'answer':<16} {'p before':>9} {'p after':>9} {'change':>9} {'logit change':>13}"]
        for c in result.answers:
            lines.append(
                f"  {c.answer!r:<16} {c.prob_before:9.4f} {c.prob_after:9.4f} {c.prob_change:+9.4f} {c.logit_change:+13.4f}"
            )
    lines += ["", f"KL(before || after) = {result.kl_divergence:.5f} nats"]
    if result.generated_before is not None:
        lines += [
            "",
            f"Generated before: {result.generated_before!r}",
            f"Generated after:  {result.generated_after!r}",
        ]
    return "\n".join(lines)


def format_sweep(result: SweepResult) -> str:
    head = "".join(f" {a!r:>12}" for a in result.answers)
    lines = [
        f"Sweep of {result.mode} on {', '.join(result.neurons)} (answer probabilities):",
        f"  {'value':>8}{head}  top",
    ]
    lines.append(f"  {'none':>8}" + "".join(f" {p:12.4f}" for p in result.baseline_probs))
    for v, probs, top in zip(result.values, result.probs, result.top_tokens, strict=True):
        lines.append(f"  {v:>8g}" + "".join(f" {p:12.4f}" for p in probs) + f"  {top!r}")
    return "\n".join(lines)


def _run_cluster(args: argparse.Namespace) -> None:
    """``--cluster``: one edit for every neuron of a cluster, then the output change and the downstream ratios."""
    from pathlib import Path

    from neurontrace.commands._common import model_from_args
    from neurontrace.sites import check_site
    from neurontrace.steering.clusters import (
        find_cluster,
        format_ratios,
        graph_clusters,
        read_cluster,
    )

    if args.cluster is None:
        raise NeurontraceError("--graph goes with --cluster FILE_OR_NAME (the cluster to steer)")
    if args.neurons is not None:
        raise NeurontraceError("give --neurons or --cluster, not both")
    if args.mode == "patch" or args.sweep:
        raise NeurontraceError("a cluster is steered by --mode scale, set or add, without --sweep")
    check_site(args.site)
    graph_prompt, others = graph_clusters(args.graph) if args.graph else (None, [])  # the file read once
    if Path(args.cluster).is_file():
        cluster = read_cluster(args.cluster)
    elif args.graph:
        cluster = find_cluster(others, args.cluster)
    else:
        raise NeurontraceError(
            f"--cluster {args.cluster!r} is not a file; name a supernode label together with --graph GRAPH.json"
        )
    prompt = args.prompt if args.prompt is not None else graph_prompt
    if prompt is None:
        raise NeurontraceError("give --prompt (or --graph, whose prompt is then used)")
    from neurontrace.steering.clusters import steer_cluster

    if args.json_out:
        check_writable(args.json_out, what="--json")  # before the model loads
    model = model_from_args(args)
    result = steer_cluster(
        model,
        prompt=prompt,
        cluster=cluster,
        value=args.value,
        mode=args.mode,
        others=others,
        answers=_answers(args.answers),
        top=args.top,
        generate=args.generate,
        site=args.site,
    )
    if args.json_out:
        write_text_atomic(args.json_out, result.to_json())
    print(f"Model: {model.name} ({model.adapter.family}, {model.n_layers} layers x {model.d_ff} neurons)")
    print(f"Cluster {result.cluster!r}: {len(result.neurons)} neurons")
    print(format_steer(result.steer))
    print()
    print(format_ratios(result))


def run_steer(args: argparse.Namespace) -> None:
    from neurontrace.commands._common import model_from_args
    from neurontrace.steering.steer import steer, sweep

    if args.top < 1:
        raise NeurontraceError("--top must be at least 1")
    if args.generate < 0:
        raise NeurontraceError("--generate must be 0 or a positive number of tokens")
    if args.plot and not args.sweep:
        raise NeurontraceError("--plot draws a sweep; give --sweep VALUES too, e.g. --sweep 0,0.5,1,2,4")
    if args.sweep and args.mode == "patch":
        raise NeurontraceError("--sweep varies the value; use --mode scale, set or add")
    from neurontrace.sites import check_site

    if args.cluster is not None or args.graph is not None:
        return _run_cluster(args)
    if args.neurons is None or args.prompt is None:
        raise NeurontraceError("give --prompt and --neurons (or --cluster FILE_OR_NAME with --graph)")
    neurons = parse_neurons(args.neurons)
    check_site(args.site)
    answers = _answers(args.answers)
    values = _floats(args.sweep) if args.sweep else None
    if args.json_out:
        check_writable(args.json_out, what="--json")  # before the model loads
    model = model_from_args(args)
    result = steer(
        model,
        prompt=args.prompt,
        neurons=neurons,
        mode=args.mode,
        value=args.value,
        from_prompt=args.from_prompt,
        answers=answers,
        top=args.top,
        generate=args.generate,
        site=args.site,
    )
    swept = None
    if values is not None:
        swept = sweep(
            model,
            prompt=args.prompt,
            neurons=neurons,
            values=values,
            mode=args.mode,
            answers=answers,
            site=args.site,
        )
        if args.plot:
            swept.plot(args.plot)
    if args.json_out:
        data = {
            "schema_version": result.schema_version,
            "steer": asdict(result),
            "sweep": swept and asdict(swept),
        }
        write_text_atomic(args.json_out, json.dumps(data, indent=2))
    print(f"Model: {model.name} ({model.adapter.family}, {model.n_layers} layers x {model.d_ff} neurons)")
    print(format_steer(result))
    if swept is not None:
        print()
        print(format_sweep(swept))
        if args.plot:
            print(f"\nPlot written to {args.plot}")

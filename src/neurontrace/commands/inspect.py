"""``neurontrace inspect``: print the top next tokens, the most active neurons, and zeroing effects."""

from __future__ import annotations

import argparse

from neurontrace.commands._common import model_from_args
from neurontrace.errors import NeurontraceError
from neurontrace.inspection import InspectResult, inspect_prompt
from neurontrace.io import check_writable, write_text_atomic
from neurontrace.neurons import check_neuron, parse_neurons


def format_result(result: InspectResult) -> str:
    lines = [
        f"Prompt: {result.prompt!r} ({len(result.tokens)} tokens: {' '.join(repr(t) for t in result.tokens)})",
        "",
        "Top next tokens:",
    ]
    for rank, t in enumerate(result.top, 1):
        lines.append(f"  {rank:>2}. {t.token!r:<16} p={t.prob:.4f}  logit={t.logit:8.3f}")
    token = result.tokens[result.position]
    lines += ["", f"Most active neurons at position {result.position} ({token!r}), by |activation|:"]
    for layer_neurons in result.active:
        cells = "  ".join(f"{n.neuron:<12} {n.activation:+9.3f}" for n in layer_neurons)
        lines.append(f"  L{layer_neurons[0].layer:<3} {cells}")
    if result.answer is not None:
        a = result.answer
        what = (
            f"logit({a.answer!r}) - logit({a.contrast!r})"
            if a.contrast is not None
            else f"logit({a.answer!r})"
        )
        lines += ["", f"{what} = {a.logit_diff:+.4f}"]
    if result.counterfactual is not None:
        lines += [
            "",
            f"Neurons that differ most from {result.counterfactual!r} at that position (clean - counterfactual):",
        ]
        for n in result.most_changed:
            lines.append(f"  {n.neuron:<12} {n.activation:+9.3f}")
    if result.zero is not None:
        z = result.zero
        lines += ["", f"With {', '.join(z.zeroed)} zeroed:"]
        lines.append(f"  {'token':<16} {'p before':>9} {'p after':>9} {'change':>9}")
        for c in z.changes:
            change = c["prob_after"] - c["prob_before"]
            lines.append(
                f"  {c['token']!r:<16} {c['prob_before']:9.4f} {c['prob_after']:9.4f} {change:+9.4f}"
            )
        lines.append(f"  new top token: {z.top_after[0].token!r} (p={z.top_after[0].prob:.4f})")
        lines.append(f"  KL(before || after) = {z.kl_divergence:.5f} nats")
        if result.answer is not None and result.answer.logit_diff_after_zero is not None:
            lines.append(f"  answer score after zeroing: {result.answer.logit_diff_after_zero:+.4f}")
    return "\n".join(lines)


def run_inspect(args: argparse.Namespace) -> None:
    if args.top < 1 or args.per_layer < 1:
        raise NeurontraceError("--top and --per-layer must be at least 1")
    zero = [n for spec in args.zero for n in parse_neurons(spec)]
    if args.json_out:
        check_writable(args.json_out, what="--json")  # before the model loads
    model = model_from_args(args)
    for n in zero:
        check_neuron(model, n)
    result = inspect_prompt(
        model,
        args.prompt,
        top=args.top,
        per_layer=args.per_layer,
        position=args.position,
        zero=zero,
        answer=args.answer,
        contrast=args.contrast,
        counterfactual=args.counterfactual,
    )
    if args.json_out:
        write_text_atomic(args.json_out, result.to_json())
    print(f"Model: {model.name} ({model.adapter.family}, {model.n_layers} layers x {model.d_ff} neurons)")
    print(format_result(result))

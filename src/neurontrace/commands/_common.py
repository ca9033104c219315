"""Helpers shared by the CLI commands."""

from __future__ import annotations

import argparse

from neurontrace import distributed
from neurontrace.models.loading import load_model, parse_device_map
from neurontrace.models.model import NeuronModel


def model_from_args(args: argparse.Namespace) -> NeuronModel:
    """Load the model named by the common ``--model/--device/--dtype`` options, with progress on stderr."""
    return load_model(
        args.model,
        device=args.device,
        dtype=args.dtype,
        device_map=parse_device_map(getattr(args, "device_map", None)),
        offload_folder=getattr(args, "offload_folder", None),
        trust_remote_code=args.trust_remote_code,
        progress=distributed.is_main(),
    )


def _on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"must be on or off, got {text!r}")
    return text == "on"


def add_rule_args(p: argparse.ArgumentParser) -> None:
    """The RelP rule options (``--rules`` preset, then one flag per rule overriding it), for every RelP command."""
    from neurontrace.attribution.replacement import GATE_RULES, RULE_PRESETS

    group = p.add_argument_group(
        "RelP rules",
        "which LRP rules the replacement model applies (method relp; docs/attribution.md): the --rules "
        "preset, then each rule flag given (None: the preset's rule)",
    )
    group.add_argument(
        "--rules",
        default="relp",
        choices=list(RULE_PRESETS),
        help="preset: relp = every rule (METHOD.md); transluce = the paper's released code (TransluceAI/circuits): "
        "no attention rule, so gradient also flows through the softmax; none = plain gradients. The flags "
        "below override single rules of the preset",
    )
    group.add_argument(
        "--norm", type=_on_off, default=None, metavar="on|off", help="LN rule: the norms' scale is a constant"
    )
    group.add_argument(
        "--attention",
        type=_on_off,
        default=None,
        metavar="on|off",
        help="AH rule: queries and keys are constants, gradient flows through the values only",
    )
    group.add_argument(
        "--identity",
        type=_on_off,
        default=None,
        metavar="on|off",
        help="identity rule on the MLP activation (and a final-logit soft-cap): act(z) = z * (act(z)/z), "
        "the ratio a constant",
    )
    group.add_argument(
        "--gate",
        default=None,
        choices=list(GATE_RULES),
        help="gated MLPs: half = each factor of act(gate) * up gets half the gradient; detach = the gate is a "
        "constant (no-gate variant); plain = the product's ordinary gradient",
    )


def rules_from_args(args: argparse.Namespace):
    """The :class:`~neurontrace.attribution.replacement.RelPRules` of the options of :func:`add_rule_args`."""
    from neurontrace.attribution.replacement import rules_from

    return rules_from(
        args.rules, norm=args.norm, attention=args.attention, nonlinearity=args.identity, gate=args.gate
    )


def rules_given(args: argparse.Namespace) -> bool:
    """Whether any option of :func:`add_rule_args` was given (a command that runs no RelP then refuses them)."""
    return args.rules != "relp" or any(
        getattr(args, name) is not None for name in ("norm", "attention", "identity", "gate")
    )


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_node_args(p: argparse.ArgumentParser, *, center: bool = True) -> None:
    """``--blacklist`` and ``--suffix-length`` (which nodes may be selected) and, with ``center``,
    ``--center-logits`` (the metric)."""
    p.add_argument(
        "--blacklist",
        metavar="FILE",
        default=None,
        help="neurons that never become nodes (score 0 at every position), e.g. always-on neurons: a JSON list "
        'of [layer, neuron] pairs or ids, [[23, 306], "L20/N3972"] (the reference code\'s apply_blacklist); '
        "neurons site/basis only",
    )
    p.add_argument(
        "--suffix-length",
        type=_positive,
        default=None,
        metavar="N",
        help="only the last N token positions of each prompt can hold nodes, the others score 0, e.g. the final "
        "tokens of a chat-templated prompt (the reference code's suffix_length)",
    )
    if center:
        p.add_argument(
            "--center-logits",
            action="store_true",
            help="score logits minus their mean over the vocabulary (the reference code's center_logits); "
            "logit and topk metrics (graphs: the target logits)",
        )

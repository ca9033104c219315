"""The ``neurontrace`` command line.

Every user mistake (bad model spec, bad neuron id, multi-token answer...) ends in one line on stderr,
``neurontrace: error: ...``, and exit code 2; no traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from neurontrace import __version__

EXIT_USAGE = 2


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        "-m",
        default="smollm2-135m",
        help="hub id, local model folder, .gguf file, or alias: smollm2-135m (default, offline) or gemma3-270m",
    )
    p.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:1... (default: auto = CUDA if available)"
    )
    p.add_argument(
        "--dtype", default="float32", help="float32 (default, exact attribution), bfloat16 or float16"
    )
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow a hub repository's own Python code to run (only for repositories you trust)",
    )


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neurontrace",
        description=(
            "Circuit tracing in the neuron basis of Hugging Face causal LMs: find which MLP neurons "
            "produce a behaviour, and prove it by intervention."
        ),
    )
    parser.add_argument("--version", action="version", version=f"neurontrace {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "inspect",
        help="top next tokens, most active neurons per layer, and the effect of zeroing neurons",
        description=(
            "Run one prompt and print the top next tokens with probabilities, the most active neurons of each "
            "layer at one position (as L{layer}/N{index}{+|-}, the sign being the activation's polarity), and, "
            "with --zero, how the prediction changes when those neurons are zeroed."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_model_args(p)
    p.add_argument("--prompt", "-p", required=True, help="the prompt text")
    p.add_argument("--top", type=int, default=10, help="how many next tokens to show")
    p.add_argument("--per-layer", type=int, default=3, help="most active neurons shown per layer")
    p.add_argument("--position", type=int, default=-1, help="prompt position of the neuron table (-1 = last)")
    p.add_argument("--answer", help="a single-token answer to score, e.g. ' are' (mind the leading space)")
    p.add_argument("--contrast", help="a contrast answer: the score becomes logit(answer) - logit(contrast)")
    p.add_argument(
        "--counterfactual",
        help="a second prompt of the same token length: list the neurons whose activation differs most",
    )
    p.add_argument(
        "--json", dest="json_out", metavar="FILE", help="also write the full result as JSON to FILE"
    )
    p.add_argument(
        "--zero",
        action="append",
        default=[],
        metavar="NEURONS",
        help="neurons to zero, e.g. L5/N123 or 'L5/N123,L7/N9@-1' (@pos limits it to one position); repeatable",
    )

    sub.add_parser("models", help="list supported architecture families and model aliases")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from neurontrace.errors import NeurontraceError

    try:
        if args.command == "inspect":
            from neurontrace.commands.inspect import run_inspect

            run_inspect(args)
        elif args.command == "models":
            from neurontrace.commands.models import run_models

            run_models()
    except NeurontraceError as exc:
        print(f"neurontrace: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("neurontrace: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

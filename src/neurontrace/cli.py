"""The ``neurontrace`` command line.

Every user mistake (bad model spec, bad neuron id, multi-token answer...) ends in one line on stderr,
``neurontrace: error: ...``, and exit code 2; an operating-system failure (no space left, no permission) in one
line and exit code 3; no traceback (``NEURONTRACE_DEBUG=1`` shows it for the latter).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import os
import sys
from collections.abc import Sequence

from neurontrace import __version__

EXIT_USAGE = 2  # a user mistake: bad model, data, prompt or option
EXIT_ENVIRONMENT = 3  # the machine refused: no space left, no permission, a read-only folder
_PATH_KINDS = {
    errno.EEXIST: "a file is there where a folder is needed",
    errno.ENOTDIR: "a file is in the way: part of this path is a file, not a folder",
    errno.EISDIR: "is a folder where a file is written",
}
# command -> (module in neurontrace.commands, function taking the parsed arguments); imported on use
COMMANDS: dict[str, tuple[str, str]] = {
    "inspect": ("inspect", "run_inspect"),
    "attribute": ("attribute", "run_attribute"),
    "tasks": ("tasks", "run_tasks"),
    "evaluate": ("evaluate", "run_evaluate"),
    "graph": ("graph", "run_graph"),
    "steer": ("steer", "run_steer"),
    "describe": ("describe", "run_describe"),
    "case": ("case", "run_case"),
    "hypotheses": ("hypotheses", "run_hypotheses"),
    "estimate": ("estimate", "run_estimate"),
    "models": ("models", "run_models"),
    "view": ("view", "run_view"),
    "train-sae": ("train_sae", "run_train_sae"),
}


def _batch_size(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number or 'auto', got {text!r}") from None


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
        "--device-map",
        help="spread a large model with accelerate: auto, balanced, sequential, or a JSON object (or .json file) "
        'mapping every module with weights to a device, e.g. {"model.layers.21": "disk", ...}; overrides --device',
    )
    p.add_argument("--offload-folder", help="where --device-map puts weights offloaded to disk")
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow a hub repository's own Python code to run (only for repositories you trust)",
    )


def _build_parser() -> argparse.ArgumentParser:
    from neurontrace.commands._common import add_node_args, add_rule_args

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

    p = sub.add_parser(
        "attribute",
        help="score every neuron at every position for a prompt or a dataset (RelP by default)",
        description=(
            "Attribute a metric to every neuron at every layer and position. One prompt: --prompt with --answer "
            "(and --contrast for a logit difference, --counterfactual for a paired prompt of equal token length). "
            "A dataset: --dataset FILE.jsonl of {clean_prefix, patch_prefix, clean_answer, patch_answer} lines, "
            "run in batches with a progress bar; the result file is written to --out and an interrupted run "
            "resumes from its .partial checkpoint. Scores estimate m(patched) - m(clean) for counterfactuals, "
            "m(clean) - m(baseline) otherwise."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_model_args(p)
    p.add_argument("--prompt", "-p", help="the prompt text (one example)")
    p.add_argument("--answer", help="the answer token to score, e.g. ' are' (mind the leading space)")
    p.add_argument("--contrast", help="contrast answer: the metric becomes logit(answer) - logit(contrast)")
    p.add_argument("--counterfactual", help="a counterfactual prompt of the same token length (paired mode)")
    p.add_argument("--dataset", help="a JSONL dataset of clean/counterfactual pairs (Marks et al. format)")
    p.add_argument(
        "--method", default="relp", choices=["relp", "atp", "ig", "ig-inputs", "exact", "delta", "random"]
    )
    p.add_argument(
        "--metric",
        default=None,
        choices=["logit-diff", "logit", "logprob", "prob", "topk"],
        help="default: logit-diff with a contrast or for datasets, else logit; logprob teacher-forces multi-token answers",
    )
    p.add_argument(
        "--site",
        default="neurons",
        help="the basis: neurons (default), mlp_out, attn_out, resid, or sae:DIR, a SAELens dictionary (one SAE "
        "folder, or a folder of them, one a layer); its units are the latents, then the error components",
    )
    p.add_argument(
        "--baseline", default="zero", choices=["zero", "mean"], help="baseline without a counterfactual"
    )
    add_rule_args(p)
    add_node_args(p)
    p.add_argument("--steps", type=int, default=32, help="integrated-gradients steps")
    p.add_argument(
        "--ig-rule", default="midpoint", choices=["midpoint", "left"], help="integrated-gradients rule"
    )
    p.add_argument(
        "--batch-size",
        type=_batch_size,
        default=8,
        help="prompts per batch, or 'auto' (the largest that fits in a quarter of the free memory)",
    )
    p.add_argument("--top", type=int, default=20, help="how many neurons to print")
    p.add_argument("--verify", type=int, default=0, metavar="K", help="also patch the top K nodes exactly")
    p.add_argument(
        "--out",
        help="result file (.safetensors); default for datasets: results/attribution-METHOD.safetensors",
    )

    p = sub.add_parser(
        "tasks",
        help="generate a task dataset (subject-verb agreement) as train/test JSONL",
        description=(
            "Write {task}_train.jsonl and {task}_test.jsonl of clean/counterfactual pairs from the project's own "
            "generators. With --model, pairs are filtered for that tokenizer: single-token answers, equal "
            "clean/counterfactual lengths, and one length per set."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_model_args(p)
    p.set_defaults(model=None)
    p.add_argument(
        "--task",
        required=True,
        choices=["sva-simple", "sva-nounpp", "sva-rc", "sva-within-rc"],
        help="which task",
    )
    p.add_argument("--out", default="data", help="output folder")
    p.add_argument("--n", type=int, default=None, help="number of pairs (default: all balanced combinations)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-fraction", type=float, default=0.2)

    from neurontrace.commands.case import add_case_parser
    from neurontrace.commands.describe import add_describe_parser
    from neurontrace.commands.estimate import add_estimate_parser
    from neurontrace.commands.evaluate import add_evaluate_parser
    from neurontrace.commands.graph import add_graph_parser
    from neurontrace.commands.hypotheses import add_hypotheses_parser
    from neurontrace.commands.steer import add_steer_parser
    from neurontrace.commands.train_sae import add_train_sae_parser
    from neurontrace.commands.view import add_view_parser

    add_evaluate_parser(sub, _add_model_args)
    add_graph_parser(sub, _add_model_args)
    add_steer_parser(sub, _add_model_args)
    add_describe_parser(sub, _add_model_args)
    add_case_parser(sub, _add_model_args)
    add_hypotheses_parser(sub, _add_model_args)
    add_estimate_parser(sub, _add_model_args)
    add_train_sae_parser(sub, _add_model_args)

    sub.add_parser("models", help="list supported architecture families and model aliases")
    add_view_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from neurontrace.distributed import stop_on_sigterm

    stop_on_sigterm()  # under torchrun: stopped by the launcher, print one line of ours
    code = _run(args)
    if code and _world_size() > 1:
        # under torchrun: leave now, skipping exit handlers that could wait on the other processes; they see the
        # connection close within seconds and stop too (torchrun stops the rest)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _world_size() -> int:
    from neurontrace.distributed import world

    return world().size


def _run(args: argparse.Namespace) -> int:
    from neurontrace.distributed import PeerStopped, is_main, stopping
    from neurontrace.errors import NeurontraceError

    try:
        module, function = COMMANDS[args.command]
        with contextlib.ExitStack() as stack:
            if not is_main():  # launched by torchrun: only the main process prints (all of them compute)
                stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
            getattr(importlib.import_module(f"neurontrace.commands.{module}"), function)(args)
    except NeurontraceError as exc:
        print(f"neurontrace: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # the environment, not the input: one line, and what was written stays intact
        if os.environ.get("NEURONTRACE_DEBUG"):
            raise
        in_the_way = _PATH_KINDS.get(exc.errno)
        if in_the_way:  # a path of the wrong kind is the user's choice of --out, not the machine's fault
            print(f"neurontrace: error: {exc.filename}: {in_the_way}; choose another --out", file=sys.stderr)
            return EXIT_USAGE
        where = f" ({exc.filename})" if exc.filename else ""
        print(
            f"neurontrace: error: {exc.strerror or exc}{where}; files written before are intact "
            "(set NEURONTRACE_DEBUG=1 for a traceback)",
            file=sys.stderr,
        )
        return EXIT_ENVIRONMENT
    except KeyboardInterrupt:
        stopping()
        print("neurontrace: interrupted", file=sys.stderr)
        return 130
    except PeerStopped as exc:  # under torchrun: a collective found another process gone
        if os.environ.get("NEURONTRACE_DEBUG"):
            raise
        stopping()  # the launcher's SIGTERM, which may come any moment now, adds no second line
        print(f"neurontrace: error: {exc}", file=sys.stderr)
        return EXIT_ENVIRONMENT
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""``neurontrace describe``: what neurons write (promoted/suppressed tokens) and where they fire, per polarity.

Building the parser imports nothing heavy (no torch), so that ``cli.py`` can add it to every invocation.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import asdict

from neurontrace.errors import NeurontraceError
from neurontrace.io import write_text_atomic
from neurontrace.neurons import parse_neurons

SCHEMA_VERSION = 1


def add_describe_parser(
    sub: argparse._SubParsersAction, add_model_args: Callable[[argparse.ArgumentParser], None]
):
    """Add the ``describe`` sub-command to ``sub``; ``add_model_args`` adds the common model options."""
    p = sub.add_parser(
        "describe",
        help="what neurons write (top promoted/suppressed tokens) and where they fire (top contexts)",
        description=(
            "Describe neurons per polarity: the tokens their output weights promote and suppress (through the "
            "final norm's weight and the unembedding), and their top-activating contexts over a corpus. "
            "L5/N3+ describes the neuron firing positively, L5/N3- negatively, L5/N3 both. The corpus scan is "
            "cached per model, corpus and layer, so more neurons of a scanned layer cost no model run."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_args(p)
    p.add_argument(
        "neurons", nargs="+", metavar="NEURON", help="neuron ids, e.g. L12/N345+ L3/N9- (or comma-separated)"
    )
    p.add_argument(
        "--corpus",
        default="model",
        help="'model' (text sampled from the model, offline), a .txt file, a folder of .txt files, hf:DATASET "
        "(needs pip install datasets), or 'none' for the writes only",
    )
    p.add_argument("--k", type=int, default=10, help="tokens and contexts shown per polarity")
    p.add_argument("--max-tokens", type=int, default=20_000, help="corpus tokens scanned")
    p.add_argument("--window", type=int, default=64, help="tokens per corpus window")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument(
        "--json", dest="json_out", metavar="FILE", help="also write the descriptions as JSON to FILE"
    )
    return p


def run_describe(args: argparse.Namespace) -> None:
    from neurontrace.commands._common import model_from_args
    from neurontrace.describe import describe_all

    if args.k < 1 or args.max_tokens < 1 or args.batch_size < 1:
        raise NeurontraceError("--k, --max-tokens and --batch-size must be at least 1")
    neurons = [n for spec in args.neurons for n in parse_neurons(spec)]
    if args.json_out:
        from neurontrace.io import check_writable

        check_writable(args.json_out, what="--json")  # before the model loads
    model = model_from_args(args)
    corpus = None if args.corpus.lower() == "none" else args.corpus
    descriptions = describe_all(
        model,
        neurons,
        corpus=corpus,
        k=args.k,
        window=args.window,
        max_tokens=args.max_tokens,
        batch_size=args.batch_size,
        progress=True,
    )
    if args.json_out:
        data = {
            "schema_version": SCHEMA_VERSION,
            "model": model.name,
            "corpus": corpus,
            "neurons": [asdict(d) for d in descriptions],
        }
        write_text_atomic(args.json_out, json.dumps(data, indent=2))
    print(f"Model: {model.name} ({model.adapter.family}, {model.n_layers} layers x {model.d_ff} neurons)")
    for d in descriptions:
        print()
        print(d.format())

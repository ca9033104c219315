"""``neurontrace estimate``: expected peak memory of attribution and of graph edges, before a run."""

from __future__ import annotations

import argparse

from neurontrace.errors import NeurontraceError


def run_estimate(args: argparse.Namespace) -> None:

    from neurontrace.memory import estimate, gib
    from neurontrace.models.loading import load_model

    if args.prompt_len < 1 or args.nodes < 0 or args.batch_size < 1:
        raise NeurontraceError("--prompt-len and --batch-size must be at least 1, --nodes at least 0")
    if args.json:
        from neurontrace.io import check_writable

        check_writable(args.json, what="--json")  # a folder, a file in the way or a read-only disk: now
    model = load_model(args.model, device="meta", dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    from neurontrace.models.loading import resolve_device

    run_on = resolve_device(
        args.device
    )  # the device whose free memory counts; one that is not here is an error
    e = estimate(model, prompt_len=args.prompt_len, nodes=args.nodes, batch_size=args.batch_size,
                 paired=args.paired, device=run_on)  # fmt: skip
    free = e.available
    print(
        f"{model.name}: {model.n_layers} layers x {model.d_ff} neurons, {e.dtype}; prompt {e.prompt_len} tokens"
    )
    print(f"  weights:                       {gib(e.weights)}")
    print(f"  attribution (batch {e.batch_size}):          {gib(e.attribution_peak)} working memory")
    for part, n in e.attribution.items():
        if n:
            print(f"    {part + ':':33s}{gib(n)}")
    print(f"  graph ({e.nodes} neuron nodes):      {gib(e.graph_peak)} working memory")
    for part, n in e.graph.items():
        print(f"    {part + ':':50s}{gib(n)}")
    print(f"  free on {run_on}: {gib(free)}")
    for what, need in (("attribution", e.attribution_peak), ("graph", e.graph_peak)):
        total = e.weights + need
        verdict = (
            "fits"
            if total <= free
            else "does NOT fit: lower --batch-size / --prompt-len / --nodes, or use bfloat16"
        )
        print(f"  {what}: weights + working = {gib(total)}: {verdict}")
    if args.json:
        e.save(args.json)


def add_estimate_parser(sub, add_model_args) -> None:
    p = sub.add_parser(
        "estimate",
        help="expected peak memory of attribution and graph edges for a model and prompt length (no weights read)",
        description=(
            "Counts the tensors that attribution (one forward + backward over every neuron site) and graph edges "
            "(a batched backward over the graph's targets) keep alive at their peak, from the model's shape; "
            "checked against measured peaks on SmolLM2-135M (docs/benchmarks.md). Runs that would not fit stop "
            "early with the same estimate."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_args(p)
    p.add_argument("--prompt-len", type=int, required=True, help="tokens per prompt")
    p.add_argument("--nodes", type=int, default=200, help="neuron nodes of a graph")
    p.add_argument("--batch-size", type=int, default=1, help="prompts per attribution batch")
    p.add_argument(
        "--paired", action="store_true", help="clean/counterfactual pairs (keeps the patch activations)"
    )
    p.add_argument("--json", help="also write the estimate as JSON here")

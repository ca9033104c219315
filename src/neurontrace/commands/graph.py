"""``neurontrace graph``: build, prune and export the attribution graph of one prompt, with the HTML viewer."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from neurontrace.commands._common import model_from_args
from neurontrace.errors import NeurontraceError


def run_graph(args: argparse.Namespace) -> None:
    from neurontrace.describe.writes import describe_writes
    from neurontrace.graphs.build import NEURON, build_graph
    from neurontrace.graphs.export import save_graph, to_circuit_tracer
    from neurontrace.graphs.prune import prune_graph
    from neurontrace.io import write_text_atomic
    from neurontrace.neurons import NeuronId
    from neurontrace.viewer import write_viewer

    if not 0 < args.node_fraction <= 1 or not 0 < args.edge_fraction <= 1:
        raise NeurontraceError("--node-fraction and --edge-fraction must be in (0, 1]")
    model = model_from_args(args)
    answers = [a for a in (args.answer or [])]
    start = time.perf_counter()
    graph = build_graph(
        model,
        args.prompt,
        answers=answers or None,
        max_logits=args.max_logits,
        node_threshold=args.node_threshold,
        max_nodes=args.max_nodes,
        progress=True,
    )
    built = time.perf_counter() - start
    pruned = (
        graph
        if args.no_prune
        else prune_graph(graph, node_fraction=args.node_fraction, edge_fraction=args.edge_fraction)
    )

    def describe(node):
        d = describe_writes(model, NeuronId(node.layer, node.index, NeuronId.polarity(node.activation)), k=5)
        return {"top_tokens": [t.token for t in d.promoted], "bottom_tokens": [t.token for t in d.suppressed]}

    out = Path(args.out)
    slug = args.slug or "graph"
    data = to_circuit_tracer(pruned, slug=slug, node_threshold=args.node_fraction, describe=describe)
    groups = []
    if args.supernodes:
        from neurontrace.graphs.supernodes import find_supernodes, with_supernodes

        groups = find_supernodes(pruned, distance_threshold=args.supernode_threshold)
        data = with_supernodes(data, groups)
    json_path = write_text_atomic(out / f"{slug}.json", json.dumps(data))
    full_path = save_graph(graph, out / f"{slug}.neurontrace.json")
    html_path = write_viewer(data, out / f"{slug}.html")
    n_neurons = sum(n.kind == NEURON for n in graph.nodes)
    p_neurons = sum(n.kind == NEURON for n in pruned.nodes)
    print(f"Graph of {args.prompt!r} on {model.name}: targets " + ", ".join(
        f"{n.token!r} (p={n.prob:.3f})" for n in graph.nodes if n.kind == "logit"))  # fmt: skip
    print(f"  {n_neurons} neuron nodes, {graph.n_edges} edges built in {built:.1f} s; "
          f"pruned to {p_neurons} neurons and {pruned.n_edges} edges")  # fmt: skip
    print(
        f"  circuit-tracer JSON: {json_path}\n  full graph:          {full_path}\n  viewer (offline):    {html_path}"
    )


def add_graph_parser(sub, add_model_args) -> None:
    p = sub.add_parser(
        "graph",
        help="attribution graph of one prompt: JSON (circuit-tracer/Neuronpedia format) and an offline HTML viewer",
        description=(
            "Select neurons by RelP attribution to the target logits, compute direct-effect edges between them, "
            "the token embeddings and the logits, prune by influence on the logits, and write the graph JSON, the "
            "unpruned graph in neurontrace's own format, and a self-contained HTML viewer."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_args(p)
    p.add_argument("--prompt", "-p", required=True)
    p.add_argument(
        "--answer", action="append", help="target answer token (repeatable); default: the top tokens"
    )
    p.add_argument("--max-logits", type=int, default=5, help="most target logits when no --answer is given")
    p.add_argument(
        "--node-threshold", type=float, default=0.005, help="keep neurons with |a*dm/da| >= this * m"
    )
    p.add_argument("--max-nodes", type=int, default=2000, help="most neuron nodes")
    p.add_argument(
        "--node-fraction", type=float, default=0.8, help="pruning: cumulative influence kept (nodes)"
    )
    p.add_argument(
        "--edge-fraction", type=float, default=0.98, help="pruning: cumulative influence kept (edges)"
    )
    p.add_argument("--no-prune", action="store_true", help="export the unpruned graph")
    p.add_argument(
        "--supernodes",
        action="store_true",
        help="group neurons with similar input/output profiles into supernodes",
    )
    p.add_argument(
        "--supernode-threshold", type=float, default=0.5, help="cosine distance for joining groups"
    )
    p.add_argument("--slug", default=None, help="file name stem and graph slug (default: graph)")
    p.add_argument("--out", default="results/graph", help="output folder")

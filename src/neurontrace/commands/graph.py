"""``neurontrace graph``: build, prune and export the attribution graph of one prompt, with the HTML viewer.

With ``--prompts FILE`` it does so for every line of the file (``SLUG-000.*``, ``SLUG-001.*``, ... and an
``index.json``); launched by ``torchrun``, each process builds and writes its share of the graphs. With
``--dataset FILE.jsonl`` or ``--task NAME`` it builds one dataset graph of all the prompts
(:mod:`neurontrace.graphs.dataset`), with ``--rollout N`` / ``--continuation TEXT`` one rollout graph of a prompt
and its continuation (:mod:`neurontrace.graphs.rollout`). Every run also updates ``graph-metadata.json``
(circuit-tracer's graph index, one entry per graph) and writes the neurons' feature files under ``features/`` so
that circuit-tracer's own frontend can serve the folder as it is.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

from neurontrace import distributed
from neurontrace.commands._common import add_node_args, add_rule_args, model_from_args, rules_from_args
from neurontrace.errors import NeurontraceError
from neurontrace.io import check_writable, write_text_atomic

_PLAIN_NAME = re.compile(r"[A-Za-z0-9._-]+")


def read_prompts(path: str) -> list[str]:
    """The prompts of a UTF-8 text file, one a line (blank lines skipped; see :func:`neurontrace.io.text_lines`)."""
    from neurontrace.io import text_lines

    file = Path(path)
    if not file.is_file():
        raise NeurontraceError(f"no such prompts file: {path}; give a text file with one prompt a line")
    prompts = [line for _, line in text_lines(file) if line.strip()]
    if not prompts:
        raise NeurontraceError(f"the prompts file {path} is empty; give one prompt a line")
    return prompts


DATASET_FLAGS = {"combine": "--combine", "per_example_topk": "--per-example-topk", "node_mass": "--node-mass",
                 "n": "--n"}  # fmt: skip
ROLLOUT_FLAGS = {"rollout": "--rollout", "continuation": "--continuation"}


def check_graph_inputs(args: argparse.Namespace) -> None:
    """One input (--prompt, --prompts, --dataset or --task), and only the options that input uses."""
    given = [flag for flag, name in (("--prompt", "prompt"), ("--prompts", "prompts"), ("--dataset", "dataset"),
                                     ("--task", "task")) if getattr(args, name) is not None]  # fmt: skip
    if len(given) != 1:
        raise NeurontraceError(
            "give one of --prompt (one graph), --prompts FILE (one graph a line), or --dataset FILE.jsonl / "
            f"--task NAME (one dataset graph){'; got ' + ' and '.join(given) if given else ''}"
        )
    dataset = args.dataset is not None or args.task is not None
    for name, flag in DATASET_FLAGS.items():
        if getattr(args, name) is not None and not dataset:
            raise NeurontraceError(
                f"{flag} applies to dataset graphs only; add --dataset FILE.jsonl or --task NAME"
            )
    if dataset and args.answer:
        raise NeurontraceError("--answer does not apply to a dataset graph: each pair gives its clean_answer")
    if dataset and distributed.launched():
        raise NeurontraceError("a dataset graph is built by one process; run it without torchrun")
    if args.per_example_topk is not None and args.node_mass is not None:
        raise NeurontraceError("give at most one of --per-example-topk and --node-mass (one selection rule)")
    rollout = [flag for name, flag in ROLLOUT_FLAGS.items() if getattr(args, name) is not None]
    if rollout and args.prompt is None:
        raise NeurontraceError(f"{rollout[0]} applies to one prompt; give --prompt")
    if len(rollout) > 1:
        raise NeurontraceError("give either --rollout N (generate) or --continuation TEXT, not both")
    if rollout and args.answer:
        raise NeurontraceError(f"--answer does not apply with {rollout[0]}: the targets are the continuation")


def dataset_prompts(args: argparse.Namespace, model) -> tuple[list[str], list[str]]:
    """The prompts (clean prefixes) and answers (clean answers) of --dataset or --task, as `evaluate` reads them."""
    from neurontrace.commands.tasks import sva_task
    from neurontrace.errors import DatasetError, TokenizationError
    from neurontrace.tasks import generate_sva, load_pairs
    from neurontrace.tokens import single_token_id

    if args.task is not None:
        pairs = generate_sva(sva_task(args.task), n=16 if args.n is None else args.n, seed=args.seed,
                             tokenizer=model)  # fmt: skip
    else:
        pairs = load_pairs(args.dataset)[: args.n]
    for pair in pairs:
        try:
            single_token_id(model, pair.clean_answer)
        except TokenizationError as exc:
            raise DatasetError(f"{pair.source or args.task}: {exc}") from None
    return [p.clean_prefix for p in pairs], [p.clean_answer for p in pairs]


def graph_options(args: argparse.Namespace, rules) -> dict:
    """The build options a dataset or rollout graph shares with the per-prompt graphs."""
    return dict(node_threshold=args.node_threshold, max_nodes=args.max_nodes, site=args.site, rules=rules,
                center_logits=args.center_logits, suffix_length=args.suffix_length, blacklist=args.blacklist)  # fmt: skip


def one_graph(model, args: argparse.Namespace, rules):
    """The dataset graph of --dataset/--task, or the rollout graph of --prompt with --rollout/--continuation."""
    progress = distributed.is_main()
    if args.dataset is not None or args.task is not None:
        from neurontrace.graphs.dataset import build_dataset_graph

        prompts, answers = dataset_prompts(args, model)
        return build_dataset_graph(
            model, prompts, answers=answers, combine=args.combine or "mean", per_example_topk=args.per_example_topk,
            mass=args.node_mass, max_logits=args.max_logits, progress=progress, **graph_options(args, rules),
        )  # fmt: skip
    from neurontrace.graphs.rollout import build_rollout_graph

    return build_rollout_graph(model, args.prompt, continuation=args.continuation, generate=args.rollout,
                               progress=progress, **graph_options(args, rules))  # fmt: skip


def run_graph(args: argparse.Namespace) -> None:
    from neurontrace.graphs.export import index_entry, update_graph_index
    from neurontrace.graphs.many import build_graphs
    from neurontrace.sites import check_site

    if not 0 < args.node_fraction <= 1 or not 0 < args.edge_fraction <= 1:
        raise NeurontraceError("--node-fraction and --edge-fraction must be in (0, 1]")
    check_site(args.site)  # a dictionary folder that is not there stops before the model loads
    check_graph_inputs(args)
    slug = args.slug or "graph"
    if not _PLAIN_NAME.fullmatch(slug) or slug in (".", ".."):
        raise NeurontraceError(
            f"--slug {slug!r} is not a plain file name; use letters, digits, '.', '_' and '-' (files go in --out)"
        )
    prompts = [args.prompt] if args.prompts is None else read_prompts(args.prompts)
    if args.dataset is not None:
        from neurontrace.tasks import load_pairs

        load_pairs(args.dataset)  # a line that is not a pair stops before the model loads
    out = Path(args.out)
    stems = [slug] if args.prompts is None else [f"{slug}-{i:03d}" for i in range(len(prompts))]
    for i in distributed.shard(
        len(stems)
    ):  # this process's outputs: a blocked path stops it before the compute
        stem = stems[i]
        profiles = (".profiles.json",) if args.profiles else ()
        for suffix in (".json", ".neurontrace.json", ".html", *profiles):
            check_writable(out / f"{stem}{suffix}", what="--out")
    rules = rules_from_args(args)
    from neurontrace.graphs.ig_edges import check_edges

    check_edges(args.edges, args.edge_steps)
    one = (args.dataset, args.task, args.rollout, args.continuation)
    if args.edges != "relp" and any(v is not None for v in one):
        raise NeurontraceError(f"--edges {args.edges} applies to per-prompt graphs (--prompt or --prompts)")
    model = model_from_args(args)
    if any(v is not None for v in (args.dataset, args.task, args.rollout, args.continuation)):
        start = time.perf_counter()  # a dataset or rollout graph: one graph
        graph = one_graph(model, args, rules)
        _write_graph(model, graph, args, out, slug, time.perf_counter() - start, None)
        update_graph_index(out, [index_entry(json.loads((out / f"{slug}.json").read_text(encoding="utf-8")))])
        return
    answers = [a for a in (args.answer or [])]
    slugs = stems
    siblings = None
    if args.prompts is not None:
        siblings = [
            {"slug": s, "prompt": p, "html": f"{s}.html"} for p, s in zip(prompts, slugs, strict=True)
        ]
    start = time.perf_counter()
    for index, graph in build_graphs(
        model,
        prompts,
        answers=answers or None,
        max_logits=args.max_logits,
        node_threshold=args.node_threshold,
        max_nodes=args.max_nodes,
        progress=args.prompt is not None and distributed.is_main(),
        site=args.site,
        rules=rules,
        center_logits=args.center_logits,
        suffix_length=args.suffix_length,
        blacklist=args.blacklist,
        edges=args.edges,
        edge_steps=args.edge_steps,
    ):
        _write_graph(model, graph, args, out, slugs[index], time.perf_counter() - start, siblings)
        start = time.perf_counter()
    if args.prompts is None:
        update_graph_index(out, [index_entry(json.loads((out / f"{slug}.json").read_text(encoding="utf-8")))])
    else:
        distributed.barrier()  # every graph is written before the index names it
        if distributed.is_main():
            entries = [
                index_entry(json.loads((out / f"{s}.json").read_text(encoding="utf-8"))) for s in slugs
            ]
            update_graph_index(out, entries)
            index = [
                {
                    "prompt": p,
                    "slug": s,
                    "json": f"{s}.json",
                    "full": f"{s}.neurontrace.json",
                    "html": f"{s}.html",
                }
                for p, s in zip(prompts, slugs, strict=True)
            ]
            path = write_text_atomic(out / "index.json", json.dumps(index, indent=2))
            print(f"{len(prompts)} graphs; index: {path}")


def _write_graph(
    model, graph, args: argparse.Namespace, out: Path, slug: str, built: float, siblings
) -> None:
    """Prune, describe and export one graph (circuit-tracer JSON, full graph, HTML viewer) and print a summary."""
    from neurontrace.describe import graph_node_describer
    from neurontrace.graphs.build import NEURON
    from neurontrace.graphs.export import feature_files, to_circuit_tracer, to_neurontrace
    from neurontrace.graphs.prune import prune_graph
    from neurontrace.io import write_files_atomic
    from neurontrace.viewer import render_viewer

    pruned = (
        graph
        if args.no_prune
        else prune_graph(graph, node_fraction=args.node_fraction, edge_fraction=args.edge_fraction)
    )

    describe = (
        None  # a dictionary's latents have no neuron description (their decoder rows are not described yet)
    )
    if args.site == "neurons":
        describe = graph_node_describer(
            model, [n for n in pruned.nodes if n.kind == NEURON], corpus=args.contexts,
            max_tokens=args.contexts_tokens, progress=args.contexts is not None,
        )  # fmt: skip

    data = to_circuit_tracer(pruned, slug=slug, describe=describe, scan=args.scan)
    groups = []
    if args.supernodes:
        from neurontrace.graphs.supernodes import find_supernodes, with_supernodes

        groups = find_supernodes(pruned, distance_threshold=args.supernode_threshold)
        data = with_supernodes(data, groups)
    # the whole set is written before any part replaces an old one: a full disk leaves the old set whole
    json_path, full_path, html_path = (
        out / f"{slug}.json",
        out / f"{slug}.neurontrace.json",
        out / f"{slug}.html",
    )
    parts = {
        json_path: json.dumps(data),
        full_path: json.dumps(to_neurontrace(graph)),
        html_path: render_viewer(data, siblings=siblings),
        **feature_files(data, out),
    }
    if getattr(args, "profiles", False):  # node and edge attribution profiles of the exported graph
        from neurontrace.graphs.profiles import node_profiles

        parts[out / f"{slug}.profiles.json"] = node_profiles(pruned).to_json()
    write_files_atomic(parts)
    n_neurons = sum(n.kind == NEURON for n in graph.nodes)
    p_neurons = sum(n.kind == NEURON for n in pruned.nodes)
    print(f"Graph of {graph.prompt!r} on {model.name}: targets " + ", ".join(
        f"{n.token!r} (p={n.prob:.3f})" for n in graph.nodes if n.kind == "logit"))  # fmt: skip
    print(f"  {n_neurons} neuron nodes, {graph.n_edges} edges built in {built:.1f} s; "
          f"pruned to {p_neurons} neurons and {pruned.n_edges} edges")  # fmt: skip
    if groups:
        sizes = ", ".join(str(len(g.nodes)) for g in groups)
        print(f"  {len(groups)} supernodes of {sizes} neurons")
    print(
        f"  circuit-tracer JSON: {json_path}\n  full graph:          {full_path}\n  viewer (offline):    {html_path}"
    )
    if getattr(args, "profiles", False):
        print(f"  profiles:            {out / f'{slug}.profiles.json'}")


def add_graph_parser(sub, add_model_args) -> None:
    p = sub.add_parser(
        "graph",
        help="attribution graph of one prompt: JSON (circuit-tracer/Neuronpedia format) and an offline HTML viewer",
        description=(
            "Select neurons by RelP attribution to the target logits, compute direct-effect edges between them, "
            "the token embeddings and the logits, prune by influence on the logits, and write the graph JSON, the "
            "unpruned graph in neurontrace's own format, and a self-contained HTML viewer. The folder also gets "
            "graph-metadata.json and features/ so that circuit-tracer's own frontend serves it unchanged "
            "(circuit_tracer.frontend.serve(data_dir=OUT)); `neurontrace view` opens graph files from elsewhere."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_args(p)
    p.add_argument("--prompt", "-p", help="the prompt (one graph)")
    p.add_argument(
        "--dataset",
        metavar="FILE.jsonl",
        help="one dataset graph of every pair's clean_prefix and clean_answer (the JSONL pairs `evaluate` reads): "
        "per-prompt graphs combined by --combine, positions aligned from the end",
    )
    p.add_argument(
        "--task",
        help="one dataset graph of a generated subject-verb agreement task (e.g. sva-nounpp; see `neurontrace tasks`)",
    )
    p.add_argument(
        "--n", type=int, default=None, help="dataset graphs: use the first N pairs (--task: generate N; 16)"
    )
    p.add_argument("--seed", type=int, default=0, help="--task: the generator's seed")
    p.add_argument(
        "--combine",
        choices=("mean", "max", "max_abs", "any"),
        default=None,
        help="dataset graphs: how the prompts' node scores and edge weights combine (a node or edge a prompt lacks "
        "counts 0): mean, max (signed), max_abs (the value of largest magnitude, sign kept), or any (each prompt "
        "selects its own neurons, the graph keeps their union, values are means); default mean",
    )
    p.add_argument(
        "--per-example-topk",
        type=int,
        default=None,
        metavar="K",
        help="dataset graphs: keep the union of each prompt's own top K neurons (instead of --node-threshold)",
    )
    p.add_argument(
        "--node-mass",
        type=float,
        default=None,
        metavar="P",
        help="dataset graphs: keep the largest |combined score| neurons until their sum reaches this fraction of "
        "the total (instead of --node-threshold; with --combine any, per prompt)",
    )
    p.add_argument(
        "--rollout",
        type=int,
        default=None,
        metavar="N",
        help="generate N tokens greedily after --prompt and build one graph with a logit node at each generated "
        "token's position (teacher forcing: each logit is the generated token)",
    )
    p.add_argument(
        "--continuation",
        default=None,
        metavar="TEXT",
        help="like --rollout, for a given continuation of --prompt (e.g. ' are on the table')",
    )
    p.add_argument(
        "--prompts",
        metavar="FILE",
        help="a UTF-8 text file with one prompt a line (lines end at \\n only; U+2028 stays in its prompt): one "
        "graph each, SLUG-000.*, ... and index.json in --out "
        "(under torchrun the processes share the prompts)",
    )
    p.add_argument(
        "--answer", action="append", help="target answer token (repeatable); default: the top tokens"
    )
    p.add_argument("--max-logits", type=int, default=5, help="most target logits when no --answer is given")
    p.add_argument(
        "--node-threshold", type=float, default=0.005, help="keep neurons with |a*dm/da| >= this * m"
    )
    p.add_argument("--max-nodes", type=int, default=2000, help="most neuron nodes")
    p.add_argument(
        "--site",
        default="neurons",
        help="the graph's basis: neurons (default), or a dictionary sae:DIR / transcoder:DIR (its latents are "
        "the nodes, with one error node per layer and position)",
    )
    p.add_argument(
        "--node-fraction",
        type=float,
        default=0.8,
        help="pruning: keep the neurons of the smallest set of most influential nodes (neurons and embeddings, "
        "ranked as circuit-tracer does) holding this share of the total influence",
    )
    p.add_argument(
        "--edge-fraction", type=float, default=0.98, help="pruning: cumulative influence kept (edges)"
    )
    p.add_argument("--no-prune", action="store_true", help="export the unpruned graph")
    p.add_argument(
        "--edges",
        default="relp",
        choices=["relp", "ig", "conductance"],
        help="how edges are computed: relp (direct effects with RelP gradients), ig (plain gradients integrated "
        "as each source layer's nodes go from zero to their value, all else clean: a layer's edges into a node "
        "sum to the exact effect of zeroing them) or conductance (the reference code's: gradients along the "
        "path of the input embeddings from zero, times each source's own change); nodes are chosen by RelP",
    )
    p.add_argument(
        "--edge-steps",
        type=int,
        default=16,
        help="integration steps of --edges ig/conductance (midpoint rule; ig costs steps passes per layer)",
    )
    p.add_argument(
        "--profiles",
        action="store_true",
        help="also write SLUG.profiles.json: each node's attribution to every prompt token and contribution to "
        "every target logit through the graph's paths, and each edge's share of the metric (of the exported, "
        "pruned unless --no-prune, graph)",
    )
    p.add_argument(
        "--contexts",
        default=None,
        help="also find each neuron's top-activating contexts (shown on click in the viewer) in this corpus: a "
        "text file or folder, a Hugging Face dataset name, or 'model' (text sampled from the model; slow on CPU)",
    )
    p.add_argument("--contexts-tokens", type=int, default=20_000, help="tokens of the corpus to scan")
    p.add_argument(
        "--supernodes",
        action="store_true",
        help="group neurons with similar input/output profiles into supernodes",
    )
    p.add_argument(
        "--supernode-threshold", type=float, default=0.5, help="cosine distance for joining groups"
    )
    p.add_argument("--slug", default=None, help="file name stem and graph slug (default: graph)")
    p.add_argument(
        "--scan",
        default=None,
        help="metadata.scan of the graph JSON: default ./graph_data/features/MODEL, the feature files written "
        "next to the graph (circuit-tracer's frontend serving --out loads them offline); give a Neuronpedia model "
        "id when uploading there",
    )
    p.add_argument("--out", default="results/graph", help="output folder")
    add_rule_args(p)
    add_node_args(p)

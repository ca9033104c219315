"""``neurontrace view``: open attribution-graph JSON files (ours, circuit-tracer's, Neuronpedia's) in the viewer.

Nothing in a file is dropped: nodes and links pass through unchanged (error nodes, unknown keys and all), and
the ``qParams`` that circuit-tracer's Save writes as strings (pinned ids, supernodes, edited labels, threshold)
are read back as lists and numbers, so a saved workspace opens as it was left.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

NESTED = "its JSON is nested too deeply to read (a graph's nodes and links are a few levels deep)"


def read_graph_file(path: str | Path) -> dict:
    """The graph JSON of a ``.json`` file or of a viewer page (``.html``), imported for the viewer."""
    from neurontrace.errors import NeurontraceError
    from neurontrace.graphs.export import import_graph_json
    from neurontrace.viewer import graph_from_html

    file = Path(path)
    if not file.is_file():
        raise NeurontraceError(f"no such graph file: {path}")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise NeurontraceError(f"{path} is not UTF-8 text; give a graph .json or a viewer .html") from None
    if file.suffix.lower() in (".html", ".htm"):
        try:
            data = graph_from_html(text)
        except NeurontraceError as exc:
            raise NeurontraceError(f"{path}: {exc}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise NeurontraceError(f"{path} is not JSON: {exc.msg} (line {exc.lineno})") from None
        except RecursionError:
            raise NeurontraceError(f"{path}: {NESTED}") from None
    try:
        return import_graph_json(data)
    except NeurontraceError as exc:
        raise NeurontraceError(f"{path}: {exc}") from None


def run_view(args: argparse.Namespace) -> None:
    from neurontrace.errors import NeurontraceError
    from neurontrace.viewer import write_viewer

    graphs = [(Path(f), read_graph_file(f)) for f in args.files]
    stems = [f.name[: -len(".json")] if f.name.endswith(".json") else f.stem for f, _ in graphs]
    if len(set(stems)) != len(stems):
        raise NeurontraceError("two input files have the same name; view them in separate runs")
    siblings = None
    if len(graphs) > 1:
        siblings = [
            {
                "slug": str(g["metadata"].get("slug", s)),
                "prompt": str(g["metadata"].get("prompt", "")),
                "html": f"{s}.html",
            }
            for (_, g), s in zip(graphs, stems, strict=True)
        ]
    for (file, graph), stem in zip(graphs, stems, strict=True):
        folder = Path(args.out) if args.out else file.parent
        target = folder / f"{stem}.html"
        if target.resolve() == file.resolve():
            target = folder / f"{stem}.view.html"
        path = write_viewer(graph, target, siblings=siblings)
        n = len(graph["nodes"])
        print(f"{file}: {n} nodes, {len(graph['links'])} links -> {path}")


def add_view_parser(sub) -> None:
    p = sub.add_parser(
        "view",
        help="open graph JSON files (neurontrace, circuit-tracer or Neuronpedia) in the offline HTML viewer",
        description=(
            "Write the offline viewer page of each graph file: FILE.json -> FILE.html (in --out, or next to the "
            "file). Files saved by circuit-tracer's frontend open with their pinned nodes, supernodes and edited "
            "labels; several files get a graph selector."
        ),
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="graph .json files (or viewer .html pages)")
    p.add_argument("--out", default=None, help="output folder (default: next to each file)")

"""Graph files: the circuit-tracer/Neuronpedia graph JSON (METHOD.md section 7) and the project's own format.

circuit-tracer JSON: node ids ``{layer}_{index}_{pos}`` for neurons, ``E_{token_id}_{pos}`` for embeddings,
``{n_layers+1}_{token_id}_{pos}`` for logits; ``feature`` is the Cantor pair of layer and index; ``influence`` is
the node's cumulative influence (neurons sorted by influence, so ``influence <= node_threshold`` is the pruned
set); link weights are the raw direct effects. Extra node keys (``attribution``, ``token``, ``top_tokens``,
``influence_raw``...) carry everything needed to load the graph back without loss.

Own format (``format: neurontrace-graph``, ``schema_version: 1``): prompt, tokens, metadata, the node table and
the edges as coordinate lists (``target``, ``source``, ``weight``); normalised weights are ``weight / activation``
of the target.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from neurontrace.errors import NeurontraceError
from neurontrace.graphs.build import EMBEDDING, LOGIT, NEURON, AttributionGraph, GraphNode
from neurontrace.io import write_text_atomic
from neurontrace.neurons import NeuronId

SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).with_name("schema") / "attribution-graph.v1.schema.json"
_FEATURE_TYPES = {NEURON: "mlp neuron", EMBEDDING: "embedding", LOGIT: "logit"}
_KINDS = {v: k for k, v in _FEATURE_TYPES.items()}


def cantor(layer: int, index: int) -> int:
    return (layer + index) * (layer + index + 1) // 2 + index


def node_id(node: GraphNode, n_layers: int) -> str:
    if node.kind == NEURON:
        return f"{node.layer}_{node.index}_{node.position}"
    if node.kind == EMBEDDING:
        return f"E_{node.index}_{node.position}"
    return f"{n_layers + 1}_{node.index}_{node.position}"


def _cumulative_influence(graph: AttributionGraph) -> dict[int, float]:
    values = [(i, n.influence or 0.0) for i, n in enumerate(graph.nodes) if n.kind == NEURON]
    total = sum(v for _, v in values) or 1.0
    out, running = {}, 0.0
    for i, v in sorted(values, key=lambda x: -x[1]):
        running += v
        out[i] = running / total
    return out


def to_circuit_tracer(
    graph: AttributionGraph,
    *,
    slug: str = "neurontrace-graph",
    node_threshold: float = 0.8,
    describe: Callable[[GraphNode], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The circuit-tracer/Neuronpedia graph JSON of ``graph`` (``describe`` may add e.g. ``top_tokens``)."""
    L = graph.n_layers
    T = len(graph.tokens)
    cumulative = _cumulative_influence(graph)
    nodes = []
    for i, n in enumerate(graph.nodes):
        nid = node_id(n, L)
        if n.kind == NEURON:
            clerp = str(NeuronId(n.layer, n.index, NeuronId.polarity(n.activation)))
            layer, feature, influence = str(n.layer), cantor(n.layer, n.index), cumulative.get(i)
        elif n.kind == EMBEDDING:
            clerp, layer, feature, influence = f"Emb: {n.token!r}", "E", n.index, None
        else:
            clerp, layer, feature, influence = (
                f"Output {n.token!r} (p={n.prob:.3f})",
                str(L + 1),
                n.index,
                None,
            )
        node = {
            "node_id": nid,
            "feature": int(feature),
            "layer": layer,
            "ctx_idx": n.position,
            "feature_type": _FEATURE_TYPES[n.kind],
            "jsNodeId": nid,
            "clerp": clerp,
            "influence": influence,
            "activation": n.activation if n.kind != EMBEDDING else None,
            "token_prob": n.prob,
            "is_target_logit": n.kind == LOGIT,
            "run_idx": 0,
            "reverse_ctx_idx": T - 1 - n.position,
            "attribution": n.attribution,
            "token": n.token,  # the output token for logits (the viewer labels logit nodes with it)
            "index": n.index,
            "influence_raw": n.influence,
        }
        if describe is not None and n.kind == NEURON:
            node.update(describe(n))
        node.update(n.extra)
        nodes.append(node)
    ids = [node["node_id"] for node in nodes]
    nz = graph.adjacency.nonzero().tolist()
    links = [{"source": ids[s], "target": ids[t], "weight": float(graph.adjacency[t, s])} for t, s in nz]
    metadata = {
        "slug": slug,
        "scan": graph.meta.get("model", ""),
        "prompt_tokens": list(graph.tokens),
        "prompt": graph.prompt,
        "node_threshold": node_threshold,
        "schema_version": SCHEMA_VERSION,
        "neurontrace": {k: v for k, v in graph.meta.items()},
        "token_ids": list(graph.token_ids),
    }
    q_params = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": metadata, "qParams": q_params, "nodes": nodes, "links": links}


_NODE_ID = re.compile(r"^(E|\d+)_(\d+)_(\d+)$")
_CORE_KEYS = {
    "node_id", "feature", "layer", "ctx_idx", "feature_type", "jsNodeId", "clerp", "influence", "activation",
    "token_prob", "is_target_logit", "run_idx", "reverse_ctx_idx", "attribution", "token", "index",
    "influence_raw",
}  # fmt: skip


def from_circuit_tracer(data: dict[str, Any]) -> AttributionGraph:
    """Load a graph written by :func:`to_circuit_tracer` (or any graph JSON with these node ids)."""
    try:
        meta = dict(data["metadata"].get("neurontrace", {}))
        tokens = list(data["metadata"]["prompt_tokens"])
        n_layers = int(meta.get("n_layers", 0))
        nodes, ids = [], {}
        for raw in data["nodes"]:
            match = _NODE_ID.match(raw["node_id"])
            if match is None:
                raise NeurontraceError(f"node id {raw['node_id']!r} is not of the form layer_index_position")
            kind = _KINDS.get(raw["feature_type"], NEURON)
            layer = -1 if kind == EMBEDDING else int(match[1]) if kind == NEURON else n_layers
            if kind == LOGIT and not n_layers:
                n_layers = int(match[1]) - 1
                layer = n_layers
            extra = {k: v for k, v in raw.items() if k not in _CORE_KEYS}
            token = raw.get("token", "")
            node = GraphNode(
                kind=kind,
                layer=layer,
                position=int(raw["ctx_idx"]),
                index=int(raw.get("index", match[2])),
                activation=float(raw["activation"] or 0.0),
                attribution=float(raw.get("attribution", 0.0)),
                token=token,
                prob=float(raw.get("token_prob", 0.0)),
                influence=raw.get("influence_raw"),
                extra=extra,
            )
            ids[raw["node_id"]] = len(nodes)
            nodes.append(node)
        adjacency = torch.zeros(len(nodes), len(nodes))
        for link in data["links"]:
            adjacency[ids[link["target"]], ids[link["source"]]] = float(link["weight"])
    except (KeyError, TypeError, ValueError) as exc:
        raise NeurontraceError(f"not an attribution-graph JSON: {exc}") from None
    meta.setdefault("n_layers", n_layers)
    token_ids = list(data["metadata"].get("token_ids", []))
    return AttributionGraph(data["metadata"]["prompt"], tokens, token_ids, nodes, adjacency, meta)


def validate_circuit_tracer(data: dict[str, Any]) -> None:
    """Check ``data`` against the bundled JSON Schema (needs the ``jsonschema`` package)."""
    import jsonschema

    jsonschema.validate(data, json.loads(SCHEMA_PATH.read_text()))


# ------------------------------------------------------------------------------------------ own format
def to_neurontrace(graph: AttributionGraph) -> dict[str, Any]:
    nz = graph.adjacency.nonzero()
    return {
        "format": "neurontrace-graph",
        "schema_version": SCHEMA_VERSION,
        "prompt": graph.prompt,
        "tokens": graph.tokens,
        "token_ids": graph.token_ids,
        "meta": graph.meta,
        "nodes": [dict(n.__dict__) for n in graph.nodes],
        "edges": {
            "target": nz[:, 0].tolist(),
            "source": nz[:, 1].tolist(),
            "weight": graph.adjacency[nz[:, 0], nz[:, 1]].tolist(),
        },
    }


def from_neurontrace(data: dict[str, Any]) -> AttributionGraph:
    if data.get("format") != "neurontrace-graph":
        raise NeurontraceError("not a neurontrace graph file (format is not 'neurontrace-graph')")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise NeurontraceError(
            f"graph schema version {data.get('schema_version')}; this neurontrace reads {SCHEMA_VERSION}"
        )
    nodes = [GraphNode(**n) for n in data["nodes"]]
    adjacency = torch.zeros(len(nodes), len(nodes))
    e = data["edges"]
    if e["target"]:
        adjacency[torch.tensor(e["target"]), torch.tensor(e["source"])] = torch.tensor(e["weight"])
    return AttributionGraph(data["prompt"], data["tokens"], data["token_ids"], nodes, adjacency, data["meta"])


def save_graph(graph: AttributionGraph, path: str | Path, **export: Any) -> Path:
    """Write ``*.json`` as circuit-tracer JSON, or ``*.neurontrace.json`` in the project's own format."""
    path = Path(path)
    data = (
        to_neurontrace(graph)
        if path.name.endswith(".neurontrace.json")
        else to_circuit_tracer(graph, **export)
    )
    return write_text_atomic(path, json.dumps(data))


def load_graph(path: str | Path) -> AttributionGraph:
    path = Path(path)
    if not path.is_file():
        raise NeurontraceError(f"no such graph file: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise NeurontraceError(f"{path} is not JSON: {exc.msg} (line {exc.lineno})") from None
    return from_neurontrace(data) if data.get("format") == "neurontrace-graph" else from_circuit_tracer(data)

"""Graph files: the circuit-tracer/Neuronpedia graph JSON (METHOD.md section 7) and the project's own format.

circuit-tracer JSON, written so that circuit-tracer's own frontend and its graph-file models (pydantic
``circuit_tracer.frontend.graph_models.Model``) read it unchanged, every field meaning what it means there:

- neurons are feature nodes: ``feature_type: "cross layer transcoder"`` (the type circuit-tracer's frontend
  shows with an activation, output tokens and label editing; ``unit: "mlp neuron"`` says what they are), node id
  ``{layer}_{index}_{pos}``, ``jsNodeId`` ``{layer}_{index}-0``, ``feature`` the Cantor pair of layer and index;
- embeddings: node id ``E_{token_id}_{pos}``, ``feature`` the position, ``jsNodeId`` ``E_{token_id}-{pos}``;
- logits: node id ``{n_layers+1}_{token_id}_{pos}``, ``feature`` the token id, ``jsNodeId`` ``L_{token_id}-{pos}``,
  ``clerp`` ``Output "TOKEN" (p=0.159)`` (the frontend reads the token between the double quotes, so a ``"`` in
  the token is written ``＂``; ``token`` keeps it exactly); ``is_target_logit`` only on the most likely one;
- ``influence``: circuit-tracer's cumulative influence over the *unpruned* graph (``graphs/prune.py``), so the
  pruned neurons have ``influence <= metadata.node_threshold``, which is the largest influence of a kept neuron
  (the fraction the pruning reached, at least ``--node-fraction``): the frontend's default shows every one;
- ``reverse_ctx_idx`` 0 and ``metadata.transcoder_list`` ``[]``, as circuit-tracer writes them;
- neuron details in the fields the frontend's panel reads: ``top_logit_effects`` / ``bottom_logit_effects``;
- a graph on a dictionary basis (``graph --site sae:DIR``): latents are feature nodes with ``unit`` ``sae latent``
  (or ``transcoder latent``) and clerp ``L{layer}/F{index}``; error terms are circuit-tracer's ``mlp
  reconstruction error`` nodes, ``feature`` -1, node id ``err_{layer}_{pos}`` and ``jsNodeId``
  ``err_{layer}-{pos}`` (circuit-tracer's own ``0_{layer}_{pos}`` would collide with layer-0 feature ids).

Extra keys (``attribution``, ``token``, ``index``, ``influence_raw``, ``unit``, ``top_contexts``) and
``metadata.neurontrace`` carry everything needed to load the graph back without loss. :func:`feature_file` gives
the per-neuron feature file the frontend loads for its examples panel (``metadata.scan`` names their folder).

Own format (``format: neurontrace-graph``, ``schema_version: 1``): prompt, tokens, metadata, the node table and
the edges as coordinate lists (``target``, ``source``, ``weight``); normalised weights are ``weight / activation``
of the target.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from neurontrace.errors import NeurontraceError
from neurontrace.graphs.build import EMBEDDING, ERROR, LOGIT, NEURON, AttributionGraph, GraphNode
from neurontrace.io import write_text_atomic
from neurontrace.neurons import NeuronId

SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).with_name("schema") / "attribution-graph.v1.schema.json"
NEURON_TYPE = "cross layer transcoder"  # circuit-tracer's feature-node type
ERROR_TYPES = ("mlp reconstruction error",)
_FEATURE_TYPES = {NEURON: NEURON_TYPE, EMBEDDING: "embedding", LOGIT: "logit", ERROR: ERROR_TYPES[0]}
_KINDS = {NEURON_TYPE: NEURON, "mlp neuron": NEURON, "unexplored node": NEURON, "embedding": EMBEDDING,
          "logit": LOGIT}  # fmt: skip
FEATURES_PREFIX = (
    "./graph_data/features"  # where circuit-tracer's local server finds files of the data folder
)


def cantor(layer: int, index: int) -> int:
    return (layer + index) * (layer + index + 1) // 2 + index


def node_id(node: GraphNode, n_layers: int) -> str:
    if node.kind == ERROR:
        return f"err_{node.layer}_{node.position}"
    if node.kind == NEURON:
        return f"{node.layer}_{node.index}_{node.position}"
    if node.kind == EMBEDDING:
        return f"E_{node.index}_{node.position}"
    return f"{n_layers + 1}_{node.index}_{node.position}"


def js_node_id(node: GraphNode) -> str:
    """circuit-tracer's ``jsNodeId``: ``{layer}_{index}-0``, ``E_{token_id}-{pos}``, ``L_{token_id}-{pos}``."""
    if node.kind == ERROR:
        return f"err_{node.layer}-{node.position}"
    if node.kind == NEURON:
        return f"{node.layer}_{node.index}-0"
    if node.kind == EMBEDDING:
        return f"E_{node.index}-{node.position}"
    return f"L_{node.index}-{node.position}"


def logit_clerp(token: str, prob: float) -> str:
    """``Output "TOKEN" (p=...)``; the frontend splits on ``"``, so one inside the token is written ``＂``."""
    return f'Output "{token.replace(chr(34), chr(0xFF02))}" (p={prob:.3f})'


def default_scan(model_name: str) -> str:
    """``./graph_data/features/<model>``: the feature files' folder as circuit-tracer's frontend fetches it."""
    key = re.sub(r"[^A-Za-z0-9._-]+", "-", model_name).strip("-.") or "model"
    return f"{FEATURES_PREFIX}/{key}"


def _cumulative_influence(graph: AttributionGraph) -> dict[int, float]:
    """Cumulative influence of every non-logit node: the pruned value when set, else computed on ``graph``."""
    if any(n.cumulative is not None for n in graph.nodes):
        return {i: n.cumulative for i, n in enumerate(graph.nodes) if n.cumulative is not None}
    from neurontrace.graphs.prune import cumulative_influence, path_influence

    ranked = path_influence(graph)
    ranked[[i for i, n in enumerate(graph.nodes) if n.kind == LOGIT]] = 0.0
    values = cumulative_influence(ranked)
    return {i: float(values[i]) for i, n in enumerate(graph.nodes) if n.kind != LOGIT}


def to_circuit_tracer(
    graph: AttributionGraph,
    *,
    slug: str = "neurontrace-graph",
    node_threshold: float | None = None,
    describe: Callable[[GraphNode], dict[str, Any]] | None = None,
    scan: str | None = None,
) -> dict[str, Any]:
    """The circuit-tracer/Neuronpedia graph JSON of ``graph``.

    ``describe(node)`` may add neuron details (``top_logit_effects``, ``top_contexts``...). ``node_threshold``
    defaults to the largest cumulative influence of a neuron in ``graph`` (for a pruned graph: the fraction its
    pruning reached), so the frontend's default threshold shows every neuron. ``scan`` defaults to
    :func:`default_scan` of the model (feature files fetched offline); give a Neuronpedia model id to upload.
    """
    L = graph.n_layers
    site = str(graph.meta.get("site", "neurons"))
    unit = "mlp neuron" if ":" not in site else f"{site.split(':')[0]} latent"
    cumulative = _cumulative_influence(graph)
    nodes = []
    first_logit = next((i for i, n in enumerate(graph.nodes) if n.kind == LOGIT), None)
    for i, n in enumerate(graph.nodes):
        if n.kind == NEURON and unit != "mlp neuron":
            clerp, layer, feature = f"L{n.layer}/F{n.index}", str(n.layer), cantor(n.layer, n.index)
        elif n.kind == NEURON:
            clerp = str(NeuronId(n.layer, n.index, NeuronId.polarity(n.activation)))
            layer, feature = str(n.layer), cantor(n.layer, n.index)
        elif n.kind == ERROR:
            clerp, layer, feature = f"Err L{n.layer}@{n.position}", str(n.layer), -1
        elif n.kind == EMBEDDING:
            clerp, layer, feature = f"Emb: {n.token!r}", "E", n.position
        else:
            clerp, layer, feature = logit_clerp(n.token, n.prob), str(L + 1), n.index
        node = {
            "node_id": node_id(n, L),
            "feature": int(feature),
            "layer": layer,
            "ctx_idx": n.position,
            "feature_type": _FEATURE_TYPES[n.kind],
            "jsNodeId": js_node_id(n),
            "clerp": clerp,
            "influence": cumulative.get(i),
            "activation": n.activation if n.kind != EMBEDDING else None,
            "token_prob": n.prob,
            "is_target_logit": i == first_logit,
            "run_idx": 0,
            "reverse_ctx_idx": 0,
            "attribution": n.attribution,
            "token": n.token,  # the prompt token at this position (logits: the output token, exactly)
            "index": n.index,
            "influence_raw": n.influence,
        }
        if n.kind == NEURON:
            node["unit"] = unit
            if describe is not None:
                node.update(describe(n))
        node.update(n.extra)
        nodes.append(node)
    ids = [node["node_id"] for node in nodes]
    nz = graph.adjacency.nonzero().tolist()
    links = [{"source": ids[s], "target": ids[t], "weight": float(graph.adjacency[t, s])} for t, s in nz]
    if node_threshold is None:
        kept = [cumulative[i] for i, n in enumerate(graph.nodes) if n.kind == NEURON and i in cumulative]
        node_threshold = max(kept) if kept else float(graph.meta.get("pruned", {}).get("node_fraction", 0.8))
    metadata = {
        "slug": slug,
        "scan": scan if scan is not None else default_scan(str(graph.meta.get("model", "model"))),
        "transcoder_list": [],
        "prompt_tokens": list(graph.tokens),
        "prompt": graph.prompt,
        "node_threshold": float(node_threshold),
        "schema_version": SCHEMA_VERSION,
        "neurontrace": {k: v for k, v in graph.meta.items()},
        "token_ids": list(graph.token_ids),
    }
    q_params = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": metadata, "qParams": q_params, "nodes": nodes, "links": links}


_INDEX_KEYS = (
    "slug",
    "scan",
    "transcoder_list",
    "prompt_tokens",
    "prompt",
    "node_threshold",
    "schema_version",
)


def index_entry(data: Mapping[str, Any]) -> dict[str, Any]:
    """A graph's entry of ``graph-metadata.json``: its metadata fields that circuit-tracer's index holds."""
    meta = data["metadata"]
    return {k: meta[k] for k in _INDEX_KEYS if k in meta}


def update_graph_index(folder: str | Path, entries: Iterable[Mapping[str, Any]]) -> Path:
    """Add (or replace, by slug) ``entries`` in ``folder/graph-metadata.json`` (``{"graphs": [...]}``)."""
    path = Path(folder) / "graph-metadata.json"
    graphs: list[dict[str, Any]] = []
    if path.exists():
        try:
            graphs = list(json.loads(path.read_text(encoding="utf-8"))["graphs"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise NeurontraceError(
                f"{path} is not a graph index ({exc}); move it away or choose another --out"
            ) from None
    new = {e["slug"]: dict(e) for e in entries}
    graphs = [g for g in graphs if g.get("slug") not in new] + list(new.values())
    return write_text_atomic(path, json.dumps({"graphs": graphs}, indent=2))


def _histogram(values: list[float], lo: float, hi: float, bins: int = 10) -> list[float]:
    counts = [0.0] * bins
    width = (hi - lo) / bins if hi > lo else 1.0
    for v in values:
        counts[min(bins - 1, max(0, int((v - lo) / width)))] += 1
    return counts


def feature_file(
    node: Mapping[str, Any], scan: str, existing: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The feature file circuit-tracer's frontend loads from ``{scan}/{feature}.json`` for a neuron node.

    Fields as in ``circuit_tracer.frontend.feature_models.Model``: ``top_logits`` / ``bottom_logits`` are what
    the neuron's positive activation promotes / suppresses (the node's own lists, swapped for a negative
    activation); ``examples_quantiles`` one entry per polarity with top-activating contexts, when the node has
    them (only the top token's activation is known: the other tokens' are ``null``, not measured);
    ``histogram`` counts those contexts' activations (empty without contexts). ``activation_frequency`` and
    ``quantile_values`` are left out or empty: nothing here measures them. ``existing`` (the same neuron's file
    from another graph) keeps the quantiles it has.
    """
    top, bottom = list(node.get("top_logit_effects") or []), list(node.get("bottom_logit_effects") or [])
    negative = (node.get("activation") or 0.0) < 0
    if negative:
        top, bottom = bottom, top
    quantiles = {q["quantile_name"]: q for q in (existing or {}).get("examples_quantiles", [])}
    contexts = node.get("top_contexts") or []
    if contexts:
        examples = []
        for c in contexts:
            tokens = [*c["before"], c["token"], *c["after"]]
            acts = [None] * len(tokens)
            acts[len(c["before"])] = c["activation"]
            examples.append({"tokens": tokens, "tokens_acts_list": acts, "train_token_ind": len(c["before"]),
                             "is_repeated_datapoint": False})  # fmt: skip
        name = f"Top activations ({'negative' if negative else 'positive'} polarity)"
        quantiles[name] = {"quantile_name": name, "examples": examples}
    acts = [abs(a) for q in quantiles.values() for e in q["examples"] for a in e["tokens_acts_list"] if a]
    lo, hi = 0.0, max(acts, default=abs(node.get("activation") or 0.0)) or 1.0
    return {
        "transcoder_id": scan,
        "index": int(node["feature"]),
        "examples_quantiles": list(quantiles.values()),
        "top_logits": top,
        "bottom_logits": bottom,
        "act_min": lo,
        "act_max": hi,
        "quantile_values": [],
        "histogram": _histogram(acts, lo, hi) if acts else [],
    }


def feature_files(data: Mapping[str, Any], folder: str | Path) -> dict[Path, str]:
    """The feature files of ``data``'s neurons under ``folder`` (the data folder the frontend serves): path ->
    JSON text, merged with the files already there (:func:`feature_file`).

    Only for a ``scan`` under ``./graph_data/``; a Neuronpedia scan has its features on Neuronpedia.
    """
    scan = str(data["metadata"].get("scan", ""))
    if not scan.startswith("./graph_data/"):
        return {}
    root = Path(folder) / scan[len("./graph_data/") :]
    files: dict[Path, str] = {}
    for node in data["nodes"]:
        if node.get("feature_type") != NEURON_TYPE:
            continue
        path = root / f"{int(node['feature'])}.json"
        existing = json.loads(files[path]) if path in files else None
        if existing is None and path.exists():
            try:
                existing = json.loads(path.read_text(encoding="utf-8"))
            except ValueError:
                existing = None  # a damaged feature file of ours: written anew
        files[path] = json.dumps(feature_file(node, scan, existing))
    return files


def normalise_q_params(q: Any) -> dict[str, Any]:
    """``qParams`` with circuit-tracer's saved string forms read back as lists and numbers.

    Its Save writes the URL parameters: ``pinnedIds`` ``"a,b"``, ``supernodes`` and ``clerps`` as JSON strings,
    ``pruningThreshold`` as a string. Keys it does not know are kept as they are.
    """
    if q is None:
        q = {}
    if not isinstance(q, Mapping):
        raise NeurontraceError("qParams must be an object")
    out = dict(q)

    def parse_json(key: str) -> Any:
        value = out.get(key)
        if isinstance(value, str):
            try:
                return json.loads(value) if value.strip() else []
            except ValueError:
                raise NeurontraceError(f"qParams.{key} is neither a list nor JSON: {value[:60]!r}") from None
        return value

    pinned = out.get("pinnedIds")
    if isinstance(pinned, str):
        pinned = [p for p in pinned.split(",") if p]
    if pinned and (not isinstance(pinned, list) or not all(isinstance(p, str) for p in pinned)):
        raise NeurontraceError(
            f"qParams.pinnedIds must be node ids, a list of strings or 'a,b', not {json.dumps(pinned)[:60]}"
        )
    out["pinnedIds"] = list(pinned or [])
    out["supernodes"] = _string_lists(parse_json("supernodes"), "supernodes", "[name, node id, ...]")
    if "clerps" in out:
        out["clerps"] = _string_lists(parse_json("clerps"), "clerps", "[node id, label]")
    if isinstance(out.get("pruningThreshold"), str):
        try:
            out["pruningThreshold"] = float(out["pruningThreshold"])
        except ValueError:
            raise NeurontraceError(
                f"qParams.pruningThreshold is not a number: {out['pruningThreshold']!r}"
            ) from None
    for key, default in (("linkType", "both"), ("clickedId", ""), ("sg_pos", "")):
        out[key] = default if out.get(key) in (None, "null") else str(out[key])
    return out


def _string_lists(value: Any, key: str, form: str) -> list[list[str]]:
    """``qParams[key]`` as a list of lists of strings; anything else is a one-line error, never turned into
    strings (``"str"`` would become ``["s", "t", "r"]``)."""
    if not value:
        return []
    if not isinstance(value, list):
        raise NeurontraceError(f"qParams.{key} must be a list of {form} lists, not {type(value).__name__}")
    for i, entry in enumerate(value):
        if not isinstance(entry, list) or not all(isinstance(x, str) for x in entry):
            raise NeurontraceError(
                f"qParams.{key}[{i}] must be a list of strings, {form}, not {json.dumps(entry)[:60]}"
            )
    return [list(entry) for entry in value]


def import_graph_json(data: Any) -> dict[str, Any]:
    """A circuit-tracer / Neuronpedia graph JSON checked and ready for the viewer, nothing dropped.

    Node and link fields pass through unchanged; ``qParams`` is normalised (:func:`normalise_q_params`). Errors
    (not an object, no nodes, duplicate node ids, links to unknown nodes, pins or supernodes naming unknown nodes,
    NaN) are one-line :class:`NeurontraceError`.
    """
    if not isinstance(data, Mapping):
        raise NeurontraceError(f"a graph JSON must be an object, not {type(data).__name__}")
    for key in ("metadata", "nodes", "links"):
        if key not in data:
            raise NeurontraceError(
                f"not an attribution-graph JSON: no {key!r} (expected metadata, qParams, nodes, links)"
            )
    if not isinstance(data["nodes"], list) or not isinstance(data["links"], list):
        raise NeurontraceError("not an attribution-graph JSON: 'nodes' and 'links' must be lists")
    ids: set[str] = set()
    for n in data["nodes"]:
        nid = n.get("node_id") if isinstance(n, Mapping) else None
        if not isinstance(nid, str):
            raise NeurontraceError("not an attribution-graph JSON: a node has no string node_id")
        if nid in ids:
            raise NeurontraceError(f"node id {nid!r} appears twice in the graph JSON")
        ids.add(nid)
    for link in data["links"]:
        if not isinstance(link, Mapping) or link.get("source") not in ids or link.get("target") not in ids:
            raise NeurontraceError(
                f"a link joins unknown nodes: {dict(link) if isinstance(link, Mapping) else link!r}"
            )
        w = link.get("weight")
        if not isinstance(w, (int, float)) or not math.isfinite(w):
            raise NeurontraceError(
                f"link {link['source']} -> {link['target']} has weight {w!r}, not a finite number"
            )
    out = dict(data)
    out["qParams"] = normalise_q_params(data.get("qParams"))
    q = out["qParams"]
    unknown = [p for p in q["pinnedIds"] if p not in ids]
    unknown += [m for s in q["supernodes"] for m in s[1:] if m not in ids]
    if unknown:
        raise NeurontraceError(f"qParams names node {unknown[0]!r}, which is not in the graph")
    return out


_NODE_ID = re.compile(r"^(E|\d+|err)_(\d+)_(\d+)$")
_CORE_KEYS = {
    "node_id", "feature", "layer", "ctx_idx", "feature_type", "jsNodeId", "clerp", "influence", "activation",
    "token_prob", "is_target_logit", "run_idx", "reverse_ctx_idx", "attribution", "token", "index",
    "influence_raw", "unit",
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
            if raw["feature_type"] in ERROR_TYPES and match[1] != "err":
                raise NeurontraceError(
                    f"node {raw['node_id']} is a circuit-tracer {raw['feature_type']} node, which neurontrace's "
                    "graphs name err_LAYER_POS: open circuit-tracer graphs with `neurontrace view FILE.json`"
                )
            kind = ERROR if match[1] == "err" else _KINDS.get(raw["feature_type"], NEURON)
            layer = -1 if kind == EMBEDDING else int(match[1]) if kind == NEURON else n_layers
            if kind == ERROR:
                layer = int(match[2])
            if kind == LOGIT and not n_layers:
                n_layers = int(match[1]) - 1
                layer = n_layers
            extra = {k: v for k, v in raw.items() if k not in _CORE_KEYS}
            token = raw.get("token", "")
            node = GraphNode(
                kind=kind,
                layer=layer,
                position=int(raw["ctx_idx"]),
                index=int(raw.get("index", -1 if kind == ERROR else match[2])),
                activation=float(raw["activation"] or 0.0),
                attribution=float(raw.get("attribution", 0.0)),
                token=token,
                prob=float(raw.get("token_prob", 0.0)),
                influence=raw.get("influence_raw"),
                cumulative=raw.get("influence") if kind != LOGIT else None,
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

"""Supernodes: a graph's neurons clustered by where their input comes from and which outputs they push.

Profiles use the graph's path shares, as pruning does (``graphs/prune.py``): ``A_n`` is ``|adjacency|`` with
rows normalised to 1, so ``A_n[t, s]`` is the share of node ``t``'s direct input that comes from ``s``, and
``P = A_n + A_n^2 + ... = A_n (I - A_n)^-1`` sums those shares over every path (the graph is acyclic).

- **Input profile** of neuron ``t``: ``P[t, e]`` for each embedding node ``e`` (a token at a position), the
  share of ``t``'s input that comes, through all paths, from that embedding.
- **Output profile** of neuron ``s``: for each target logit ``l``, the share of ``l``'s input that comes from
  ``s`` through all paths, *signed*: the same series on ``S = A_n * sign(A) * sign(a_t)`` (each edge's sign,
  flipped where the target neuron's activation is negative, so a path's sign is the sign of its effect on the
  logit). Unsigned shares would not tell a neuron that pushes ``' are'`` from one that suppresses it.

Each profile is rescaled to absolute sum 1 (what ``Supernode.input_share``/``output_share`` report), then to
unit length, and the two are concatenated: the cosine similarity of two neurons is the mean of their input and
output cosine similarities. Clustering is average-linkage agglomerative on a distance that is the cosine
distance (1 - similarity) plus ``layer_weight`` times the layer gap as a fraction of the model's depth, and
infinite between neurons at different token positions (a supernode is one role at one position, as in the
attribution-graph papers; profiles alone put most of a graph in one or two groups, through the first token's
attention-sink input), deterministic, cut at ``distance_threshold`` or at ``n_clusters``. A cluster is labelled by its
dominant input (largest mean input share), its dominant output (largest mean |output share|; ``→`` pushes,
``⊣`` suppresses) and its layer range: ``from ' keys'@1 → ' are' (L2–L7)``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from neurontrace.errors import NeurontraceError
from neurontrace.graphs.build import EMBEDDING, LOGIT, NEURON, AttributionGraph
from neurontrace.graphs.export import node_id
from neurontrace.graphs.prune import normalised_abs


@dataclass
class Supernode:
    """A labelled group of neuron nodes of one graph."""

    label: str
    nodes: list[int]  # indices into graph.nodes
    node_ids: list[str]  # circuit-tracer node ids ("{layer}_{index}_{pos}")
    layers: tuple[int, int]  # lowest and highest layer of the members
    input_token: str | None  # the dominant input: embedding token and position (None: no input path)
    input_position: int | None
    input_share: float  # the members' mean share of input from that embedding
    output_token: str | None  # the dominant target logit (None: no path to a logit)
    output_share: float  # the members' mean signed share of their output on it (< 0: they suppress it)

    def to_list(self) -> list[str]:
        """The circuit-tracer ``qParams.supernodes`` entry: ``[label, node_id, ...]``."""
        return [self.label, *self.node_ids]


def path_shares(graph: AttributionGraph) -> tuple[torch.Tensor, torch.Tensor]:
    """Input profiles ``[neurons, embeddings]`` (shares >= 0) and signed output profiles ``[neurons, logits]``.

    Each row is rescaled to sum of absolute values 1 (a row with no path stays 0).
    """
    a_n = normalised_abs(graph.adjacency)
    kinds = [n.kind for n in graph.nodes]
    neurons = [i for i, k in enumerate(kinds) if k == NEURON]
    embeds = [i for i, k in enumerate(kinds) if k == EMBEDDING]
    logits = [i for i, k in enumerate(kinds) if k == LOGIT]
    eye = torch.eye(a_n.shape[0], dtype=a_n.dtype)
    empty = torch.zeros(len(neurons), 0, dtype=a_n.dtype)
    # P[:, E] = (I - A_n)^-1 A_n[:, E]
    into = torch.linalg.solve(eye - a_n, a_n[:, embeds])[neurons] if embeds else empty
    # signed shares: a path's sign is its effect on the logit (a negative neuron flips what feeds it)
    flip = torch.tensor(
        [-1.0 if n.kind == NEURON and n.activation < 0 else 1.0 for n in graph.nodes], dtype=a_n.dtype
    )
    signed = a_n * graph.adjacency.double().sign() * flip[:, None]
    # P_s[Lg, :] = S[Lg, :] (I - S)^-1, solved transposed
    out = torch.linalg.solve((eye - signed).T, signed[logits].T)[neurons] if logits else empty

    def rescale(x: torch.Tensor) -> torch.Tensor:
        total = x.abs().sum(1, keepdim=True)
        return torch.where(total > 1e-12, x / total.clamp_min(1e-300), torch.zeros_like(x))

    return rescale(into.clamp_min(0)), rescale(out)


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    norm = x.norm(dim=1, keepdim=True)
    return torch.where(norm > 1e-12, x / norm.clamp_min(1e-300), torch.zeros_like(x))


def average_linkage(
    distance: torch.Tensor, *, n_clusters: int | None = None, threshold: float = 0.5
) -> list[list[int]]:
    """Agglomerative clusters of items with pairwise ``distance`` ``[n, n]`` (average linkage).

    Merges the closest pair of clusters until ``n_clusters`` remain (when given) or no two clusters are closer
    than ``threshold``. Deterministic (no randomness; equal distances go to the lowest index). Clusters are returned as sorted
    index lists, ordered by their first member.
    """
    n = distance.shape[0]
    members: dict[int, list[int]] = {i: [i] for i in range(n)}
    if n < 2:
        return list(members.values())
    d = distance.double().clone()
    d.fill_diagonal_(float("inf"))
    row_min, row_arg = d.min(1)
    target = n_clusters if n_clusters is not None else 1
    while len(members) > target:
        i = int(row_min.argmin())
        j = int(row_arg[i])
        if n_clusters is None and float(row_min[i]) > threshold:
            break
        i, j = min(i, j), max(i, j)
        ni, nj = len(members[i]), len(members[j])
        merged = (ni * d[i] + nj * d[j]) / (ni + nj)  # Lance-Williams update for average linkage
        merged[i] = merged[j] = float("inf")
        d[i], d[:, i] = merged, merged
        d[j], d[:, j] = float("inf"), float("inf")
        members[i] += members.pop(j)
        # rows whose nearest cluster was i or j, and rows i and j themselves, need a fresh minimum
        stale = (row_arg == i) | (row_arg == j)
        stale[i] = stale[j] = True
        rows = stale.nonzero().flatten()
        row_min[rows], row_arg[rows] = d[rows].min(1)
        closer = d[:, i] < row_min  # the merged cluster may now be the nearest of other rows
        row_min[closer], row_arg[closer] = d[closer, i], i
    return [sorted(m) for m in sorted(members.values(), key=min)]


def _describe(token: str | None, position: int | None = None) -> str:
    if token is None:
        return "(none)"
    return repr(token) if position is None else f"{token!r}@{position}"


def find_supernodes(
    graph: AttributionGraph,
    *,
    n_clusters: int | None = None,
    distance_threshold: float = 0.5,
    min_size: int = 2,
    layer_weight: float = 0.5,
    same_position: bool = True,
) -> list[Supernode]:
    """Cluster ``graph``'s neurons by their input and output profiles into labelled supernodes.

    ``n_clusters`` (when given) fixes the number of clusters, else clusters merge while their average cosine
    distance is at most ``distance_threshold`` (0: identical profiles, 1: unrelated). Clusters with fewer than
    ``min_size`` neurons are not reported, so a neuron is in at most one supernode. ``same_position`` keeps
    each supernode at one token position; ``layer_weight`` makes neurons layers apart less alike. Supernodes come strongest
    first (summed |attribution| of their members).
    """
    if n_clusters is not None and n_clusters < 1:
        raise NeurontraceError("n_clusters must be at least 1")
    if not 0.0 <= distance_threshold <= 2.0:
        raise NeurontraceError("distance_threshold is a cosine distance, between 0 and 2")
    if min_size < 1:
        raise NeurontraceError("min_size must be at least 1")
    neurons = graph.indices(NEURON)
    if not neurons:
        return []
    embeds, logits = graph.indices(EMBEDDING), graph.indices(LOGIT)
    into, out = path_shares(graph)
    profile = torch.cat([_unit_rows(into), _unit_rows(out)], dim=1) / 2**0.5
    connected = (profile.norm(dim=1) > 1e-12).nonzero().flatten().tolist()  # isolated neurons stay out
    if not connected:
        return []
    p = profile[connected]
    distance = (1.0 - p @ p.T).clamp_min(0.0)
    members = [graph.nodes[neurons[c]] for c in connected]
    layers = torch.tensor([float(n.layer) for n in members], dtype=distance.dtype)
    depth = max(1, graph.n_layers - 1)
    distance = distance + layer_weight * (layers[:, None] - layers[None, :]).abs() / depth
    if same_position:
        positions = torch.tensor([n.position for n in members])
        apart = positions[:, None] != positions[None, :]
        distance = torch.where(apart, torch.full_like(distance, 1e9), distance)
    clusters = average_linkage(distance, n_clusters=n_clusters, threshold=distance_threshold)

    n_layers = graph.n_layers
    found: list[tuple[float, Supernode]] = []
    for cluster in clusters:
        if len(cluster) < min_size:
            continue
        rows = [connected[c] for c in cluster]
        nodes = [neurons[r] for r in rows]
        mean_in, mean_out = into[rows].mean(0), out[rows].mean(0)
        src = graph.nodes[embeds[int(mean_in.argmax())]] if mean_in.numel() and mean_in.max() > 0 else None
        k = int(mean_out.abs().argmax()) if mean_out.numel() else 0
        dst = graph.nodes[logits[k]] if mean_out.numel() and mean_out[k] != 0 else None
        lo = min(graph.nodes[i].layer for i in nodes)
        hi = max(graph.nodes[i].layer for i in nodes)
        span = f"L{lo}" if lo == hi else f"L{lo}–L{hi}"
        source = _describe(src.token, src.position) if src else _describe(None)
        arrow = "⊣" if dst and mean_out[k] < 0 else "→"
        label = f"from {source} {arrow} {_describe(dst.token if dst else None)} ({span})"
        supernode = Supernode(
            label=label,
            nodes=nodes,
            node_ids=[node_id(graph.nodes[i], n_layers) for i in nodes],
            layers=(lo, hi),
            input_token=src.token if src else None,
            input_position=src.position if src else None,
            input_share=float(mean_in.max()) if src else 0.0,
            output_token=dst.token if dst else None,
            output_share=float(mean_out[k]) if dst else 0.0,
        )
        found.append((sum(abs(graph.nodes[i].attribution) for i in nodes), supernode))
    found.sort(key=lambda x: -x[0])  # stable: equal strength keeps the clusters' order
    result = [s for _, s in found]
    seen: dict[str, int] = {}
    for s in result:  # labels are unique: repeats get a counter
        seen[s.label] = seen.get(s.label, 0) + 1
        if seen[s.label] > 1:
            s.label = f"{s.label} #{seen[s.label]}"
    return result


def with_supernodes(
    circuit_tracer_json: dict[str, Any], supernodes: Sequence[Supernode], *, keep_existing: bool = False
) -> dict[str, Any]:
    """A copy of a circuit-tracer graph JSON whose ``qParams.supernodes`` lists ``supernodes``.

    Existing supernodes (e.g. drawn in the viewer) are replaced unless ``keep_existing``. Every node id must
    be in the JSON: cluster the same graph that was exported (after pruning, not before).
    """
    try:
        present = {node["node_id"] for node in circuit_tracer_json["nodes"]}
        q_params = circuit_tracer_json.get("qParams") or {}
    except (KeyError, TypeError):
        raise NeurontraceError("not a circuit-tracer graph JSON (no nodes with node_id)") from None
    for s in supernodes:
        missing = [i for i in s.node_ids if i not in present]
        if missing:
            raise NeurontraceError(
                f"supernode {s.label!r} names node {missing[0]} that is not in the graph JSON; "
                "find supernodes on the graph you export"
            )
    data = copy.copy(circuit_tracer_json)
    data["qParams"] = {
        "pinnedIds": [],
        "linkType": "both",
        "clickedId": "",
        "sg_pos": "",
        **copy.deepcopy(q_params),
    }
    existing = list(data["qParams"].get("supernodes") or []) if keep_existing else []
    data["qParams"]["supernodes"] = existing + [s.to_list() for s in supernodes]
    return data

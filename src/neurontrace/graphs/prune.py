"""Pruning a graph by influence on the target logits (METHOD.md section 6).

Rows of ``|A|`` are normalised to sum to 1, so ``A_n[t, s]`` is the share of target ``t``'s input that comes from
``s``. A node's influence is the logit-weighted sum over all paths to the logits:
``influence = w @ (A_n + A_n^2 + ...) = w @ A_n @ (I - A_n)^-1`` (the series is finite: the graph is acyclic).

As circuit-tracer does, every node but the logits (neurons and embeddings) is ranked by influence, and a node's
*cumulative influence* is the share of the total held by it and every node ranked above it (lower: more
important). The neurons of the smallest prefix of that ranking that reaches ``node_fraction`` are kept
(embeddings and logits always stay), then the edges (scored by the influence of their target times their share)
until ``edge_fraction``, then neurons left without a path are dropped: no incoming edge, or no outgoing edge.
Each kept node carries its cumulative influence over the *unpruned* graph, so a kept neuron's is at most the
fraction reached (what the exported ``influence`` field and ``metadata.node_threshold`` mean).
"""

from __future__ import annotations

import torch

from neurontrace.graphs.build import LOGIT, NEURON, AttributionGraph


def normalised_abs(adjacency: torch.Tensor) -> torch.Tensor:
    a = adjacency.abs().double()
    total = a.sum(1, keepdim=True)
    return torch.where(total > 0, a / total.clamp_min(1e-300), torch.zeros_like(a))


def logit_weights(graph: AttributionGraph) -> torch.Tensor:
    """The weight of each target logit (its probability), 0 for every other node, ``[N]``."""
    return torch.tensor([n.attribution if n.kind == LOGIT else 0.0 for n in graph.nodes], dtype=torch.float64)


def path_influence(graph: AttributionGraph) -> torch.Tensor:
    """``w A_n (I - A_n)^-1``: every node's influence on the weighted logits through its paths, ``[N]`` (0 at
    the logits, which have no outgoing edges)."""
    a_n = normalised_abs(graph.adjacency)
    w = logit_weights(graph)
    eye = torch.eye(a_n.shape[0], dtype=torch.float64)
    # row vector x = w A_n (I - A_n)^-1  <=>  x (I - A_n) = w A_n
    return torch.linalg.solve((eye - a_n).T, (w @ a_n)[:, None])[:, 0]


def node_influence(graph: AttributionGraph) -> torch.Tensor:
    """Influence of every node on the (probability-weighted) target logits, ``[N]``; a logit's is its weight."""
    w = logit_weights(graph)
    return torch.where(w > 0, w, path_influence(graph))


def cumulative_influence(values: torch.Tensor) -> torch.Tensor:
    """Each entry's share of the total held by it and every larger entry (ties: lower index first), ``[N]``."""
    total = float(values.sum())
    order = torch.sort(values, descending=True, stable=True).indices
    out = torch.zeros_like(values, dtype=torch.float64)
    if total > 0:
        out[order] = values[order].double().cumsum(0) / total
    return out


def _cumulative_keep(values: torch.Tensor, fraction: float) -> torch.Tensor:
    """Boolean mask of the largest ``values`` whose sum first reaches ``fraction`` of the total."""
    keep = torch.zeros_like(values, dtype=torch.bool)
    total = float(values.sum())
    if total <= 0:
        return keep
    order = torch.sort(values, descending=True, stable=True).indices
    cumulative = values[order].cumsum(0) / total
    n = int((cumulative < fraction - 1e-12).sum()) + 1
    keep[order[: min(n, len(order))]] = True
    return keep


def prune_graph(
    graph: AttributionGraph, *, node_fraction: float = 0.8, edge_fraction: float = 0.98
) -> AttributionGraph:
    """A smaller graph keeping the nodes and edges that carry most of the influence on the logits."""
    paths = path_influence(graph)
    logit_weight = logit_weights(graph)
    influence = torch.where(logit_weight > 0, logit_weight, paths)  # node_influence
    kinds = [n.kind for n in graph.nodes]
    is_neuron = torch.tensor([k == NEURON for k in kinds])
    is_logit = torch.tensor([k == LOGIT for k in kinds])
    ranked = torch.where(is_logit, torch.zeros_like(paths), paths)  # every node but the logits
    cumulative = cumulative_influence(ranked)
    keep = ~is_neuron  # embeddings and logits always stay
    keep |= is_neuron & _cumulative_keep(ranked, node_fraction)
    a_n = normalised_abs(graph.adjacency)
    # an edge's score: its target's influence (paths, plus the weight when the target is a logit) x its share
    edge_score = (paths + logit_weight)[:, None] * a_n
    edge_score = edge_score * keep[:, None] * keep[None, :]
    edge_keep = _cumulative_keep(edge_score.flatten(), edge_fraction).view_as(edge_score)
    adjacency = torch.where(edge_keep, graph.adjacency, torch.zeros_like(graph.adjacency))
    # drop neurons left dangling (repeat: removing one can strand another)
    while True:
        has_in = (adjacency != 0).any(1)
        has_out = (adjacency != 0).any(0)
        dangling = keep & is_neuron & ~(has_in & has_out)
        if not dangling.any():
            break
        keep &= ~dangling
        adjacency[dangling, :] = 0
        adjacency[:, dangling] = 0
    idx = keep.nonzero().flatten()
    nodes = []
    for i in idx.tolist():
        node = graph.nodes[i]
        cum = None if kinds[i] == LOGIT else float(cumulative[i])
        nodes.append(type(node)(**{**node.__dict__, "influence": float(influence[i]), "cumulative": cum}))
    meta = {
        **graph.meta,
        "pruned": {
            "node_fraction": node_fraction,
            "edge_fraction": edge_fraction,
            "nodes_before": len(graph.nodes),
        },
    }
    pruned = AttributionGraph(
        graph.prompt, graph.tokens, graph.token_ids, nodes, adjacency[idx][:, idx].clone(), meta
    )
    return pruned

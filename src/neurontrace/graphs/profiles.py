"""Attribution profiles of a graph's nodes and edges (the paper's "attr" and "contrib" maps, ADAG).

All three come from the graph alone, through its paths. Let ``A[t, s]`` be the raw edge weights and ``u_s`` a
source's unit value: its activation for neurons (and logits), 1 for embeddings and error nodes (their edges
are derivatives with respect to a scale that is 1). ``J = A / u`` (column-wise) is then the direct derivative
``d t / d s`` of each edge, and ``P = (I - J)^-1 = I + J + J^2 + ...`` (a finite sum: the graph is acyclic) the
total derivative through all paths of the graph, with ``P[i, i] = 1``.

- **source-token attribution** ``attr[i, p] = P[i, E_p]``: how much of node ``i``'s value comes from the embedding
  at position ``p``, summed over every path from it (an embedding node: 1 at its own position). In a complete
  graph (every neuron a node) it is the replacement model's total attribution ``sum_d e_p * d a_i / d e_p``,
  so for bias-free families a node's row sums to its activation (RelP's conservation).
- **logit contribution** ``contrib[i, l] = u_i * P[l, i]``: node ``i``'s contribution to target logit ``l``
  through every path (a logit's to itself: its value). In a complete graph it is ``a_i * d logit_l / d a_i``
  in the replacement model, and the probability-weighted sum over the logits is the node's RelP score.
  Beside it, ``influence[i, l]``: the unsigned influence pruning ranks nodes by (:mod:`neurontrace.graphs.prune`),
  per logit; weighted by the logits' probabilities it is the node's pruning influence.
- **edge share** ``share[t, s] = A[t, s] * down[t] / m``: the edge's part of the final attribution, its weight
  times the total derivative of the metric ``m = sum_l w_l logit_l`` with respect to its target (``down =
  sum_l w_l P[l, :]``), over ``m``. Every path from an embedding to a logit crosses each layer boundary once, so
  in a complete graph of a bias-free model the shares of the edges crossing any boundary sum to 1.

A pruned graph keeps fewer paths: its profiles are what its own paths carry.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from neurontrace.errors import NeurontraceError
from neurontrace.graphs.build import EMBEDDING, ERROR, LOGIT, AttributionGraph
from neurontrace.graphs.export import node_id
from neurontrace.graphs.prune import normalised_abs
from neurontrace.io import write_text_atomic

PROFILES_SCHEMA_VERSION = 1


@dataclass
class NodeProfiles:
    """Profiles of every node of one graph (rows in the graph's node order)."""

    node_ids: list[str]
    tokens: list[str]  # the prompt's tokens: the columns of ``source_attribution``
    logit_ids: list[str]  # the target logits: the columns of ``logit_contribution`` and ``logit_influence``
    logit_weights: list[float]  # their probability weights in the metric
    activations: list[float]
    source_attribution: torch.Tensor  # [N, T]
    logit_contribution: torch.Tensor  # [N, K] signed
    logit_influence: torch.Tensor  # [N, K] unsigned (pruning's influence, per logit)
    edge_share: torch.Tensor  # [N, N] (target, source)
    edge_weight: torch.Tensor  # [N, N] the graph's raw edges
    metric: float  # sum over the logits of weight * value

    @property
    def metric_attribution(self) -> torch.Tensor:
        """Each node's contribution to the metric through the graph's paths, ``[N]``."""
        return self.logit_contribution @ torch.tensor(self.logit_weights, dtype=self.logit_contribution.dtype)

    def to_dict(self) -> dict:
        nz = self.edge_weight.nonzero().tolist()
        return {
            "format": "neurontrace-profiles",
            "schema_version": PROFILES_SCHEMA_VERSION,
            "tokens": self.tokens,
            "logits": [
                {"node_id": i, "weight": w} for i, w in zip(self.logit_ids, self.logit_weights, strict=True)
            ],
            "metric": self.metric,
            "nodes": [
                {
                    "node_id": nid,
                    "activation": self.activations[i],
                    "source_attribution": self.source_attribution[i].tolist(),
                    "logit_contribution": self.logit_contribution[i].tolist(),
                    "logit_influence": self.logit_influence[i].tolist(),
                    "metric_attribution": float(self.metric_attribution[i]),
                }
                for i, nid in enumerate(self.node_ids)
            ],
            "edges": [
                {
                    "source": self.node_ids[s],
                    "target": self.node_ids[t],
                    "weight": float(self.edge_weight[t, s]),
                    "share": float(self.edge_share[t, s]),
                }
                for t, s in nz
            ],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def save(self, path: str | os.PathLike) -> Path:
        """Write the profiles as JSON, atomically."""
        return write_text_atomic(path, self.to_json())


def unit_values(graph: AttributionGraph) -> torch.Tensor:
    """``u``: each node's value as a source of its edges, 1 for embeddings and error nodes (scales), ``[N]``."""
    return torch.tensor(
        [1.0 if n.kind in (EMBEDDING, ERROR) else n.activation for n in graph.nodes], dtype=torch.float64
    )


def direct_derivatives(graph: AttributionGraph) -> torch.Tensor:
    """``J = A / u`` by column: each edge's ``d target / d source`` (0 from a source whose value is 0)."""
    u = unit_values(graph)
    ok = u.abs() > 1e-12
    return torch.where(ok[None, :], graph.adjacency.double() / torch.where(ok, u, 1.0)[None, :], 0.0)


def node_profiles(graph: AttributionGraph) -> NodeProfiles:
    """The source-token attribution, logit contribution and influence of every node, and every edge's share."""
    N = len(graph.nodes)
    kinds = [n.kind for n in graph.nodes]
    embeds = sorted((n.position, i) for i, n in enumerate(graph.nodes) if n.kind == EMBEDDING)
    embed_cols = [i for _, i in embeds]
    logits = [i for i, k in enumerate(kinds) if k == LOGIT]
    if not logits:
        raise NeurontraceError("the graph has no logit nodes; profiles attribute to the target logits")
    A = graph.adjacency.double()
    u = unit_values(graph)
    eye = torch.eye(N, dtype=torch.float64)
    system = eye - direct_derivatives(graph)
    to_embeds = torch.linalg.solve(system, eye[:, embed_cols])  # P[:, E]
    from_logits = torch.linalg.solve(system.T, eye[:, logits]).T  # P[L, :], [K, N]
    contribution = (from_logits * u[None, :]).T  # [N, K]
    weights = torch.tensor([graph.nodes[i].attribution for i in logits], dtype=torch.float64)
    values = torch.tensor([graph.nodes[i].activation for i in logits], dtype=torch.float64)
    metric = float(weights @ values)
    down = weights @ from_logits  # [N]: d m / d node through the graph's paths
    share = A * down[:, None] / metric if metric != 0 else torch.zeros_like(A)
    a_n = normalised_abs(graph.adjacency)  # pruning's influence, one logit at a time
    influence = torch.linalg.solve((eye - a_n).T, a_n.T[:, logits])  # [N, K]
    influence[logits, torch.arange(len(logits))] = 1.0  # a logit's on itself (no edge leaves a logit)
    ids = [node_id(n, graph.n_layers) for n in graph.nodes]
    return NodeProfiles(
        node_ids=ids,
        tokens=[graph.tokens[p] for p, _ in embeds],
        logit_ids=[ids[i] for i in logits],
        logit_weights=weights.tolist(),
        activations=[n.activation for n in graph.nodes],
        source_attribution=to_embeds,
        logit_contribution=contribution,
        logit_influence=influence,
        edge_share=share,
        edge_weight=A,
        metric=metric,
    )

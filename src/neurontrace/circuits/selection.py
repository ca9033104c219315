"""Circuit selection from node scores: threshold, top-k, or cumulative mass (METHOD.md section 4).

Scores are ``[L, T, d]`` (per-position nodes) or ``[L, d]`` (position-free nodes: a unit at every position).
A circuit is a boolean mask of the same shape.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch

from neurontrace.errors import NeurontraceError
from neurontrace.neurons import NeuronId


@dataclass
class Circuit:
    """A set of nodes as a boolean mask over ``[L, T, d]`` or ``[L, d]`` (then every position of a unit)."""

    mask: torch.Tensor
    layers: list[int]
    site: str = "neurons"
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_nodes(self) -> int:
        return int(self.mask.sum())

    @property
    def per_position(self) -> bool:
        return self.mask.dim() == 3

    def complement(self) -> Circuit:
        return Circuit(~self.mask, self.layers, self.site, {**self.meta, "complement": True})

    def nodes(self, scores: torch.Tensor | None = None) -> list[dict[str, Any]]:
        """The nodes as dicts (layer, unit, position or None, score if given), strongest first when scored."""
        idx = self.mask.nonzero().tolist()
        out = []
        for i in idx:
            layer, unit = self.layers[i[0]], i[-1]
            node = {"node": str(NeuronId(layer, unit)), "layer": layer, "unit": unit}
            node["position"] = i[1] if self.per_position else None
            if scores is not None:
                node["score"] = float(scores[tuple(i)])
            out.append(node)
        if scores is not None:
            out.sort(key=lambda n: -abs(n["score"]))
        return out

    def to_json(self, scores: torch.Tensor | None = None) -> str:
        return json.dumps(
            {"site": self.site, "n_nodes": self.n_nodes, **self.meta, "nodes": self.nodes(scores)}
        )


def select_circuit(
    scores: torch.Tensor,
    *,
    layers: list[int],
    site: str = "neurons",
    threshold: float | None = None,
    top_k: int | None = None,
    mass: float | None = None,
) -> Circuit:
    """Nodes with ``|score| > threshold``, or the ``top_k`` largest ``|score|``, or the smallest set of largest
    ``|score|`` nodes holding a fraction ``mass`` of the total ``|score|``. Exactly one criterion."""
    if sum(x is not None for x in (threshold, top_k, mass)) != 1:
        raise NeurontraceError("select a circuit by exactly one of: threshold, top_k, mass")
    if scores.dim() not in (2, 3) or scores.shape[0] != len(layers):
        raise NeurontraceError(
            f"scores must be [layers, (positions,) units]; got shape {tuple(scores.shape)}"
        )
    magnitude = scores.abs().float()
    if threshold is not None:
        mask = magnitude > threshold
        meta = {"threshold": threshold}
    elif top_k is not None:
        if top_k < 0:
            raise NeurontraceError("top_k must be at least 0")
        flat = torch.zeros(magnitude.numel(), dtype=torch.bool)
        flat[magnitude.flatten().topk(min(top_k, magnitude.numel())).indices] = True
        mask = flat.view_as(magnitude)
        meta = {"top_k": top_k}
    else:
        if not 0 < mass <= 1:
            raise NeurontraceError("mass must be in (0, 1]")
        values, order = magnitude.flatten().sort(descending=True)
        cumulative = values.cumsum(0) / values.sum().clamp_min(1e-30)
        n = min(int((cumulative < mass - 1e-7).sum()) + 1, int((values > 0).sum()))
        flat = torch.zeros(magnitude.numel(), dtype=torch.bool)
        flat[order[:n]] = True
        mask = flat.view_as(magnitude)
        meta = {"mass": mass}
    return Circuit(mask, list(layers), site, meta)


def random_circuit_like(circuit: Circuit, *, generator: torch.Generator) -> Circuit:
    """A random circuit with as many nodes as ``circuit`` (the random-nodes control)."""
    flat = torch.zeros(circuit.mask.numel(), dtype=torch.bool)
    flat[torch.randperm(flat.numel(), generator=generator)[: circuit.n_nodes]] = True
    return Circuit(flat.view_as(circuit.mask), circuit.layers, circuit.site, {"random_control": True})

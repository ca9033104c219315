"""Edge-based circuits: the neurons of attribution graphs that strong edges pass through.

A neuron node is kept iff it has at least one **incoming** and at least one **outgoing** edge with
``|weight| >= threshold``: it lies on a strong edge into it (from an embedding, an error node or an earlier
neuron) and on a strong edge out of it (to a later neuron or a target logit). One pass: an edge counts whether
or not its other end is kept. The threshold is the ``percentile``-th percentile of the ``|weight|`` of every
edge of the graph (its non-zero adjacency entries, of every kind; linear interpolation between order
statistics, as ``numpy.percentile``), so sweeping the percentile gives circuits of different sizes.

This is the paper's edge thresholding (``ADAGConfig.edge_threshold``/``parent_threshold`` in
TransluceAI/circuits, ``core/jvp.py``): there an edge is dropped iff ``max over the batch of |w| <
threshold``, ``w`` the edge's *relative* attribution ``a_s * d a_t / d a_s / a_t`` (our
:attr:`~neurontrace.graphs.build.AttributionGraph.normalised`, the default ``weights``; ``raw`` takes
``adjacency`` itself), so an edge exactly at the threshold stays, as here. (``topk`` is passed there but not
used; ``percentage_threshold`` is a *node* threshold, ``|a dm/da| >= p * m``, the graph's ``node_threshold``.)

Several graphs (one per prompt of a dataset, same token length for per-position nodes) are one batch as in
the paper: an edge's weight is its largest ``|w|`` over the graphs, so a node ``(layer, position, neuron)`` is
kept iff some graph gives it a strong incoming edge and some graph a strong outgoing one; the percentile is
taken over the edges of every graph pooled.

Equivalently, each neuron node has the **edge score** ``min(max_in |w|, max_out |w|)`` and the circuit at
threshold ``tau`` is ``{score >= tau}``. The circuits of increasing thresholds are therefore nested: prefixes of
the ranking by decreasing score, which is what :func:`neurontrace.evaluation.faithfulness.sweep` measures, so
:func:`sweep_edges` gives a :class:`~neurontrace.evaluation.faithfulness.Curve` with the same ablation,
metric, test set, random control, exact sizes and intervals as the node-based curves (nodes of score 0, without
a strong edge on both sides at any threshold, rank last and are in no grid circuit).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from neurontrace.circuits.selection import Circuit
from neurontrace.errors import NeurontraceError

if TYPE_CHECKING:  # pragma: no cover
    from neurontrace.evaluation.faithfulness import Curve, EvalSet
    from neurontrace.graphs.build import AttributionGraph

WEIGHTS: tuple[str, ...] = ("normalised", "raw")
"""Which edge weights are thresholded: ``normalised`` (divided by the target's activation, the paper's relative
attribution) or ``raw`` (``a_s * d a_t / d a_s``)."""


def percentile_of(sorted_values: torch.Tensor, percentile: float) -> float:
    """The ``percentile`` (0..100) of ascending ``sorted_values``, interpolated linearly (``numpy.percentile``)."""
    if not 0.0 <= float(percentile) <= 100.0 or math.isnan(float(percentile)):
        raise NeurontraceError(f"an edge percentile is between 0 and 100, got {percentile!r}")
    n = sorted_values.numel()
    if n == 0:
        raise NeurontraceError("the graph has no edges; build it with more nodes (a lower node threshold)")
    values = sorted_values.double()
    pos = (n - 1) * float(percentile) / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return float(values[lo] + (values[hi] - values[lo]) * (pos - lo))


@dataclass
class EdgeScores:
    """Every neuron node's edge score, with the pooled edge weights the percentiles come from.

    ``scores``: ``[L, T, d]`` (per-position nodes) or ``[L, d]`` (summed nodes: a unit's largest score over the
    positions), 0 for nodes in no graph; ``edge_weights``: ascending ``|w|`` of every edge of every graph.
    """

    scores: torch.Tensor
    edge_weights: torch.Tensor
    layers: list[int]
    site: str = "neurons"
    weights: str = "normalised"
    n_graphs: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    def threshold(self, percentile: float) -> float:
        """The ``|weight|`` threshold of an edge percentile."""
        return percentile_of(self.edge_weights, percentile)

    def circuit(self, *, percentile: float | None = None, threshold: float | None = None) -> Circuit:
        """The neurons with a strong incoming and a strong outgoing edge (``|w| >= threshold``), the threshold
        given or taken from an edge percentile."""
        if (percentile is None) == (threshold is None):
            raise NeurontraceError("select edges by exactly one of: percentile, threshold")
        meta: dict[str, Any] = {"weights": self.weights}
        if percentile is not None:
            meta["edge_percentile"] = float(percentile)
            threshold = self.threshold(percentile)
        meta["edge_threshold"] = float(threshold)
        # float64 on both sides: a threshold between two float32 weights must not round onto one of them
        mask = (self.scores.double() >= float(threshold)) & (self.scores > 0)
        return Circuit(mask, list(self.layers), self.site, meta)

    def sweep_thresholds(self, percentiles: Sequence[float]) -> list[float]:
        """Thresholds for :func:`~neurontrace.evaluation.faithfulness.sweep` (which keeps ``|score| > tau``)
        that select the circuit of each edge percentile: just below the smallest score the circuit keeps."""
        flat = self.scores.float().flatten()
        out = []
        for p in percentiles:
            kept = flat[self.circuit(percentile=p).mask.flatten()]
            if kept.numel() == 0:
                out.append(float(flat.max()) if flat.numel() else 0.0)
            else:
                low = kept.min()
                out.append(float(torch.nextafter(low, torch.tensor(-math.inf, dtype=low.dtype))))
        return out


def _neuron_rows(graph: AttributionGraph) -> list[int]:
    from neurontrace.graphs.build import NEURON

    return [i for i, n in enumerate(graph.nodes) if n.kind == NEURON]


def edge_scores(
    *,
    graphs: AttributionGraph | Iterable[AttributionGraph],
    weights: str = "normalised",
    summed: bool = False,
    layers: Sequence[int] | None = None,
    width: int | None = None,
) -> EdgeScores:
    """The edge score of every neuron node of ``graphs`` (one graph or many; see the module docstring).

    Graphs are folded one at a time (only the scores and the edge weights are kept), so an iterator of many
    graphs never holds more than one. ``layers`` (default ``0..n_layers-1``) and ``width`` (default the graph's
    ``d_sae`` or ``d_ff``) give the node grid; ``summed`` makes nodes (layer, unit) over every position.
    """
    from neurontrace.graphs.build import AttributionGraph

    if weights not in WEIGHTS:
        raise NeurontraceError(f"unknown edge weights {weights!r}; choose one of {', '.join(WEIGHTS)}")
    if isinstance(graphs, AttributionGraph):
        graphs = [graphs]
    scores: torch.Tensor | None = None
    pooled: list[torch.Tensor] = []
    length = None
    n_graphs = 0
    site = "neurons"
    for graph in graphs:
        n_graphs += 1
        meta = graph.meta
        site = meta.get("site", "neurons")
        if scores is None:
            layers = list(range(int(meta["n_layers"]))) if layers is None else list(layers)
            width = int(meta.get("d_sae") or meta["d_ff"]) if width is None else int(width)
            length = len(graph.tokens)
            shape = (len(layers), width) if summed else (len(layers), length, width)
            scores = torch.zeros(shape, dtype=torch.float32)
        if not summed and len(graph.tokens) != length:
            raise NeurontraceError(
                f"per-position edge circuits need prompts of one token length (got {length} and "
                f"{len(graph.tokens)} tokens); use summed nodes"
            )
        a = (graph.normalised if weights == "normalised" else graph.adjacency).abs().float()
        pooled.append(a[a > 0])
        rows = _neuron_rows(graph)
        if not rows:
            continue
        idx = torch.tensor(rows)
        strongest_in = a[idx].max(dim=1).values  # row t: edges into t
        strongest_out = a[:, idx].max(dim=0).values  # column s: edges out of s
        node_score = torch.minimum(strongest_in, strongest_out)
        index = {layer: i for i, layer in enumerate(layers)}
        for row, value in zip(rows, node_score.tolist(), strict=True):
            n = graph.nodes[row]
            if n.layer not in index or not 0 <= n.index < width:
                raise NeurontraceError(
                    f"graph node L{n.layer}/N{n.index} is outside the node grid ({len(layers)} layers x {width} "
                    "units); build the graphs with the model you evaluate"
                )
            at = (index[n.layer], n.index) if summed else (index[n.layer], n.position, n.index)
            scores[at] = max(float(scores[at]), value)
    if scores is None:
        raise NeurontraceError("no graphs given; pass at least one attribution graph")
    edge_weights = torch.cat(pooled).sort().values if pooled else torch.zeros(0)
    return EdgeScores(scores, edge_weights, list(layers), site, weights, n_graphs)


def select_by_edges(
    *,
    graph: AttributionGraph | Iterable[AttributionGraph],
    percentile: float,
    weights: str = "normalised",
    summed: bool = False,
) -> Circuit:
    """The edge-based circuit of one graph (or a dataset of per-prompt graphs) at an edge ``percentile``: neurons
    with an incoming and an outgoing edge whose ``|weight|`` is at least that percentile of every edge's."""
    return edge_scores(graphs=graph, weights=weights, summed=summed).circuit(percentile=percentile)


def edge_percentiles(points: int = 24) -> list[float]:
    """A sweep grid: ``100 - 100 * logspace(-4, 0, points)`` (the strongest 0.01% of the edges ... all of them)."""
    if points < 1:
        raise NeurontraceError("the edge-percentile grid needs at least one point")
    return sorted({100.0 - 100.0 * float(x) for x in torch.logspace(-4, 0, points, dtype=torch.float64)})


def sweep_edges(
    evalset: EvalSet,
    *,
    scores: EdgeScores | None = None,
    graphs: AttributionGraph | Iterable[AttributionGraph] | None = None,
    percentiles: Sequence[float] | None = None,
    weights: str = "normalised",
    method: str = "relp-edges",
    **sweep_args: Any,
) -> Curve:
    """Faithfulness/completeness of the edge-based circuits of an edge-percentile sweep, on ``evalset``.

    Give ``scores`` (:func:`edge_scores`) or ``graphs``. The circuits are those of :meth:`EdgeScores.circuit` at
    each percentile (default :func:`edge_percentiles`), measured by
    :func:`neurontrace.evaluation.faithfulness.sweep` (``sweep_args``: ``levels``, ``seed``, ``scan_limit``,
    ``random_control``...), so the curve compares point for point with a node-based one of the same evaluation
    set. ``curve.meta["edge_percentiles"]`` maps each grid size to its percentile (the smallest giving it) and
    ``curve.meta["edge_thresholds"]`` to its ``|weight|`` threshold; a point's ``threshold`` is its sweep value.
    """
    from neurontrace.evaluation.faithfulness import sweep

    if (scores is None) == (graphs is None):
        raise NeurontraceError("give edge scores or graphs, not both")
    if evalset.latents is not None:
        raise NeurontraceError(
            "edge-based circuits are selected in the neuron basis; evaluate them on neurons"
        )
    if scores is None:
        summed = evalset.width is None
        scores = edge_scores(graphs=graphs, weights=weights, summed=summed, layers=evalset.layers)
    expected = (len(evalset.layers), evalset.width) if evalset.width is not None else (len(evalset.layers),)
    if tuple(scores.scores.shape[:-1]) != expected:
        raise NeurontraceError(
            f"the edge scores cover {tuple(scores.scores.shape[:-1])} (layers, positions) but the test set has "
            f"{expected}; build the graphs from prompts of the test prompts' token length"
        )
    percentiles = edge_percentiles() if percentiles is None else [float(p) for p in percentiles]
    thresholds = scores.sweep_thresholds(percentiles)
    curve = sweep(evalset, scores.scores, method=method, thresholds=thresholds, **sweep_args)
    by_size: dict[str, float] = {}
    limits: dict[str, float] = {}
    for p in sorted(percentiles, reverse=True):
        k = str(scores.circuit(percentile=p).n_nodes)
        by_size[k], limits[k] = p, scores.threshold(p)  # descending: the smallest percentile of a size stays
    curve.meta = {
        **curve.meta,
        "selection": "edges",
        "edge_weights": scores.weights,
        "n_graphs": scores.n_graphs,
        "edge_percentiles": by_size,
        "edge_thresholds": limits,
    }
    return curve

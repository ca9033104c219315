"""Cluster (supernode) steering: one multiplier for a whole group of neurons, and what it does downstream.

>>> clusters = clusters_of_graph("results/graph/graph.json")      # the graph's supernodes
>>> result = steer_cluster(model, prompt=prompt, cluster=clusters[0], value=0.0, others=clusters[1:])
>>> result.downstream[0].mean_ratio

Steering a cluster is steering each of its neurons with the same edit (:func:`~neurontrace.steering.steer.steer`:
``scale`` multiplies every member's activation by ``value``, 0 ablates; ``set``/``add`` likewise), at the
member's position (a graph node is pinned to its prompt position; an unpinned neuron is edited at every
position). The model then runs as it is (nothing frozen: attention and every later neuron are recomputed), and
the output change is :class:`~neurontrace.steering.steer.SteerResult`'s.

**Downstream ratios.** For every other cluster ``K`` (members ``i``: neuron ``(layer, index)`` at a position),
with ``a_i`` its activation in the clean forward pass and ``a'_i`` in the steered one:

- ``mean_ratio = mean_i a'_i / a_i`` over the members with ``a_i != 0``: circuit-tracer's supernode
  *activation fraction* (its demos' ``InterventionGraph.set_node_activation_fractions``; the percentages drawn
  on the supernodes of intervention figures); ``None`` when every ``a_i`` is 0;
- ``sum_ratio = sum_i a'_i / sum_i a_i``: the ratio of the cluster's total activation (``None`` when the sum is
  0), less sensitive to a member whose clean activation is near 0.

Both are exactly 1 for a cluster whose members all sit in layers at or below the lowest steered layer (or at
earlier positions): the steered neurons cannot reach them. (The paper's code has no supernode interventions;
these are circuit-tracer's semantics, but without its frozen attention.)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from neurontrace.errors import NeurontraceError
from neurontrace.interventions import intervene
from neurontrace.io import JsonResult
from neurontrace.models.model import NeuronModel
from neurontrace.neurons import NeuronId, parse_neuron
from neurontrace.sites import capture
from neurontrace.steering.steer import SCHEMA_VERSION, SteerResult, check_neurons, steer, steering_edits

CLUSTER_MODES: tuple[str, ...] = ("scale", "set", "add")


@dataclass
class Cluster:
    """A named group of neurons; each pinned to a prompt position (``@pos``) or edited at every position."""

    name: str
    neurons: list[NeuronId]


@dataclass
class ClusterRatio:
    """How much of a downstream cluster's activation is left after steering (see the module docstring)."""

    name: str
    n_neurons: int
    layers: tuple[int, int]
    mean_ratio: float | None  # mean over members of after / before (circuit-tracer's activation fraction)
    sum_ratio: float | None  # summed activation after / before
    sum_before: float
    sum_after: float


@dataclass
class ClusterSteerResult(JsonResult):
    """The output change of steering one cluster and the activation ratios of every other cluster."""

    cluster: str
    neurons: list[str]
    mode: str
    value: float
    steer: SteerResult
    downstream: list[ClusterRatio] = field(default_factory=list)
    schema_version: int = field(default=SCHEMA_VERSION)


# ------------------------------------------------------------------------------------------ reading
def _node_from(item: Any) -> NeuronId:
    """A cluster member: ``"L12/N345@3"``, a circuit-tracer neuron id ``"12_345_3"`` or ``{"layer", "index"
    (or "neuron"), "position"}``."""
    if isinstance(item, str):
        parts = item.split("_")
        if len(parts) == 3 and all(p.isdigit() for p in parts):
            return NeuronId(int(parts[0]), int(parts[1]), None, int(parts[2]))
        try:
            return parse_neuron(item)
        except NeurontraceError:
            pass
    if isinstance(item, dict) and "layer" in item and ("index" in item or "neuron" in item):
        position = item.get("position", item.get("ctx_idx"))
        index = item.get("index", item.get("neuron"))
        try:
            return NeuronId(int(item["layer"]), int(index), None, None if position is None else int(position))
        except (TypeError, ValueError):
            pass
    raise NeurontraceError(
        f"cannot read cluster member {item!r}; write 'L12/N345@3', '12_345_3' or "
        '{"layer": 12, "index": 345, "position": 3}'
    )


def read_cluster(path: str | Path) -> Cluster:
    """A cluster from a JSON file: a list of members (see :func:`_node_from`), ``{"name": ..., "nodes": [...]}``
    or a circuit-tracer supernode entry ``[label, node_id, ...]``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise NeurontraceError(f"cannot read cluster file {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise NeurontraceError(f"cluster file {path} is not JSON: {exc.msg} (line {exc.lineno})") from None
    name = path.stem
    if isinstance(data, dict):
        name = str(data.get("name") or data.get("label") or name)
        data = data.get("nodes")
    elif isinstance(data, list) and data and isinstance(data[0], str) and not _is_member(data[0]):
        name, data = data[0], data[1:]  # [label, node_id, ...]
    if not isinstance(data, list) or not data:
        raise NeurontraceError(f'cluster file {path} lists no neurons; give a JSON list such as ["L3/N7@2"]')
    return Cluster(name, [_node_from(item) for item in data])


def _is_member(text: str) -> bool:
    try:
        _node_from(text)
    except NeurontraceError:
        return False
    return True


def clusters_of_graph(path: str | Path) -> list[Cluster]:
    """The supernodes of a graph file as clusters (:func:`graph_clusters` without the prompt)."""
    return graph_clusters(path)[1]


def graph_clusters(path: str | Path) -> tuple[str, list[Cluster]]:
    """The prompt of a graph file and its supernodes as clusters of pinned neurons: the ``qParams.supernodes`` of
    a circuit-tracer JSON (``neurontrace graph --supernodes`` writes them; circuit-tracer's Save keeps drawn ones),
    else :func:`~neurontrace.graphs.supernodes.find_supernodes` on the graph (also for ``*.neurontrace.json``).
    Members that are not neurons (embeddings, logits, error nodes) are left out."""
    from neurontrace.graphs.build import NEURON
    from neurontrace.graphs.export import node_id
    from neurontrace.graphs.supernodes import find_supernodes

    graph, entries = _read_graph(path)
    by_id = {node_id(n, graph.n_layers): n for n in graph.nodes if n.kind == NEURON}
    if not entries:
        entries = [s.to_list() for s in find_supernodes(graph)]
    clusters = []
    for label, *ids in entries:
        members = [by_id[i] for i in ids if i in by_id]
        if members:
            clusters.append(Cluster(label, [NeuronId(n.layer, n.index, None, n.position) for n in members]))
    return graph.prompt, clusters


def _read_graph(path: str | Path):
    """(graph, its circuit-tracer supernode entries ``[label, node_id, ...]``, empty for our own format)."""
    from neurontrace.graphs.export import from_circuit_tracer, from_neurontrace, import_graph_json

    path = Path(path)
    if not path.is_file():
        raise NeurontraceError(
            f"no such graph file: {path}; give a graph.json written by `neurontrace graph`"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NeurontraceError(f"{path} is not a JSON graph file: {exc}") from None
    if isinstance(data, dict) and data.get("format") == "neurontrace-graph":
        return from_neurontrace(data), []
    checked = import_graph_json(data)
    return from_circuit_tracer(checked), checked["qParams"]["supernodes"]


def find_cluster(clusters: Sequence[Cluster], name: str) -> Cluster:
    """The cluster labelled ``name`` (exactly, else the one whose label contains it, case-insensitively)."""
    exact = [c for c in clusters if c.name == name]
    if exact:
        return exact[0]
    partial = [c for c in clusters if name.lower() in c.name.lower()]
    if len(partial) == 1:
        return partial[0]
    labels = "; ".join(repr(c.name) for c in clusters[:8]) or "none"
    what = "several" if partial else "no"
    raise NeurontraceError(
        f"{what} clusters of the graph match {name!r}; give a label or a JSON file of nodes (labels: {labels})"
    )


# ------------------------------------------------------------------------------------------ steering
def _member_values(model: NeuronModel, acts, cluster: Cluster, site: str, length: int) -> torch.Tensor:
    """Activations of a cluster's members (an unpinned member: every prompt position), float64."""
    values = []
    for n in cluster.neurons:
        x = acts.unpadded(0, n.layer, site)[:, n.index].double().cpu()  # [T]
        if n.position is None:
            values.append(x)
        else:
            if not -length <= n.position < length:
                raise NeurontraceError(
                    f"{n} of cluster {cluster.name!r} is outside the prompt, which has {length} tokens; "
                    "use the prompt the graph was built for"
                )
            p = n.position % length
            values.append(x[p : p + 1])
    return torch.cat(values)


def cluster_ratio(cluster: Cluster, before: torch.Tensor, after: torch.Tensor) -> ClusterRatio:
    """:class:`ClusterRatio` of a cluster's member activations before and after (see the module docstring)."""
    nonzero = before != 0
    mean = float((after[nonzero] / before[nonzero]).mean()) if bool(nonzero.any()) else None
    total_before, total_after = float(before.sum()), float(after.sum())
    layers = [n.layer for n in cluster.neurons]
    return ClusterRatio(
        name=cluster.name,
        n_neurons=len(cluster.neurons),
        layers=(min(layers), max(layers)),
        mean_ratio=mean,
        sum_ratio=total_after / total_before if total_before != 0 else None,
        sum_before=total_before,
        sum_after=total_after,
    )


def steer_cluster(
    model: NeuronModel,
    *,
    prompt: str,
    cluster: Cluster | Sequence[NeuronId],
    value: float = 0.0,
    mode: str = "scale",
    others: Sequence[Cluster] = (),
    answers: Sequence[str] = (),
    top: int = 10,
    generate: int = 0,
    site: str = "neurons",
) -> ClusterSteerResult:
    """Steer every neuron of ``cluster`` with one edit (``scale`` by ``value``: one multiplier for the whole
    cluster) and report the output change and, for each of ``others`` (the graph's other clusters; one with the
    steered cluster's name is skipped), its activation ratios after/before (see the module docstring)."""
    if mode not in CLUSTER_MODES:
        raise NeurontraceError(f"a cluster is steered by {', '.join(CLUSTER_MODES)}, not {mode!r}")
    if not isinstance(cluster, Cluster):
        cluster = Cluster("cluster", list(cluster))
    if not cluster.neurons:
        raise NeurontraceError(f"cluster {cluster.name!r} has no neurons")
    check_neurons(model, cluster.neurons, site)
    others = [c for c in others if c.name != cluster.name]
    for other in others:
        check_neurons(model, other.neurons, site)
    result = steer(
        model,
        prompt=prompt,
        neurons=cluster.neurons,
        mode=mode,
        value=value,
        answers=answers,
        top=top,
        generate=generate,
        site=site,
    )
    downstream = []
    if others:
        batch = model.tokenize(prompt)
        edits = steering_edits(
            model, cluster.neurons, prompt_length=batch.width, mode=mode, value=value, site=site
        )
        layers = sorted({n.layer for c in others for n in c.neurons})
        before = capture(model, batch, sites=site, layers=layers, keep_logits=False)
        with intervene(model, edits):
            after = capture(model, batch, sites=site, layers=layers, keep_logits=False)
        for other in others:
            downstream.append(
                cluster_ratio(
                    other,
                    _member_values(model, before, other, site, batch.width),
                    _member_values(model, after, other, site, batch.width),
                )
            )
    return ClusterSteerResult(
        cluster=cluster.name,
        neurons=[str(n) for n in cluster.neurons],
        mode=mode,
        value=float(value),
        steer=result,
        downstream=downstream,
    )


def format_ratios(result: ClusterSteerResult) -> str:
    """The downstream table: each other cluster's layers, size and activation ratios."""
    if not result.downstream:
        return "No other clusters in the graph."
    fmt = lambda r: "n/a" if r is None else f"{r:.4f}"  # noqa: E731
    lines = [
        "Downstream clusters (activation after / before; mean of the members' ratios, ratio of sums):",
        f"  {'layers':>9} {'neurons':>7} {'mean ratio':>10} {'sum ratio':>10}  cluster",
    ]
    for r in result.downstream:
        span = f"L{r.layers[0]}" if r.layers[0] == r.layers[1] else f"L{r.layers[0]}-L{r.layers[1]}"
        lines.append(f"  {span:>9} {r.n_neurons:>7} {fmt(r.mean_ratio):>10} {fmt(r.sum_ratio):>10}  {r.name}")
    return "\n".join(lines)

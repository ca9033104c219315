"""Per-prompt attribution graphs in the neuron basis (METHOD.md section 6).

Nodes: neurons selected by their RelP attribution to the target logits, every token embedding, and the target
logits. Edges are *direct effects* in the replacement model: ``w(s -> t) = a_s * d a_t / d a_s`` with every MLP
strictly between ``s`` and ``t`` frozen, so only residual and attention-OV paths count.

How the edges are computed: one forward pass of the replacement model in which each layer's neuron-site tensor
is cut (the rest of the network is fed a detached copy in which only the node units are leaves), while the live
tensor (a function of the earlier leaves and the embeddings) is kept as a target. The gradient of a live target
with respect to an earlier leaf then never passes through an MLP: exactly the direct effect. One batched
vector-Jacobian product per chunk of targets in one layer gives their edges from every source layer at once, and
a batch of one prompt has no cross terms.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from neurontrace.attribution.api import check_suffix_length, restrict_scores
from neurontrace.attribution.blacklist import Blacklist, blacklist_for
from neurontrace.attribution.engine import frozen_parameters, run_sites
from neurontrace.attribution.metrics import centred, make_metric
from neurontrace.attribution.replacement import RelPRules, _promote, replacement_model
from neurontrace.errors import NeurontraceError
from neurontrace.hooks import add_output_hook
from neurontrace.memory import (
    MAX_CHUNK,
    Shape,
    available_bytes,
    check_fits,
    edge_bytes_per_target,
    graph_bytes,
    graph_peak,
    pin_allocator,
    selection_bytes,
)
from neurontrace.models.model import NeuronModel
from neurontrace.sites import check_site, dictionary_latents, hook_site, site_layers
from neurontrace.tokens import Batch, pad_id_of, single_token_id, token_strings

NEURON, EMBEDDING, LOGIT, ERROR = "neuron", "embedding", "logit", "error"
"""Node kinds. ``neuron`` is a unit of the graph's basis (a neuron, or a dictionary latent); ``error`` is a
dictionary's error term at one (layer, position), a source only (as in circuit-tracer)."""


@dataclass
class GraphNode:
    """One node. ``index`` is the unit index for neurons (latents), the token id for embeddings and logits, and
    -1 for error nodes."""

    kind: str
    layer: int  # -1 for embeddings, n_layers for logits
    position: int
    index: int
    activation: float  # neuron activation; logit value for logits; 0 for embeddings
    attribution: float = 0.0  # RelP node score a * dm/da (zero baseline); probability weight for logits
    token: str = ""  # the prompt token at this position (for logits: the output token)
    prob: float = 0.0  # logits: the token's probability
    influence: float | None = None  # set by pruning: influence on the weighted logits through all paths
    cumulative: float | None = None  # set by pruning: cumulative influence over the unpruned graph (prune.py)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, int, int, int]:
        return (self.kind, self.layer, self.position, self.index)


@dataclass
class AttributionGraph:
    """Nodes and dense edge matrices: ``adjacency[t, s]`` is the raw weight of the edge from s to t."""

    prompt: str
    tokens: list[str]
    token_ids: list[int]
    nodes: list[GraphNode]
    adjacency: torch.Tensor  # [N, N] raw direct effects
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return int(self.meta["n_layers"])

    @property
    def normalised(self) -> torch.Tensor:
        """Edge weights divided by the target's activation (its logit for logit nodes)."""
        act = torch.tensor([n.activation for n in self.nodes], dtype=self.adjacency.dtype)
        safe = torch.where(act.abs() > 1e-12, act, torch.ones_like(act))
        return torch.where(
            act.abs()[:, None] > 1e-12, self.adjacency / safe[:, None], torch.zeros_like(self.adjacency)
        )

    def indices(self, kind: str) -> list[int]:
        return [i for i, n in enumerate(self.nodes) if n.kind == kind]

    @property
    def n_edges(self) -> int:
        return int((self.adjacency != 0).sum())


def _chunk_size(
    model: NeuronModel,
    prompt_len: int,
    source_layers: int,
    requested: int | None,
    *,
    logits: bool = False,
    full_leaves: bool = False,
) -> int:
    """Targets per vector-Jacobian product: as many as a quarter of the free memory holds (at most 512).

    ``logits``: a chunk of logit targets (their backward also holds vocabulary-sized buffers); ``full_leaves``:
    the former full-leaf computation. Stops early, with the estimate, when not even one target fits
    (:mod:`neurontrace.memory`).
    """
    if requested:
        return max(1, requested)
    per_target = edge_bytes_per_target(Shape.of(model), prompt_len=prompt_len, source_layers=source_layers,
                                       logits=logits, full_leaves=full_leaves)  # fmt: skip
    free = available_bytes(model.device)
    check_fits(per_target, what="one target of the graph's batched backward", lower="the prompt length",
               device=model.device)  # fmt: skip
    budget = int(os.environ.get("NEURONTRACE_EDGE_MEMORY", free // 4))
    return int(max(1, min(MAX_CHUNK, budget // max(1, per_target))))


def select_targets(
    model: NeuronModel,
    logits: torch.Tensor,
    *,
    answers: Sequence[str] | None,
    max_logits: int,
    logit_mass: float,
) -> tuple[list[int], torch.Tensor]:
    """Target token ids and their probabilities: the given answers, or the top tokens up to ``logit_mass``."""
    probs = logits.float().softmax(-1)
    if answers:
        ids = [single_token_id(model, a) for a in answers]
    else:
        values, order = probs.sort(descending=True)
        n = int((values.cumsum(0) < logit_mass).sum()) + 1
        ids = order[: max(1, min(n, max_logits))].tolist()
    return ids, probs[ids]


@dataclass
class TargetGroup:
    """The target logits at one position: token ids, their probabilities and logits (centred with
    ``center_logits``), and their weights in the position's metric (the probabilities, normalised)."""

    position: int
    ids: list[int]
    probs: torch.Tensor  # [k]
    logits: torch.Tensor  # [k]

    @property
    def weights(self) -> torch.Tensor:
        return (self.probs / self.probs.sum()).to(torch.float32)


@dataclass
class GraphScores:
    """RelP node scores (zero baseline) of every unit for a graph's targets, one metric per target position.

    ``by_target[g]`` is ``a * dm_g/da`` for the metric ``m_g`` of ``groups[g]`` (the weighted sum of its target
    logits); the graph's metric is their mean, so its scores are ``scores`` (the mean over positions).
    ``selectable`` is ``by_target`` with the units that may not be selected (suffix, blacklist; a dictionary's
    error components) removed: what node selection reads.
    """

    batch: Batch
    tokens: list[str]
    groups: list[TargetGroup]
    acts: torch.Tensor  # [L, T, width]
    by_target: torch.Tensor  # [P, L, T, width]
    metric: list[float]  # [P]
    selectable: torch.Tensor  # [P, L, T, units]

    @property
    def scores(self) -> torch.Tensor:
        return self.by_target.mean(0)

    @property
    def metric_value(self) -> float:
        return sum(self.metric) / len(self.metric)


def _prompt_batch(model: NeuronModel, prompt: str | Sequence[int]) -> Batch:
    """A batch of one prompt: text, or token ids used as they are."""
    if isinstance(prompt, str):
        return model.tokenize(prompt)
    ids = [int(i) for i in prompt]
    if not ids or any(not 0 <= i < model.vocab_size for i in ids):
        raise NeurontraceError(f"token ids must be a non-empty list of ids below {model.vocab_size}")
    pad = pad_id_of(model.tokenizer) if model.tokenizer is not None else 0
    return Batch.from_ids([ids], pad_id=pad)


def _decoded(model: NeuronModel, ids: Sequence[int]) -> str:
    return model.tokenizer.decode(list(ids)) if model.tokenizer is not None else ""


def _target_groups(
    model: NeuronModel,
    batch: Batch,
    *,
    answers: Sequence[str] | None,
    targets: Sequence[tuple[int, str | int]] | None,
    max_logits: int,
    logit_mass: float,
    center_logits: bool,
) -> list[TargetGroup]:
    """The graph's targets, by position: ``targets`` (position, token), else ``answers`` or the top tokens at the
    last position."""
    T = batch.width
    if targets is not None and answers:
        raise NeurontraceError(
            "give either answers (at the last position) or targets (position, token), not both"
        )
    wanted: dict[int, list[int]] = {}
    for position, token in targets or []:
        if isinstance(position, bool) or not isinstance(position, int) or not -T <= position < T:
            raise NeurontraceError(f"target position {position!r} is outside the prompt's {T} tokens")
        tid = single_token_id(model, token) if isinstance(token, str) else int(token)
        if not 0 <= tid < model.vocab_size:
            raise NeurontraceError(
                f"target token id {tid} is outside the vocabulary ({model.vocab_size} ids)"
            )
        ids = wanted.setdefault(position % T, [])
        if tid in ids:
            raise NeurontraceError(f"target token {tid} appears twice at position {position % T}")
        ids.append(tid)
    if targets is not None and not wanted:
        raise NeurontraceError("targets is empty; give at least one (position, token)")
    start = min(wanted, default=T - 1)
    with torch.no_grad():
        clean = model.forward(batch, logits_to_keep=T - start).logits[0]  # [T - start, V]
    groups = []
    for position in sorted(wanted) if wanted else [T - 1]:
        logits = clean[position - start]
        if wanted:
            ids, probs = wanted[position], logits.float().softmax(-1)[wanted[position]]
        else:
            ids, probs = select_targets(
                model, logits, answers=answers, max_logits=max_logits, logit_mass=logit_mass
            )
        shown = centred(logits.float()) if center_logits else logits
        groups.append(TargetGroup(position, list(ids), probs, shown[ids]))
    return groups


@pin_allocator()  # the process's memory follows the tensors (and the estimate)
def graph_scores(
    model: NeuronModel,
    prompt: str | Sequence[int],
    *,
    answers: Sequence[str] | None = None,
    targets: Sequence[tuple[int, str | int]] | None = None,
    max_logits: int = 5,
    logit_mass: float = 0.95,
    rules: RelPRules | None = None,
    site: str = "neurons",
    center_logits: bool = False,
    suffix_length: int | None = None,
    blacklist: Blacklist | str | Sequence[Sequence[int]] | None = None,
) -> GraphScores:
    """The targets of a graph and every unit's RelP score for them (what :func:`build_graph` selects nodes by).

    One backward pass per target position (one in an ordinary graph, whose targets are all at the last position).
    """
    rules = rules or RelPRules()
    check_site(site)
    check_suffix_length(suffix_length)
    blacklist = blacklist_for(blacklist, model=model, site=site)
    batch = _prompt_batch(model, prompt)
    T = batch.width
    layers = site_layers(model, site)
    latents = dictionary_latents(site)  # a dictionary site: latents, then error components
    selection = selection_bytes(Shape.of(model), prompt_len=T)  # before the forward that picks the targets
    check_fits(selection, what="the graph's node selection", lower="the prompt length", device=model.device)
    groups = _target_groups(model, batch, answers=answers, targets=targets, max_logits=max_logits,
                            logit_mass=logit_mass, center_logits=center_logits)  # fmt: skip
    values: list[torch.Tensor] = []

    def weighted_logits(logits: torch.Tensor) -> torch.Tensor:
        start = T - logits.shape[1]
        values.clear()
        for g in groups:
            at = logits[:, g.position - start].float()
            at = centred(at) if center_logits else at
            values.append((at[:, g.ids] * g.weights.to(at.device)).sum(-1))
        return torch.stack(values, -1).mean(-1)

    metric = make_metric("custom", fn=weighted_logits)
    by_target = []
    with frozen_parameters(model):
        run = run_sites(model, batch, metric, site=site, layers=layers, rules=rules)
        inputs = [run.acts[layer] for layer in layers]
        # per layer to the CPU first: a device map may spread the layers over devices
        acts = torch.stack([a[0].detach().float().cpu() for a in inputs])  # [L, T, d]
        for j, value in enumerate(values):
            grads = torch.autograd.grad(value.sum(), inputs, retain_graph=j < len(values) - 1)
            by_target.append(acts * torch.stack([g[0].float().cpu() for g in grads]))
    by_target_t = torch.stack(by_target)  # [P, L, T, d]
    # the suffix and the blacklist restrict which neurons can be selected, not their scores
    limits = dict(layers=layers, suffix_length=suffix_length, blacklist=blacklist)
    eligible = restrict_scores(by_target_t, **limits)
    # a dictionary's error components are not selected alone
    selectable = eligible if latents is None else eligible[..., :latents]
    tokens = token_strings(model, batch.ids(0))
    metric_values = [float(v[0].detach()) for v in values]
    return GraphScores(batch, tokens, groups, acts, by_target_t, metric_values, selectable)


def select_neurons(
    scores: GraphScores, *, node_threshold: float, max_nodes: int | None
) -> tuple[list[tuple[int, int, int]], int]:
    """``(layer index, position, unit)`` of the selected units and how many reach the threshold.

    A unit is kept when its score for some target position is at least ``node_threshold`` times that position's
    metric (with one target position: ``|a * dm/da| >= node_threshold * |m|``); at most ``max_nodes``, the
    largest first (relative to their position's metric when there are several).
    """
    units = scores.selectable
    P, _, T, d = units.shape
    flat = units.flatten(1).abs()  # [P, L * T * d]
    above = torch.zeros(flat.shape[1], dtype=torch.bool)
    for g in range(P):
        above |= flat[g] >= node_threshold * abs(scores.metric[g])
    if P == 1:
        rank = flat[0]
    else:
        scale = torch.tensor([abs(v) if v != 0 else 1.0 for v in scores.metric])[:, None]
        rank = (flat / scale).max(0).values
    keep = above.nonzero().flatten()
    if max_nodes is not None and keep.numel() > max_nodes:
        keep = keep[rank[keep].topk(max_nodes).indices]
    return sorted((int(i) // (T * d), (int(i) // d) % T, int(i) % d) for i in keep), int(above.sum())


def _given_neurons(
    neurons: Sequence[tuple[int, int, int]], *, layers: Sequence[int], T: int, units: int
) -> list[tuple[int, int, int]]:
    """``(layer, position, unit)`` given by the caller, checked, as sorted ``(layer index, position, unit)``."""
    chosen = set()
    for layer, position, unit in neurons:
        if layer not in layers or not -T <= position < T or not 0 <= unit < units:
            raise NeurontraceError(
                f"neuron (layer {layer}, position {position}, index {unit}) is not in this graph: layers "
                f"{layers[0]}-{layers[-1]}, {T} positions, {units} units a layer"
            )
        chosen.add((list(layers).index(layer), position % T, int(unit)))
    return sorted(chosen)


@pin_allocator()  # the process's memory follows the tensors (and the estimate)
def build_graph(
    model: NeuronModel,
    prompt: str | Sequence[int],
    *,
    answers: Sequence[str] | None = None,
    targets: Sequence[tuple[int, str | int]] | None = None,
    neurons: Sequence[tuple[int, int, int]] | None = None,
    max_logits: int = 5,
    logit_mass: float = 0.95,
    node_threshold: float = 0.005,
    max_nodes: int | None = 2000,
    rules: RelPRules | None = None,
    chunk_size: int | None = None,
    progress: bool = False,
    site: str = "neurons",
    center_logits: bool = False,
    suffix_length: int | None = None,
    blacklist: Blacklist | str | Sequence[Sequence[int]] | None = None,
    edges: str = "relp",
    edge_steps: int = 16,
) -> AttributionGraph:
    """Build the attribution graph of one prompt.

    Targets are ``answers`` (single tokens) or the most likely next tokens (at most ``max_logits``, until their
    probability reaches ``logit_mass``). The metric ``m`` is the probability-weighted sum of the target logits; the
    neurons kept are those with ``|a * dm/da| >= node_threshold * |m|`` (RelP, zero baseline), at most
    ``max_nodes`` of the largest.

    ``site`` may be a dictionary (``sae:DIR``, ``transcoder:DIR``): its latents are then the units, selected the
    same way, and its error term at every (layer, position) is one more source node (kind ``error``).

    ``center_logits``: the targets are logits minus their mean over the vocabulary (node selection, the logit
    nodes' values and the edges into them). ``suffix_length``: neurons are selected only at the prompt's last N
    positions. ``blacklist``: neurons never selected (see :mod:`neurontrace.attribution.blacklist`).

    ``edges``: ``relp`` (direct effects, below), or ``ig`` / ``conductance`` with ``edge_steps`` steps
    (:mod:`neurontrace.graphs.ig_edges`); nodes are selected by RelP either way.

    ``prompt`` may be token ids (used as they are). ``targets``: ``(position, token)`` pairs instead of answers,
    at any positions (a token is a string or an id): each position's metric is the probability-weighted sum of
    its targets' logits, the graph's metric their mean (logit node weights sum to 1), a neuron is kept when its
    score for some position reaches ``node_threshold`` times that position's metric, and with several positions
    each neuron's scores per position are in ``extra["attribution_by_target"]`` (order of
    ``meta["target_positions"]``); :mod:`neurontrace.graphs.rollout` builds such graphs. ``neurons``: the
    ``(layer, position, index)`` units to use as nodes instead of the selection (edges do not depend on which
    other units are nodes).
    """
    from neurontrace.graphs.ig_edges import check_edges, integrated_edges

    rules = rules or RelPRules()
    check_site(site)
    check_edges(edges, edge_steps)
    check_suffix_length(suffix_length)
    blacklist = blacklist_for(blacklist, model=model, site=site)
    layers = site_layers(model, site)
    latents = dictionary_latents(site)  # a dictionary site: latents, then error components
    # before any forward: node selection, then the edges with one target per backward (the least they need;
    # chunks are sized to the free memory)
    T, n = _prompt_batch(model, prompt).width, len(neurons) if neurons is not None else max_nodes or 0
    n_targets = len(targets) if targets is not None else len(answers) if answers else max_logits
    least = graph_bytes(Shape.of(model), prompt_len=T, nodes=n, logits=n_targets, chunk=1)
    check_fits(graph_peak(least), what=f"a graph of a {T}-token prompt with up to {n} neuron nodes",
               lower="the prompt length or max_nodes (--max-nodes)", device=model.device)  # fmt: skip

    # 1. Node selection: RelP node scores (total effects) for the weighted target logits.
    s = graph_scores(model, prompt, answers=answers, targets=targets, max_logits=max_logits,
                     logit_mass=logit_mass, rules=rules, site=site, center_logits=center_logits,
                     suffix_length=suffix_length, blacklist=blacklist)  # fmt: skip
    batch, tokens, acts, scores, m = s.batch, s.tokens, s.acts, s.scores, s.metric_value
    T, P = batch.width, len(s.groups)
    if P > 1 and edges != "relp":
        raise NeurontraceError(f"{edges} edges need every target at the last position; use edges='relp'")
    chosen, n_above = select_neurons(s, node_threshold=node_threshold, max_nodes=max_nodes)
    if neurons is not None:
        chosen = _given_neurons(neurons, layers=layers, T=T, units=s.selectable.shape[-1])

    nodes = [GraphNode(EMBEDDING, -1, p, int(batch.input_ids[0, p]), 0.0, token=tokens[p]) for p in range(T)]
    for li, pos, unit in chosen:
        nodes.append(
            GraphNode(NEURON, layers[li], pos, unit, float(acts[li, pos, unit]), float(scores[li, pos, unit]),
                      token=tokens[pos])
        )  # fmt: skip
        if P > 1:
            nodes[-1].extra["attribution_by_target"] = s.by_target[:, li, pos, unit].tolist()
    if latents is not None:  # every error term, as circuit-tracer keeps them: activation = its norm
        errors = scores[..., latents:].sum(-1)  # [L, T]
        norms = acts[..., latents:].norm(dim=-1)
        for li, layer in enumerate(layers):
            for pos in range(T):
                nodes.append(GraphNode(ERROR, layer, pos, -1, float(norms[li, pos]), float(errors[li, pos]),
                                       token=tokens[pos]))  # fmt: skip
    for g in s.groups:  # with several target positions, each position's weights sum to 1 / P
        for tid, w, p, value in zip(
            g.ids, g.weights.tolist(), g.probs.tolist(), g.logits.tolist(), strict=True
        ):
            nodes.append(
                GraphNode(LOGIT, model.n_layers, g.position, tid, value, w / P, model.token_str(tid), p)
            )

    if edges == "relp":
        adjacency = direct_effects(
            model, batch, nodes, rules=rules, chunk_size=chunk_size, progress=progress, site=site,
            center_logits=center_logits,
        )  # fmt: skip
    else:
        adjacency = integrated_edges(
            model, batch, nodes, method=edges, steps=edge_steps, chunk_size=chunk_size, progress=progress,
            site=site, center_logits=center_logits,
        )  # fmt: skip
    meta = {
        "model": model.name,
        "family": model.adapter.family,
        "n_layers": model.n_layers,
        "d_ff": model.d_ff,
        "metric": "probability-weighted sum of target logits",
        "metric_value": m,
        "node_threshold": node_threshold,
        "max_nodes": max_nodes,
        "rules": rules.to_dict(),
        "center_logits": center_logits,
        "suffix_length": suffix_length,
        "blacklist": None if blacklist is None else blacklist.to_list(),
        "neurons_above_threshold": n_above,
        "site": site,
        "edges": edges,
    }
    if P > 1:
        meta["metric"] = "mean over target positions of the probability-weighted sum of their target logits"
        meta["target_positions"] = [g.position for g in s.groups]
    if neurons is not None:
        meta["neurons"] = "given"
    if edges != "relp":
        meta["edge_steps"] = edge_steps
    if latents is not None:
        meta["d_sae"] = latents
    text = prompt if isinstance(prompt, str) else _decoded(model, batch.ids(0))
    return AttributionGraph(text, tokens, batch.ids(0), nodes, adjacency, meta)


@pin_allocator()  # the process's memory follows the tensors (and the estimate)
def direct_effects(
    model: NeuronModel,
    batch,
    nodes: Sequence[GraphNode],
    *,
    rules: RelPRules,
    chunk_size: int | None = None,
    progress: bool = False,
    site: str = "neurons",
    _full_leaves: bool = False,
    center_logits: bool = False,
) -> torch.Tensor:
    """The ``[N, N]`` matrix of direct effects between ``nodes`` (row: target, column: source).

    Every layer's ``site`` tensor is cut (the network is fed a detached copy), so an edge never passes through
    another unit of the basis. Only what the edges use is a leaf: per source layer its node units
    (``[n]``, scattered into the detached copy), per (layer, position) of an error node one scalar that scales
    that position's error components (``d/ds (s * err)`` at ``s = 1`` is the sum over the components of
    ``err * grad``: the error node's edge), per position of the embeddings one scalar likewise. The batched
    vector-Jacobian products then return ``[K, n]`` per layer instead of ``[K, T, width]``.

    Each chunk of targets lies in one layer (logits: their own chunks), so its backward seeds one site tensor and
    traverses only the layers below it. ``_full_leaves`` runs the former computation (every site tensor a leaf,
    chunks across layers), kept for tests and ``benchmarks/bench_graph.py``. ``center_logits``: the logit targets
    are the logits minus their mean over the vocabulary.
    """
    if _full_leaves:
        return _direct_effects_full_leaves(
            model, batch, nodes, rules=rules, chunk_size=chunk_size, progress=progress, site=site,
            center_logits=center_logits,
        )  # fmt: skip
    layers = site_layers(model, site)
    latents = dictionary_latents(site)
    T = batch.width
    by_layer: dict[int, list[int]] = {}
    errors_by_layer: dict[int, list[int]] = {}
    for i, n in enumerate(nodes):
        if n.kind == NEURON:
            by_layer.setdefault(n.layer, []).append(i)
        elif n.kind == ERROR:
            errors_by_layer.setdefault(n.layer, []).append(i)
    live: dict[int, torch.Tensor] = {}
    unit_leaves: dict[int, torch.Tensor] = {}  # [n]: the layer's node units
    error_leaves: dict[int, torch.Tensor] = {}  # [m]: scales of the layer's error nodes' components
    embeds: list[torch.Tensor] = []  # [T]: scales of the embeddings

    def scales(n: int, like: torch.Tensor) -> torch.Tensor:  # ones, a leaf, at least float32
        dtype = torch.promote_types(like.dtype, torch.float32)
        return torch.ones(n, dtype=dtype, device=like.device, requires_grad=True)

    def swap(layer: int):
        members, errors = by_layer.get(layer, []), errors_by_layer.get(layer, [])

        def fn(x: torch.Tensor) -> torch.Tensor:
            out = x.detach()
            if (
                members
            ):  # a target layer (elsewhere nothing holds x, so the autograd graph that made it is freed)
                live[layer] = x
                pos = torch.tensor([nodes[i].position for i in members], device=x.device)
                unit = torch.tensor([nodes[i].index for i in members], device=x.device)
                unit_leaves[layer] = out[0, pos, unit].requires_grad_(True)  # advanced indexing: a copy
                out = out.index_put((torch.zeros_like(pos), pos, unit), unit_leaves[layer])
            if errors:
                pos = torch.tensor([nodes[i].position for i in errors], device=x.device)
                s = error_leaves[layer] = scales(len(errors), x)
                scale = torch.ones(T, dtype=s.dtype, device=x.device).index_put((pos,), s)
                err = (_promote(out[..., latents:]) * scale[:, None]).to(out.dtype)
                out = torch.cat([out[..., :latents], err], dim=-1)
            return out

        return fn

    def on_embed(y: torch.Tensor) -> torch.Tensor:
        s = scales(T, y)
        embeds.append(s)
        return (_promote(y.detach()) * s[:, None]).to(y.dtype)

    first = min((n.position for n in nodes if n.kind == LOGIT), default=batch.width - 1)
    with frozen_parameters(model), replacement_model(model, rules) as rep:
        handles = [add_output_hook(model.embed, on_embed)]
        handles += [hook_site(model, site, layer, swap(layer)) for layer in layers]
        try:
            with torch.enable_grad():  # logits from the first target position on: [T - first, V]
                logits = rep.logits(model.forward(batch, logits_to_keep=batch.width - first))[0]
        finally:
            for h in handles:
                h.remove()
        if center_logits:
            logits = centred(_promote(logits))
        index = {n.key: i for i, n in enumerate(nodes)}
        embed_keys = [(EMBEDDING, -1, p, int(batch.input_ids[0, p])) for p in range(T)]
        embed_columns = torch.tensor([index[key] for key in embed_keys])
        source_layers = sorted(set(by_layer) | set(errors_by_layer))
        k = _chunk_size(model, T, len(source_layers), chunk_size)
        k_logits = _chunk_size(model, T, len(source_layers), chunk_size, logits=True)
        # chunks of targets, each in one layer (the logits in layer n_layers): (target layer, rows)
        chunks: list[tuple[int, list[int]]] = []
        for layer, rows in sorted(by_layer.items()):
            chunks += [(layer, rows[start : start + k]) for start in range(0, len(rows), k)]
        logit_rows = [i for i, n in enumerate(nodes) if n.kind == LOGIT]
        chunks += [
            (model.n_layers, logit_rows[i : i + k_logits]) for i in range(0, len(logit_rows), k_logits)
        ]
        N = len(nodes)
        adjacency = torch.zeros(N, N)
        progress_chunks: Any = chunks
        if progress:
            from tqdm.auto import tqdm

            progress_chunks = tqdm(chunks, desc="graph edges", unit="chunk", leave=False)
        for target_layer, rows in progress_chunks:
            if target_layer == model.n_layers:
                pos = torch.tensor([nodes[i].position - first for i in rows], device=logits.device)
                values = logits[pos, torch.tensor([nodes[i].index for i in rows], device=logits.device)]
            else:
                x = live[target_layer]
                pos = torch.tensor([nodes[i].position for i in rows], device=x.device)
                unit = torch.tensor([nodes[i].index for i in rows], device=x.device)
                values = x[0, pos, unit]
            # float32 seeds for a low-precision model (float64 stays float64)
            values = _promote(values)
            K = len(rows)
            below = [layer for layer in source_layers if layer < target_layer]
            unit_sources = [layer for layer in below if layer in unit_leaves]
            error_sources = [layer for layer in below if layer in error_leaves]
            inputs = [
                embeds[0],
                *(unit_leaves[la] for la in unit_sources),
                *(error_leaves[la] for la in error_sources),
            ]
            grads = torch.autograd.grad(
                values,
                inputs,
                grad_outputs=torch.eye(K, dtype=values.dtype, device=values.device),
                is_grads_batched=True,
                retain_graph=True,
                allow_unused=True,
            )
            rows_t = torch.tensor(rows)[:, None]
            if grads[0] is not None:  # d/ds of the scaled embedding: the sum over d_model of e * grad
                adjacency[rows_t, embed_columns[None, :]] = grads[0].float().cpu()
            for layer, g in zip(unit_sources, grads[1 : 1 + len(unit_sources)], strict=True):
                if g is not None:  # a_s * d a_t / d a_s
                    w = _promote(unit_leaves[layer].detach()) * _promote(g)
                    adjacency[rows_t, torch.tensor(by_layer[layer])[None, :]] = w.float().cpu()
            for layer, g in zip(error_sources, grads[1 + len(unit_sources) :], strict=True):
                if g is not None:  # d/ds of the scaled error components: the sum over them of err * grad
                    adjacency[rows_t, torch.tensor(errors_by_layer[layer])[None, :]] = g.float().cpu()
            grads = g = None  # free this chunk's gradients before the next VJP
    return adjacency


def _direct_effects_full_leaves(
    model: NeuronModel,
    batch,
    nodes: Sequence[GraphNode],
    *,
    rules: RelPRules,
    chunk_size: int | None = None,
    progress: bool = False,
    site: str = "neurons",
    center_logits: bool = False,
) -> torch.Tensor:
    """The former computation of :func:`direct_effects` (same edges): every layer's whole site tensor a leaf,
    chunks of targets across layers, every chunk's backward returning ``[K, 1, T, width]`` per source layer."""
    layers = site_layers(model, site)
    latents = dictionary_latents(site)
    live: dict[int, torch.Tensor] = {}
    leaves: dict[int, torch.Tensor] = {}
    embeds: list[torch.Tensor] = []

    def swap(layer: int):
        def fn(x: torch.Tensor) -> torch.Tensor:
            live[layer] = x
            leaves[layer] = x.detach().requires_grad_(True)
            return leaves[layer]

        return fn

    def on_embed(y: torch.Tensor) -> torch.Tensor:
        y = y.detach().requires_grad_(True)
        embeds.append(y)
        return y

    first = min((n.position for n in nodes if n.kind == LOGIT), default=batch.width - 1)
    with frozen_parameters(model), replacement_model(model, rules) as rep:
        handles = [add_output_hook(model.embed, on_embed)]
        handles += [hook_site(model, site, layer, swap(layer)) for layer in layers]
        try:
            with torch.enable_grad():  # logits from the first target position on: [T - first, V]
                logits = rep.logits(model.forward(batch, logits_to_keep=batch.width - first))[0]
        finally:
            for h in handles:
                h.remove()
        if center_logits:
            logits = centred(_promote(logits))
        e = embeds[0]
        index = {n.key: i for i, n in enumerate(nodes)}
        neuron_nodes = [(i, n) for i, n in enumerate(nodes) if n.kind == NEURON]
        error_nodes = [(i, n) for i, n in enumerate(nodes) if n.kind == ERROR]
        target_rows = [i for i, n in enumerate(nodes) if n.kind in (NEURON, LOGIT)]
        values = []
        for i in target_rows:
            n = nodes[i]
            values.append(
                live[n.layer][0, n.position, n.index]
                if n.kind == NEURON
                else logits[n.position - first, n.index]
            )
        # on one device (layers may sit on several) and in float32 (the seeds of the batched backward)
        targets = torch.stack([_promote(v.to(logits.device)) for v in values])
        source_layers = sorted({n.layer for _, n in neuron_nodes + error_nodes})
        inputs = [e] + [leaves[layer] for layer in source_layers]
        by_layer = {layer: [(i, n) for i, n in neuron_nodes if n.layer == layer] for layer in source_layers}
        errors_by_layer = {
            layer: [(i, n) for i, n in error_nodes if n.layer == layer] for layer in source_layers
        }
        N = len(nodes)
        adjacency = torch.zeros(N, N)
        k = _chunk_size(model, batch.width, len(source_layers), chunk_size, full_leaves=True)
        chunks = range(0, len(target_rows), k)
        if progress:
            from tqdm.auto import tqdm

            chunks = tqdm(chunks, desc="graph edges", unit="chunk", leave=False)
        T = batch.width
        for start in chunks:
            rows = target_rows[start : start + k]
            K = len(rows)
            onehot = torch.zeros(K, targets.shape[0], dtype=targets.dtype, device=targets.device)
            onehot[torch.arange(K), torch.arange(start, start + K)] = 1.0
            grads = torch.autograd.grad(
                targets,
                inputs,
                grad_outputs=onehot,
                is_grads_batched=True,
                retain_graph=True,
                allow_unused=True,
            )
            rows_t = torch.tensor(rows)
            g_e = grads[0]
            if g_e is not None:
                emb = (_promote(e.detach())[None] * _promote(g_e)).sum(-1)[:, 0].float().cpu()  # [K, T]
                for p in range(T):
                    adjacency[rows_t, index[(EMBEDDING, -1, p, int(batch.input_ids[0, p]))]] = emb[:, p]
            for layer, g in zip(source_layers, grads[1:], strict=True):
                if g is None:
                    continue
                members = by_layer[layer]
                leaf = leaves[layer].detach()[0]
                if members:
                    pos = torch.tensor([n.position for _, n in members])
                    unit = torch.tensor([n.index for _, n in members])
                    w = (
                        (_promote(leaf[pos, unit])[None] * _promote(g[:, 0, pos, unit])).float().cpu()
                    )  # [K, n]
                    adjacency[rows_t[:, None], torch.tensor([i for i, _ in members])[None, :]] = w
                if errors_by_layer[layer]:
                    pos = torch.tensor([n.position for _, n in errors_by_layer[layer]])
                    contrib = _promote(leaf[pos, latents:])[None] * _promote(g[:, 0, pos, latents:])
                    columns = torch.tensor([i for i, _ in errors_by_layer[layer]])
                    adjacency[rows_t[:, None], columns[None, :]] = contrib.sum(-1).float().cpu()  # [K, n]
            # free this chunk's gradients before the next VJP: kept, they doubled the peak (two chunks alive)
            grads = g_e = g = None
    return adjacency

"""Integrated-gradient and conductance edges: alternatives to the RelP direct effects of a graph's edges.

A graph edge is a direct effect (METHOD.md section 6): the target ``t`` is a function ``F_t`` of the embeddings
and of the site tensors ``z`` of the layers below it, every site cut (the network downstream of a site is fed a
given value, so nothing passes through another MLP). RelP edges are ``z_s * dF_t/dz_s`` at the clean point with
the replacement model's gradients. These two integrate plain gradients of ``F_t`` along a path instead:

- ``ig``: integrated gradients with one layer interpolated at a time, as IG node attribution does
  (``method="ig"`` of :mod:`neurontrace.attribution.engine`): the graph's nodes in the source's layer (the
  embeddings: all positions) go from zero to their value, every other input of ``F_t`` stays clean:
  ``w(s -> t) = z_s * mean_j dF_t/dz_s`` at ``alpha_j`` of that path. Completeness: the edges from one layer's
  nodes to ``t`` sum to ``F_t(clean) - F_t(those nodes zeroed)``, the exact direct effect of ablating them (for
  a layer with one node: the edge is the exact effect of ablating its source). A target linear in its inputs
  gets the plain-gradient edge at any ``steps``.
- ``conductance`` (the reference code's ``ig_mode="conductance"``): the path the real model takes when its input
  embeddings go from zero to their value, ``p(beta)`` = (``beta e``, the sites of the model run on ``beta e``);
  ``w(s -> t) = sum_j dF_t/dz_s(p(alpha_j)) * (z_s(b_{j+1}) - z_s(b_j))`` with breakpoints ``b_j = j/steps``,
  the path integral of the gradient along how ``z_s`` really moves. The edges from *all* inputs of ``F_t`` sum to
  ``t``'s change along the path, ``F_t(p(1)) - F_t(p(0))``.

The quadrature is the project's IG convention: ``alpha_j = (j + offset)/steps``, ``j = 0..steps-1``, offset 1/2
(``midpoint``, the default) or 0 (``left``), the path running from the baseline (``alpha = 0``) to the clean
point. An embedding's edge sums over ``d_model``, an error node's over its components, as for RelP edges.

A norm makes a function of its input alone scale-invariant, with a jump at exactly zero (``eps`` smooths it over
a tiny interval that no practical ``steps`` resolves): zero-baseline paths of the embeddings (``ig``'s embedding
layer, ``conductance``'s whole path) see only what they move *besides* that normalised read-out; e.g. embedding
edges into layer-0 neurons are ~0. Neuron layers keep the clean residual stream around them and have no jump.

Cost: each pass is one forward with the batched vector-Jacobian products of :func:`~neurontrace.graphs.build.
direct_effects` (the input of each source is ``point + c * direction`` with ``c = 0`` a leaf, so ``dF_t/dc`` is
the directional derivative for every source of a chunk of targets at once). ``ig`` runs ``steps`` passes per
source layer (and the embeddings), ``conductance`` ``steps`` passes and ``steps + 1`` forwards without gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from neurontrace.attribution.engine import IG_RULES, frozen_parameters
from neurontrace.attribution.replacement import _promote
from neurontrace.errors import NeurontraceError
from neurontrace.graphs.build import EMBEDDING, ERROR, LOGIT, NEURON, GraphNode, _chunk_size
from neurontrace.hooks import add_output_hook
from neurontrace.models.model import NeuronModel
from neurontrace.sites import dictionary_latents, hook_site, site_layers

EDGE_METHODS: tuple[str, ...] = ("relp", "ig", "conductance")
"""How graph edges are computed: RelP direct effects (:func:`~neurontrace.graphs.build.direct_effects`), or the
integrated ones of this module."""


def check_edges(edges: str, steps: int) -> None:
    """A one-line error for an unknown edge method or a step count below 1."""
    if edges not in EDGE_METHODS:
        raise NeurontraceError(f"unknown edge method {edges!r}; choose one of {', '.join(EDGE_METHODS)}")
    if edges != "relp" and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise NeurontraceError(f"edge steps must be a whole number >= 1 (got {steps!r})")


@dataclass
class _State:
    """A point of the direct-effect model's input space: the embeddings and each layer's site tensor."""

    embeds: torch.Tensor  # [1, T, d_model]
    sites: dict[int, torch.Tensor]  # layer -> [1, T, width]

    def minus(self, other: _State) -> _State:
        return _State(self.embeds - other.embeds, {k: v - other.sites[k] for k, v in self.sites.items()})


def _promoted(state: _State) -> _State:
    return _State(_promote(state.embeds), {k: _promote(v) for k, v in state.sites.items()})


def _real_state(model: NeuronModel, batch, *, site: str, layers: Sequence[int], scale: float) -> _State:
    """The real model's embeddings and site tensors when its input embeddings are multiplied by ``scale``."""
    embeds: list[torch.Tensor] = []
    sites: dict[int, torch.Tensor] = {}

    def on_embed(y: torch.Tensor) -> torch.Tensor:
        y = (_promote(y) * scale).to(y.dtype)
        embeds.append(y.detach())
        return y

    def recorder(layer: int):
        def fn(x: torch.Tensor) -> None:
            sites[layer] = x.detach()

        return fn

    handles = [add_output_hook(model.embed, on_embed)]
    handles += [hook_site(model, site, layer, recorder(layer)) for layer in layers]
    try:
        with torch.no_grad():
            model.forward(batch, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    return _State(embeds[0], sites)


def integrated_edges(
    model: NeuronModel,
    batch,
    nodes: Sequence[GraphNode],
    *,
    method: str = "ig",
    steps: int = 16,
    ig_rule: str = "midpoint",
    chunk_size: int | None = None,
    progress: bool = False,
    site: str = "neurons",
    center_logits: bool = False,
) -> torch.Tensor:
    """The ``[N, N]`` matrix of integrated direct effects between ``nodes`` (row: target, column: source).

    ``method`` is ``ig`` (each source layer's nodes interpolated from zero, all else clean) or ``conductance``
    (the real model's path from zero input embeddings); see the module docstring. Plain gradients (no RelP
    rules), as for IG node attribution. ``center_logits``: logit targets are the logits minus their mean over
    the vocabulary.
    """
    check_edges(method, steps)
    if method == "relp":
        raise NeurontraceError(
            "integrated_edges computes ig or conductance edges; use direct_effects for relp"
        )
    if ig_rule not in IG_RULES:
        raise NeurontraceError(f"unknown integration rule {ig_rule!r}; choose one of {', '.join(IG_RULES)}")
    layers = site_layers(model, site)
    latents = dictionary_latents(site)
    alphas = [(j + (0.5 if ig_rule == "midpoint" else 0.0)) / steps for j in range(steps)]
    adjacency = torch.zeros(len(nodes), len(nodes), dtype=torch.float64)
    run = dict(site=site, layers=layers, chunk_size=chunk_size, center_logits=center_logits)
    with frozen_parameters(model):
        if method == "ig":
            clean = _real_state(model, batch, site=site, layers=layers, scale=1.0)
            direction = _promoted(clean)  # zero baseline: the path's direction is the clean point
            groups = [-1, *sorted({n.layer for n in nodes if n.kind in (NEURON, ERROR)})]
            work: Any = [(g, a) for g in groups for a in alphas]
            if progress:
                from tqdm.auto import tqdm

                work = tqdm(work, desc="graph edges (ig)", unit="pass", leave=False)
            for group, alpha in work:
                point = _State(clean.embeds, dict(clean.sites))
                if group == -1:
                    point.embeds = (_promote(clean.embeds) * alpha).to(clean.embeds.dtype)
                else:
                    point.sites[group] = _scaled_nodes(clean.sites[group], nodes, group, alpha, latents)
                adjacency += _directional_edges(
                    model, batch, nodes, point=point, direction=direction, sources=[group], **run
                )
            adjacency /= steps
        else:
            work = range(steps)
            if progress:
                from tqdm.auto import tqdm

                work = tqdm(work, desc="graph edges (conductance)", unit="step", leave=False)
            previous = _real_state(model, batch, site=site, layers=layers, scale=0.0)
            for j in work:
                following = _real_state(model, batch, site=site, layers=layers, scale=(j + 1) / steps)
                direction = _promoted(following).minus(_promoted(previous))
                adjacency += _directional_edges(
                    model, batch, nodes, point=None, scale=alphas[j], direction=direction, sources=None, **run
                )
                previous = following
    return adjacency.float()


def _scaled_nodes(
    site_tensor: torch.Tensor, nodes: Sequence[GraphNode], layer: int, alpha: float, latents: int | None
) -> torch.Tensor:
    """``site_tensor`` with the units of the layer's neuron nodes (and its error nodes' components) times
    ``alpha``: the point ``alpha`` of the path on which that layer's nodes go from zero to their value."""
    out = _promote(site_tensor).clone()
    units = [(n.position, n.index) for n in nodes if n.kind == NEURON and n.layer == layer]
    if units:
        pos, unit = torch.tensor(units, device=out.device).T
        out[0, pos, unit] *= alpha
    for n in nodes:
        if n.kind == ERROR and n.layer == layer:
            out[0, n.position, latents:] *= alpha
    return out.to(site_tensor.dtype)


def _directional_edges(
    model: NeuronModel,
    batch,
    nodes: Sequence[GraphNode],
    *,
    point: _State | None,
    direction: _State,
    sources: Sequence[int] | None,
    site: str,
    layers: Sequence[int],
    chunk_size: int | None,
    center_logits: bool,
    scale: float = 1.0,
) -> torch.Tensor:
    """``D[t, s]``: the derivative of target ``t`` along ``direction`` restricted to source ``s``'s units.

    At ``point`` (every site cut and fed the point's value), or, when ``point`` is None, at the real model's own
    state for input embeddings times ``scale`` (every site cut and fed its own value). Only the sources in the
    layers ``sources`` (``-1``: the embeddings; None: all) get a column. Float64 on the CPU, ``[N, N]``.
    """
    latents = dictionary_latents(site)
    T = batch.width
    wanted = (lambda layer: True) if sources is None else (lambda layer: layer in sources)
    targets: dict[int, list[int]] = {}
    by_layer: dict[int, list[int]] = {}
    errors_by_layer: dict[int, list[int]] = {}
    for i, n in enumerate(nodes):
        if n.kind == NEURON:
            targets.setdefault(n.layer, []).append(i)
            if wanted(n.layer):
                by_layer.setdefault(n.layer, []).append(i)
        elif n.kind == ERROR and wanted(n.layer):
            errors_by_layer.setdefault(n.layer, []).append(i)
    lowest = min([*by_layer, *errors_by_layer, *([-1] if wanted(-1) else [])], default=model.n_layers)
    live: dict[int, torch.Tensor] = {}
    unit_leaves: dict[int, torch.Tensor] = {}
    error_leaves: dict[int, torch.Tensor] = {}
    embed_leaves: list[torch.Tensor] = []

    def zeros(n: int, like: torch.Tensor) -> torch.Tensor:
        return torch.zeros(n, dtype=torch.promote_types(like.dtype, torch.float32), device=like.device,
                           requires_grad=True)  # fmt: skip

    def cut(layer: int):
        members, errors = by_layer.get(layer, []), errors_by_layer.get(layer, [])

        def fn(x: torch.Tensor) -> torch.Tensor:
            if layer in targets and layer > lowest:
                live[layer] = x
            out = (x if point is None else point.sites[layer].to(x.device, x.dtype)).detach()
            step = direction.sites[layer].to(x.device)
            if members:
                pos = torch.tensor([nodes[i].position for i in members], device=x.device)
                unit = torch.tensor([nodes[i].index for i in members], device=x.device)
                c = unit_leaves[layer] = zeros(len(members), x)
                moved = _promote(out[0, pos, unit]) + c * step[0, pos, unit]
                out = out.index_put((torch.zeros_like(pos), pos, unit), moved.to(out.dtype))
            if errors:
                pos = torch.tensor([nodes[i].position for i in errors], device=x.device)
                c = error_leaves[layer] = zeros(len(errors), x)
                scale_t = torch.zeros(T, dtype=c.dtype, device=x.device).index_put((pos,), c)
                err = _promote(out[..., latents:]) + scale_t[None, :, None] * step[..., latents:]
                out = torch.cat([out[..., :latents], err.to(out.dtype)], dim=-1)
            return out

        return fn

    def on_embed(y: torch.Tensor) -> torch.Tensor:
        base = (_promote(y) * scale).to(y.dtype) if point is None else point.embeds.to(y.device, y.dtype)
        if not wanted(-1):
            return base.detach()
        c = zeros(T, y)
        embed_leaves.append(c)
        return (_promote(base.detach()) + c[None, :, None] * direction.embeds.to(y.device)).to(y.dtype)

    handles = [add_output_hook(model.embed, on_embed)]
    handles += [hook_site(model, site, layer, cut(layer)) for layer in layers]
    try:
        with torch.enable_grad():
            logits = _promote(model.forward(batch, logits_to_keep=1).logits[0, -1])
    finally:
        for h in handles:
            h.remove()
    if center_logits:
        logits = logits - logits.mean()
    index = {n.key: i for i, n in enumerate(nodes)}
    embed_columns = torch.tensor([index[(EMBEDDING, -1, p, int(batch.input_ids[0, p]))] for p in range(T)])
    source_layers = sorted(set(by_layer) | set(errors_by_layer))
    k = _chunk_size(model, T, max(1, len(source_layers)), chunk_size)
    k_logits = _chunk_size(model, T, max(1, len(source_layers)), chunk_size, logits=True)
    chunks: list[tuple[int, list[int]]] = []
    for layer, rows in sorted(targets.items()):
        if layer > lowest:
            chunks += [(layer, rows[start : start + k]) for start in range(0, len(rows), k)]
    logit_rows = [i for i, n in enumerate(nodes) if n.kind == LOGIT]
    chunks += [(model.n_layers, logit_rows[i : i + k_logits]) for i in range(0, len(logit_rows), k_logits)]
    out = torch.zeros(len(nodes), len(nodes), dtype=torch.float64)
    for target_layer, rows in chunks:
        below = [layer for layer in source_layers if layer < target_layer]
        pairs = [(embed_columns, embed_leaves[0])] if embed_leaves else []
        pairs += [(torch.tensor(by_layer[la]), unit_leaves[la]) for la in below if la in unit_leaves]
        pairs += [(torch.tensor(errors_by_layer[la]), error_leaves[la]) for la in below if la in error_leaves]
        if not pairs:
            continue
        if target_layer == model.n_layers:
            values = logits[torch.tensor([nodes[i].index for i in rows], device=logits.device)]
        else:
            x = live[target_layer]
            pos = torch.tensor([nodes[i].position for i in rows], device=x.device)
            unit = torch.tensor([nodes[i].index for i in rows], device=x.device)
            values = _promote(x[0, pos, unit])
        grads = torch.autograd.grad(
            values,
            [leaf for _, leaf in pairs],
            grad_outputs=torch.eye(len(rows), dtype=values.dtype, device=values.device),
            is_grads_batched=True,
            retain_graph=True,
            allow_unused=True,
        )
        rows_t = torch.tensor(rows)[:, None]
        for (cols, _), g in zip(pairs, grads, strict=True):
            if g is not None:
                out[rows_t, cols[None, :]] = g.double().cpu()
        grads = g = None  # free this chunk's gradients before the next one
    return out

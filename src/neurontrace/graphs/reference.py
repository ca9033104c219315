"""A straightforward reference computation of graph edges: one forward per (source layer, target layer) pair.

It exists to check :func:`neurontrace.graphs.build.direct_effects` (same numbers) and to measure what the
one-forward design saves (``benchmarks/bench_graph.py``). Do not use it for real work: it costs O(layers^2)
forward passes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from neurontrace.attribution.engine import frozen_parameters
from neurontrace.attribution.replacement import RelPRules, replacement_model
from neurontrace.graphs.build import EMBEDDING, LOGIT, NEURON, GraphNode
from neurontrace.hooks import add_output_hook
from neurontrace.models.model import NeuronModel
from neurontrace.sites import hook_site


def direct_effects_per_layer_pair(
    model: NeuronModel, batch, nodes: Sequence[GraphNode], *, rules: RelPRules | None = None
) -> torch.Tensor:
    """The same ``[N, N]`` direct-effect matrix, with a fresh forward for every source/target layer pair in which
    only the MLPs strictly between the two layers are frozen."""
    rules = rules or RelPRules()
    L = model.n_layers
    N = len(nodes)
    adjacency = torch.zeros(N, N)
    index = {n.key: i for i, n in enumerate(nodes)}
    targets_by_layer: dict[int, list[int]] = {}
    for i, n in enumerate(nodes):
        if n.kind in (NEURON, LOGIT):
            targets_by_layer.setdefault(n.layer, []).append(i)
    sources_by_layer: dict[int, list[int]] = {-1: [i for i, n in enumerate(nodes) if n.kind == EMBEDDING]}
    for i, n in enumerate(nodes):
        if n.kind == NEURON:
            sources_by_layer.setdefault(n.layer, []).append(i)
    for t_layer, t_rows in sorted(targets_by_layer.items()):
        for s_layer, s_cols in sorted(sources_by_layer.items()):
            if s_layer >= t_layer:
                continue
            live, leaves, embeds = {}, {}, []

            def swap(layer: int, live=live, leaves=leaves, s_layer=s_layer, t_layer=t_layer):
                def fn(x: torch.Tensor) -> torch.Tensor:
                    live[layer] = x
                    if s_layer <= layer < t_layer or (layer == s_layer):
                        leaves[layer] = x.detach().requires_grad_(True)
                        return leaves[layer]
                    return x

                return fn

            def on_embed(y: torch.Tensor, embeds=embeds) -> torch.Tensor:
                y = y.detach().requires_grad_(True)
                embeds.append(y)
                return y

            with frozen_parameters(model), replacement_model(model, rules) as rep:
                handles = [add_output_hook(model.embed, on_embed)]
                handles += [hook_site(model, "neurons", layer, swap(layer)) for layer in range(L)]
                try:
                    with torch.enable_grad():
                        logits = rep.logits(model.forward(batch, logits_to_keep=1))[0, -1]
                finally:
                    for h in handles:
                        h.remove()
                values = [
                    live[nodes[i].layer][0, nodes[i].position, nodes[i].index]
                    if nodes[i].kind == NEURON
                    else logits[nodes[i].index]
                    for i in t_rows
                ]
                targets = torch.stack(values)
                source = embeds[0] if s_layer == -1 else leaves[s_layer]
                onehot = torch.eye(len(t_rows), dtype=targets.dtype)
                (g,) = torch.autograd.grad(
                    targets, [source], grad_outputs=onehot, is_grads_batched=True, allow_unused=True
                )
            if g is None:
                continue
            rows = torch.tensor(t_rows)
            if s_layer == -1:
                weights = (source.detach()[None] * g).sum(-1)[:, 0]  # [K, T]
                for col in s_cols:
                    n = nodes[col]
                    adjacency[rows, index[n.key]] = weights[:, n.position].float()
            else:
                pos = torch.tensor([nodes[c].position for c in s_cols])
                unit = torch.tensor([nodes[c].index for c in s_cols])
                w = source.detach()[0][pos, unit][None] * g[:, 0, pos, unit]
                adjacency[rows[:, None], torch.tensor(s_cols)[None, :]] = w.float()
    return adjacency

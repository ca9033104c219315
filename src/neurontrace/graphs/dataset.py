"""Dataset attribution graphs: one graph for a set of prompts, combining their per-prompt graphs.

What the paper's code does with a batch (``ADAGConfig.batch_aggregation``, ``topk_neurons``,
``node_attribution_threshold``, ``percentage_threshold``), restated:

- Node scores (RelP, zero baseline, as in :func:`neurontrace.graphs.build.build_graph`) are computed per prompt
  for every neuron, then **combined** over the prompts: ``mean``, ``max`` (the signed maximum), ``max_abs`` (the
  value of largest magnitude, its sign kept: its magnitude is the reference's ``max |score|``) or ``any``.
- Neurons are **selected** on the combined scores, by one rule: ``|score| >= node_threshold * |m|`` with ``m``
  the combined metric (the reference's ``percentage_threshold``, the default), or the smallest set of the largest
  ``|score|`` whose sum reaches a fraction ``mass`` of the total (``node_attribution_threshold``). With
  ``combine="any"`` the rule is applied to each prompt's own scores (and its own ``m``) and the graph keeps the
  union; ``per_example_topk=k`` likewise keeps the union of each prompt's own top ``k`` (the reference's
  ``topk_neurons`` with ``any``), whatever ``combine`` is. ``max_nodes`` then keeps the largest (by ``|combined
  score|``; for the per-prompt rules, by the largest ``|score|`` in any prompt).
- Each prompt's graph is then built on those neurons, and every node value (activation, score, logit weight and
  probability) and every edge weight is combined over the prompts by the same rule (``any``: the mean).

Positions align **from the end**: a prompt shorter than the longest one, by ``k`` tokens, has its position ``p``
at the dataset graph's position ``p + k`` (the last positions, where the answer is predicted, coincide). A node
or edge a prompt's graph does not have (a position it lacks, another prompt's token or answer) counts as 0 in
every combination, so a ``mean`` is over all the prompts. Embedding nodes are per (position, token id), logit
nodes per (position, token id): a position where the prompts differ has one embedding node per token, and the
graph's token there is the distinct tokens joined by ``|``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from neurontrace.attribution.replacement import RelPRules
from neurontrace.errors import NeurontraceError
from neurontrace.graphs.build import (
    EMBEDDING,
    ERROR,
    LOGIT,
    NEURON,
    AttributionGraph,
    GraphNode,
    build_graph,
    graph_scores,
)
from neurontrace.models.model import NeuronModel
from neurontrace.sites import dictionary_latents, site_layers
from neurontrace.tokens import encode

COMBINE = ("mean", "max", "max_abs", "any")
"""How the prompts' node scores and edge weights combine (``any``: a per-prompt node selection, values averaged)."""
SCORING_OPTIONS = ("center_logits", "suffix_length", "blacklist")
"""The options of :func:`~neurontrace.graphs.build.build_graph` that change node scores or which neurons count."""


def fold(acc: torch.Tensor | None, value: torch.Tensor, combine: str) -> torch.Tensor:
    """One step of a running combination over prompts (``mean``/``any``: a sum, divided by :func:`finish`)."""
    if acc is None:
        return value.clone()
    if combine == "max":
        return torch.maximum(acc, value)
    if combine == "max_abs":  # the first prompt's value wins a tie
        return torch.where(value.abs() > acc.abs(), value, acc)
    return acc + value


def finish(acc: torch.Tensor, combine: str, n: int) -> torch.Tensor:
    return acc / n if combine in ("mean", "any") else acc


def mass_keep(values: torch.Tensor, fraction: float) -> torch.Tensor:
    """Boolean mask (shape of ``values``) of the largest ``values`` whose sum first reaches ``fraction`` of the
    total: they are taken in decreasing order (ties: lower flat index first) until the sum reaches it."""
    flat = values.flatten().double()
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    total = float(flat.sum())
    if total > 0:
        order = torch.sort(flat, descending=True, stable=True).indices
        cumulative = flat[order].cumsum(0) / total
        n = int((cumulative < fraction - 1e-12).sum()) + 1
        keep[order[: min(n, flat.numel())]] = True
    return keep.view(values.shape)


def _answer_lists(answers: Any, n: int) -> list[list[str] | None]:
    if answers is None:
        return [None] * n
    if isinstance(answers, str) or len(answers) != n:
        got = "a string" if isinstance(answers, str) else f"{len(answers)} entries"
        raise NeurontraceError(f"answers must have one entry per prompt ({n}), got {got}")
    return [None if a is None else [a] if isinstance(a, str) else list(a) for a in answers]


def _check(prompts: list[str], combine: str, per_example_topk: int | None, mass: float | None) -> None:
    if not prompts:
        raise NeurontraceError("no prompts given; a dataset graph needs at least one prompt")
    if combine not in COMBINE:
        raise NeurontraceError(f"unknown combination {combine!r}; choose one of {', '.join(COMBINE)}")
    if per_example_topk is not None and mass is not None:
        raise NeurontraceError(
            "give at most one of the per-example top-k and the node mass (one selection rule)"
        )
    if per_example_topk is not None and (
        isinstance(per_example_topk, bool) or not isinstance(per_example_topk, int) or per_example_topk < 1
    ):
        raise NeurontraceError(f"the per-example top-k must be a whole number >= 1, got {per_example_topk!r}")
    if mass is not None and not 0 < mass <= 1:
        raise NeurontraceError(f"the node mass must be a fraction in (0, 1], got {mass!r}")


def _label(tokens: dict[int, str]) -> str:
    """A position's token: the prompts' one token, or their distinct tokens joined by ``|`` (at most 3)."""
    distinct = list(tokens.values())
    return "|".join(distinct[:3]) + ("|…" if len(distinct) > 3 else "")


def build_dataset_graph(
    model: NeuronModel,
    prompts: Sequence[str],
    *,
    answers: Sequence[str | Sequence[str] | None] | None = None,
    combine: str = "mean",
    per_example_topk: int | None = None,
    mass: float | None = None,
    node_threshold: float = 0.005,
    max_nodes: int | None = 2000,
    max_logits: int = 5,
    logit_mass: float = 0.95,
    rules: RelPRules | None = None,
    chunk_size: int | None = None,
    progress: bool = False,
    site: str = "neurons",
    **options: Any,
) -> AttributionGraph:
    """The attribution graph of a set of prompts (module docstring: combination, selection, alignment).

    ``answers``: one entry per prompt (an answer token, a list of them, or None for its top tokens), or None.
    ``options`` go to every prompt's :func:`~neurontrace.graphs.build.build_graph` (e.g. ``center_logits``,
    ``blacklist``), and those that change scores to its :func:`~neurontrace.graphs.build.graph_scores` too. ``meta["dataset"]`` records the
    prompts, answers, combination, selection rule and each prompt's offset; ``meta["metric_value"]`` is the
    combined metric.
    """
    prompts = list(prompts)
    _check(prompts, combine, per_example_topk, mass)
    answer_lists = _answer_lists(answers, len(prompts))
    rules = rules or RelPRules()
    layers = site_layers(model, site)
    lengths = [len(encode(model, p)) for p in prompts]
    width = max(lengths)
    offsets = [width - n for n in lengths]
    per_example = combine == "any" or per_example_topk is not None
    B = len(prompts)
    scoring = {k: v for k, v in options.items() if k in SCORING_OPTIONS}

    def bar(items, desc: str):
        if not progress:
            return items
        from tqdm.auto import tqdm

        return tqdm(items, desc=desc, unit="prompt", leave=False)

    # 1. Node scores of every prompt, aligned from the end and combined; the per-prompt selections' union.
    combined = metric = union = largest = None
    tokens_at: list[dict[int, str]] = [{} for _ in range(width)]
    logit_tokens: dict[tuple[int, int], str] = {}
    for i in bar(range(B), "dataset node scores"):
        s = graph_scores(model, prompts[i], answers=answer_lists[i], max_logits=max_logits,
                         logit_mass=logit_mass, rules=rules, site=site, **scoring)  # fmt: skip
        o = offsets[i]
        own = s.selectable.mean(0).double()  # [L, T_i, d]: one target position, so the group's scores
        aligned = own.new_zeros(own.shape[0], width, own.shape[2])
        aligned[:, o:] = own
        combined = fold(combined, aligned, combine)
        metric = fold(metric, torch.tensor(s.metric_value, dtype=torch.float64), combine)
        if per_example:
            if per_example_topk is not None:
                pick = torch.zeros(own.numel(), dtype=torch.bool)
                pick[own.abs().flatten().topk(min(per_example_topk, own.numel())).indices] = True
                pick = pick.view(own.shape)
            elif mass is not None:
                pick = mass_keep(own.abs(), mass)
            else:
                pick = own.abs() >= node_threshold * abs(s.metric_value)
            mine = torch.zeros(aligned.shape, dtype=torch.bool)
            mine[:, o:] = pick
            union = mine if union is None else union | mine
            largest = fold(largest, aligned.abs(), "max")
        for p, (tid, tok) in enumerate(zip(s.batch.ids(0), s.tokens, strict=True)):
            tokens_at[p + o].setdefault(int(tid), tok)
        for g in s.groups:
            for tid in g.ids:
                logit_tokens.setdefault((g.position + o, int(tid)), model.token_str(tid))
    combined = finish(combined, combine, B)
    m = float(finish(metric, combine, B))
    if per_example:
        keep, rank = union, largest
    elif mass is not None:
        keep, rank = mass_keep(combined.abs(), mass), combined.abs()
    else:
        keep, rank = combined.abs() >= node_threshold * abs(m), combined.abs()
    chosen_flat = keep.flatten().nonzero().flatten()
    n_selected = chosen_flat.numel()
    if max_nodes is not None and n_selected > max_nodes:
        chosen_flat = chosen_flat[rank.flatten()[chosen_flat].topk(max_nodes).indices]
    d = combined.shape[-1]
    chosen = sorted((int(f) // (width * d), (int(f) // d) % width, int(f) % d) for f in chosen_flat)

    # 2. Every prompt's graph on those neurons, its nodes and edges put in place and combined.
    keys = [(EMBEDDING, -1, q, tid) for q in range(width) for tid in tokens_at[q]]
    keys += [(NEURON, layers[li], q, unit) for li, q, unit in chosen]
    if dictionary_latents(site) is not None:
        keys += [(ERROR, layer, q, -1) for layer in layers for q in range(width)]
    keys += [(LOGIT, model.n_layers, q, tid) for q, tid in sorted(logit_tokens)]
    index = {key: j for j, key in enumerate(keys)}
    N = len(keys)
    adjacency = values = None
    first_meta: dict[str, Any] = {}
    for i in bar(range(B), "dataset graph edges"):
        o = offsets[i]
        mine = [(layers[li], q - o, unit) for li, q, unit in chosen if q >= o]
        g = build_graph(model, prompts[i], answers=answer_lists[i], neurons=mine, max_logits=max_logits,
                        logit_mass=logit_mass, node_threshold=node_threshold, max_nodes=None, rules=rules,
                        chunk_size=chunk_size, site=site, **options)  # fmt: skip
        first_meta = first_meta or g.meta
        at = torch.tensor([index[(n.kind, n.layer, n.position + o, n.index)] for n in g.nodes])
        full = torch.zeros(N, N, dtype=torch.float64)
        full[at[:, None], at[None, :]] = g.adjacency.double()
        own_values = torch.zeros(3, N, dtype=torch.float64)
        own_values[:, at] = torch.tensor(
            [[n.activation for n in g.nodes], [n.attribution for n in g.nodes], [n.prob for n in g.nodes]],
            dtype=torch.float64,
        )
        adjacency = fold(adjacency, full, combine)
        values = fold(values, own_values, combine)
    adjacency, values = finish(adjacency, combine, B), finish(values, combine, B)

    labels = [_label(t) for t in tokens_at]
    nodes = []
    for j, (kind, layer, q, idx) in enumerate(keys):
        token = (
            tokens_at[q][idx] if kind == EMBEDDING else logit_tokens[(q, idx)] if kind == LOGIT else labels[q]
        )
        nodes.append(GraphNode(kind, layer, q, idx, float(values[0, j]), float(values[1, j]), token=token,
                               prob=float(values[2, j])))  # fmt: skip
    meta = {
        k: v for k, v in first_meta.items() if k not in ("neurons", "metric_value", "neurons_above_threshold")
    }
    meta.update(
        metric=f"{combine} over prompts of each prompt's {first_meta.get('metric', 'metric')}",
        metric_value=m,
        node_threshold=node_threshold,
        max_nodes=max_nodes,
        neurons_above_threshold=n_selected,
        dataset={
            "prompts": prompts,
            "answers": answer_lists,
            "combine": combine,
            "values": "mean" if combine == "any" else combine,
            "selection": "per-example top-k" if per_example_topk is not None
            else ("per-example " if combine == "any" else "") + ("mass" if mass is not None else "threshold"),
            "per_example_topk": per_example_topk,
            "mass": mass,
            "alignment": "end",
            "offsets": offsets,
        },
    )  # fmt: skip
    shown = " | ".join(prompts[:3]) + (f" | … ({B} prompts)" if B > 3 else "")
    token_ids = [next(iter(t)) if len(t) == 1 else -1 for t in tokens_at]
    return AttributionGraph(shown, labels, token_ids, nodes, adjacency.float(), meta)

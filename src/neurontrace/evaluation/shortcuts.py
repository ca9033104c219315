"""Shortcuts of an ablation forward pass that leave its metric unchanged up to rounding.

An evaluation sweep runs the test set once per circuit (:mod:`.faithfulness`); most of that work gives the same
numbers every time. These shortcuts skip it (``EvalSet(shortcuts=True)``, the default; ``False`` runs every
pass in full, the reference ``benchmarks/bench_sweep.py`` compares against):

- **Shared prefix.** Where every clean and counterfactual test prompt has the same first tokens, a node at those
  positions has the same activation in every prompt (the model is causal), so mean and resample ablation give
  it its own value back. Those positions are computed once (the model's key/value cache of the clean prefix,
  one row, repeated to every row of a pass), and every pass runs only the positions after them. Zero ablation
  changes them, so it has no shared prefix. With test prompts of several token lengths only the first position
  is shared (the others' mean-ablation values pool positions at one distance from the end).
- **Sparse MLP.** A layer where every circuit of a pass ablates most neurons needs the gate and up projections
  only for the kept neurons (the union over the pass's circuits and positions): ``down(v) = down(r) + W_down[:,
  U] (v - r)[U]`` with ``r`` the ablation value and ``U`` the kept units, ``down(r)`` computed once (where
  that is cheaper counting the weight gathers: :func:`runs_sparse`). The projections are the model's own
  modules, given a sparse ``forward`` for the duration of the pass.
- **Vocabulary subset.** The logit-difference metric reads two logits per prompt: the unembedding computes the
  rows of the batch's answer and contrast tokens only.
- **Last MLP at the last position.** That metric reads the last position only, and the last layer's MLP output
  reaches no other position: it runs on the last position alone.
- **Masks seen before.** A sweep meets some masks twice (the empty circuit, the full model as the largest
  circuit and as the complement of the empty one): the sweep's kept values serve (``seen`` of
  ``EvalSet.metric_values_many``).

Passes are grouped by an estimated cost (:func:`group_passes`), so that circuits that keep the same few neurons
(the small top-k circuits of one ranking) share a pass and its sparse MLPs.

Each changes the order of floating-point sums, so curves agree with the full passes to rounding (largest
difference in ``benchmarks/bench_sweep.py``), not bit for bit.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from neurontrace.attribution.metrics import Metric, make_metric
from neurontrace.models.model import NeuronModel

SPARSE_SHARE = 0.5
"""Largest share of a layer's neurons a pass may keep for its MLP to run on the kept ones only (see
:func:`runs_sparse`; at 1,024 tokens a share of 0.7 still saved a fifth of the MLP, but whole sweeps ran no
faster)."""

GATHER_TOKENS = 115.0
"""What gathering the kept neurons' weight rows and columns costs a sparse MLP, as the tokens whose products cost
as much (the gather is per pass, the products per token; measured on the default model on a CPU with
``sparse_mlp`` against the dense MLP and its ablation hook: at 128 tokens a sparse MLP keeping a share ``s``
costs about ``0.05 + 1.9 s`` of the dense one, at 1,024 tokens ``0.05 + 1.1 s``)."""

CIRCUIT_COST = 0.6
"""What one circuit's rows cost a pass besides their MLPs (attention, norms, hooks), in units of their MLPs run
in full; measured on the default model on a CPU (sweep passes of one to eight sparse and dense circuits)."""

PASS_COST = 0.6
"""What a pass costs whatever its circuits (its fixed work), in the units of :data:`CIRCUIT_COST`."""


def sparse_cost(share: float | torch.Tensor, tokens: int) -> float | torch.Tensor:
    """Estimated cost of an MLP run on a ``share`` of its neurons for ``tokens`` tokens, as a share of the dense
    MLP (with its ablation hook)."""
    return 0.05 + share * (1.0 + GATHER_TOKENS / max(1, tokens))


def runs_sparse(share: float | torch.Tensor, tokens: int) -> bool | torch.Tensor:
    """Whether a pass's MLP that keeps ``share`` of its neurons for ``tokens`` tokens runs on the kept ones only
    (elementwise for a tensor of shares): at most :data:`SPARSE_SHARE`, and cheaper than the dense MLP by a
    margin (at most 0.9 of it)."""
    return (share <= SPARSE_SHARE) & (sparse_cost(share, tokens) < 0.9)


def pass_cost(units: torch.Tensor, circuits: int, tokens: int) -> float:
    """Estimated cost of a pass of ``circuits`` circuits of ``tokens`` tokens each whose union of kept neurons is
    ``units`` (``[L, w]`` boolean, over the circuits and positions): per circuit :data:`CIRCUIT_COST` plus each
    layer's MLP, :func:`sparse_cost` where it runs sparse (:func:`runs_sparse`), else all of it; plus
    :data:`PASS_COST`."""
    share = units.float().mean(-1)
    n = circuits * tokens
    mlp = torch.where(runs_sparse(share, n), sparse_cost(share, n), torch.ones_like(share))
    return PASS_COST + circuits * (CIRCUIT_COST + float(mlp.mean()))


def group_passes(units: list[torch.Tensor], per_pass: int, tokens: int) -> list[list[int]]:
    """Circuits (their kept neurons ``units[i]``, ``[L, w]`` each, over ``tokens`` tokens per circuit) in passes
    of at most ``per_pass``, by estimated cost (:func:`pass_cost`): in order of size, each joins the open pass it
    makes least dearer, or opens one when that is cheaper. Circuits that keep few neurons then share passes
    with circuits that keep the same neurons (the larger top-k circuits of one ranking) rather than with
    circuits of their size that keep others (random controls)."""
    order = sorted(range(len(units)), key=lambda i: (int(units[i].sum()), i))
    passes: list[list[int]] = []
    unions: list[torch.Tensor] = []
    costs: list[float] = []
    for i in order:
        best, where, joined = pass_cost(units[i], 1, tokens), None, None
        for j, members in enumerate(passes):
            if len(members) >= per_pass:
                continue
            union = unions[j] | units[i]
            extra = pass_cost(union, len(members) + 1, tokens) - costs[j]
            if extra < best:
                best, where, joined = extra, j, union
        if where is None:
            passes.append([i])
            unions.append(units[i].clone())
            costs.append(best)
        else:
            passes[where].append(i)
            unions[where] = joined
            costs[where] += best
    return passes


def shared_prefix_length(prompts: list[torch.Tensor], ablation: str) -> int:
    """Leading positions whose ablation is a no-op: the first tokens shared by every prompt of ``prompts`` (the
    clean and counterfactual test prompts' token ids, unpadded), at most one with several lengths, none under
    zero ablation, and always short of the shortest prompt's last token."""
    if ablation == "zero" or not prompts:
        return 0
    lengths = {len(p) for p in prompts}
    shortest = min(lengths)
    ids = torch.stack([p[:shortest] for p in prompts])
    n = int((ids == ids[:1]).all(0).long().cumprod(0).sum())
    if len(lengths) > 1:
        n = min(n, 1)
    return max(0, min(n, shortest - 1))


def _cache_argument(module: nn.Module) -> str:
    """The name a model's forward takes its key/value cache by (``cache`` in recent transformers)."""
    params = inspect.signature(module.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def prefix_cache(model: NeuronModel, input_ids: torch.Tensor, prefix: int):
    """The key/value cache of the first ``prefix`` tokens of ``input_ids``' first row (the unablated model; the
    decoder only, no unembedding): every row shares them, so one row serves any batch (:func:`forward_after`
    repeats it)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.hf.config)
    ids = input_ids[:1, :prefix].to(model.device)
    decoder = model.hf.base_model
    with torch.no_grad():
        decoder(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            position_ids=torch.arange(prefix, device=ids.device)[None],
            use_cache=True,
            **{_cache_argument(decoder): cache},
        )
    return cache


def forward_after(model: NeuronModel, input_ids: torch.Tensor, prefix: int, cache) -> torch.Tensor:
    """Last-position logits of ``input_ids`` (no padding; every row starting with the prefix's tokens) run from
    position ``prefix`` on, with a copy of the prefix's one-row ``cache`` repeated to every row (the forward
    extends the cache it gets)."""
    ids = input_ids.to(model.device)
    t = ids.shape[1]
    cache = copy.deepcopy(cache)
    cache.batch_repeat_interleave(ids.shape[0])
    return model.hf(
        input_ids=ids[:, prefix:],
        attention_mask=torch.ones_like(ids),
        position_ids=torch.arange(prefix, t, device=ids.device).expand(ids.shape[0], -1),
        use_cache=True,
        logits_to_keep=1,
        **{_cache_argument(model.hf): cache},
    ).logits


def _conv1d(module: nn.Module) -> bool:
    """A GPT-2 style ``Conv1D`` (weight ``[in, out]``)."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def _plain(module: nn.Module) -> bool:
    """A module whose ``forward`` can be swapped: a dense linear or Conv1D layer with no dispatch hook
    (accelerate's offloading wraps ``forward`` itself) and no forward defined on the instance."""
    dense = type(module) is nn.Linear or _conv1d(module)
    return dense and not hasattr(module, "_hf_hook") and "forward" not in module.__dict__


def sparse_mlp_modules(
    model: NeuronModel, layer: int
) -> tuple[nn.Module | None, nn.Module, nn.Module] | None:
    """(gate, up, down) of a layer's MLP when the sparse-MLP shortcut can run on them, else None."""
    a = model.adapter
    gate = model.layer_module(layer, a.gate) if a.gate is not None and not a.gate_up_fused else None
    up, down = model.layer_module(layer, a.up), model.layer_module(layer, a.down)
    modules = [m for m in (gate, up, down) if m is not None]
    return (gate, up, down) if all(_plain(m) for m in modules) else None


def _rows(module: nn.Module, units: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight ``[out_units, in]`` and bias of the output units ``units`` of a linear or Conv1D module."""
    weight = module.weight[:, units].T if _conv1d(module) else module.weight[units]
    bias = None if module.bias is None else module.bias[units]
    return weight, bias


def _columns(module: nn.Module, units: torch.Tensor) -> torch.Tensor:
    """Weight ``[out, in_units]`` of the input units ``units`` of a linear or Conv1D module."""
    return module.weight[units].T if _conv1d(module) else module.weight[:, units]


def _narrow_projection(module: nn.Module, units: torch.Tensor, fused: bool):
    """``forward`` of a projection that computes only its outputs ``units`` (with ``fused``, those units of both
    halves of a fused [gate | up] projection, which the MLP splits in two): the MLP's elementwise product then
    runs on the kept neurons only."""
    if fused:
        half = (module.weight.shape[1] if _conv1d(module) else module.weight.shape[0]) // 2
        units = torch.cat([units, units + half])
    weight, bias = _rows(module, units)
    return lambda x: F.linear(x, weight, bias)


def down_of(down: nn.Module, values: torch.Tensor) -> torch.Tensor:
    """The down projection of ablation values (``[..., d_ff]`` -> ``[..., d_model]``), with the real module."""
    with torch.no_grad():
        return down(values.to(down.weight.dtype).contiguous())


@contextmanager
def sparse_mlp(
    modules: tuple[nn.Module | None, nn.Module, nn.Module],
    *,
    units: torch.Tensor,
    keep: torch.Tensor,
    replacement: torch.Tensor,
    down_replacement: torch.Tensor,
    circuits: int,
    fused: bool = False,
) -> Iterator[None]:
    """Run one MLP on the kept ``units`` only while inside.

    The gate and up projections compute the ``units`` only, so the MLP's own elementwise code runs on them;
    the down projection gets those values ``v`` and returns ``down(r) + W[:, U] (where(keep, v, r) - r)[U]``,
    which is ``down(where(keep, v, r))`` (every other neuron is ablated in every circuit): what the ablation hook
    and the full MLP give. ``keep``: ``[m, 1, T, w]`` or ``[m, 1, 1, w]`` (the pass's ``m = circuits`` row
    blocks); ``replacement``: the ablation value, broadcastable to ``[B, T, w]``; ``down_replacement``: ``down``
    of it, broadcastable to ``[B, T, d_model]``; all on the module's device and in its dtype.
    """
    gate, up, down = modules
    patched: list[nn.Module] = []
    try:
        for module in (gate, up):
            if module is not None:
                module.forward = _narrow_projection(module, units, fused and module is up)
                patched.append(module)
        k = keep[..., units]
        r = replacement[..., units] if replacement.dim() else replacement
        w = _columns(down, units)
        m = circuits

        d = down_replacement  # [d], [T, d] or [B, T, d]

        def forward(v: torch.Tensor) -> torch.Tensor:  # v: [rows, T, units], the kept neurons' values
            rows = v.reshape(m, v.shape[0] // m, *v.shape[1:])  # [m, B, T, u]: one block of rows per circuit
            diff = torch.where(k, rows - r, 0)
            return (F.linear(diff, w) + d).reshape(*v.shape[:-1], d.shape[-1])

        down.forward = forward
        patched.append(down)
        yield
    finally:
        for module in patched:
            del module.forward


@contextmanager
def last_position_mlp(model: NeuronModel) -> Iterator[None]:
    """While inside, the last decoder layer's MLP runs on the last position only (its output broadcasts over the
    positions when the layer adds it to the residual stream: the other positions' values are then wrong, and
    nothing reads them when the metric reads the last position's logits)."""
    mlp = model.layer_module(model.n_layers - 1, model.adapter.mlp)
    handle = mlp.register_forward_pre_hook(lambda _m, args: (args[0][:, -1:], *args[1:]))
    try:
        yield
    finally:
        handle.remove()


def subset_metric(metric: Metric) -> tuple[torch.Tensor, Metric] | None:
    """For a logit-difference metric: the vocabulary ids it reads, and the same metric on logits of those ids
    only; None for other metrics."""
    if metric.kind != "logit-diff" or metric.center:
        return None
    ids = torch.unique(torch.cat([metric.answer.flatten(), metric.contrast.flatten()]))
    index = lambda t: torch.searchsorted(ids, t)  # noqa: E731
    return ids, make_metric("logit-diff", answer=index(metric.answer), contrast=index(metric.contrast))


@contextmanager
def vocabulary_subset(model: NeuronModel, ids: torch.Tensor) -> Iterator[bool]:
    """While inside, the unembedding computes only the logits of ``ids`` (yields whether it could)."""
    head = model.hf.get_submodule(model.adapter.unembed)
    if not _plain(head) or _conv1d(head):
        yield False
        return
    weight, bias = _rows(head, ids.to(head.weight.device))
    head.forward = lambda x: F.linear(x, weight, bias)
    try:
        yield True
    finally:
        del head.forward

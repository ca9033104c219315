"""Attribution methods over one batch: RelP, AtP, integrated gradients, exact patching and two controls.

Every method returns scores ``[B, L, T, width]`` for the batch's padded layout (METHOD.md section 3):

- ``relp``: ``(a' - a) * dm/da`` with gradients from the RelP replacement model (one forward, one backward).
- ``atp``: the same with plain gradients.
- ``ig``: integrated gradients on activations, one layer's site interpolated at a time (midpoint or left rule).
  The layers below the interpolated one do not change with the step: they run once per batch, and each step
  runs the model from that layer on (:mod:`neurontrace.models.suffix`; ``NEURONTRACE_IG_PREFIX=0`` or
  ``ig_prefix=False`` runs the whole model at every step instead, with the same scores).
- ``ig-inputs``: integrated gradients along a path of input embeddings; all layers from each backward pass.
- ``exact``: activation patching, one forward per node (batched over nodes): the ground truth.
- ``delta`` (activation difference) and ``random``: controls.

For pairs, ``a'`` is the counterfactual run and a score estimates ``m(do a = a') - m(clean)``. For single
prompts the baseline ``a'`` is zero or a mean, and a score estimates ``m(clean) - m(do a = a')``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch

from neurontrace.attribution.metrics import Metric
from neurontrace.attribution.replacement import RelPRules, _promote, replacement_model
from neurontrace.errors import NeurontraceError
from neurontrace.hooks import add_output_hook
from neurontrace.models.model import NeuronModel
from neurontrace.models.placement import stack_on
from neurontrace.models.suffix import RecordedForward, SuffixUnsupported, record_forward, run_from
from neurontrace.sites import hook_site
from neurontrace.tokens import Batch

METHODS: tuple[str, ...] = ("relp", "atp", "ig", "ig-inputs", "exact", "delta", "random")
# Integrated gradients average gradients at alpha_j = (j + offset) / steps, j = 0..steps-1. METHOD.md writes the
# left rule (offset 0); the midpoint rule (offset 1/2) costs the same and its error falls as 1/steps^2 rather
# than 1/steps, so it is the default (docs/attribution.md shows both).
IG_RULES: tuple[str, ...] = ("midpoint", "left")
# "0" (or "false", "no", "off") makes IG on activations run the whole model at every step (the old path).
IG_PREFIX_ENV = "NEURONTRACE_IG_PREFIX"


def _ig_prefix_default() -> bool:
    return os.environ.get(IG_PREFIX_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


@contextmanager
def frozen_parameters(model: NeuronModel) -> Iterator[None]:
    """No parameter gradients inside the block (attribution needs activation gradients only).

    Flags are restored by name: accelerate replaces the parameter objects of offloaded modules at every forward.
    """
    saved = {name: p.requires_grad for name, p in model.hf.named_parameters()}
    try:
        for p in model.hf.parameters():
            p.requires_grad_(False)
        yield
    finally:
        for name, p in model.hf.named_parameters():
            p.requires_grad_(saved.get(name, p.requires_grad))


@dataclass
class SiteRun:
    """One forward pass: the metric per example, the site tensors (live if grad), and the input embeddings."""

    metric: torch.Tensor  # [B]
    acts: dict[int, torch.Tensor]  # layer -> [B, T, width]
    embeds: torch.Tensor | None = None  # [B, T, d_model]


def run_sites(
    model: NeuronModel,
    batch: Batch,
    metric: Metric,
    *,
    site: str,
    layers: Sequence[int],
    rules: RelPRules | None = None,
    grad: bool = True,
    replace: dict[int, torch.Tensor] | None = None,
    replace_embeds: torch.Tensor | None = None,
) -> SiteRun:
    """Run ``batch`` once, recording the site at ``layers``.

    ``rules`` turns on the RelP replacement model. ``replace`` substitutes given tensors for sites (e.g. leaves for
    integrated gradients), ``replace_embeds`` for the input embeddings. With ``grad``, the embeddings are a leaf
    requiring grad so the graph is built (parameters should be frozen by the caller).
    """
    acts: dict[int, torch.Tensor] = {}
    embeds: list[torch.Tensor] = []
    replace = replace or {}

    def on_embed(y: torch.Tensor) -> torch.Tensor:
        if replace_embeds is not None:
            y = replace_embeds.to(y.device)
        elif grad:
            y = y.detach().requires_grad_(True)
        embeds.append(y)
        return y

    def recorder(layer: int):
        def fn(x: torch.Tensor) -> torch.Tensor:
            if layer in replace:
                x = replace[layer].to(x.device)  # layers may sit on different devices (device_map)
            acts[layer] = x
            return x

        return fn

    with ExitStack() as stack:
        rep = stack.enter_context(replacement_model(model, rules)) if rules is not None else None
        stack.enter_context(torch.enable_grad() if grad else torch.no_grad())
        handles = [add_output_hook(model.embed, on_embed)]
        handles += [hook_site(model, site, layer, recorder(layer)) for layer in layers]
        stack.callback(lambda: [h.remove() for h in handles])
        kwargs = {"logits_to_keep": metric.keep} if metric.keep else {}
        out = model.forward(batch, **kwargs)
        logits = rep.logits(out) if rep is not None else out.logits
        value = metric(logits)
    return SiteRun(value, acts, embeds[0] if embeds else None)


def _site_from(
    model: NeuronModel,
    recorded: RecordedForward,
    site: str,
    layer: int,
    leaf: torch.Tensor,
    metric: Metric,
) -> torch.Tensor:
    """The metric with ``leaf`` substituted for the site at ``layer``, running the model from ``layer`` on only.

    The layer's input comes from ``recorded`` (a pass over the same rows); the plain residual-stream site is the
    layer's output, so there the run starts at the next layer with ``leaf`` as its input.
    """
    with torch.enable_grad():
        if site == "resid":
            return metric(run_from(model, recorded, layer + 1, leaf))
        handle = hook_site(model, site, layer, lambda x: leaf.to(x.device))
        try:
            return metric(run_from(model, recorded, layer, recorded.inputs[layer]))
        finally:
            handle.remove()


def _stack(acts: dict[int, torch.Tensor], layers: Sequence[int]) -> torch.Tensor:
    """``[B, L, T, width]`` on the first layer's device (a device map may spread the layers)."""
    return stack_on([acts[layer] for layer in layers], dim=1)


def _repeat(batch: Batch, times: int) -> Batch:
    return Batch(batch.input_ids.repeat(times, 1), batch.attention_mask.repeat(times, 1))


@dataclass
class BatchScores:
    scores: torch.Tensor  # [B, L, T, width]
    acts: torch.Tensor  # [B, L, T, width] clean activations
    metric_clean: torch.Tensor  # [B]
    metric_patch: torch.Tensor | None = None  # [B]
    embed_scores: torch.Tensor | None = None  # [B, T] (ig-inputs)


class BatchAttributor:
    """Scores one batch with one method. ``patch`` is the counterfactual batch (pairs) or None (baseline)."""

    def __init__(
        self,
        model: NeuronModel,
        *,
        method: str,
        site: str = "neurons",
        layers: Sequence[int] | None = None,
        rules: RelPRules | None = None,
        steps: int = 32,
        ig_rule: str = "midpoint",
        max_rows: int = 64,
        seed: int = 0,
        ig_prefix: bool | None = None,
    ) -> None:
        if ig_rule not in IG_RULES:
            raise NeurontraceError(
                f"unknown integration rule {ig_rule!r}; choose one of {', '.join(IG_RULES)}"
            )
        if method not in METHODS:
            raise NeurontraceError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        if steps < 1:
            raise NeurontraceError("integrated gradients needs at least 1 step")
        self.model, self.method, self.site = model, method, site
        self.layers = list(range(model.n_layers)) if layers is None else list(layers)
        self.rules = rules or RelPRules()
        self.steps, self.ig_rule, self.max_rows = steps, ig_rule, max_rows
        self.generator = torch.Generator().manual_seed(seed)
        # IG on activations: run the layers below the interpolated site once per batch (None: $NEURONTRACE_IG_PREFIX,
        # on by default). ``ig_path`` says which path the last batch took and, if the whole model ran, why.
        self.ig_prefix = _ig_prefix_default() if ig_prefix is None else bool(ig_prefix)
        self.ig_path: str | None = None

    # --------------------------------------------------------------- helpers
    def _values(self, batch: Batch, metric: Metric) -> SiteRun:
        return run_sites(self.model, batch, metric, site=self.site, layers=self.layers, grad=False)

    def _baseline(self, clean: torch.Tensor, patch_run: SiteRun | None, baseline: torch.Tensor | None):
        """Activations ``a'`` of the counterfactual run, or the baseline (zero, or a ``[L, width]`` mean)."""
        if patch_run is not None:
            return _stack(patch_run.acts, self.layers)
        if baseline is None:
            return torch.zeros_like(clean)
        return baseline.to(clean.device, clean.dtype)[None, :, None, :].expand_as(clean)

    # --------------------------------------------------------------- methods
    def __call__(
        self,
        clean: Batch,
        metric: Metric,
        *,
        patch: Batch | None = None,
        baseline: torch.Tensor | None = None,
    ) -> BatchScores:
        with frozen_parameters(self.model):
            patch_run = self._values(patch, metric) if patch is not None else None
            if self.method in ("relp", "atp"):
                return self._gradient(clean, metric, patch_run, baseline)
            if self.method == "ig":
                return self._ig_activations(clean, metric, patch_run, baseline)
            if self.method == "ig-inputs":
                return self._ig_inputs(clean, metric, patch, patch_run)
            run = self._values(clean, metric)
            acts = _stack(run.acts, self.layers)
            other = self._baseline(acts, patch_run, baseline)
            sign = 1.0 if patch_run is not None else -1.0
            if self.method == "delta":
                scores = sign * (_promote(other) - _promote(acts))
            elif self.method == "random":
                noise = torch.randn(acts.shape, generator=self.generator)
                scores = noise.to(acts.device, torch.promote_types(acts.dtype, torch.float32))
            else:  # exact
                scores = self._exact(clean, metric, acts, other, run.metric, paired=patch_run is not None)
            return BatchScores(scores, acts, run.metric, None if patch_run is None else patch_run.metric)

    def _gradient(self, clean: Batch, metric: Metric, patch_run: SiteRun | None, baseline) -> BatchScores:
        rules = self.rules if self.method == "relp" else None
        run = run_sites(self.model, clean, metric, site=self.site, layers=self.layers, rules=rules)
        grads = torch.autograd.grad(run.metric.sum(), [run.acts[layer] for layer in self.layers])
        acts = _stack({k: v.detach() for k, v in run.acts.items()}, self.layers)
        grad = _promote(stack_on(grads, dim=1, device=acts.device))
        other = self._baseline(acts, patch_run, baseline)
        delta = (
            _promote(other) - _promote(acts) if patch_run is not None else _promote(acts) - _promote(other)
        )
        return BatchScores(
            delta * grad, acts, run.metric.detach(), None if patch_run is None else patch_run.metric
        )

    def _alpha_chunks(self, rows_per_alpha: int) -> Iterator[torch.Tensor]:
        offset = 0.5 if self.ig_rule == "midpoint" else 0.0
        alphas = (torch.arange(self.steps, dtype=torch.float64) + offset) / self.steps
        per = max(1, self.max_rows // max(1, rows_per_alpha))
        yield from alphas.split(per)

    def _record_prefix(
        self, clean: Batch, metric: Metric, sizes: set[int]
    ) -> dict[int, RecordedForward] | None:
        """One recorded forward of the batch repeated ``n`` times per chunk size ``n`` (no gradients), or None
        (with the reason in ``ig_path``) where the model must run whole at every step."""
        if not self.ig_prefix:
            self.ig_path = "full: prefix caching turned off"
            return None
        # The resid site is a layer's output: its steps start at the next layer, from the leaf itself.
        keep = [] if self.site == "resid" else self.layers
        try:
            recorded = {
                n: record_forward(self.model, _repeat(clean, n), keep_inputs=keep, logits_to_keep=metric.keep)
                for n in sorted(sizes)
            }
        except SuffixUnsupported as exc:
            self.ig_path = f"full: {exc}"
            return None
        self.ig_path = "prefix-cached"
        return recorded

    def _ig_activations(
        self, clean: Batch, metric: Metric, patch_run: SiteRun | None, baseline
    ) -> BatchScores:
        run = self._values(clean, metric)
        acts = _stack(run.acts, self.layers)
        other = self._baseline(acts, patch_run, baseline)
        start, end = (acts, other) if patch_run is not None else (other, acts)
        start, end = _promote(start), _promote(end)  # the path and the gradient sums in float32 (bf16 models)
        B = clean.size
        chunks = list(self._alpha_chunks(B))
        # Each chunk runs n * B rows, as the old path did; the recorded passes have the same rows, so the layers
        # from the interpolated one on compute exactly what they computed inside a whole forward pass.
        recorded = self._record_prefix(clean, metric, {len(c) for c in chunks})
        mean_grad = torch.zeros_like(start)
        for li, layer in enumerate(self.layers):
            for alphas in chunks:
                n = len(alphas)
                a = alphas.to(start)[:, None, None, None]
                path = (start[:, li][None] + a * (end[:, li] - start[:, li])[None]).reshape(
                    n * B, *acts.shape[2:]
                )
                leaf = path.to(acts.dtype).detach().requires_grad_(True)
                rows = metric.select(torch.arange(B).repeat(n))
                if recorded is not None:
                    value = _site_from(self.model, recorded[n], self.site, layer, leaf, rows)
                else:
                    value = run_sites(
                        self.model,
                        _repeat(clean, n),
                        rows,
                        site=self.site,
                        layers=[layer],
                        replace={layer: leaf},
                    ).metric
                (g,) = torch.autograd.grad(value.sum(), [leaf])
                mean_grad[:, li] += _promote(g).view(n, B, *acts.shape[2:]).sum(0)
            if recorded is not None and layer not in self.layers[li + 1 :]:
                for rec in recorded.values():  # memory: a layer's input is not needed again
                    rec.inputs.pop(layer, None)
        mean_grad /= self.steps
        return BatchScores(
            (end - start) * mean_grad, acts, run.metric, None if patch_run is None else patch_run.metric
        )

    def _ig_inputs(
        self, clean: Batch, metric: Metric, patch: Batch | None, patch_run: SiteRun | None
    ) -> BatchScores:
        run = self._values(clean, metric)
        acts = _stack(run.acts, self.layers)
        e_clean = run.embeds.detach()
        if patch is not None:
            e_other = run_sites(
                self.model, patch, metric, site=self.site, layers=[], grad=False
            ).embeds.detach()
            other = _stack(patch_run.acts, self.layers)
            start, end, e_start, e_end = acts, other, e_clean, e_other
        else:
            e_other = torch.zeros_like(e_clean)
            zero = run_sites(
                self.model,
                clean,
                metric,
                site=self.site,
                layers=self.layers,
                grad=False,
                replace_embeds=e_other,
            )
            start, end, e_start, e_end = _stack(zero.acts, self.layers), acts, e_other, e_clean
        B = clean.size
        start, end, e_start, e_end = (_promote(t) for t in (start, end, e_start, e_end))  # float32 sums
        mean_grad = torch.zeros_like(start)
        mean_grad_e = torch.zeros_like(e_start)
        for alphas in self._alpha_chunks(B):
            n = len(alphas)
            a = alphas.to(e_start)[:, None, None, None]
            path = (e_start[None] + a * (e_end - e_start)[None]).reshape(n * B, *e_clean.shape[1:])
            leaf = path.to(e_clean.dtype).detach().requires_grad_(True)
            r = run_sites(
                self.model,
                _repeat(clean, n),
                metric.select(torch.arange(B).repeat(n)),
                site=self.site,
                layers=self.layers,
                replace_embeds=leaf,
            )
            grads = torch.autograd.grad(r.metric.sum(), [leaf] + [r.acts[layer] for layer in self.layers])
            mean_grad_e += _promote(grads[0]).view(n, B, *e_clean.shape[1:]).sum(0)
            layer_grads = _promote(stack_on(grads[1:], dim=1, device=mean_grad.device))
            mean_grad += layer_grads.view(n, B, *acts.shape[1:]).sum(0)
        mean_grad /= self.steps
        mean_grad_e /= self.steps
        embed_scores = ((e_end - e_start) * mean_grad_e).sum(-1)
        return BatchScores(
            (end - start) * mean_grad,
            acts,
            run.metric,
            None if patch_run is None else patch_run.metric,
            embed_scores=embed_scores,
        )

    def _exact(
        self,
        clean: Batch,
        metric: Metric,
        acts: torch.Tensor,
        other: torch.Tensor,
        m_clean: torch.Tensor,
        *,
        paired: bool,
    ) -> torch.Tensor:
        """Patch every (layer, position, unit) node alone; ground truth, so it costs one forward per node."""
        B, L, T, d = acts.shape
        scores = torch.zeros_like(acts, dtype=torch.promote_types(acts.dtype, torch.float32))
        for b in range(B):
            one = clean.select([b])
            pad = int(one.pad[0])
            nodes = [(li, t, u) for li in range(L) for t in range(pad, T) for u in range(d)]
            effects = patch_effects(
                self.model,
                one,
                metric.select([b]),
                site=self.site,
                layers=self.layers,
                node_sets=[[n] for n in nodes],
                values=other[b : b + 1],
                columns=True,
                max_rows=self.max_rows,
            )[:, 0]
            change = effects - m_clean[b]
            for (li, t, u), value in zip(nodes, change.tolist(), strict=True):
                scores[b, li, t, u] = value if paired else -value
        return scores


def patch_effects(
    model: NeuronModel,
    batch: Batch,
    metric: Metric,
    *,
    site: str,
    layers: Sequence[int],
    node_sets: Sequence[Sequence[tuple[int, int | None, int]]],
    values: torch.Tensor,
    columns: bool = False,
    max_rows: int = 64,
) -> torch.Tensor:
    """The metric after patching each node set, ``[len(node_sets), B]`` (no gradients).

    A node is ``(layer index into layers, position, unit)``; position None means every position. Positions are
    prompt-relative unless ``columns`` (then they are padded columns). Patched nodes take their value from
    ``values`` ``[B, L, T, width]`` (the counterfactual run or the baseline). Node sets are evaluated in batches
    of ``max_rows`` rows: one forward per chunk, every set on its own copy of the batch.
    """
    B, T = batch.size, batch.width
    width = values.shape[-1]
    pad = batch.pad
    results = []
    per = max(1, max_rows // B)
    for start in range(0, len(node_sets), per):
        chunk = node_sets[start : start + per]
        K = len(chunk)
        masks = {li: torch.zeros(K, B, T, width, dtype=torch.bool) for li in range(len(layers))}
        for k, node_set in enumerate(chunk):
            for li, pos, unit in node_set:
                if pos is None:
                    masks[li][k, :, :, unit] = True
                elif columns:
                    masks[li][k, :, pos, unit] = True
                else:
                    for b in range(B):
                        col = int(pad[b]) + (pos if pos >= 0 else int(batch.lengths[b]) + pos)
                        masks[li][k, b, col, unit] = True
        used = {li: m.view(K * B, T, width) for li, m in masks.items() if m.any()}
        vals = values.repeat(K, 1, 1, 1)  # [K*B, L, T, width]

        def patcher(li: int, mask: torch.Tensor, vals: torch.Tensor):
            def fn(x: torch.Tensor) -> torch.Tensor:
                return torch.where(mask.to(x.device), vals[:, li].to(x.device, x.dtype), x)

            return fn

        with torch.no_grad(), ExitStack() as stack:
            handles = [hook_site(model, site, layers[li], patcher(li, used[li], vals)) for li in used]
            stack.callback(lambda handles=handles: [h.remove() for h in handles])
            kwargs = {"logits_to_keep": metric.keep} if metric.keep else {}
            out = model.forward(_repeat(batch, K), **kwargs)
            results.append(metric.select(torch.arange(B).repeat(K))(out.logits).view(K, B))
    return torch.cat(results) if results else torch.zeros(0, B)

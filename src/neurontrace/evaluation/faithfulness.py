"""Faithfulness and completeness of circuits under ablation (Marks et al.; METHOD.md section 5).

``F(X)`` is the mean metric over the test examples with every node *outside* ``X`` ablated:

- faithfulness  = (F(C) - F(∅)) / (F(M) - F(∅))   (near 1 is good)
- completeness  = (F(C^c) - F(∅)) / (F(M) - F(∅)) (near 0 is good; below 0: ablating only the circuit pushes
  the metric past the fully ablated model, e.g. the model then prefers the counterfactual answer)

Circuits of a method are prefixes of its ranking (nodes by decreasing ``|score|``, ties in index order): a
threshold ``tau`` selects the ``k = #{|score| > tau}`` first nodes. :func:`sweep` measures a grid of thresholds,
then, for each requested level ``L``, the **exact size** ``n*(L)``: the smallest ``k`` with
``F(top-k) >= L``. Faithfulness is not monotone in ``k``, so ``n*`` is searched in the bracket the grid gives
(after the last grid size below ``L`` and up to the first grid size reaching it): bisection finds a crossing,
then every size of the bracket below it is measured upwards until the first that reaches ``L``. When that scan
would take more than ``scan_limit`` forwards, the bisection crossing is reported with ``exact=False`` (an upper
bound). Grid sizes below the bracket all miss the level; sizes between them are not searched.

Every evaluated circuit keeps its metric per test example (``Curve.samples``), so each number gets a bootstrap
95% interval (:mod:`.intervals`) without another forward pass.

Several circuits share one forward pass (:meth:`EvalSet.metric_values_many`): each test batch is repeated along
the batch dimension, one copy per circuit, and the ablation hooks apply a per-row mask. A sweep measures F(M) with
F(∅), then every grid point's circuit, complement and random control in such passes; the upward scan evaluates
the next sizes of the bracket together (and, on an accelerator, the bisection evaluates the probes of its next
steps together). Sizes evaluated ahead of need are kept only when the one-circuit-per-pass search would have
measured them, so a curve measures the same circuits whatever the number of circuits per pass. A pass also skips
work that gives the same metric up to rounding (:mod:`.shortcuts`: the test prompts' shared first tokens run
once, MLPs where a pass keeps few neurons run on those only, two logits per prompt); circuits that keep few
neurons share passes. With the shortcuts (the default) curves agree to rounding whatever the number of circuits
per pass (``benchmarks/bench_sweep.py``: largest difference 2.5e-5 of any curve number, the same exact sizes).
Without them (``prepare_eval(shortcuts=False)``, ``evaluate --full-passes``) the curves' sizes, brackets and
search accounting are the same whatever the number of circuits per pass, and their numbers agree to float32
rounding: matrix products of other batch shapes may pick other kernels and round differently, on one CPU thread
too (measured on an AVX-512 CPU: up to 0.2 of the tolerance derived in ``tests/rounding.py``; 2 threads on the
default model: 2.1e-5).

Ablation values are computed once per test set (:class:`EvalSet`). Test prompts may have several token
lengths: batches then hold one length each, and the mean-ablation value of a position is the counterfactual
mean over the test prompts at the same *aligned position* (the first token with first tokens: a BOS token, or
the attention sink of a model without one; every other position with the same distance from the last token). With one length this is
the plain per-position mean. Resample donors are drawn among test examples of the same length.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import torch

from neurontrace import distributed
from neurontrace.attribution.metrics import Metric, make_metric
from neurontrace.circuits.selection import Circuit
from neurontrace.errors import NeurontraceError
from neurontrace.evaluation import intervals
from neurontrace.evaluation import shortcuts as shortcut
from neurontrace.models.model import NeuronModel
from neurontrace.sites import (
    TRANSCODER_PREFIX,
    capture,
    check_site,
    dictionary_latents,
    dictionary_of,
    hook_site,
    site_layers,
    site_width,
)
from neurontrace.tokens import Batch, single_token_id, tokenize_pairs

ABLATIONS: tuple[str, ...] = ("mean", "zero", "resample")
ERROR_NODES: tuple[str, ...] = ("count", "keep", "ablate")
"""How a dictionary basis's error nodes (one per layer and position) enter a sweep: ``count`` (Marks et al.: a
node like any latent, ranked by its score and counted in the circuit size), ``keep`` (never ablated, not
counted: the dictionary's error is free) or ``ablate`` (always ablated outside the full model, not counted: the
dictionary alone must carry the behaviour)."""
LEVELS: tuple[float, ...] = (0.8, 0.9)
GRIDS: tuple[str, ...] = ("log", "paper")
SCAN_LIMIT = 64
"""Most sizes the linear scan of one level's bracket may measure before the crossing is reported instead."""
MAX_CIRCUITS: dict[str, int] = {"cpu": 8, "cuda": 16}
"""Most circuits per forward pass by device type (others: ``cuda``'s). A CPU pass is compute-bound: a sweep of
SmolLM2-135M on 32 test pairs took 0.90x the CPU time with 2 circuits per pass, 0.86x with 4 and 0.82x with 8
(one thread, full passes), and with the shortcuts 16 per pass were slower than 8; an accelerator runs one test
batch far below its capacity (``benchmarks/bench_sweep.py``)."""
GRID_PASSES = 4
"""Passes' worth of grid circuits one call may sort into passes (:meth:`_Measurer.grid_group`)."""
GRID_MASK_BYTES = 2**28
"""Most bytes of boolean masks a group of grid sizes may hold."""
MEMORY_SHARE = 0.25
"""Share of the free memory the circuits of one pass may take (as :func:`neurontrace.memory.auto_batch_size`)."""


@dataclass
class EvalBatch:
    """Test examples of one token length, with their metric and ablation values."""

    batch: Batch
    metric: Metric
    rows: list[int]  # indices of these examples in the test set
    keys: torch.Tensor  # [T] aligned position of each position (which mean-ablation value it gets)
    values: torch.Tensor | None  # [B, L, T, width] donors' counterfactual activations (resample)
    node_pos: torch.Tensor | None = None  # [T] node position (slot) of each token; None: the token's own


@dataclass
class EvalSet:
    """Test examples in batches with their metric and cached ablation values."""

    model: NeuronModel
    site: str
    layers: list[int]
    ablation: str
    batches: list[EvalBatch]
    mean: torch.Tensor | None  # [K, L, width]: counterfactual mean per aligned position (mean ablation)
    n_total: int  # test examples over every process (launched distributed, batches are a share)
    width: (
        int | None
    )  # node positions of a per-position mask: the one token length (or slot count), else None
    forwards: int = 0  # circuit-forwards so far: circuits evaluated x test batches (see metric_values_many)
    latents: int | None = None  # a dictionary site: its latents come first, then the error components
    passes: int = 0  # forward passes actually run (several circuits share one: metric_values_many)
    max_circuits: int | None = None  # most circuits per forward pass; None: from the free memory
    prefix: int = (
        0  # leading positions shared by every test prompt (their ablation is a no-op; see .shortcuts)
    )
    shortcuts: bool = True  # skip work that gives the same metric (.shortcuts); False: every pass in full
    memo: dict = field(
        default_factory=dict, repr=False
    )  # the prefix cache and down(ablation value) (shortcuts)

    @property
    def n_examples(self) -> int:
        return self.n_total

    @property
    def node_width(self) -> int | None:
        """Nodes per (layer, position) when a dictionary's error components are one node, else None."""
        return None if self.latents is None else self.latents + 1

    def nodes_of(self, scores: torch.Tensor) -> torch.Tensor:
        """``scores`` over nodes: a dictionary site's error components summed into one error node per (layer,
        position) (the last column); other sites' scores unchanged."""
        if self.latents is None or scores.shape[-1] == self.node_width:
            return scores
        return group_error_nodes(scores, self.latents)

    def metric_values(self, keep: torch.Tensor | None) -> torch.Tensor:
        """Metric of every test example (``[n]``, float64) with every node outside ``keep`` ablated.

        ``keep``: ``[L, T, w]`` (per-position nodes; needs one token length, or ``[L, S, w]`` over the slots
        of an evaluation set made with ``slot_maps``) or ``[L, w]`` (a unit at every position) boolean; ``None``
        runs the full model. Launched distributed, every process gets all values. One forward pass per test
        batch (:meth:`metric_values_many` shares passes between circuits).
        """
        return self.metric_values_many([keep], circuits_per_pass=1)[0]

    def metric_with(self, keep: torch.Tensor | None) -> float:
        """Mean metric over the test examples with every node outside ``keep`` ablated (see
        :meth:`metric_values`)."""
        return float(self.metric_values(keep).mean())

    def metric_values_many(
        self,
        keeps: Sequence[torch.Tensor | None],
        *,
        circuits_per_pass: int | None = None,
        seen: dict | None = None,
    ) -> list[torch.Tensor]:
        """:meth:`metric_values` of every mask of ``keeps``, up to ``circuits_per_pass`` circuits (default
        :meth:`circuits_per_pass`) in one forward pass of each test batch.

        The batch is repeated along the batch dimension, one copy per circuit, and each ablation hook gives every
        row its circuit's mask (per position ``[L, T, w]``, summed ``[L, w]`` or slots ``[L, S, w]``; a
        dictionary site's error nodes expanded to their components). A layer that a circuit keeps whole is left
        as it is for that circuit's rows (on a dictionary site, the site's own value, not the dictionary's
        splice), as :meth:`metric_values` leaves it unhooked. Masks of different shapes go in different passes.

        ``seen``: the values of masks measured before (a sweep's own, so that its curve does not depend on what
        ran before it), filled in; with it and :attr:`shortcuts`, a mask in ``seen`` (or twice in the call;
        keeping every node is the full model) is not run again.

        Accounting: :attr:`forwards` grows by one per circuit run and test batch (the forwards of one circuit per
        pass, whatever the batching), :attr:`passes` by one per forward pass run. Launched distributed, the
        values of all circuits run are reduced together, once per call.
        """
        if not keeps:
            return []
        keeps = [self._site_mask(k) for k in keeps]
        per_pass = self.circuits_per_pass() if circuits_per_pass is None else int(circuits_per_pass)
        if per_pass < 1:
            raise NeurontraceError("circuits per forward pass must be at least 1")
        memo = seen is not None and self.shortcuts
        keys = [self._values_key(k) for k in keeps] if memo else list(range(len(keeps)))
        known = seen if memo else {}
        todo = sorted({key: i for i, key in reversed(list(enumerate(keys))) if key not in known}.values())
        shapes = list(dict.fromkeys(tuple(keeps[i].shape) for i in todo if keeps[i] is not None))
        groups: dict[tuple | None, list[int]] = {}
        for i in todo:  # the full model (None) goes with the first shape
            shape = (shapes[0] if shapes else None) if keeps[i] is None else tuple(keeps[i].shape)
            groups.setdefault(shape, []).append(i)
        fresh = torch.zeros(len(keeps), self.n_total, dtype=torch.float64)
        for members in groups.values():
            for chunk in self._chunks(keeps, members, per_pass):
                values = self._run_pass([keeps[i] for i in chunk])
                for i, v in zip(chunk, values, strict=True):
                    fresh[i] = v
        if distributed.world().size > 1 and todo:  # every process has the same masks, so the same todo
            fresh = distributed.all_reduce_sum(fresh)
        out = fresh
        if memo:  # each mask not measured before ran once
            for i in todo:
                known[keys[i]] = fresh[i]
            out = torch.stack([known[key] for key in keys])
        if torch.isnan(out).any():
            raise NeurontraceError(
                "the metric is NaN on some test examples under this ablation; check the model's precision "
                "(try --dtype float32) and the ablation"
            )
        return list(out.unbind(0))

    def _chunks(self, keeps: list, members: list[int], per_pass: int) -> list[list[int]]:
        """``members`` in passes of at most ``per_pass``. With the sparse-MLP shortcut, by the passes' estimated
        cost (:func:`.shortcuts.group_passes`): circuits that keep few neurons go together, with circuits
        that keep the same ones, so that a pass's union of kept neurons stays small."""
        if not self._sparse_site():
            return [members[i : i + per_pass] for i in range(0, len(members), per_pass)]
        groups = shortcut.group_passes(
            [self._kept_units(keeps[i]) for i in members], per_pass, self._tokens()
        )
        return [[members[i] for i in group] for group in groups]

    def _values_key(self, keep: torch.Tensor | None) -> tuple:
        """The key of a site mask's metric values in ``seen``: its shape and a digest of its bits (keeping every
        node is the full model, None)."""
        if keep is None or bool(keep.all()):
            return (None,)
        bits = keep.contiguous().cpu().numpy().tobytes()
        return (tuple(keep.shape), hashlib.blake2b(bits, digest_size=16).digest())

    def _sparse_site(self) -> bool:
        """Whether passes may run MLPs on their kept neurons only (:mod:`.shortcuts`)."""
        return self.shortcuts and self.site == "neurons" and self.latents is None

    def _tokens(self) -> int:
        """Tokens one circuit's rows of the largest test batch run through a pass (after the shared prefix)."""
        return max((eb.batch.size * max(1, eb.batch.width - self.prefix) for eb in self.batches), default=1)

    def _kept_units(self, keep: torch.Tensor | None) -> torch.Tensor:
        """``[L, w]``: the neurons ``keep`` keeps at some position after the shared prefix (all for None)."""
        if keep is None:
            return torch.ones(len(self.layers), site_width(self.model, self.site), dtype=torch.bool)
        return keep[:, self.prefix :].any(1) if keep.dim() == 3 else keep

    def circuits_per_pass(self) -> int:
        """Circuits one forward pass evaluates: :attr:`max_circuits` when set, else as many as fit in
        :data:`MEMORY_SHARE` of the free memory of the model's device (:func:`neurontrace.memory.available_bytes`;
        each circuit adds a copy of the largest test batch), at most :data:`MAX_CIRCUITS` of the device type.
        This process's count: launched distributed, a sweep takes the smallest over the processes."""
        if self.max_circuits is not None:
            if self.max_circuits < 1:
                raise NeurontraceError("max_circuits must be at least 1")
            return int(self.max_circuits)
        from neurontrace.memory import available_bytes

        device = torch.device(self.model.device)
        cap = MAX_CIRCUITS.get(device.type, MAX_CIRCUITS["cuda"])
        one = max((self._circuit_bytes(eb) for eb in self.batches), default=1)
        budget = int(available_bytes(device) * MEMORY_SHARE)
        return int(max(1, min(cap, budget // max(1, one))))

    def _circuit_bytes(self, eb: EvalBatch) -> int:
        """Working memory one circuit adds to a forward pass of ``eb`` without gradients (bytes; an estimate
        that errs high): per token, the MLP's hidden activations, the hooked site and its replacement, the
        residual-stream tensors and one row of attention weights per head; per row, the last position's
        logits."""
        model = self.model
        itemsize = torch.empty((), dtype=model.dtype).element_size()
        rows, t = eb.batch.size, eb.batch.width
        heads = getattr(model.config, "num_attention_heads", None) or 1
        width = site_width(model, self.site)
        per_token = 4 * model.d_ff + 3 * width + 6 * model.d_model + heads * t
        return int(rows * (t * per_token * itemsize + 8 * model.vocab_size))

    def _site_mask(self, keep: torch.Tensor | None) -> torch.Tensor | None:
        """A node mask checked against the test set and, on a dictionary site, expanded to its components."""
        if keep is None:
            return None
        if keep.dim() == 3 and (self.width is None or keep.shape[1] != self.width):
            raise NeurontraceError(
                "per-position nodes need test prompts of one token length (so positions align); "
                "use summed nodes (--nodes summed) for prompts of several lengths"
            )
        if self.latents is not None and keep.shape[-1] == self.node_width:
            keep = expand_error_nodes(keep, self.latents, site_width(self.model, self.site))
        return keep

    def _raw_site(self) -> str | None:
        """A dictionary site's underlying model site (where its splice is hooked), else None."""
        if self.latents is None:
            return None
        if self.site.startswith(TRANSCODER_PREFIX):
            return "mlp_out"  # a transcoder replaces the MLP module's output
        return dictionary_of(self.site).site

    def _run_pass(self, keeps: list[torch.Tensor | None]) -> list[torch.Tensor]:
        """This process's metric values (``[n]`` each, other processes' examples 0) of ``keeps`` (site masks of
        one shape, or None), all in one forward pass of every test batch (with :mod:`.shortcuts`: from the end
        of the shared prefix on, sparse MLPs where the pass keeps few neurons, two logits per prompt)."""
        m = len(keeps)
        fast = self.shortcuts and self.latents is None
        p0 = self.prefix if fast else 0
        hooked = []  # (layer index, [m, ...] masks after the prefix, [m] whether each circuit keeps the layer whole)
        for li in range(len(self.layers)):
            cols = [None if k is None else (k[li, p0:] if k.dim() == 3 else k[li]) for k in keeps]
            full = torch.tensor([c is None or bool(c.all()) for c in cols])
            if bool(full.all()):
                continue
            like = next(c for c in cols if c is not None)
            hooked.append((li, torch.stack([torch.ones_like(like) if c is None else c for c in cols]), full))
        raw = self._raw_site() if hooked else None
        out = [torch.zeros(self.n_total, dtype=torch.float64) for _ in range(m)]
        for bi, eb in enumerate(self.batches):
            b = eb.batch.size
            batch = eb.batch
            if m > 1:
                prompts = None if batch.prompts is None else batch.prompts * m
                batch = Batch(batch.input_ids.repeat(m, 1), batch.attention_mask.repeat(m, 1), prompts)
            subset = None
            if fast:  # the vocabulary ids the metric reads, once per test batch
                if ("subset", bi) not in self.memo:
                    self.memo[("subset", bi)] = shortcut.subset_metric(eb.metric)
                subset = self.memo[("subset", bi)]
            cache = self._prefix_cache() if p0 else None  # the unablated prefix: before any hook
            with torch.no_grad(), ExitStack() as stack:
                handles: list = []
                stack.callback(lambda handles=handles: [h.remove() for h in handles])
                tail = fast and self._sparse_site() and eb.metric.kind == "logit-diff" and eb.node_pos is None
                if tail:  # the last MLP only at the last position: the metric reads nothing else
                    stack.enter_context(shortcut.last_position_mlp(self.model))
                for li, masks, full in hooked:
                    layer = self.layers[li]
                    start = p0
                    if tail and layer == self.model.n_layers - 1:
                        start = eb.batch.width - 1
                        masks = masks[:, start - p0 :] if masks.dim() == 3 else masks
                    if self._enter_sparse_mlp(stack, eb, bi, li, masks, start):
                        continue
                    restore = raw is not None and bool(full.any())
                    if restore:  # rows of circuits that keep the layer whole get the site's own value back
                        saved: dict[str, torch.Tensor] = {}
                        handles.append(hook_site(self.model, raw, layer, partial(_save, saved)))
                    handles.append(
                        hook_site(self.model, self.site, layer, self._ablator(eb, li, masks, start))
                    )
                    if restore:
                        rows = full.repeat_interleave(b)
                        handles.append(hook_site(self.model, raw, layer, partial(_restore, saved, rows)))
                metric = eb.metric
                if subset is not None and stack.enter_context(
                    shortcut.vocabulary_subset(self.model, subset[0])
                ):
                    metric = subset[1]
                if p0 == 0:
                    logits = self.model.forward(batch, logits_to_keep=1).logits
                else:
                    logits = shortcut.forward_after(self.model, batch.input_ids, p0, cache)
            self.passes += 1
            self.forwards += m
            for c in range(m):
                out[c][eb.rows] = metric(logits[c * b : (c + 1) * b]).detach().double().cpu()
        return out

    def _prefix_cache(self):
        """The key/value cache of the shared prefix (one row: every test prompt starts with it; kept)."""
        if "prefix" not in self.memo:
            self.memo["prefix"] = shortcut.prefix_cache(
                self.model, self.batches[0].batch.input_ids, self.prefix
            )
        return self.memo["prefix"]

    def _enter_sparse_mlp(
        self, stack: ExitStack, eb: EvalBatch, bi: int, li: int, masks: torch.Tensor, start: int
    ) -> bool:
        """Run layer ``li``'s MLP on the pass's kept neurons only (inside ``stack``) when few are kept
        (:func:`.shortcuts.runs_sparse`); the MLP sees the positions from ``start`` on."""
        if not self._sparse_site() or eb.node_pos is not None:
            return False
        units = masks.reshape(-1, masks.shape[-1]).any(0)
        tokens = masks.shape[0] * eb.batch.size * (eb.batch.width - start)  # the rows' positions the MLP sees
        if not shortcut.runs_sparse(float(units.float().mean()), tokens):
            return False
        layer = self.layers[li]
        modules = shortcut.sparse_mlp_modules(self.model, layer)
        if modules is None:
            return False
        down = modules[2]
        # the ablation values at every position, and how to read this pass's positions from them
        if self.ablation == "mean":
            source, pick = self.mean[:, li], lambda t: t[eb.keys[start:]]  # [K, w]
        elif self.ablation == "zero":
            source, pick = torch.zeros(masks.shape[-1]), lambda t: t  # [w]
        else:
            source, pick = eb.values[:, li], lambda t: t[:, start:]  # [B, T, w]
        key = ("down", bi if self.ablation == "resample" else None, li)
        if key not in self.memo:
            self.memo[key] = shortcut.down_of(down, source)
        replacement, down_r = pick(source), pick(self.memo[key])
        device, dtype = down.weight.device, down.weight.dtype
        keep = masks[:, None] if masks.dim() == 3 else masks[:, None, None]
        stack.enter_context(
            shortcut.sparse_mlp(
                modules,
                units=units.nonzero().flatten().to(device),
                keep=keep.to(device),
                replacement=replacement.to(device, dtype),
                down_replacement=down_r.to(device, dtype),
                circuits=masks.shape[0],
                fused=self.model.adapter.gate_up_fused,
            )
        )
        return True

    def _ablator(self, eb: EvalBatch, li: int, masks: torch.Tensor, p0: int = 0):
        """The hook of layer ``li`` for a pass of ``len(masks)`` circuits: row block ``c`` of the repeated batch
        keeps what ``masks[c]`` (``[T, w]`` from position ``p0`` on, the positions the site sees; ``[S, w]``
        slots or ``[w]``) keeps and takes the ablation value elsewhere."""
        m = masks.shape[0]
        if eb.node_pos is not None and masks.dim() == 3:
            masks = masks[:, eb.node_pos]  # slots -> this batch's tokens
        keep = masks[:, None] if masks.dim() == 3 else masks[:, None, None]  # [m, 1, T, w] or [m, 1, 1, w]

        def fn(x: torch.Tensor) -> torch.Tensor:
            k = keep.to(x.device)
            if self.ablation == "zero":
                replacement = torch.zeros((), dtype=x.dtype, device=x.device)
            elif self.ablation == "mean":
                replacement = self.mean[eb.keys[p0:], li].to(x.device, x.dtype)  # [T, w]
            else:
                replacement = eb.values[:, li, p0:].to(x.device, x.dtype)  # [B, T, w]
            rows = x.reshape(m, -1, *x.shape[1:])  # [m, B, T, w]: one block of rows per circuit
            return torch.where(k, rows, replacement).reshape(x.shape)

        return fn


def _save(saved: dict, x: torch.Tensor) -> None:
    saved["x"] = x


def _restore(saved: dict, rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    keep = rows.to(x.device).view(-1, *([1] * (x.dim() - 1)))
    return torch.where(keep, saved.pop("x"), x)


def group_error_nodes(scores: torch.Tensor, latents: int) -> torch.Tensor:
    """``[..., latents + d_in]`` scores of a dictionary site -> ``[..., latents + 1]``: one error node (the sum of
    its components' scores: ablating it ablates them together)."""
    return torch.cat([scores[..., :latents], scores[..., latents:].sum(-1, keepdim=True)], dim=-1)


def expand_error_nodes(keep: torch.Tensor, latents: int, width: int) -> torch.Tensor:
    """A node mask ``[..., latents + 1]`` -> a site mask ``[..., width]`` (the error node's value on every error
    component)."""
    error = keep[..., latents:].expand(*keep.shape[:-1], width - latents)
    return torch.cat([keep[..., :latents], error], dim=-1)


def _aligned_keys(t: int) -> torch.Tensor:
    """Aligned position of each of ``t`` positions of one prompt: 0 for the first token (a BOS token, or the
    first word, which models without BOS use as their attention sink), else 1 + distance from the last token
    (a bijection with the positions when every prompt has one length)."""
    keys = 1 + torch.arange(t - 1, -1, -1)
    keys[0] = 0
    return keys


def prepare_eval(
    model: NeuronModel,
    pairs: Sequence[Any],
    *,
    site: str = "neurons",
    layers: Sequence[int] | None = None,
    ablation: str = "mean",
    batch_size: int = 32,
    seed: int = 0,
    slot_maps: Sequence[Sequence[int]] | None = None,
    shortcuts: bool = True,
) -> EvalSet:
    """Tokenise test pairs, and compute the ablation values once.

    ``shortcuts``: skip the work of a pass that gives the same metric up to rounding (:mod:`.shortcuts`);
    ``False`` runs every pass in full (curves then do not depend on how circuits share passes, up to the
    rounding of matrix products of other batch shapes).

    ``slot_maps`` (the slot of every token of each pair, :func:`neurontrace.tasks.slots.slot_map`) makes
    per-position masks range over slots instead of tokens, for prompts of several token lengths; mean-ablation
    values are then shared by the tokens at the same distance from the end of the same slot.

    ``mean``: mean of the site over the counterfactual prompts at each aligned position; ``zero``;
    ``resample``: each example gets the counterfactual activations of another, randomly chosen, test example
    of the same token length (its own when no other has that length).

    Launched distributed (:mod:`neurontrace.distributed`), each process keeps a share of the examples, the
    mean is reduced over all of them and resample partners are drawn over the whole set, so
    :meth:`EvalSet.metric_values` gives every process the value one process would compute.
    """
    check_site(site)
    if ablation not in ABLATIONS:
        raise NeurontraceError(f"unknown ablation {ablation!r}; choose one of {', '.join(ABLATIONS)}")
    if not pairs:
        raise NeurontraceError("the test set is empty; give at least one pair")
    layers = site_layers(model, site) if layers is None else list(layers)
    get = lambda p, k: p[k] if isinstance(p, dict) else getattr(p, k)  # noqa: E731
    clean_all, patch_all = tokenize_pairs(
        model, [get(p, "clean_prefix") for p in pairs], [get(p, "patch_prefix") for p in pairs]
    )
    answers = [single_token_id(model, get(p, "clean_answer")) for p in pairs]
    contrasts = [single_token_id(model, get(p, "patch_answer")) for p in pairs]
    n = len(pairs)
    lengths = (clean_all.width - clean_all.pad).tolist()
    if slot_maps is not None:
        slot_maps = [tuple(m) for m in slot_maps]
        if len(slot_maps) != n or any(len(m) != t for m, t in zip(slot_maps, lengths, strict=True)):
            raise NeurontraceError("slot_maps must give the slot of every token of every test prompt")
    layout = [(lengths[i], slot_maps[i] if slot_maps else None) for i in range(n)]  # a batch shares one
    order = sorted(range(n), key=lambda i: (layout[i], i))  # one layout per batch, no padding
    donor = None
    if ablation == "resample":  # drawn for the whole test set, so every share of it gets the same partners
        generator = torch.Generator().manual_seed(seed)
        donor = list(range(n))
        by_layout: dict[tuple, list[int]] = {}
        for i in range(n):
            by_layout.setdefault(layout[i], []).append(i)
        for group in by_layout.values():
            g = len(group)
            shifts = torch.randint(1, max(2, g), (g,), generator=generator).tolist()
            for j, i in enumerate(group):
                donor[i] = group[(j + shifts[j]) % g] if g > 1 else i  # never the example itself when g > 1

    def rows_batch(full: Batch, rows: list[int]) -> Batch:
        t = lengths[rows[0]]
        ids = full.input_ids[rows][:, full.width - t :]
        prompts = None if full.prompts is None else [full.prompts[r] for r in rows]
        return Batch(ids, torch.ones_like(ids), prompts)

    def patch_acts(rows: list[int]) -> torch.Tensor:
        acts = capture(model, rows_batch(patch_all, rows), sites=site, layers=layers, keep_logits=False)
        return torch.stack([acts.get(layer, site).cpu() for layer in layers], dim=1)  # [B, L, T, w]

    def slot_aligned(m: tuple[int, ...]) -> list[tuple[int, int]]:
        """(slot, distance from the slot's last token) of every token."""
        return [(s, sum(1 for x in m[p + 1 :] if x == s)) for p, s in enumerate(m)]

    slot_keys: dict[tuple[int, int], int] = {}  # numbered over the whole set, the same in every process
    for i in order if slot_maps is not None else ():
        for a in slot_aligned(slot_maps[i]):
            slot_keys.setdefault(a, len(slot_keys))

    def keys_of(batch: Batch, i: int) -> torch.Tensor:
        if slot_maps is None:
            return _aligned_keys(batch.width)
        return torch.tensor([slot_keys[a] for a in slot_aligned(slot_maps[i])])

    n_keys = 1 + max(lengths) if slot_maps is None else len(slot_keys)
    width = site_width(model, site)
    sums = torch.zeros(n_keys, len(layers), width, dtype=torch.float64) if ablation == "mean" else None
    counts = torch.zeros(n_keys, dtype=torch.float64)
    share = [order[i] for i in distributed.shard(n)]  # this process's examples (all of them in one process)
    batches: list[EvalBatch] = []
    start = 0
    while start < len(share):
        stop = start
        while (
            stop < len(share) and stop - start < batch_size and lengths[share[stop]] == lengths[share[start]]
        ):
            stop += 1
        rows = share[start:stop]
        start = stop
        batch = rows_batch(clean_all, rows)
        keys = keys_of(batch, rows[0])
        metric = make_metric(
            "logit-diff", answer=[answers[r] for r in rows], contrast=[contrasts[r] for r in rows]
        )
        values = patch_acts([donor[r] for r in rows]) if donor is not None else None
        if ablation == "mean":
            acts = patch_acts(rows).double().sum(0)  # [L, T, w]
            sums.index_add_(0, keys, acts.transpose(0, 1))
            counts.index_add_(0, keys, torch.full((len(keys),), float(len(rows)), dtype=torch.float64))
        node_pos = None if slot_maps is None else torch.tensor(slot_maps[rows[0]])
        batches.append(EvalBatch(batch, metric, rows, keys, values, node_pos))
    mean = None
    if ablation == "mean":
        sums, counts = distributed.all_reduce_sum(sums), distributed.all_reduce_sum(counts)
        mean = (sums / counts.clamp_min(1)[:, None, None]).float()
    latents = dictionary_latents(site)
    if slot_maps is not None:
        n_slots = 1 + max(max(m) for m in slot_maps)
        return EvalSet(
            model, site, layers, ablation, batches, mean, n, n_slots, latents=latents, shortcuts=shortcuts
        )
    one_length = len(set(lengths)) == 1
    width = lengths[0] if one_length else None
    prompts = [full.input_ids[i, full.width - t :] for full in (clean_all, patch_all) for i, t in
               enumerate((full.width - full.pad).tolist())]  # fmt: skip
    prefix = shortcut.shared_prefix_length(prompts, ablation)
    return EvalSet(
        model,
        site,
        layers,
        ablation,
        batches,
        mean,
        n,
        width,
        latents=latents,
        prefix=prefix,
        shortcuts=shortcuts,
    )


# ------------------------------------------------------------------ curves


@dataclass
class CurvePoint:
    """One grid point of a sweep; ``*_ci`` are bootstrap 95% intervals over test examples."""

    threshold: float
    n_nodes: int
    faithfulness: float
    completeness: float
    random_faithfulness: float | None
    f_circuit: float
    f_complement: float
    faithfulness_ci: list[float] = field(default_factory=list)
    completeness_ci: list[float] = field(default_factory=list)
    random_ci: list[float] | None = None


@dataclass
class LevelSize:
    """The smallest circuit of the ranking whose faithfulness reaches ``level`` (see the module docstring).

    ``n_nodes`` is None when no circuit reaches the level. ``exact`` is False when the bracket was too wide to
    scan (``n_nodes`` is then a crossing: an upper bound). ``bracket`` = (last grid size below, first grid size
    reaching). ``grid_n_nodes``: what the grid alone says. ``n_nodes_ci``: bootstrap interval of the smallest
    evaluated size reaching the level (``inf``: some replicates never reach it).
    """

    level: float
    n_nodes: int | None
    exact: bool
    bracket: list[int | None]
    grid_n_nodes: int | None
    faithfulness: float | None = None
    completeness: float | None = None
    random_faithfulness: float | None = None
    n_nodes_ci: list[float] = field(default_factory=list)
    completeness_ci: list[float] = field(default_factory=list)
    random_ci: list[float] = field(default_factory=list)
    # the search's circuit-forwards (bisection probes, scan, complement and random control at the size) on this
    # process's test batches: what one circuit per pass costs, the same whatever the batching (sizes evaluated
    # ahead of need and then not used are left out; EvalSet.forwards counts them)
    forwards: int = 0


@dataclass
class Curve:
    """Faithfulness and completeness against circuit size for one method, basis and seed.

    ``samples`` holds the metric of every test example for each evaluated circuit: ``model`` and ``empty``
    (F(M), F(∅)), and per circuit size (a string key) ``circuit``, ``complement`` and ``random``.
    """

    method: str
    basis: str
    ablation: str
    f_model: float
    f_empty: float
    n_total: int
    points: list[CurvePoint] = field(default_factory=list)
    levels: list[LevelSize] = field(default_factory=list)
    seed: int = 0
    f_model_ci: list[float] = field(default_factory=list)
    f_empty_ci: list[float] = field(default_factory=list)
    samples: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)  # a level some replicates never reach: Infinity

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Curve:
        data = dict(data)
        points = [CurvePoint(**p) for p in data.pop("points")]
        levels = [LevelSize(**lv) for lv in data.pop("levels", [])]
        return cls(**data, points=points, levels=levels)

    def nodes_to_reach(self, faithfulness: float) -> CurvePoint | None:
        """The smallest grid point whose faithfulness reaches the level, or None (see :meth:`level` for the
        exact size)."""
        reached = [p for p in self.points if p.faithfulness >= faithfulness]
        return min(reached, key=lambda p: p.n_nodes) if reached else None

    def level(self, level: float) -> LevelSize | None:
        """The exact-size result for ``level`` if the sweep searched it."""
        return next((lv for lv in self.levels if abs(lv.level - level) < 1e-12), None)

    # ------------------------------------------------------- bootstrap
    def replicate_base(self, replicates: int = intervals.REPLICATES) -> tuple[torch.Tensor, ...]:
        """(weights ``[R, n]``, F(M) replicates ``[R]``, F(∅) replicates ``[R]``), drawn once per curve and size
        (kept outside the dataclass fields, so never serialised)."""
        cache = self.__dict__.setdefault("_replicate_cache", {})
        if replicates not in cache:
            n = len(self.samples["model"])
            w = intervals.bootstrap_weights(n, replicates=replicates, seed=10_007 + self.seed)
            model = intervals.replicate_means(w, torch.tensor(self.samples["model"]))
            empty = intervals.replicate_means(w, torch.tensor(self.samples["empty"]))
            cache[replicates] = (w, model, empty)
        return cache[replicates]

    def bootstrap_weights(self, replicates: int = intervals.REPLICATES) -> torch.Tensor:
        """``[replicates, n]`` bootstrap counts of the test examples (the same for every curve of a seed)."""
        return self.replicate_base(replicates)[0]

    def replicates(self, values: list[float], *, replicates: int = intervals.REPLICATES) -> torch.Tensor:
        """Bootstrap replicates of the normalised score (faithfulness-like) of per-example ``values``: ``[R]``."""
        w, model, empty = self.replicate_base(replicates)
        return intervals.normalised(intervals.replicate_means(w, torch.tensor(values)), empty, model)

    def size_replicates(self, level: float, *, replicates: int = intervals.REPLICATES) -> torch.Tensor:
        """Bootstrap replicates of the smallest evaluated circuit size reaching ``level``: ``[R]`` (``inf``
        where none does)."""
        circuit = self.samples["circuit"]
        sizes = sorted(int(k) for k in circuit)
        values = torch.tensor([circuit[str(k)] for k in sizes]).T  # [n, S]
        w, model, empty = self.replicate_base(replicates)
        faith = intervals.normalised(intervals.replicate_means(w, values), empty, model)
        return intervals.first_reaching(torch.tensor(sizes), faith, level)

    def add_intervals(self) -> None:
        """Fill every ``*_ci`` field from ``samples``."""
        ci = intervals.percentile_interval
        _, model, empty = self.replicate_base()
        self.f_model_ci, self.f_empty_ci = ci(model), ci(empty)
        for p in self.points:
            key = str(p.n_nodes)
            p.faithfulness_ci = ci(self.replicates(self.samples["circuit"][key]))
            p.completeness_ci = ci(self.replicates(self.samples["complement"][key]))
            if key in self.samples.get("random", {}):
                p.random_ci = ci(self.replicates(self.samples["random"][key]))
        for lv in self.levels:
            lv.n_nodes_ci = ci(self.size_replicates(lv.level))
            if lv.n_nodes is not None:
                key = str(lv.n_nodes)
                lv.completeness_ci = ci(self.replicates(self.samples["complement"][key]))
                if key in self.samples.get("random", {}):
                    lv.random_ci = ci(self.replicates(self.samples["random"][key]))


def faithfulness_of(
    evalset: EvalSet, circuit: Circuit, *, f_model: float, f_empty: float
) -> tuple[float, float]:
    """(faithfulness, completeness) of one circuit."""
    denom = f_model - f_empty
    if abs(denom) < 1e-8:
        raise NeurontraceError("F(M) equals F(empty): ablating everything does not change the metric")
    f_c = evalset.metric_with(circuit.mask)
    f_cc = evalset.metric_with(~circuit.mask)
    return (f_c - f_empty) / denom, (f_cc - f_empty) / denom


def default_thresholds(scores: torch.Tensor, n: int = 32) -> list[float]:
    """``[0] + logspace(-6, 0, n)`` scaled to the largest |score| (METHOD.md section 5)."""
    top = float(scores.abs().max())
    return [0.0] + [top * float(x) for x in torch.logspace(-6, 0, n)]


def paper_thresholds(scores: torch.Tensor) -> list[float]:
    """The paper's grid ``[0] + logspace(-6, 0, 30) + [inf, -1]`` scaled to the largest |score| (``inf``: the
    empty circuit; ``-1``: every node)."""
    return [*default_thresholds(scores, 30), math.inf, -1.0]


def thresholds_for(scores: torch.Tensor, *, grid: str = "log", points: int = 32) -> list[float]:
    """The sweep's thresholds: ``log`` (``points`` log-spaced, plus 0) or ``paper``."""
    if grid == "log":
        return default_thresholds(scores, points)
    if grid == "paper":
        return paper_thresholds(scores)
    raise NeurontraceError(f"unknown grid {grid!r}; choose one of {', '.join(GRIDS)}")


def ranking(scores: torch.Tensor) -> torch.Tensor:
    """Flat node indices by decreasing ``|score|`` (ties in index order): the first ``k`` are the top-k circuit."""
    return scores.abs().float().flatten().sort(descending=True, stable=True).indices


def top_k_circuit(
    order: torch.Tensor, k: int, like: torch.Tensor, *, layers: list[int], site: str
) -> Circuit:
    """The circuit of the first ``k`` nodes of ``order`` (a mask shaped like ``like``)."""
    flat = torch.zeros(like.numel(), dtype=torch.bool)
    flat[order[:k]] = True
    return Circuit(flat.view(like.shape), list(layers), site, {"top_k": k})


def error_node_mask(evalset: EvalSet, like: torch.Tensor, error_nodes: str) -> torch.Tensor:
    """Which nodes of ``like`` (node scores) a sweep ranks and counts: all but a dictionary's error nodes when
    they are kept or ablated outright (:data:`ERROR_NODES`)."""
    if error_nodes not in ERROR_NODES:
        raise NeurontraceError(
            f"unknown error-node rule {error_nodes!r}; choose one of {', '.join(ERROR_NODES)}"
        )
    free = torch.ones(like.shape, dtype=torch.bool)
    if evalset.latents is not None and error_nodes != "count":
        free[..., evalset.latents :] = False
    return free


class _Measurer:
    """Measures top-k circuits of one ranking, each size once, keeping every example's metric.

    Only the ``free`` nodes are ranked, counted and drawn for the random control; the others (a dictionary's
    error nodes under ``keep``/``ablate``) are kept (``fixed=True``) or ablated in every circuit, complement and
    the empty circuit alike.

    Circuits go ``width`` to a forward pass (:meth:`EvalSet.metric_values_many`). Sizes the search evaluates
    ahead of need wait in ``ahead`` and become samples only when the one-circuit-per-pass search would have
    measured them (in the same order), so the samples, the random draws and ``kept`` (circuit-forwards of the
    kept samples) do not depend on ``width``.
    """

    def __init__(
        self,
        evalset: EvalSet,
        scores: torch.Tensor,
        *,
        random_control: bool,
        seed: int,
        free: torch.Tensor | None = None,
        fixed: bool = False,
        width: int | None = None,
        speculate: bool | None = None,
    ) -> None:
        self.evalset, self.scores, self.random_control = evalset, scores, random_control
        self.free = torch.ones(scores.shape, dtype=torch.bool) if free is None else free
        self.fixed = fixed
        order = ranking(scores)
        self.order = order[self.free.flatten()[order]]
        self.generator = torch.Generator().manual_seed(seed)
        self.width = _agreed_width(evalset.circuits_per_pass() if width is None else width)
        if speculate is None:
            speculate = torch.device(evalset.model.device).type != "cpu"
        self.speculate = speculate
        self.ahead: dict[int, torch.Tensor] = {}
        self.ahead_complements: dict[int, list[torch.Tensor]] = {}  # size -> [complement, random] values
        self.kept = 0
        self.seen: dict = {}  # values of the masks measured (the shortcuts run none twice)
        model, empty = self.evaluate([None, self.with_fixed(torch.zeros_like(scores, dtype=torch.bool))])
        self.f_model, self.f_empty = float(model.mean()), float(empty.mean())
        self.denom = self.f_model - self.f_empty
        if abs(self.denom) < 1e-8:
            raise NeurontraceError("F(M) equals F(empty): ablating everything does not change the metric")
        self.samples: dict[str, Any] = {
            "model": model.tolist(),
            "empty": empty.tolist(),
            "circuit": {},
            "complement": {},
            "random": {},
        }
        self.kept = 2 * len(evalset.batches)

    def evaluate(self, masks: list[torch.Tensor | None]) -> list[torch.Tensor]:
        return self.evalset.metric_values_many(masks, circuits_per_pass=self.width, seen=self.seen)

    def keep(self, kind: str, k: int, values: torch.Tensor) -> None:
        self.samples[kind][str(k)] = values.tolist()
        self.kept += len(self.evalset.batches)

    def with_fixed(self, mask: torch.Tensor) -> torch.Tensor:
        """``mask`` on the free nodes, the fixed value elsewhere."""
        return torch.where(self.free, mask, torch.tensor(self.fixed))

    def top_k(self, k: int) -> Circuit:
        ev = self.evalset
        circuit = top_k_circuit(self.order, k, self.scores, layers=ev.layers, site=ev.site)
        circuit.mask = self.with_fixed(circuit.mask)
        return circuit

    def complement(self, circuit: Circuit) -> torch.Tensor:
        return self.with_fixed(~circuit.mask)

    def random_like(self, k: int) -> torch.Tensor:
        """A random circuit of ``k`` free nodes (the random-nodes control; with every node free, the draw of
        :func:`~neurontrace.circuits.selection.random_circuit_like`)."""
        free = self.free.flatten().nonzero().flatten()
        flat = torch.zeros(self.scores.numel(), dtype=torch.bool)
        flat[free[torch.randperm(free.numel(), generator=self.generator)[:k]]] = True
        return self.with_fixed(flat.view(self.scores.shape))

    def normalise(self, values: list[float]) -> float:
        return (sum(values) / len(values) - self.f_empty) / self.denom

    def measured(self, k: int) -> bool:
        return str(k) in self.samples["circuit"]

    def known(self, k: int) -> bool:
        """Whether F(top-k) is measured or waiting in ``ahead``."""
        return self.measured(k) or k in self.ahead

    def reaches(self, k: int, level: float) -> bool:
        """Whether a known size reaches ``level`` (without making it a sample)."""
        if self.measured(k):
            return self.circuit(k) >= level
        return self.normalise(self.ahead[k].tolist()) >= level

    def prefetch(self, sizes: list[int]) -> None:
        """Evaluate the top-k circuits of ``sizes`` (unknown ones) together, into ``ahead``."""
        sizes = [k for k in dict.fromkeys(sizes) if not self.known(k)]
        for k, values in zip(sizes, self.evaluate([self.top_k(k).mask for k in sizes]), strict=True):
            self.ahead[k] = values

    def circuit(self, k: int) -> float:
        """Faithfulness of the top-k circuit (measured now, or taken from ``ahead``, and kept)."""
        if not self.measured(k):
            values = self.ahead.pop(k) if k in self.ahead else self.evaluate([self.top_k(k).mask])[0]
            self.keep("circuit", k, values)
        return self.normalise(self.samples["circuit"][str(k)])

    def grid_group(self) -> int:
        """Sizes whose circuits, complements and random controls go to one :meth:`EvalSet.metric_values_many`
        call: several passes' worth (the call sorts them into passes, circuits that keep few neurons together),
        as long as their masks stay within :data:`GRID_MASK_BYTES`."""
        per_size = 3 * self.scores.numel()
        return max(self.width, min(GRID_PASSES * self.width, GRID_MASK_BYTES // max(1, per_size)))

    def grid(self, sizes: list[int]) -> None:
        """Circuit, complement and random control of every size, :meth:`grid_group` sizes per call; random
        circuits are drawn in the order of ``sizes``, as one size at a time would draw them."""
        step = self.grid_group()
        for start in range(0, len(sizes), step):
            chunk = sizes[start : start + step]
            masks: list[torch.Tensor] = []
            slots: list[tuple[str, int]] = []
            for k in chunk:
                if not self.known(k):
                    masks.append(self.top_k(k).mask)
                    slots.append(("circuit", k))
            for k in chunk:
                if str(k) not in self.samples["complement"]:
                    masks.append(self.complement(self.top_k(k)))
                    slots.append(("complement", k))
                    if self.random_control:
                        masks.append(self.random_like(k))
                        slots.append(("random", k))
            values = dict(zip(slots, self.evaluate(masks), strict=True))
            for k in chunk:  # kept in the order one size at a time keeps them
                if ("circuit", k) in values:
                    self.ahead[k] = values[("circuit", k)]
                self.circuit(k)
                for kind in ("complement", "random"):
                    if (kind, k) in values:
                        self.keep(kind, k, values[(kind, k)])

    def complement_and_random(self, k: int) -> tuple[float, float | None]:
        """Completeness of the top-k circuit and the faithfulness of a random circuit of its size (one pass)."""
        key = str(k)
        if key not in self.samples["complement"]:
            values = self.ahead_complements.pop(k, None)
            if values is None:
                values = self.evaluate(self.complement_masks(k))
            self.keep("complement", k, values[0])
            if self.random_control:
                self.keep("random", k, values[1])
        rand = self.samples["random"].get(key)
        return self.normalise(self.samples["complement"][key]), None if rand is None else self.normalise(rand)

    def complement_masks(self, k: int) -> list[torch.Tensor]:
        """The complement of the top-k circuit and (drawn now) a random circuit of its size."""
        masks = [self.complement(self.top_k(k))]
        if self.random_control:
            masks.append(self.random_like(k))
        return masks

    def pending(self, level: float, grid: list[int], scan_limit: int) -> tuple[list[int], int | None, bool]:
        """What :meth:`exact_size` would evaluate next for ``level``, from what is known now, without measuring:
        (the unknown sizes of its next pass, or [] once it needs none; its size once it needs none, else None;
        whether that size is certain). A size is uncertain when the scan's limit decides it: sizes another level
        has fetched but not yet kept count against this level's limit here and not in :meth:`exact_size`."""
        reached = [k for k in grid if self.reaches(k, level)]
        if not reached:
            return [], None, True
        first = reached[0]
        below = [k for k in grid if k < first]
        if not below:
            return [], first, True
        lo, hi = below[-1], first
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if not self.known(mid):
                return (self.bisection_probes(lo, hi, level) if self.speculate else [mid]), None, False
            if self.reaches(mid, level):
                hi = mid
            else:
                lo = mid
        scanned = 0
        for k in range(below[-1] + 1, hi):
            if not self.measured(k):
                scanned += 1
                if scanned > scan_limit:
                    return [], hi, False
                if k not in self.ahead:
                    return self.scan_sizes(k, hi, scan_limit - scanned + 1), None, False
            if self.reaches(k, level):
                return [], k, True
        return [], hi, True

    def prefetch_levels(self, levels: Sequence[float], grid: list[int], scan_limit: int) -> None:
        """Run the searches of all ``levels`` side by side: each pass evaluates the next sizes every level's
        search needs (the searches themselves then find them known), then the complements and random controls
        of the sizes found, in one pass, drawn in the order the searches would draw them (up to the first
        level whose size is not certain)."""
        while True:
            need: list[int] = []
            for level in levels:
                sizes, _, _ = self.pending(level, grid, scan_limit)
                need += [k for k in sizes if k not in need]
            if not need:
                break
            self.prefetch(need)
        masks: list[torch.Tensor] = []
        order: list[int] = []
        for level in levels:
            _, n, certain = self.pending(level, grid, scan_limit)
            if not certain:
                break  # this level's random draw and every later one must wait for the searches
            if n is None or str(n) in self.samples["complement"] or n in order:
                continue
            masks += self.complement_masks(n)
            order.append(n)
        values = self.evaluate(masks)
        step = 2 if self.random_control else 1
        for i, n in enumerate(order):
            self.ahead_complements[n] = values[i * step : (i + 1) * step]

    def bisection_probes(self, lo: int, hi: int, level: float) -> list[int]:
        """The unknown probes of the next bisection steps from ``(lo, hi)``, nearest steps first, at most
        ``width``: both ways after an unknown probe, the way taken after a known one."""
        probes: list[int] = []
        queue = [(lo, hi)]
        while queue:
            a, b = queue.pop(0)
            if b - a <= 1:
                continue
            mid = (a + b) // 2
            if self.known(mid):
                queue.append((a, mid) if self.reaches(mid, level) else (mid, b))
                continue
            if len(probes) == self.width:
                break
            probes.append(mid)
            queue += [(a, mid), (mid, b)]
        return probes

    def scan_sizes(self, k: int, hi: int, remaining: int) -> list[int]:
        """The unknown sizes of the next ``width`` the upward scan from ``k`` (below ``hi``) may measure, with
        ``remaining`` unmeasured sizes left in its limit."""
        sizes: list[int] = []
        for q in range(k, hi):
            if self.measured(q):
                continue
            remaining -= 1
            if remaining < 0 or len(sizes) == self.width:
                break
            if q not in self.ahead:
                sizes.append(q)
        return sizes

    def exact_size(self, level: float, grid: list[int], scan_limit: int) -> LevelSize:
        """The smallest size reaching ``level`` in the grid's first bracket (bisection, then an upward scan)."""
        start = self.kept
        reached = [k for k in grid if self.circuit(k) >= level]
        if not reached:
            return LevelSize(level, None, True, [grid[-1], None], None)
        first = reached[0]
        below = [k for k in grid if k < first]
        n, exact, bottom = first, True, (below[-1] if below else None)
        if bottom is not None:
            lo, hi = bottom, first
            while hi - lo > 1:  # invariant: F(lo) < level <= F(hi)
                mid = (lo + hi) // 2
                if not self.known(mid):
                    self.prefetch(self.bisection_probes(lo, hi, level) if self.speculate else [mid])
                if self.circuit(mid) >= level:
                    hi = mid
                else:
                    lo = mid
            n, scanned = hi, 0
            for k in range(bottom + 1, hi):  # upwards: the first size reaching the level is the smallest
                if not self.measured(k):
                    scanned += 1
                    if scanned > scan_limit:
                        exact = False  # n stays the bisection crossing: an upper bound
                        break
                    if k not in self.ahead:  # this size and the next ones the scan may need, in one pass
                        self.prefetch(self.scan_sizes(k, hi, scan_limit - scanned + 1))
                if self.circuit(k) >= level:
                    n = k
                    break
        f_cc, rand = self.complement_and_random(n)
        forwards = self.kept - start
        return LevelSize(
            level, n, exact, [bottom, first], first, self.circuit(n), f_cc, rand, forwards=forwards
        )


def _agreed_width(width: int) -> int:
    """The smallest ``width`` over the processes (launched distributed), so that every process evaluates the
    same circuits together and runs the same collectives."""
    if distributed.world().size == 1:
        return width
    return int(distributed.gather_rows(torch.tensor([width], dtype=torch.long)).min())


def sweep(
    evalset: EvalSet,
    scores: torch.Tensor,
    *,
    method: str,
    thresholds: Sequence[float] | None = None,
    levels: Sequence[float] = LEVELS,
    scan_limit: int = SCAN_LIMIT,
    random_control: bool = True,
    seed: int = 0,
    progress: bool = False,
    error_nodes: str = "count",
    max_circuits: int | None = None,
    speculate: bool | None = None,
) -> Curve:
    """Faithfulness/completeness over a threshold sweep of ``scores`` (``[L, T, w]`` or ``[L, w]``), then the
    exact circuit size at each of ``levels`` (see the module docstring), with bootstrap intervals.

    On a dictionary site, ``scores`` may be per site dimension (latents, then error components: what
    :func:`attribute` returns) or per node (latents, then one error node); ``error_nodes`` says how the error
    nodes count (:data:`ERROR_NODES`). Sizes count the ranked nodes only.

    ``max_circuits``: circuits per forward pass (default: :meth:`EvalSet.circuits_per_pass`; 1 runs one circuit
    per pass, the reference the batched sweep equals). ``speculate``: also evaluate the bisection probes of the
    next steps together (both outcomes; the unused ones are wasted work); default: on an accelerator, not on
    a CPU, where a pass costs nearly as much per circuit. Neither changes the curve.

    Launched distributed, every process must pass the same ``scores`` (as :func:`attribute` returns them): the
    circuits and the seeded random controls are then the same everywhere and only the metric sums are reduced.
    """
    scores = evalset.nodes_of(scores)
    free = error_node_mask(evalset, scores, error_nodes)
    m = _Measurer(
        evalset,
        scores,
        random_control=random_control,
        seed=seed,
        free=free,
        fixed=error_nodes == "keep",
        width=max_circuits if max_circuits is not None else evalset.max_circuits,
        speculate=speculate,
    )
    magnitude = scores.abs().float().flatten()[free.flatten()]
    thresholds = default_thresholds(scores * free) if thresholds is None else list(thresholds)
    n_free = int(free.sum())
    curve = Curve(method, evalset.site, evalset.ablation, m.f_model, m.f_empty, n_free, seed=seed)
    sizes: dict[int, float] = {}  # each new size with its first threshold, in threshold order
    for tau in thresholds:
        k = int((magnitude > tau).sum())  # the threshold circuit is the top-k prefix of the ranking
        sizes.setdefault(k, tau)
    ks = list(sizes)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=len(ks),
            desc=f"{method}/{evalset.site} sweep",
            leave=False,
            disable=not distributed.is_main(),
        )
    group = m.grid_group()
    for start in range(0, len(ks), group):
        m.grid(ks[start : start + group])
        if bar is not None:
            bar.update(len(ks[start : start + group]))
    if bar is not None:
        bar.close()
    raw = lambda f: f * m.denom + m.f_empty  # noqa: E731
    for k in ks:
        f_c = m.circuit(k)
        f_cc, rand = m.complement_and_random(k)
        curve.points.append(CurvePoint(sizes[k], k, f_c, f_cc, rand, raw(f_c), raw(f_cc)))
    curve.points.sort(key=lambda p: p.n_nodes)
    grid = [p.n_nodes for p in curve.points]
    if m.width > 1 and len(levels) > 1:
        m.prefetch_levels(levels, grid, scan_limit)
    curve.levels = [m.exact_size(level, grid, scan_limit) for level in levels]
    curve.samples = m.samples
    curve.add_intervals()
    return curve

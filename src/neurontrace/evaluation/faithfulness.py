"""Faithfulness and completeness of circuits under ablation (Marks et al.; METHOD.md section 5).

``F(X)`` is the mean metric over the test examples with every node *outside* ``X`` ablated:

- faithfulness  = (F(C) - F(∅)) / (F(M) - F(∅))   (near 1 is good)
- completeness  = (F(C^c) - F(∅)) / (F(M) - F(∅)) (near 0 is good)

Ablation values are computed once per test set (:class:`EvalSet`) and reused by every curve point, so one point
costs one batched forward per test batch for each quantity (F(C), F(C^c) and the random control).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from neurontrace import distributed
from neurontrace.attribution.metrics import Metric, make_metric
from neurontrace.circuits.selection import Circuit, random_circuit_like, select_circuit
from neurontrace.errors import NeurontraceError
from neurontrace.models.model import NeuronModel
from neurontrace.sites import capture, check_site, hook_site, site_width
from neurontrace.tokens import Batch, single_token_id, tokenize_pairs

ABLATIONS: tuple[str, ...] = ("mean", "zero", "resample")


@dataclass
class EvalSet:
    """Test examples in batches with their metric, clean metric values and cached ablation values."""

    model: NeuronModel
    site: str
    layers: list[int]
    ablation: str
    batches: list[tuple[Batch, Metric]]
    values: list[torch.Tensor | None]  # per batch: [B, L, T, width] (resample) or None
    mean: torch.Tensor | None  # [L, T, width] (mean ablation)
    forwards: int = 0  # forward passes run so far (for the cost accounting in tests and benchmarks)
    n_total: int | None = None  # examples over every process (launched distributed, batches are a share)

    @property
    def n_examples(self) -> int:
        return self.n_total if self.n_total is not None else sum(b.size for b, _ in self.batches)

    def metric_with(self, keep: torch.Tensor | None) -> float:
        """Mean metric with every node outside ``keep`` (``[L, T, w]`` or ``[L, w]`` bool) ablated.

        ``keep=None`` runs the full model. Launched distributed, the sums of every process's share are reduced.
        """
        total = 0.0
        for (batch, metric), values in zip(self.batches, self.values, strict=True):
            with torch.no_grad(), ExitStack() as stack:
                if keep is not None:
                    handles = [
                        hook_site(self.model, self.site, layer, self._ablator(li, keep, values))
                        for li, layer in enumerate(self.layers)
                        if not bool(keep[li].all())
                    ]
                    stack.callback(lambda handles=handles: [h.remove() for h in handles])
                logits = self.model.forward(batch, logits_to_keep=1).logits
            self.forwards += 1
            total += float(metric(logits).sum())
        if distributed.world().size > 1:
            total = float(distributed.all_reduce_sum(torch.tensor(total, dtype=torch.float64)))
        return total / self.n_examples

    def _ablator(self, li: int, keep: torch.Tensor, values: torch.Tensor | None):
        keep_l = keep[li]  # [T, w] or [w]

        def fn(x: torch.Tensor) -> torch.Tensor:
            k = keep_l.to(x.device)
            if self.ablation == "zero":
                replacement = torch.zeros((), dtype=x.dtype, device=x.device)
            elif self.ablation == "mean":
                replacement = self.mean[li].to(x.device, x.dtype)
                if replacement.dim() == 2:
                    replacement = replacement[-x.shape[1] :]
            else:
                replacement = values[:, li].to(x.device, x.dtype)
            if k.dim() == 2:
                k = k[-x.shape[1] :]
            return torch.where(k, x, replacement)

        return fn


def prepare_eval(
    model: NeuronModel,
    pairs: Sequence[Any],
    *,
    site: str = "neurons",
    layers: Sequence[int] | None = None,
    ablation: str = "mean",
    batch_size: int = 32,
    seed: int = 0,
) -> EvalSet:
    """Tokenise test pairs, and compute the ablation values once.

    ``mean``: per-position mean of the site over the counterfactual prompts; ``zero``; ``resample``: each
    example gets the counterfactual activations of another, randomly chosen, test example.

    Launched distributed (:mod:`neurontrace.distributed`), each process keeps a contiguous share of the
    examples, the mean is reduced over all of them and resample partners are drawn over the whole set, so
    :meth:`EvalSet.metric_with` gives every process the value one process would compute.
    """
    check_site(site)
    if ablation not in ABLATIONS:
        raise NeurontraceError(f"unknown ablation {ablation!r}; choose one of {', '.join(ABLATIONS)}")
    if not pairs:
        raise NeurontraceError("the test set is empty; give at least one pair")
    layers = list(range(model.n_layers)) if layers is None else list(layers)
    get = lambda p, k: p[k] if isinstance(p, dict) else getattr(p, k)  # noqa: E731
    clean_all, patch_all = tokenize_pairs(
        model, [get(p, "clean_prefix") for p in pairs], [get(p, "patch_prefix") for p in pairs]
    )
    if int(clean_all.pad.max()) != 0:
        raise NeurontraceError(
            "evaluation needs test prompts of one token length (so positions align); filter them, e.g. with "
            "neurontrace.tasks.filter_pairs(pairs, tokenizer, one_length=True)"
        )
    answers = [single_token_id(model, get(p, "clean_answer")) for p in pairs]
    contrasts = [single_token_id(model, get(p, "patch_answer")) for p in pairs]
    n = len(pairs)
    donor = None
    if ablation == "resample":  # drawn for the whole test set, so every share of it gets the same partners
        generator = torch.Generator().manual_seed(seed)
        shift = (
            torch.randint(1, max(2, n), (n,), generator=generator)
            if n > 1
            else torch.zeros(1, dtype=torch.long)
        )
        donor = (torch.arange(n) + shift) % n  # never the example itself (when n > 1)

    def patch_acts(rows: list[int]) -> torch.Tensor:
        acts = capture(model, patch_all.select(rows), sites=site, layers=layers, keep_logits=False)
        return torch.stack([acts.get(layer, site).cpu() for layer in layers], dim=1)  # [B, L, T, w]

    batches, values = [], []
    total = torch.zeros(len(layers), clean_all.width, site_width(model, site)) if ablation == "mean" else None
    share = distributed.shard(n)  # this process's examples (all of them in one process)
    for start in range(share.start, share.stop, batch_size):
        rows = list(range(start, min(start + batch_size, share.stop)))
        metric = make_metric(
            "logit-diff", answer=[answers[r] for r in rows], contrast=[contrasts[r] for r in rows]
        )
        batches.append((clean_all.select(rows), metric))
        values.append(patch_acts(donor[rows].tolist()) if donor is not None else None)
        if ablation == "mean":
            total += patch_acts(rows).float().sum(0)
    mean = distributed.all_reduce_sum(total) / n if ablation == "mean" else None  # [L, T, w]
    return EvalSet(model, site, layers, ablation, batches, values, mean, n_total=n)


@dataclass
class CurvePoint:
    threshold: float
    n_nodes: int
    faithfulness: float
    completeness: float
    random_faithfulness: float | None
    f_circuit: float
    f_complement: float


@dataclass
class Curve:
    """Faithfulness and completeness against circuit size for one method and basis."""

    method: str
    basis: str
    ablation: str
    f_model: float
    f_empty: float
    n_total: int
    points: list[CurvePoint] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Curve:
        points = [CurvePoint(**p) for p in data.pop("points")]
        return cls(**data, points=points)

    def nodes_to_reach(self, faithfulness: float) -> CurvePoint | None:
        """The smallest circuit on the curve whose faithfulness reaches the level, or None."""
        reached = [p for p in self.points if p.faithfulness >= faithfulness]
        return min(reached, key=lambda p: p.n_nodes) if reached else None


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


def default_thresholds(scores: torch.Tensor, n: int = 30) -> list[float]:
    """``[0] + logspace(-6, 0, n)`` scaled to the largest |score| (METHOD.md section 5)."""
    top = float(scores.abs().max())
    return [0.0] + [top * float(x) for x in torch.logspace(-6, 0, n)]


def sweep(
    evalset: EvalSet,
    scores: torch.Tensor,
    *,
    method: str,
    thresholds: Sequence[float] | None = None,
    random_control: bool = True,
    seed: int = 0,
    progress: bool = False,
) -> Curve:
    """Faithfulness/completeness over a threshold sweep of ``scores`` (``[L, T, w]`` or ``[L, w]``).

    Launched distributed, every process must pass the same ``scores`` (as :func:`attribute` returns them): the
    circuits and the seeded random controls are then the same everywhere and only the metric sums are reduced.
    """
    f_model = evalset.metric_with(None)
    f_empty = evalset.metric_with(torch.zeros_like(scores, dtype=torch.bool))
    denom = f_model - f_empty
    if abs(denom) < 1e-8:
        raise NeurontraceError("F(M) equals F(empty): ablating everything does not change the metric")
    thresholds = default_thresholds(scores) if thresholds is None else list(thresholds)
    curve = Curve(method, evalset.site, evalset.ablation, f_model, f_empty, scores.numel())
    generator = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    iterator = thresholds
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(
            thresholds, desc=f"{method}/{evalset.site} sweep", leave=False, disable=not distributed.is_main()
        )
    for tau in iterator:
        circuit = select_circuit(scores, layers=evalset.layers, site=evalset.site, threshold=tau)
        if circuit.n_nodes in seen:
            continue
        seen.add(circuit.n_nodes)
        f_c = evalset.metric_with(circuit.mask)
        f_cc = evalset.metric_with(~circuit.mask)
        rand = None
        if random_control:
            control = random_circuit_like(circuit, generator=generator)
            rand = (evalset.metric_with(control.mask) - f_empty) / denom
        curve.points.append(
            CurvePoint(
                tau, circuit.n_nodes, (f_c - f_empty) / denom, (f_cc - f_empty) / denom, rand, f_c, f_cc
            )
        )
    curve.points.sort(key=lambda p: p.n_nodes)
    return curve

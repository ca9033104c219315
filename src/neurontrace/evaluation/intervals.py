"""95% intervals for evaluation numbers: a bootstrap over test examples, pooled over seeds.

Every evaluated circuit keeps its metric per test example, so a bootstrap replicate (test examples drawn with
replacement) is a weighted mean of stored values: no forward pass is repeated. A ratio such as faithfulness
``(F(C) - F(∅)) / (F(M) - F(∅))`` is recomputed in each replicate from the replicate's own F(C), F(∅) and
F(M). With several seeds (other train/test splits and random-control draws), the replicates of every seed are
pooled, so the interval holds both the test-sampling and the split-to-split variation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

REPLICATES = 1000
"""Bootstrap replicates per curve (the percentile interval's 2.5% tail then rests on 25 replicates)."""


def bootstrap_weights(n: int, *, replicates: int = REPLICATES, seed: int = 0) -> torch.Tensor:
    """``[replicates, n]`` counts of each example in each resample (rows sum to ``n``), float64."""
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(n, (replicates, n), generator=generator)
    weights = torch.zeros(replicates, n, dtype=torch.float64)
    return weights.scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.float64))


def replicate_means(weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` (``[n]`` or ``[n, S]``) in every replicate: ``[R]`` or ``[R, S]``."""
    return weights @ values.double() / weights.shape[1]


def normalised(num: torch.Tensor, empty: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    """``(num - empty) / (model - empty)`` with broadcasting (faithfulness, completeness, random control)."""
    if num.dim() > empty.dim():
        empty, model = empty[..., None], model[..., None]
    return (num - empty) / (model - empty)


def percentile_interval(samples: torch.Tensor | Sequence[float]) -> list[float]:
    """The 2.5% and 97.5% percentiles (``inf`` stays ``inf``: a level some replicates never reach)."""
    x = torch.as_tensor(samples, dtype=torch.float64).flatten()
    x = x[~torch.isnan(x)]
    if x.numel() == 0:
        return [math.nan, math.nan]
    x, _ = x.sort()
    lo = x[math.floor(0.025 * (x.numel() - 1))]
    hi = x[math.ceil(0.975 * (x.numel() - 1))]
    return [float(lo), float(hi)]


def first_reaching(sizes: torch.Tensor, faithfulness: torch.Tensor, level: float) -> torch.Tensor:
    """Per row of ``faithfulness`` (``[R, S]`` over ascending ``sizes`` ``[S]``), the smallest size whose
    faithfulness reaches ``level``; ``inf`` where none does."""
    reached = faithfulness >= level
    first = reached.float().argmax(dim=1)
    out = sizes.double()[first]
    return torch.where(reached.any(dim=1), out, torch.full_like(out, math.inf))


def stratified_weights(sizes: Sequence[int], *, replicates: int = REPLICATES, seed: int = 0) -> torch.Tensor:
    """``[replicates, sum(sizes)]`` counts for blocks resampled each within itself (block ``i`` with seed
    ``seed + i``): a pooled statistic over several data sets keeps every set's share in every replicate."""
    blocks = [bootstrap_weights(n, replicates=replicates, seed=seed + i) for i, n in enumerate(sizes)]
    return torch.cat(blocks, dim=1)


def weighted_pearson(weights: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of ``x`` and ``y`` (``[n]``, or ``[R, n]``: one per resample) in every resample given
    by ``weights`` (``[R, n]`` counts, as :func:`bootstrap_weights`): ``[R]``, each exactly the correlation of
    the resampled points."""
    w = weights.double()
    total = w.sum(dim=1, keepdim=True)
    x, y = x.double().expand_as(w), y.double().expand_as(w)
    mx, my = (w * x).sum(1, keepdim=True) / total, (w * y).sum(1, keepdim=True) / total
    dx, dy = x - mx, y - my
    return (w * dx * dy).sum(1) / ((w * dx * dx).sum(1) * (w * dy * dy).sum(1)).sqrt()


def weighted_ranks(weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``[R, n]``: the mid-rank (1-based, ties averaged) of each ``x[i]`` within every resample, the rank its
    copies take in the resampled sample (copies of one point, and equal values, tie)."""
    w = weights.double()
    order = x.argsort()
    _, group, _ = torch.unique_consecutive(x[order], return_inverse=True, return_counts=True)
    counts = torch.zeros(w.shape[0], int(group.max()) + 1, dtype=w.dtype).index_add_(1, group, w[:, order])
    mid = counts.cumsum(dim=1) - (counts - 1) / 2
    ranks = torch.empty_like(w)
    ranks[:, order] = mid[:, group]
    return ranks


def weighted_spearman(weights: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Spearman correlation (Pearson of mid-ranks) of ``x`` and ``y`` in every resample: ``[R]``."""
    return weighted_pearson(weights, weighted_ranks(weights, x), weighted_ranks(weights, y))

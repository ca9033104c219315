"""Bootstrap correlations (benchmarks/bench_rules.py): every replicate is the correlation of the resampled points,
computed independently by scipy on the materialised resample; paired differences cancel what both methods share."""

from __future__ import annotations

import pytest
import torch
from scipy import stats

from neurontrace.evaluation import intervals


def _data(n: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64)
    y = x + torch.randn(n, generator=g, dtype=torch.float64)
    x[5] = x[9]  # a tie in the data itself, besides the copies a resample makes
    y[:4] = 0.0  # a block of tied values
    return x, y


def test_weighted_correlations_are_those_of_the_resampled_points():
    x, y = _data()
    w = intervals.bootstrap_weights(x.numel(), replicates=6, seed=3)
    pearson, spearman = intervals.weighted_pearson(w, x, y), intervals.weighted_spearman(w, x, y)
    for r in range(6):
        rows = [i for i, c in enumerate(w[r].tolist()) for _ in range(int(c))]
        xs, ys = x[rows].numpy(), y[rows].numpy()
        assert float(pearson[r]) == pytest.approx(stats.pearsonr(xs, ys)[0], abs=1e-12)
        assert float(spearman[r]) == pytest.approx(stats.spearmanr(xs, ys)[0], abs=1e-12)
    ones = torch.ones(1, x.numel())
    assert float(intervals.weighted_spearman(ones, x, y)[0]) == pytest.approx(
        stats.spearmanr(x, y)[0], abs=1e-12
    )


def test_stratified_weights_resample_each_block_within_itself():
    w = intervals.stratified_weights([5, 12, 5], replicates=200, seed=7)
    assert w.shape == (200, 22)
    assert torch.equal(w[:, :5].sum(1), torch.full((200,), 5.0, dtype=torch.float64))
    assert torch.equal(w[:, 5:17].sum(1), torch.full((200,), 12.0, dtype=torch.float64))
    assert torch.equal(w[:, 17:].sum(1), torch.full((200,), 5.0, dtype=torch.float64))
    # blocks have their own draws: two blocks of one size drawn with one seed would be equal, count for count
    assert not torch.equal(w[:, :5], w[:, 17:])
    assert (w[:, :5] != w[:, 17:]).any(1).float().mean() > 0.9  # nearly every replicate differs
    for block, (start, n) in enumerate([(0, 5), (5, 12), (17, 5)]):  # block i: seed + i, as documented
        assert torch.equal(
            w[:, start : start + n], intervals.bootstrap_weights(n, replicates=200, seed=7 + block)
        )


def test_paired_difference_cancels_shared_resampling_noise():
    truth, _ = _data(n=60, seed=1)
    g = torch.Generator().manual_seed(2)
    good = truth + 0.3 * torch.randn(60, generator=g, dtype=torch.float64)
    affine = 2.0 * good + 3.0  # Pearson identical to good's in every resample
    bad = truth + 1.5 * torch.randn(60, generator=g, dtype=torch.float64)
    w = intervals.bootstrap_weights(60, seed=0)
    p_good, p_affine = (
        intervals.weighted_pearson(w, good, truth),
        intervals.weighted_pearson(w, affine, truth),
    )
    p_bad = intervals.weighted_pearson(w, bad, truth)
    lo, hi = intervals.percentile_interval(p_bad)
    assert hi - lo > 0.1  # each method's own interval is wide ...
    assert intervals.percentile_interval(p_good - p_affine) == pytest.approx(
        [0.0, 0.0], abs=1e-12
    )  # ... pairs cancel
    assert intervals.percentile_interval(p_good - p_bad)[0] > 0  # the less noisy estimate is clearly closer

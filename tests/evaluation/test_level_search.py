"""The exact-size search of :func:`neurontrace.evaluation.sweep` on its own, without a model: an evaluation set
whose metric is a hand-written faithfulness curve ``F(k)`` of the number of ranked nodes a circuit keeps.

Every expected size below is worked out by hand in the comments (bisection probes, the upward scan, the scan
limit), and every curve value is a dyadic fraction, so means and comparisons with the level are exact in
float64 (no tolerance is needed). Each case runs with one circuit per pass and with several (with and without
speculative bisection probes): the answers are properties of the curve, so they must hold for every batching.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import SimpleNamespace

import pytest
import torch

from neurontrace.evaluation import sweep
from neurontrace.evaluation.faithfulness import EvalSet

EXAMPLES = 4  # test examples, all with the same metric: a mean of 4 equal dyadic values is exact


class HandCurve(EvalSet):
    """An evaluation set without a model: every example's metric is ``curve[k]``, ``k`` the number of ranked
    nodes (on a dictionary site: latents) a circuit keeps; the full model (``None``) is ``curve[-1]``."""

    def __init__(self, curve: Sequence[float], *, max_circuits: int = 1, latents: int | None = None) -> None:
        super().__init__(
            model=SimpleNamespace(device="cpu"),
            site="neurons" if latents is None else "sae:hand",
            layers=[0],
            ablation="mean",
            batches=[None],  # one test batch: a circuit's forwards are 1
            mean=None,
            n_total=EXAMPLES,
            width=None,
            max_circuits=max_circuits,
            latents=latents,
        )
        self.curve = list(curve)

    def metric_values_many(self, keeps, *, circuits_per_pass=None, seen=None):
        out = []
        for keep in keeps:
            if keep is None:
                k = len(self.curve) - 1
            else:
                k = int((keep if self.latents is None else keep[..., : self.latents]).sum())
            out.append(torch.full((EXAMPLES,), float(self.curve[k]), dtype=torch.float64))
        return out


BATCHINGS = [
    pytest.param(1, False, id="one-per-pass"),
    pytest.param(4, False, id="four-per-pass"),
    pytest.param(4, True, id="four-per-pass-speculative"),
]


def ranked_scores(n: int) -> torch.Tensor:
    """``[1, n]`` scores ``n, n-1, ..., 1`` (signs alternate): node ``i`` is the ``i``-th of the ranking."""
    signs = torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in range(n)])
    return (signs * torch.arange(n, 0, -1, dtype=torch.float32))[None]


def search(curve, grid, level, scan_limit, width, speculate, *, random_control=True):
    """A sweep of ``curve`` whose threshold grid gives exactly the sizes ``grid``; returns (level result, curve,
    the sizes whose circuit was measured)."""
    n = len(curve) - 1
    thresholds = [n - k + 0.5 for k in grid]  # #{|s| > n - k + 1/2} = k for scores n, ..., 1
    result = sweep(
        HandCurve(curve, max_circuits=width),
        ranked_scores(n),
        method="hand",
        thresholds=thresholds,
        levels=(level,),
        scan_limit=scan_limit,
        random_control=random_control,
        max_circuits=width,
        speculate=speculate,
    )
    assert [p.n_nodes for p in result.points] == sorted(grid)
    assert [p.faithfulness for p in result.points] == [curve[k] for k in sorted(grid)]
    return result.level(level), result, {int(k) for k in result.samples["circuit"]}


# F(k), k = 0..32: a spike at 5 (just above the bracket's bottom, 4), a dip, then a rise through 0.5 at 12
SPIKE = (
    [0.0] * 4 + [0.25, 0.625] + [0.25] * 5 + [0.375, 0.5625, 0.625, 0.75, 0.75, 0.75] + [0.875] * 15 + [1.0]
)


@pytest.mark.parametrize(("width", "speculate"), BATCHINGS)
def test_the_scan_finds_a_spike_just_above_the_bracket_bottom(width, speculate):
    """Grid 0, 4, 16, 32; level 0.5: bracket (4, 16). Bisection: 10 misses (lo 10), 13 reaches (hi 13), 11
    misses (lo 11), 12 reaches (hi 12): crossing 12. The scan from 5 upwards: 5 reaches at once (one size
    measured), so n* = 5, not the crossing."""
    assert len(SPIKE) == 33
    lv, _, measured = search(SPIKE, [0, 4, 16, 32], 0.5, 64, width, speculate)
    assert (lv.n_nodes, lv.exact, lv.bracket, lv.grid_n_nodes) == (5, True, [4, 16], 16)
    assert measured == {0, 4, 16, 32} | {10, 13, 11, 12} | {5}
    assert lv.faithfulness == 0.625 and lv.completeness == SPIKE[32 - 5]
    assert lv.random_faithfulness == 0.625  # a random circuit of 5 nodes keeps 5 nodes
    assert lv.forwards == 4 + 1 + 2  # probes, the scan, then the complement and random control of 5
    # the spike is the only size below the crossing that reaches the level
    assert SPIKE[4] < 0.5 and all(SPIKE[k] < 0.5 for k in range(6, 12))


@pytest.mark.parametrize(("width", "speculate"), BATCHINGS)
def test_a_second_level_reuses_the_first_levels_sizes(width, speculate):
    """Levels 0.5 then 0.7 on SPIKE, grid 0, 4, 16, 32. Level 0.5 as above (n* = 5). Level 0.7, bracket
    (4, 16): 10 known, misses (lo 10); 13 known, misses (lo 13); 14 new, reaches (hi 14). The scan from 5: 5
    known (0.625, misses), 6..9 new and miss, 10..13 known and miss: n* = 14, exact, after 1 + 4 new sizes."""
    n = len(SPIKE) - 1
    result = sweep(
        HandCurve(SPIKE, max_circuits=width),
        ranked_scores(n),
        method="hand",
        thresholds=[n - k + 0.5 for k in (0, 4, 16, 32)],
        levels=(0.5, 0.7),
        scan_limit=64,
        max_circuits=width,
        speculate=speculate,
    )
    first, second = result.level(0.5), result.level(0.7)
    assert (first.n_nodes, first.exact, first.forwards) == (5, True, 7)
    assert (second.n_nodes, second.exact, second.bracket) == (14, True, [4, 16])
    assert second.forwards == 1 + 4 + 2
    assert {int(k) for k in result.samples["circuit"]} == {0, 4, 16, 32, 10, 13, 11, 12, 5, 14, 6, 7, 8, 9}


# F(k), k = 0..16: exactly the level 0.5 at 4 (a bisection probe), a dip at 5, 0.75 from 6 on
TIE = [0.0, 0.125, 0.25, 0.375, 0.5, 0.25, 0.75, 0.75, 0.75] + [0.875] * 7 + [1.0]


@pytest.mark.parametrize(("width", "speculate"), BATCHINGS)
def test_a_probe_exactly_at_the_level_reaches_it(width, speculate):
    """Grid 0, 8, 16; level 0.5: bracket (0, 8). Bisection: F(4) = 0.5 reaches (>=: hi 4), 2 misses (lo 2), 3
    misses (lo 3): crossing 4. With no scan (limit 0) the crossing is the answer, an upper bound; reading the
    tie as a miss would go 4 (lo), 6 (hi), 5 (lo): crossing 6."""
    assert len(TIE) == 17
    lv, _, measured = search(TIE, [0, 8, 16], 0.5, 0, width, speculate)
    assert (lv.n_nodes, lv.exact, lv.bracket) == (4, False, [0, 8])
    assert measured == {0, 8, 16} | {4, 2, 3}
    assert lv.faithfulness == 0.5 and lv.forwards == 3 + 2


@pytest.mark.parametrize(("width", "speculate"), BATCHINGS)
def test_with_a_scan_the_tie_is_the_exact_size_and_the_probes_are_the_hand_ones(width, speculate):
    """As above with a scan: 1 (new) misses, 2 and 3 (probes) miss, 4 reaches: n* = 4, exact, after the probes
    4, 2, 3 (not 4, 6, 5) and one scanned size."""
    lv, _, measured = search(TIE, [0, 8, 16], 0.5, 64, width, speculate)
    assert (lv.n_nodes, lv.exact) == (4, True)
    assert measured == {0, 8, 16} | {4, 2, 3} | {1}
    assert lv.forwards == 3 + 1 + 2


@pytest.mark.parametrize(("width", "speculate"), BATCHINGS)
def test_a_grid_size_exactly_at_the_level_reaches_it(width, speculate):
    """Level 0.75 on TIE: F(8) = 0.75 reaches, so the bracket is (0, 8), not (8, 16). Bisection: 4 misses (lo
    4), 6 reaches (hi 6), 5 misses (lo 5); scan 1, 2, 3 (new), 4, 5 (known) miss: n* = 6."""
    lv, _, measured = search(TIE, [0, 8, 16], 0.75, 64, width, speculate)
    assert (lv.n_nodes, lv.exact, lv.bracket, lv.grid_n_nodes) == (6, True, [0, 8], 8)
    assert measured == {0, 8, 16} | {4, 6, 5} | {1, 2, 3}


# F(k), k = 0..16: the first size reaching 0.5 is 7 (exactly 0.5), a dip at 8, the bisection crossing is 9
LIMIT = [0.0, 0.0, 0.25, 0.25, 0.25, 0.25, 0.25, 0.5, 0.375, 0.5625, 0.75] + [0.875] * 5 + [1.0]


@pytest.mark.parametrize(("width", "speculate"), BATCHINGS)
@pytest.mark.parametrize(
    ("scan_limit", "want", "exact", "scanned"),
    [
        (10**6, 7, True, {3, 4, 5, 7}),
        (4, 7, True, {3, 4, 5, 7}),  # 7 is the 4th new size of the scan: just within the limit
        (3, 9, False, {3, 4, 5}),  # one short: the crossing, an upper bound
        (1, 9, False, {3}),
        (0, 9, False, set()),
    ],
)
def test_the_scan_limit_counts_the_new_sizes_of_the_scan(width, speculate, scan_limit, want, exact, scanned):
    """Grid 0, 2, 10, 16; level 0.5: bracket (2, 10). Bisection: 6 misses (lo 6), 8 misses (lo 8), 9 reaches
    (hi 9): crossing 9. The scan: 3, 4, 5 new (1st-3rd), 6 a probe (not counted), 7 new (4th) reaches (F = 0.5,
    a tie only the scan meets). A limit of 4 new sizes finds 7; with 3 the 4th is over the limit and the
    crossing 9 is reported (exact=False)."""
    assert len(LIMIT) == 17
    lv, _, measured = search(LIMIT, [0, 2, 10, 16], 0.5, scan_limit, width, speculate)
    assert (lv.n_nodes, lv.exact, lv.bracket) == (want, exact, [2, 10])
    assert measured == {0, 2, 10, 16} | {6, 8, 9} | scanned
    assert lv.faithfulness == LIMIT[want] and lv.forwards == 3 + len(scanned) + 2


@pytest.mark.parametrize(("width", "speculate"), BATCHINGS)
def test_adjacent_grid_sizes_need_no_search(width, speculate):
    """Grid 0, 6, 7, 16 on LIMIT, level 0.5: bracket (6, 7), nothing between: n* = 7, whose complement and
    random control the grid measured already (no forwards)."""
    lv, _, measured = search(LIMIT, [0, 6, 7, 16], 0.5, 64, width, speculate)
    assert (lv.n_nodes, lv.exact, lv.bracket, lv.forwards) == (7, True, [6, 7], 0)
    assert measured == {0, 6, 7, 16}


@pytest.mark.parametrize(("width", "speculate"), BATCHINGS)
def test_a_first_grid_size_reaching_the_level_is_the_answer_and_none_is_never(width, speculate):
    """Grid 3, 10, 16 on LIMIT: F(3) = 0.25 reaches 0.2 with no grid size below it (bracket [None, 3]; sizes
    below the grid are not searched); no size reaches 1.5."""
    lv, _, measured = search(LIMIT, [3, 10, 16], 0.2, 64, width, speculate)
    assert (lv.n_nodes, lv.exact, lv.bracket, lv.grid_n_nodes) == (3, True, [None, 3], 3)
    assert measured == {3, 10, 16}
    never, _, _ = search(LIMIT, [3, 10, 16], 1.5, 64, width, speculate)
    assert (never.n_nodes, never.exact, never.bracket, never.grid_n_nodes) == (None, True, [16, None], None)


# ------------------------------------------------------------------ thresholds -> sizes


def test_a_threshold_keeps_the_nodes_strictly_above_it():
    """k = #{|s| > tau}: scores with ties at the thresholds. |s| = 4, 3, 3, 2, 1, 1, 0, 0: tau 3 keeps 1 node,
    tau 1 keeps 4, tau 0 keeps the 6 nonzero ones (>= would keep 3, 6 and 8)."""
    scores = torch.tensor([[4.0, -3.0, 3.0, 2.0, -1.0, 1.0, 0.0, -0.0]])
    curve = [k / 8 for k in range(9)]
    result = sweep(HandCurve(curve), scores, method="hand", thresholds=[3.0, 1.0, 0.0], levels=())
    assert [(p.n_nodes, p.threshold) for p in result.points] == [(1, 3.0), (4, 1.0), (6, 0.0)]
    assert [p.faithfulness for p in result.points] == [1 / 8, 4 / 8, 6 / 8]
    assert [p.completeness for p in result.points] == [7 / 8, 4 / 8, 2 / 8]
    # the default grid: 0, then 32 thresholds from 4e-6 to 4, log-spaced (ratio 10^(6/31) = 1.56); from the top
    # 4, 2.56, 1.64, 1.05, 0.67, ...: sizes 0, 3, 4, 4, 6, ... and 6 at tau = 0 (>=: 1 at tau = 4, 8 at tau = 0)
    default = sweep(HandCurve(curve), scores, method="hand", levels=())
    assert [p.n_nodes for p in default.points] == [0, 3, 4, 6]
    assert default.points[0].threshold == 4.0 and default.points[-1].threshold == 0.0


@pytest.mark.parametrize("rule", ["keep", "ablate"])
def test_the_default_grid_is_scaled_to_the_ranked_nodes_not_the_error_nodes(rule):
    """A dictionary site of 4 latents and an error node: latent scores 8, 4, 2, 1 and an error node of 1e7.
    Under keep/ablate the error node is not ranked, so the grid spans the latents' scale (top 8): sizes 4
    (tau < 1), 3, 2, 1 and 0 (tau = 8). Scaled to 1e7, every threshold but 0 would be >= 10: sizes 4 and 0."""
    scores = torch.tensor([[8.0, -4.0, 2.0, -1.0, 1e7]])  # [layer, latents + error node]
    curve = [0.0, 0.25, 0.5, 0.75, 1.0]  # by latents kept; the full model: 1
    result = sweep(HandCurve(curve, latents=4), scores, method="hand", levels=(), error_nodes=rule)
    assert result.n_total == 4
    assert [p.n_nodes for p in result.points] == [0, 1, 2, 3, 4]
    assert result.points[0].threshold == 8.0 and result.points[-1].threshold == 0.0
    assert [p.faithfulness for p in result.points] == curve
    # the thresholds 8 * 10^(-6 + 6 i / 31): the first one of each size is the first above a latent's score
    xs = [8.0 * float(x) for x in torch.logspace(-6, 0, 32)]
    for p, score in zip(result.points[1:4], [4.0, 2.0, 1.0], strict=True):
        assert p.threshold == next(t for t in xs if t >= score) and not math.isclose(p.threshold, score)

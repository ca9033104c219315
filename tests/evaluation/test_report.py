"""Summaries over seeds (:mod:`neurontrace.evaluation.report`): intervals pool the bootstrap replicates of every
seed, so they hold the split-to-split variation, checked on hand-made curves whose replicates are known.

Every example of a seed has the same metric, so each seed's bootstrap replicates are one constant (a weighted
mean of equal dyadic values is exact): the pooled interval of two seeds then spans both constants, while an
average of the seeds' replicates would collapse to their midpoint.
"""

from __future__ import annotations

import pytest
import torch

from neurontrace.evaluation.faithfulness import Curve, CurvePoint, LevelSize
from neurontrace.evaluation.report import _band, summarise

N = 4  # test examples per seed


def hand_curve(seed: int, *, model: float, circuit: dict[int, float], complement: dict[int, float],
               random: dict[int, float], level_size: int) -> Curve:  # fmt: skip
    """A curve whose raw F(M) is ``model``, F(∅) 0, and F(top-k) ``circuit[k]`` on every example (raw values;
    faithfulness is ``circuit[k] / model``)."""
    same = lambda v: [v] * N  # noqa: E731
    curve = Curve("hand", "neurons", "mean", model, 0.0, 8, seed=seed)
    curve.samples = {
        "model": same(model),
        "empty": same(0.0),
        "circuit": {str(k): same(v) for k, v in circuit.items()},
        "complement": {str(k): same(v) for k, v in complement.items()},
        "random": {str(k): same(v) for k, v in random.items()},
    }
    for k, v in circuit.items():
        cc = complement.get(k, 0.0)
        curve.points.append(CurvePoint(1.0, k, v / model, cc / model, None, v, cc))
    k = level_size
    curve.levels = [
        LevelSize(0.5, k, True, [None, k], k, circuit[k] / model, complement[k] / model, random[k] / model)
    ]
    curve.add_intervals()
    return curve


@pytest.fixture
def two_seeds() -> list[Curve]:
    # seed 0: F(M) = 1; faithfulness 0.25 at size 1, 0.75 at 2 (level 0.5 first reached at 2)
    # seed 1: F(M) = 2; faithfulness 0.75 at size 1, 0.875 at 2 (level 0.5 first reached at 1)
    a = hand_curve(0, model=1.0, circuit={1: 0.25, 2: 0.75}, complement={1: 0.5, 2: 0.25},
                   random={2: 0.125}, level_size=2)  # fmt: skip
    b = hand_curve(1, model=2.0, circuit={1: 1.5, 2: 1.75}, complement={1: 1.0, 2: 1.0},
                   random={1: 0.5}, level_size=1)  # fmt: skip
    return [a, b]


def test_each_seed_alone_has_a_point_interval(two_seeds):
    a, b = two_seeds
    assert a.f_model_ci == [1.0, 1.0] and b.f_model_ci == [2.0, 2.0]
    assert a.levels[0].n_nodes_ci == [2.0, 2.0] and b.levels[0].n_nodes_ci == [1.0, 1.0]


def test_intervals_over_seeds_pool_the_replicates_of_every_seed(two_seeds):
    """Half the pooled replicates are seed 0's constant, half seed 1's: the 2.5% and 97.5% percentiles are the
    two constants. Averaging the seeds' replicates would give the midpoint twice (1.5, 1.5 for F(M))."""
    (s,) = summarise(two_seeds)
    assert s.seeds == [0, 1] and s.f_model == 1.5
    assert s.f_model_ci == [1.0, 2.0] and s.f_empty_ci == [0.0, 0.0]
    lv = s.level(0.5)
    assert lv.per_seed == [2, 1] and lv.n_nodes == 1.5 and lv.seeds_reached == 2
    assert lv.n_nodes_ci == [1.0, 2.0]
    # completeness at each seed's own size: 0.25 / 1 (seed 0, size 2) and 1.0 / 2 (seed 1, size 1)
    assert lv.completeness_ci == [0.25, 0.5]
    # random control at each seed's size: 0.125 / 1 and 0.5 / 2
    assert lv.random_ci == [0.125, 0.25]
    assert lv.f_complement == (0.25 + 1.0) / 2


def test_plot_bands_pool_the_replicates_of_every_seed(two_seeds):
    """At sizes 1 and 2 (grid points: no interpolation) the band spans both seeds' faithfulness, the line is
    their mean."""
    mean, lo, hi = _band(two_seeds, torch.tensor([1.0, 2.0]), "faithfulness")
    assert mean.tolist() == [0.5, 0.8125]
    assert lo.tolist() == [0.25, 0.75] and hi.tolist() == [0.75, 0.875]
    mean, lo, hi = _band(two_seeds, torch.tensor([1.0, 2.0]), "completeness")
    assert lo.tolist() == [0.5, 0.25] and hi.tolist() == [0.5, 0.5]  # 0.5 / 1 and 1 / 2; 0.25 / 1 and 1 / 2

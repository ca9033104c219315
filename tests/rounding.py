"""Tolerances from float32 rounding, for tests that compare two float32 computations of one quantity that do
not run the same kernels on the same shapes (several circuits in one pass against one circuit per pass, two code
paths, a hand computation), and a comparison of two curves on them.

Why a tolerance at all: a float32 sum rounds after every addition, so its result depends on how its terms are
grouped, and the grouping follows the kernel a backend picks for a shape (a matrix product over ``m * B`` rows may
block its dot products otherwise than one over ``B`` rows), the CPU's instruction set (``ATEN_CPU_CAPABILITY``)
and the threads. Values computed by different groupings agree to rounding, not bit for bit.

The model of that rounding (:func:`metric_tolerance`). A forward pass of a decoder runs ``D = 9 L + 2``
reductions one after another from the embedding to a logit: per layer the attention norm, the q/k/v projections,
query times key, the softmax sum, the weighted values, the output projection, the MLP norm, gate/up and down;
then the final norm and the unembedding. A regrouped reduction moves its result by a few units in the last place
of the values it carries: we allow 2 ulps (``4 u``, ``u = 2**-24``) of the logits' magnitude ``S`` per reduction
(the norms keep each layer's values at the scale of its input). The moves of the ``D`` reductions are rounding
errors of unrelated sums and add like a random walk, to about ``sqrt(D)`` times one (Higham, Accuracy and
Stability of Numerical Algorithms, section 2.8), so a logit moves by about ``4 sqrt(D) u S``; for a logit
difference, the metric, we allow twice that, ``t = 8 sqrt(D) u S``. This is a model, not a proof: the worst case adds the
moves, ``8 D u S``, five times more on the tiny llama, too coarse to tell circuits one neuron apart near a level,
and a layer could amplify an error. What the tests measured is well below ``t`` (the tiny llama: ``D = 29``,
``S`` about 3.2, ``t`` about 9e-6; the largest difference of one metric value 1.6e-6, 0.18 t, on an AMD EPYC
with its own AVX-512 kernels, ``ATEN_CPU_CAPABILITY=avx2`` and ``=default``, on one thread and on two).

Everything a curve derives from its per-example metric values is computed in float64 from them, so given the
metric values within ``t`` the bounds of the rest follow exactly (:func:`normalised_tolerance`,
:func:`assert_same_curve`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from neurontrace.evaluation import intervals
from neurontrace.evaluation.faithfulness import Curve

U32 = 2.0**-24
"""float32 unit roundoff: one ulp of a value ``x`` is at most ``2 * U32 * |x|``."""
SLACK = 1e-12
"""Allowance for the float64 arithmetic that turns metric values into curve numbers (far below any ``t``)."""


def reductions_per_forward(model) -> int:
    """``D``: the float32 reductions a forward pass runs one after another from the embedding to a logit."""
    return 9 * model.n_layers + 2


def metric_tolerance(model, *, logit_scale: float) -> float:
    """``t = 8 sqrt(D) u S``: how far two float32 evaluations of one logit-difference metric value may differ
    when their sums are grouped differently (see the module docstring); ``logit_scale`` is ``S``, the largest
    |logit|."""
    return 8 * math.sqrt(reductions_per_forward(model)) * U32 * logit_scale


@contextmanager
def largest_logit(model) -> Iterator[list[float]]:
    """Records the largest |logit| of every forward pass run inside (``S`` of :func:`metric_tolerance`); yields a
    one-element list holding it."""
    seen = [0.0]

    def hook(_module, _args, out) -> None:
        seen[0] = max(seen[0], float(out.detach().abs().max()))

    handle = model.hf.get_output_embeddings().register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def normalised_tolerance(value: float, denom: float, t: float) -> float:
    """How far a normalised score ``value = (c - e) / (m - e)`` (faithfulness, completeness; ``denom = m - e``)
    may move when each of ``c``, ``e`` and ``m`` moves by at most ``t``: the numerator and the denominator each
    move by at most ``2 t``, so ``|value' - value| <= 2 t (1 + |value|) / (|denom| - 2 t)`` (exact, not first
    order); ``inf`` when ``|denom| <= 2 t``."""
    room = abs(denom) - 2 * t
    return math.inf if room <= 0 else 2 * t * (1 + abs(value)) / room + SLACK


def _as_dict(curve: Curve | dict | str) -> dict[str, Any]:
    if isinstance(curve, Curve):
        curve = curve.to_json()
    if isinstance(curve, str):
        return json.loads(curve)
    return json.loads(json.dumps(curve))  # the form a saved curve has (inf as Infinity, tuples as lists)


def _structure(got: Any, want: Any, path: tuple, floats: list) -> None:
    """Everything but the floats must be equal (keys in the same order, lengths, ints, strings, None); the floats
    are collected as (path, got, want)."""
    where = "/".join(map(str, path)) or "the curve"
    if isinstance(want, float) and isinstance(got, float):
        floats.append((path, got, want))
    elif isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want), (where, list(got), list(want))
        for key in want:
            _structure(got[key], want[key], (*path, key), floats)
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), (where, got, want)
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            _structure(a, b, (*path, i), floats)
    else:
        assert type(got) is type(want) and got == want, (where, got, want)


class _Bounds:
    """Where each number of a curve computed from metric values within ``t`` of ``want``'s may lie."""

    def __init__(self, want: dict, t: float) -> None:
        self.want, self.t = want, t
        self.curve = Curve.from_dict(want)
        w, model, empty = self.curve.replicate_base()
        self.weights, self.denoms = w, model - empty
        self.denom = want["f_model"] - want["f_empty"]

    def _spread(self, faith: torch.Tensor, denoms: torch.Tensor) -> torch.Tensor:
        room = denoms.abs() - 2 * self.t
        spread = 2 * self.t * (1 + faith.abs()) / room + SLACK
        return torch.where(room > 0, spread, torch.full_like(spread, math.inf))

    def score_ci(self, values: list[float]) -> tuple[list[float], list[float]]:
        """The lowest and highest interval of a normalised score of ``values``: each replicate moves by at most
        its own :func:`normalised_tolerance`, and a percentile of the replicates (an order statistic) is monotone
        in each of them."""
        faith = self.curve.replicates(values)
        spread = self._spread(faith, self.denoms)
        ci = intervals.percentile_interval
        return ci(faith - spread), ci(faith + spread)

    def size_ci(self, level: float) -> tuple[list[float], list[float]]:
        """The lowest and highest interval of the smallest sampled size reaching ``level``: the first size reaching
        it comes no earlier than with every replicate's faithfulness raised by its tolerance, and no later than
        with it lowered."""
        circuit = self.want["samples"]["circuit"]
        sizes = sorted(int(k) for k in circuit)
        values = torch.tensor([circuit[str(k)] for k in sizes], dtype=torch.float64).T
        _, model, empty = self.curve.replicate_base()
        faith = intervals.normalised(intervals.replicate_means(self.weights, values), empty, model)
        spread = self._spread(faith, self.denoms[:, None])
        first, ci = intervals.first_reaching, intervals.percentile_interval
        sizes_t = torch.tensor(sizes)
        return ci(first(sizes_t, faith + spread, level)), ci(first(sizes_t, faith - spread, level))

    def check_ci(self, got: list[float], bounds: tuple[list[float], list[float]], where: str) -> None:
        low, high = bounds
        for g, lo, hi in zip(got, low, high, strict=True):
            assert lo - SLACK <= g <= hi + SLACK, f"{where}: {got} outside [{low}, {high}] (t = {self.t:.2e})"


SCORE_INTERVALS = (("faithfulness_ci", "circuit"), ("completeness_ci", "complement"), ("random_ci", "random"))
"""Bootstrap intervals of normalised scores, with the samples they come from."""
INTERVALS = (*(field for field, _ in SCORE_INTERVALS), "n_nodes_ci")
"""Every bootstrap interval of normalised scores and sizes (checked against :class:`_Bounds`)."""


def _raw(path: tuple) -> bool:
    """Whether a number is a mean of metric values (or one of them): it moves by at most ``t``."""
    head, last = path[0], path[-1]
    return head in ("samples", "f_model", "f_empty", "f_model_ci", "f_empty_ci") or last in (
        "f_circuit",
        "f_complement",
    )


def assert_clear_of_levels(curve: Curve | dict | str, *, metric_tol: float) -> None:
    """The precondition of comparing two sweeps' exact sizes: no circuit the sweep measured has a faithfulness
    within rounding of a level, so metric values within ``metric_tol`` make every search take the same way."""
    want = _as_dict(curve)
    denom = want["f_model"] - want["f_empty"]
    for key, values in want["samples"]["circuit"].items():
        faith = (sum(values) / len(values) - want["f_empty"]) / denom
        margin = normalised_tolerance(faith, denom, metric_tol)
        for level in (lv["level"] for lv in want["levels"]):
            assert abs(faith - level) > margin, (
                f"the test data puts the faithfulness of the top-{key} circuit ({faith:.6f}) within rounding "
                f"({margin:.2e}) of the level {level}: the search may go either way there; choose other inputs"
            )


def assert_same_curve(got: Curve | dict | str, want: Curve | dict | str, *, metric_tol: float) -> None:
    """``got`` is ``want`` computed by other groupings of float32 sums (see the module docstring).

    Exactly equal: everything that is not a float (method, sizes, the grid's sizes, each level's size, exact
    flag, bracket, grid size and search forwards, which sizes were measured, in the order they were kept, how
    many examples each holds, meta), and the floats that are inputs (thresholds, levels). Within rounding: each
    metric value and mean of them by ``metric_tol`` (``t`` of :func:`metric_tolerance`); normalised scores by
    :func:`normalised_tolerance`; bootstrap intervals within the lowest and highest interval those allow
    (:class:`_Bounds`). Asserts :func:`assert_clear_of_levels` of ``want`` first: with a circuit within rounding
    of a level, equal sizes would not be owed.
    """
    got, want = _as_dict(got), _as_dict(want)
    assert_clear_of_levels(want, metric_tol=metric_tol)
    floats: list = []
    _structure(got, want, (), floats)
    bounds = _Bounds(want, metric_tol)
    for path, g, w in floats:
        where = "/".join(map(str, path))
        if _raw(path):
            assert abs(g - w) <= metric_tol + SLACK, f"{where}: {g} vs {w} (t = {metric_tol:.2e})"
        elif path[-1] in ("faithfulness", "completeness", "random_faithfulness"):
            tol = normalised_tolerance(w, bounds.denom, metric_tol)
            assert abs(g - w) <= tol, f"{where}: {g} vs {w} (tolerance {tol:.2e})"
        elif len(path) < 2 or path[-2] not in INTERVALS:  # thresholds, levels, meta: inputs, not rounded
            assert g == w or (math.isnan(g) and math.isnan(w)), f"{where}: {g} vs {w} (an input: exact)"
    for i, p in enumerate(want["points"]):
        key, q = str(p["n_nodes"]), got["points"][i]
        for field, kind in SCORE_INTERVALS:
            if p[field]:
                bounds.check_ci(q[field], bounds.score_ci(want["samples"][kind][key]), f"points/{i}/{field}")
    for i, lv in enumerate(want["levels"]):
        mine = got["levels"][i]
        bounds.check_ci(mine["n_nodes_ci"], bounds.size_ci(lv["level"]), f"levels/{i}/n_nodes_ci")
        key = str(lv["n_nodes"])
        for field, kind in SCORE_INTERVALS[1:]:
            if lv[field]:
                bound = bounds.score_ci(want["samples"][kind][key])
                bounds.check_ci(mine[field], bound, f"levels/{i}/{field}")

"""Faithfulness, completeness, the random control and the exact circuit size, each against a hand computation
on a tiny model: ablations written as forward pre-hooks on the Hugging Face down projections, metrics read from
the raw logits, circuit sizes found by brute force over every k."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_tiny
from rounding import largest_logit, metric_tolerance, normalised_tolerance

from neurontrace.evaluation import intervals, prepare_eval, sweep
from neurontrace.tasks import Pair

NOUNS = [("dog", "dogs"), ("key", "keys"), ("table", "tables"), ("cabinet", "cabinets")]
PAIRS = [
    Pair(f"the {sg} near the {o}", f"the {pl} near the {o}", " is", " are")
    for sg, pl in NOUNS
    for o in ("table", "cabinet", "dog")
] + [
    Pair(f"the {pl} near the {o}", f"the {sg} near the {o}", " are", " is")
    for sg, pl in NOUNS
    for o in ("key",)
]


@pytest.fixture(scope="module")
def model():
    return make_tiny("llama", seed=3)


def ids(model, text: str) -> list[int]:
    return model.tokenizer(text, add_special_tokens=True)["input_ids"]


def hand_run(model, text: str, replace: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None):
    """Last-position logits of one prompt; ``replace[layer] = (mask [T, d], values [T, d])`` overwrites the
    down projection's input where ``mask`` is True."""
    handles = []
    for layer, (mask, values) in (replace or {}).items():
        down = model.hf.model.layers[layer].mlp.down_proj

        def pre(module, args, mask=mask, values=values):
            return (torch.where(mask, values.to(args[0].dtype), args[0]),)

        handles.append(down.register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            return model.hf(torch.tensor([ids(model, text)])).logits[0, -1]
    finally:
        for h in handles:
            h.remove()


def hand_acts(model, text: str) -> torch.Tensor:
    """``[L, T, d]`` inputs of every down projection for one prompt."""
    store = {}
    handles = [
        model.hf.model.layers[layer].mlp.down_proj.register_forward_pre_hook(
            lambda m, a, layer=layer: store.__setitem__(layer, a[0][0].detach())
        )
        for layer in range(model.n_layers)
    ]
    with torch.no_grad():
        model.hf(torch.tensor([ids(model, text)]))
    for h in handles:
        h.remove()
    return torch.stack([store[layer] for layer in range(model.n_layers)])


def hand_metric(model, pair: Pair, logits: torch.Tensor) -> float:
    a, b = ids(model, pair.clean_answer)[-1], ids(model, pair.patch_answer)[-1]
    return float(logits[a] - logits[b])


def hand_F(model, pairs, ablate: torch.Tensor) -> float:
    """Mean logit difference with the nodes in ``ablate`` (``[L, T, d]``, or ``[L, d]`` for every position) set
    to the mean of the counterfactual prompts' activations at their position (one token length)."""
    means = torch.stack([hand_acts(model, p.patch_prefix) for p in pairs]).mean(0)  # [L, T, d]
    if ablate.dim() == 2:
        ablate = ablate[:, None, :].expand_as(means)
    replace = {layer: (ablate[layer], means[layer]) for layer in range(model.n_layers) if ablate[layer].any()}
    return sum(hand_metric(model, p, hand_run(model, p.clean_prefix, replace)) for p in pairs) / len(pairs)


def hand_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    order = sorted(range(scores.numel()), key=lambda i: (-abs(float(scores.flatten()[i])), i))
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask.view_as(scores)


def test_faithfulness_and_completeness_of_sweep_points_equal_hand_ablations(model):
    torch.manual_seed(0)
    t = len(ids(model, PAIRS[0].clean_prefix))
    scores = torch.randn(model.n_layers, t, model.d_ff)
    ev = prepare_eval(model, PAIRS, ablation="mean", batch_size=8)
    curve = sweep(ev, scores, method="random", thresholds=[1.5, 0.8], levels=(), random_control=False)
    nothing = torch.zeros_like(scores, dtype=torch.bool)
    f_m, f_e = hand_F(model, PAIRS, nothing), hand_F(model, PAIRS, ~nothing)
    assert curve.f_model == pytest.approx(f_m, abs=1e-4) and curve.f_empty == pytest.approx(f_e, abs=1e-4)
    for point in curve.points:
        assert 0 < point.n_nodes < scores.numel()
        c = hand_top_k(scores, point.n_nodes)
        assert c.sum() == int((scores.abs() > point.threshold).sum())
        f_c, f_cc = hand_F(model, PAIRS, ~c), hand_F(model, PAIRS, c)
        assert point.faithfulness == pytest.approx((f_c - f_e) / (f_m - f_e), abs=1e-4)
        assert point.completeness == pytest.approx((f_cc - f_e) / (f_m - f_e), abs=1e-4)
        assert point.f_complement == pytest.approx(f_cc, abs=1e-4)


def test_random_control_is_normalised_from_the_empty_model(model):
    scores = torch.randn(model.n_layers, model.d_ff, generator=torch.Generator().manual_seed(1))
    ev = prepare_eval(model, PAIRS, ablation="mean", batch_size=8)
    curve = sweep(ev, scores, method="random", thresholds=[math.inf, 1.0, -1.0], levels=(0.5,), seed=4)
    by_size = {p.n_nodes: p for p in curve.points}
    assert set(by_size) >= {0, scores.numel()}
    # an empty random circuit is the empty model (0); a random circuit of every node is the full model (1)
    assert by_size[0].random_faithfulness == pytest.approx(0.0, abs=1e-6)
    assert by_size[scores.numel()].random_faithfulness == pytest.approx(1.0, abs=1e-6)
    # a mid-size random control, recomputed by hand from the same draw
    k = next(n for n in by_size if 0 < n < scores.numel())
    generator = torch.Generator().manual_seed(4)
    draws = {}
    for tau in [math.inf, 1.0, -1.0]:  # the sweep draws one control per new size, in threshold order
        n = int((scores.abs() > tau).sum())
        flat = torch.zeros(scores.numel(), dtype=torch.bool)
        flat[torch.randperm(scores.numel(), generator=generator)[:n]] = True
        draws[n] = flat.view_as(scores)
    f_m, f_e = curve.f_model, curve.f_empty
    f_r = hand_F(model, PAIRS, ~draws[k])
    assert by_size[k].random_faithfulness == pytest.approx((f_r - f_e) / (f_m - f_e), abs=1e-4)


@pytest.mark.parametrize("levels", [(0.3, 0.6, 0.9)])
def test_exact_size_is_the_smallest_top_k_circuit_reaching_the_level(model, levels):
    """Brute force: F(top-k) by hand for every k; the sweep's exact size must be the first k reaching the level
    after the bracket's bottom, and no smaller grid circuit reaches it."""
    train_scores = torch.randn(model.n_layers, model.d_ff, generator=torch.Generator().manual_seed(2))
    # a ranking that matters: scores from the mean |activation difference| between clean and counterfactual
    diff = torch.stack([hand_acts(model, p.clean_prefix) - hand_acts(model, p.patch_prefix) for p in PAIRS])
    scores = diff.abs().sum(2).mean(0) + 1e-3 * train_scores.abs()
    ev = prepare_eval(model, PAIRS, ablation="mean", batch_size=8)
    total = scores.numel()
    with largest_logit(model) as scale:
        curve = sweep(
            ev, scores, method="hand", thresholds=None, levels=levels, scan_limit=10**6, random_control=False
        )
        f_m = hand_F(model, PAIRS, torch.zeros_like(scores, dtype=torch.bool))
        f_e = hand_F(model, PAIRS, torch.ones_like(scores, dtype=torch.bool))
        faith = [(hand_F(model, PAIRS, ~hand_top_k(scores, k)) - f_e) / (f_m - f_e) for k in range(total + 1)]
    # the hand forwards and the sweep's passes agree to float32 rounding (tests/rounding.py), so the two searches
    # must agree only where no circuit is within rounding of a level: the data's precondition, asserted
    t = metric_tolerance(model, logit_scale=scale[0])
    tol = [normalised_tolerance(f, f_m - f_e, t) for f in faith]
    assert all(abs(f - level) > e for f, e in zip(faith, tol, strict=True) for level in levels)
    grid = [p.n_nodes for p in curve.points]
    for level in levels:
        lv = curve.level(level)
        first_grid = next(k for k in grid if faith[k] >= level)
        below = [k for k in grid if k < first_grid]
        start = below[-1] + 1 if below else first_grid
        want = next(k for k in range(start, total + 1) if faith[k] >= level)
        assert lv.exact and lv.n_nodes == want, (level, lv, want)
        assert lv.grid_n_nodes == first_grid and lv.bracket == [below[-1] if below else None, first_grid]
        assert lv.faithfulness == pytest.approx(faith[want], abs=tol[want])
        assert faith[want - 1] < level or want == start
    # with no scan, the bisection crossing: an upper bound that reaches the level, just above a size that misses
    coarse = sweep(ev, scores, method="hand", levels=levels, scan_limit=0, random_control=False)
    for level in levels:
        lv = coarse.level(level)
        assert lv.n_nodes >= curve.level(level).n_nodes and faith[lv.n_nodes] >= level
        assert lv.exact or faith[lv.n_nodes - 1] < level


def test_intervals_come_from_the_stored_examples(model):
    scores = torch.randn(model.n_layers, model.d_ff, generator=torch.Generator().manual_seed(5))
    ev = prepare_eval(model, PAIRS, ablation="mean", batch_size=8)
    curve = sweep(ev, scores, method="random", thresholds=[math.inf, 0.5, -1.0], levels=(0.5,))
    by_size = {p.n_nodes: p for p in curve.points}
    assert by_size[0].faithfulness_ci == pytest.approx([0.0, 0.0], abs=1e-9)
    assert by_size[scores.numel()].faithfulness_ci == pytest.approx([1.0, 1.0], abs=1e-9)
    mid = next(p for n, p in by_size.items() if 0 < n < scores.numel())
    lo, hi = mid.faithfulness_ci
    assert lo <= mid.faithfulness <= hi and hi > lo
    # one replicate by hand: resample the examples by the replicate's counts
    w = curve.bootstrap_weights(intervals.REPLICATES)[0]
    rows = [i for i, c in enumerate(w.tolist()) for _ in range(int(c))]
    mean = lambda xs: sum(xs[i] for i in rows) / len(rows)  # noqa: E731
    s = curve.samples
    want = (mean(s["circuit"][str(mid.n_nodes)]) - mean(s["empty"])) / (mean(s["model"]) - mean(s["empty"]))
    assert float(curve.replicates(s["circuit"][str(mid.n_nodes)])[0]) == pytest.approx(want, rel=1e-9)
    assert intervals.percentile_interval(list(range(1001))) == [25.0, 975.0]
    sizes, f = torch.tensor([1, 5, 9]), torch.tensor([[0.1, 0.9, 0.95], [0.0, 0.2, 0.3]])
    assert intervals.first_reaching(sizes, f, 0.8).tolist() == [5.0, math.inf]


def test_mixed_lengths_summed_nodes_align_from_the_end(model):
    """Prompts of two lengths: each example's metric equals the prompt run alone, and the mean-ablation value of
    a position is the counterfactual mean over the prompts at the same distance from the last token (the first
    token over the first tokens)."""
    pairs = [*PAIRS[:4], Pair("the dog near the table", "the dogs near the table", " is", " are"),
             Pair("dogs near the table", "dog near the table", " are", " is"),
             Pair("keys near a table", "key near a table", " are", " is")]  # fmt: skip
    ev = prepare_eval(model, pairs, ablation="mean", batch_size=8)
    assert ev.width is None and len(ev.batches) == 2
    full = ev.metric_values(None)
    for i, p in enumerate(pairs):
        assert float(full[i]) == pytest.approx(
            hand_metric(model, p, hand_run(model, p.clean_prefix)), abs=1e-5
        )
    acts = [hand_acts(model, p.patch_prefix) for p in pairs]
    # the first token with first tokens (BOS or attention sink); every other token by its distance from the end
    first = torch.stack([a[:, 0] for a in acts]).mean(0)  # [L, d]
    t_max = max(a.shape[1] for a in acts)
    sums = torch.zeros(model.n_layers, t_max, model.d_ff)
    counts = torch.zeros(t_max)
    for a in acts:  # index 0 is the last token
        rest = a[:, 1:].flip(1)
        sums[:, : rest.shape[1]] += rest
        counts[: rest.shape[1]] += 1
    from_end = sums / counts.clamp_min(1)[None, :, None]
    keep = torch.zeros(model.n_layers, model.d_ff, dtype=torch.bool)
    keep[0, :5] = True
    got = ev.metric_values(keep)
    for i, p in enumerate(pairs):
        t = len(ids(model, p.clean_prefix))
        values = torch.cat([first[:, None], from_end[:, : t - 1].flip(1)], dim=1)  # this prompt's positions
        replace = {layer: (~keep[layer].expand(t, -1), values[layer]) for layer in range(model.n_layers)}
        want = hand_metric(model, p, hand_run(model, p.clean_prefix, replace))
        assert float(got[i]) == pytest.approx(want, abs=1e-4)
    with pytest.raises(Exception, match="one token length"):
        ev.metric_values(torch.ones(model.n_layers, 5, model.d_ff, dtype=torch.bool))


def test_the_papers_grid_adds_the_empty_and_the_full_circuit(model):
    from neurontrace.evaluation.faithfulness import thresholds_for

    scores = torch.randn(model.n_layers, model.d_ff, generator=torch.Generator().manual_seed(6))
    grid = thresholds_for(scores, grid="paper")
    top = float(scores.abs().max())
    assert len(grid) == 33 and grid[0] == 0.0 and grid[-2:] == [math.inf, -1.0]
    assert grid[1] == pytest.approx(1e-6 * top) and grid[30] == pytest.approx(top)
    assert len(thresholds_for(scores, grid="log", points=40)) == 41
    ev = prepare_eval(model, PAIRS[:6], ablation="zero", batch_size=8)
    curve = sweep(ev, scores, method="random", thresholds=grid, levels=(), random_control=False)
    assert curve.points[0].n_nodes == 0 and curve.points[-1].n_nodes == scores.numel()
    assert curve.points[0].faithfulness == pytest.approx(0.0, abs=1e-6)
    assert curve.points[-1].faithfulness == pytest.approx(1.0, abs=1e-6)


SLOTTED = [
    Pair(
        f"the {sg} {prep} the {o}",
        f"the {pl} {prep} the {o}",
        " is",
        " are",
        slots=("the", sg, prep, "the", o),
    )
    for sg, pl in NOUNS[:3]
    for prep in ("near", "near to")
    for o in ("table", "dog")
]


def test_slot_nodes_align_prompts_of_several_lengths(model):
    """Slot masks reach every token of their slot; mean-ablation values are shared by the tokens at the same
    distance from the end of the same slot; slot scores are each pair's token scores added into slots."""
    from neurontrace.attribution.api import attribute
    from neurontrace.evaluation.runner import slot_scores
    from neurontrace.tasks.slots import slot_map

    maps = [slot_map(model.tokenizer, p) for p in SLOTTED]
    assert maps[0] == [1, 2, 3, 4, 5] and maps[2] == [1, 2, 3, 3, 4, 5]  # "near to": two tokens, one slot
    ev = prepare_eval(model, SLOTTED, ablation="mean", batch_size=8, slot_maps=maps)
    assert ev.width == 6  # slot 0 (special tokens) + 5 slots
    keep = torch.ones(model.n_layers, 6, model.d_ff, dtype=torch.bool)
    keep[1, 3, :] = False  # ablate the preposition slot of layer 1
    keep[0, 5, :7] = False  # and 7 units of the last noun at layer 0
    acts = [hand_acts(model, p.patch_prefix) for p in SLOTTED]
    aligned: dict[tuple[int, int], list[torch.Tensor]] = {}
    for m, a in zip(maps, acts, strict=True):
        for pos, s in enumerate(m):
            aligned.setdefault((s, sum(1 for x in m[pos + 1 :] if x == s)), []).append(a[:, pos])
    got = ev.metric_values(keep)
    for i, (p, m) in enumerate(zip(SLOTTED, maps, strict=True)):
        t = len(m)
        values = torch.stack(
            [
                torch.stack(aligned[(s, sum(1 for x in m[pos + 1 :] if x == s))]).mean(0)
                for pos, s in enumerate(m)
            ],
            dim=1,
        )  # [L, T, d]
        mask = ~keep[:, m]  # [L, T, d]: True where ablated
        replace = {
            layer: (mask[layer], values[layer]) for layer in range(model.n_layers) if mask[layer].any()
        }
        want = hand_metric(model, p, hand_run(model, p.clean_prefix, replace))
        assert float(got[i]) == pytest.approx(want, abs=1e-4), i
        assert t in (5, 6)
    scores = slot_scores(model, SLOTTED, method="relp", site="neurons")
    want = torch.zeros_like(scores)
    for p, m in zip(SLOTTED, maps, strict=True):
        alone = attribute(model, pairs=[p], method="relp").mean_scores  # [L, T, d]
        for pos, s in enumerate(m):
            want[:, s] += alone[:, pos] / len(SLOTTED)
    assert torch.allclose(scores, want, atol=1e-5)

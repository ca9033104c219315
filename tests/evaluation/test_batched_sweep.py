"""Several circuits per forward pass: every sweep equals the sweep of one circuit per pass for every ablation,
node kind and dictionary error-node rule: the same sizes, grid, exact sizes, brackets, search forwards, sizes
measured (in the order kept), random draws and exact flags, exactly, and the same metric values to float32
rounding; metric_values_many equals metric_values mask by mask to rounding; and the number of circuits per pass
follows the free memory.

Why not bit for bit: a pass of ``m`` circuits runs the model on ``m`` copies of a test batch, and a backend may
group a matrix product's sums otherwise for ``m * B`` rows than for ``B`` (it does on an AMD EPYC with AVX-512,
even on one thread). The tolerance is derived in tests/rounding.py (``8 sqrt(D) u S`` per metric value,
everything else from it exactly); the data keep every measured circuit clear of the levels by more than that,
which each comparison asserts, so the searches must take the same way.

The evaluation sets here run every pass in full (``shortcuts=False``): the shortcuts' sparse MLPs depend on which
circuits share a pass, which moves the metric by more than regrouping does (tests/evaluation/test_shortcuts.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny
from rounding import assert_same_curve, largest_logit, metric_tolerance

from neurontrace.dictionaries import SAE, Transcoder, save_sae, save_transcoders
from neurontrace.evaluation import faithfulness, sweep
from neurontrace.evaluation import prepare_eval as _prepare_eval
from neurontrace.sites import site_width
from neurontrace.tasks import Pair
from neurontrace.tasks.slots import slot_map

NOUNS = [("dog", "dogs"), ("key", "keys"), ("table", "tables"), ("cabinet", "cabinets")]
PAIRS = [
    Pair(f"the {sg} near the {o}", f"the {pl} near the {o}", " is", " are")
    for sg, pl in NOUNS
    for o in ("table", "cabinet", "dog")
] + [
    Pair(f"the {pl} near the {o}", f"the {sg} near the {o}", " are", " is")
    for sg, pl in NOUNS
    for o in ("key", "dog")
]
MIXED = [*PAIRS[:9], Pair("dogs near the table", "dog near the table", " are", " is"),
         Pair("keys near a table", "key near a table", " are", " is"),
         Pair("the dog near the table", "the dogs near the table", " is", " are")]  # fmt: skip
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
T = 5  # tokens of every prompt of PAIRS
LEVELS = (0.3, 0.6, 0.9)


def prepare_eval(*args, **kwargs):
    """An evaluation set that runs every pass in full."""
    return _prepare_eval(*args, shortcuts=False, **kwargs)


@pytest.fixture(scope="module")
def model():
    return make_tiny("llama", seed=3)


def coarse(ev, scores, error_nodes="count") -> list[float]:
    """Thresholds of a few top-k sizes (0, 5%, 12% and 40% of the nodes): wide brackets, long scans."""
    nodes = ev.nodes_of(scores)
    mags = (
        (nodes * faithfulness.error_node_mask(ev, nodes, error_nodes)).abs().flatten().sort(descending=True)
    )
    n = mags.values.numel()
    return [float(mags.values[int(n * f)]) for f in (0.4, 0.12, 0.05)] + [float("inf")]


def same_sweep(ev, scores, *, widths=(3, 7), speculate=(False, True), **kwargs):
    """Sweep with one circuit per pass, then batched (and speculating): the same curve (rounding.assert_same_curve:
    its structure exactly, its numbers to float32 rounding), in fewer passes."""
    forwards, passes = ev.forwards, ev.passes
    runs = []
    with largest_logit(ev.model) as scale:  # S of the tolerance: the largest |logit| any of these passes saw
        ref = sweep(ev, scores, method="m", max_circuits=1, **kwargs)
        one_each = ev.passes - passes
        assert ev.forwards - forwards == one_each  # one circuit per pass: a forward per circuit and batch
        for width in widths:
            for spec in speculate:
                passes = ev.passes
                runs.append(((width, spec), sweep(ev, scores, method="m", max_circuits=width, speculate=spec,
                                                  **kwargs)))  # fmt: skip
                assert ev.passes - passes < one_each
    t = metric_tolerance(ev.model, logit_scale=scale[0])
    for (width, spec), got in runs:
        try:
            assert_same_curve(got, ref, metric_tol=t)
        except AssertionError as error:
            raise AssertionError(f"{width} circuits per pass, speculate={spec}: {error}") from None
    return ref


@pytest.mark.parametrize("ablation", ["mean", "zero", "resample"])
def test_per_position_sweeps_are_identical(model, ablation):
    scores = torch.randn(model.n_layers, T, model.d_ff, generator=torch.Generator().manual_seed(1))
    ev = prepare_eval(model, PAIRS, ablation=ablation, batch_size=8, seed=2)
    assert len(ev.batches) == 3  # 20 examples: batches of 8, 8 and 4
    curve = same_sweep(ev, scores, thresholds=coarse(ev, scores), levels=LEVELS, scan_limit=10**6, seed=1)
    assert any(lv.n_nodes is not None and lv.bracket[0] is not None for lv in curve.levels)  # a search ran
    coarse_curve = same_sweep(
        ev, scores, thresholds=coarse(ev, scores), levels=LEVELS, scan_limit=3, widths=(4,)
    )
    assert not all(lv.exact for lv in coarse_curve.levels)  # the upper-bound logic
    same_sweep(ev, scores, levels=LEVELS, scan_limit=10**6, seed=1, widths=(4,))  # the default grid


@pytest.mark.parametrize("ablation", ["mean", "zero", "resample"])
def test_summed_sweeps_over_several_lengths_are_identical(model, ablation):
    scores = torch.randn(model.n_layers, model.d_ff, generator=torch.Generator().manual_seed(1))
    ev = prepare_eval(model, MIXED, ablation=ablation, batch_size=4, seed=3)
    assert ev.width is None and len(ev.batches) >= 4
    same_sweep(
        ev, scores, thresholds=coarse(ev, scores), levels=LEVELS, scan_limit=10**6, seed=5, widths=(2, 5)
    )


@pytest.mark.parametrize("ablation", ["mean", "resample"])
def test_slot_sweeps_are_identical(model, ablation):
    maps = [slot_map(model.tokenizer, p) for p in SLOTTED]
    ev = prepare_eval(model, SLOTTED, ablation=ablation, batch_size=8, slot_maps=maps)
    scores = torch.randn(model.n_layers, ev.width, model.d_ff, generator=torch.Generator().manual_seed(2))
    same_sweep(ev, scores, thresholds=coarse(ev, scores), levels=LEVELS, scan_limit=10**6, widths=(4,))


def test_the_papers_grid_with_the_empty_and_the_full_circuit(model):
    scores = torch.randn(model.n_layers, T, model.d_ff, generator=torch.Generator().manual_seed(3))
    ev = prepare_eval(model, PAIRS, ablation="mean", batch_size=32)
    thresholds = faithfulness.thresholds_for(scores, grid="paper")
    same_sweep(ev, scores, thresholds=thresholds, levels=(0.5, 0.95), widths=(16,), speculate=(True,))


@pytest.fixture(scope="module")
def sae_site(model, tmp_path_factory):
    """A random TopK SAE on the neurons of layers 0 and 1 (its error nodes matter)."""
    folder = tmp_path_factory.mktemp("batched-sae") / "neurons"
    d, d_sae = model.d_ff, 24
    for layer in (0, 1):
        g = torch.Generator().manual_seed(layer)
        sae = SAE(torch.randn(d, d_sae, generator=g) / d**0.5, torch.randn(d_sae, generator=g) * 0.1,
                  torch.randn(d_sae, d, generator=g) / d_sae**0.5, torch.randn(d, generator=g) * 0.1,
                  "neurons", layer, "topk", 5)  # fmt: skip
        save_sae(sae, folder / f"L{layer}")
    return f"sae:{folder}"


@pytest.fixture(scope="module")
def transcoder_site(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("batched-tc") / "tc"
    d, d_sae, tcs = model.d_model, 16, {}
    for layer in (0, 2):
        g = torch.Generator().manual_seed(10 + layer)
        tcs[layer] = Transcoder(torch.randn(d, d_sae, generator=g) / d**0.5, torch.randn(d_sae, generator=g) * 0.1,
                                torch.randn(d_sae, d, generator=g) / d_sae**0.5, torch.randn(d, generator=g) * 0.3,
                                layer, "relu")  # fmt: skip
    save_transcoders(tcs, folder, model_name=model.name)
    return f"transcoder:{folder}"


@pytest.mark.parametrize("rule", ["count", "keep", "ablate"])
@pytest.mark.parametrize("kind", ["sae", "transcoder"])
def test_dictionary_sweeps_are_identical_under_each_error_node_rule(
    model, sae_site, transcoder_site, kind, rule
):
    site = sae_site if kind == "sae" else transcoder_site
    ev = prepare_eval(model, PAIRS, site=site, ablation="mean", batch_size=8)
    g = torch.Generator().manual_seed(4)
    scores = torch.randn(len(ev.layers), T, site_width(model, site), generator=g)  # per site dimension
    thresholds = coarse(ev, scores, rule)
    same_sweep(
        ev, scores, thresholds=thresholds, levels=LEVELS, scan_limit=10**6, error_nodes=rule, widths=(5,)
    )


def test_many_equals_one_at_a_time(model, sae_site):
    """Masks that keep some layers whole (left unhooked one at a time) next to masks that hook them, the full
    model and masks of another shape, in one call: each mask's values to float32 rounding (passes of three
    circuits run other batch shapes; tests/rounding.py)."""
    for site, pairs, kw in ((sae_site, PAIRS, {}), ("neurons", MIXED, {"ablation": "resample"})):
        ev = prepare_eval(model, pairs, site=site, batch_size=8, **kw)
        L, w = len(ev.layers), (ev.node_width or model.d_ff)
        g = torch.Generator().manual_seed(5)
        masks = [torch.rand(L, w, generator=g) > 0.3 for _ in range(4)]
        masks[1][0] = True  # keeps layer 0 whole
        masks[2][:] = True  # keeps everything: the full model
        if ev.width is not None:
            masks += [torch.rand(L, ev.width, w, generator=g) > 0.5, None]
        masks.append(torch.zeros(L, w, dtype=torch.bool))
        with largest_logit(model) as scale:
            one = [ev.metric_values(k) for k in masks]
            forwards, passes = ev.forwards, ev.passes
            many = ev.metric_values_many(masks, circuits_per_pass=3)
        assert ev.forwards - forwards == len(masks) * len(ev.batches)
        assert ev.passes - passes < len(masks) * len(ev.batches)
        t = metric_tolerance(model, logit_scale=scale[0])
        for i, (a, b) in enumerate(zip(one, many, strict=True)):
            torch.testing.assert_close(b, a, rtol=0, atol=t, msg=lambda m, i=i: f"mask {i}: {m}")
        # every two masks' values differ by far more than t, so values given to the wrong mask would show
        distinct = [v for i, v in enumerate(one) if not any(torch.equal(v, u) for u in one[:i])]
        gaps = [float((a - b).abs().max()) for i, a in enumerate(distinct) for b in distinct[i + 1 :]]
        assert min(gaps) > 100 * t
        # keeping every node hooks no layer: the very forward of the full model (same kernels, same shapes), exact
        assert torch.equal(one[2], ev.metric_values(None))


def test_the_search_counts_the_forwards_one_circuit_per_pass_takes(model):
    """Sizes the batched scan evaluates past the first that reaches a level are work done (EvalSet.forwards),
    not samples, and not the search's forwards."""
    scores = torch.randn(model.n_layers, T, model.d_ff, generator=torch.Generator().manual_seed(5))
    ev = prepare_eval(model, PAIRS, ablation="mean", batch_size=32)
    runs = {}
    with largest_logit(model) as scale:
        for width in (1, 4):
            start = ev.forwards
            curve = sweep(
                ev, scores, method="m", thresholds=coarse(ev, scores), levels=LEVELS, max_circuits=width
            )
            runs[width] = (ev.forwards - start, curve)
    (f1, c1), (f4, c4) = runs[1], runs[4]
    assert [lv.forwards for lv in c1.levels] == [lv.forwards for lv in c4.levels]
    # the same sizes kept in the same order with the same values (to rounding: other batch shapes)
    assert_same_curve(c4, c1, metric_tol=metric_tolerance(model, logit_scale=scale[0]))
    assert f4 > f1  # some sizes were evaluated ahead and not needed
    kept = sum(len(c1.samples[k]) for k in ("circuit", "complement", "random")) + 2
    assert f1 == kept  # one test batch: a forward per kept circuit
    assert sum(lv.forwards for lv in c1.levels) == kept - 2 - 3 * len(c1.points)


def test_circuits_per_pass_follow_the_free_memory(model, monkeypatch):
    import neurontrace.memory as memory

    ev = prepare_eval(model, PAIRS, ablation="mean", batch_size=8)
    one = max(ev._circuit_bytes(eb) for eb in ev.batches)
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: 10**15)
    assert ev.circuits_per_pass() == faithfulness.MAX_CIRCUITS["cpu"]
    monkeypatch.setattr(
        memory, "available_bytes", lambda device=None: int(2.5 * one / faithfulness.MEMORY_SHARE)
    )
    assert ev.circuits_per_pass() == 2
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: 0)
    assert ev.circuits_per_pass() == 1
    ev.max_circuits = 6
    assert ev.circuits_per_pass() == 6

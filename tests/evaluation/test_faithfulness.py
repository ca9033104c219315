"""The evaluation maths on a tiny model where the answers are known."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny

from neurontrace.attribution.api import attribute
from neurontrace.circuits import select_circuit
from neurontrace.evaluation import faithfulness_of, prepare_eval, sweep
from neurontrace.interventions import Edit, intervene
from neurontrace.sites import capture
from neurontrace.tasks import Pair
from neurontrace.tokens import tokenize_pairs

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


@pytest.fixture(scope="module")
def model():
    return make_tiny("llama", seed=3)


@pytest.mark.parametrize("ablation", ["mean", "zero", "resample"])
def test_full_and_empty_circuits(model, ablation):
    ev = prepare_eval(model, PAIRS, ablation=ablation, batch_size=8)
    f_model = ev.metric_with(None)
    all_nodes = torch.ones(model.n_layers, 5, model.d_ff, dtype=torch.bool)
    f_empty = ev.metric_with(~all_nodes)
    assert ev.metric_with(all_nodes) == pytest.approx(f_model, abs=1e-6)
    full = select_circuit(
        torch.ones(model.n_layers, 5, model.d_ff), layers=list(range(model.n_layers)), top_k=10**9
    )
    faith, comp = faithfulness_of(ev, full, f_model=f_model, f_empty=f_empty)
    assert faith == pytest.approx(1.0, abs=1e-6) and comp == pytest.approx(0.0, abs=1e-6)
    faith, comp = faithfulness_of(ev, full.complement(), f_model=f_model, f_empty=f_empty)
    assert faith == pytest.approx(0.0, abs=1e-6) and comp == pytest.approx(1.0, abs=1e-6)


def test_mean_ablation_equals_setting_the_complement_to_the_counterfactual_mean(model):
    ev = prepare_eval(model, PAIRS, ablation="mean", batch_size=32)
    clean, patch = tokenize_pairs(model, [p.clean_prefix for p in PAIRS], [p.patch_prefix for p in PAIRS])
    acts = capture(model, patch)
    keep = torch.zeros(model.n_layers, 5, model.d_ff, dtype=torch.bool)
    keep[1, 4, :10] = True  # keep ten neurons of layer 1 at the last position
    edits = []
    for layer in range(model.n_layers):
        mean = acts.get(layer).mean(0)  # [T, d]
        for pos in range(5):
            units = [u for u in range(model.d_ff) if not keep[layer, pos, u]]
            edits.append(Edit(layer=layer, neurons=units, positions=[pos], op="set", value=mean[pos, units]))
    with intervene(model, edits):
        logits = model.logits(clean)[:, -1]
    metric = ev.batches[0].metric
    expected = float(metric(logits[:, None]).mean())
    assert ev.metric_with(keep) == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_resample_uses_another_example(model):
    ev = prepare_eval(model, PAIRS, ablation="resample", batch_size=32, seed=1)
    _, patch = tokenize_pairs(model, [p.clean_prefix for p in PAIRS], [p.patch_prefix for p in PAIRS])
    own = torch.stack([capture(model, patch).get(layer) for layer in range(model.n_layers)], dim=1)
    differs = (ev.batches[0].values - own).flatten(1).abs().sum(1) > 0
    assert differs.all()


def test_exact_patching_circuits_beat_random_ones(model):
    train = attribute(model, pairs=PAIRS, method="exact", batch_size=8)
    ev = prepare_eval(model, PAIRS, ablation="mean", batch_size=32)
    curve = sweep(ev, train.mean_scores, method="exact", seed=0)
    mid = [p for p in curve.points if 0 < p.n_nodes < curve.n_total // 4]
    assert len(mid) >= 5
    assert sum(p.faithfulness for p in mid) >= sum(p.random_faithfulness for p in mid)
    ends = curve.points[0], curve.points[-1]
    assert ends[0].n_nodes == 0 and ends[0].faithfulness == pytest.approx(0.0, abs=1e-6)
    assert ends[-1].faithfulness == pytest.approx(1.0, abs=0.05)


def test_sweep_costs_one_forward_per_batch_per_quantity(model):
    ev = prepare_eval(model, PAIRS, ablation="mean", batch_size=8, shortcuts=False)  # no mask memo
    n_batches = len(ev.batches)
    scores = torch.randn(model.n_layers, model.d_ff)  # position-free nodes
    start = ev.forwards
    curve = sweep(ev, scores, method="random", thresholds=[0.0, 0.5, 1.0, 1.5, 100.0], levels=())
    points = len(curve.points)
    assert ev.forwards - start == n_batches * (2 + 3 * points)  # F(M), F(empty), then F(C), F(C^c), random

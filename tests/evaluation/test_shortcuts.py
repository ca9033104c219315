"""The shortcuts of an ablation pass (evaluation/shortcuts.py) give the metric of the full pass, on every family:
the shared prefix run from the model's cache, MLPs run on their kept neurons only, two logits per prompt. Each
test also checks that the shortcut it covers really ran (spies on the modules), so agreement is not vacuous."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, make_tiny

from neurontrace.evaluation import prepare_eval, sweep
from neurontrace.evaluation import shortcuts as shortcut
from neurontrace.evaluation.faithfulness import ranking
from neurontrace.tasks import Pair

NOUNS = [("dog", "dogs"), ("key", "keys"), ("table", "tables"), ("cabinet", "cabinets")]
PAIRS = (
    [  # every prompt starts with "the": a shared prefix of one token
        Pair(f"the {sg} near the {o}", f"the {pl} near the {o}", " is", " are")
        for sg, pl in NOUNS
        for o in ("table", "dog")
    ]
    + [
        Pair(f"the {pl} on the {o}", f"the {sg} on the {o}", " are", " is")
        for sg, pl in NOUNS[:2]
        for o in ("key",)
    ]
)
LONGER = [
    Pair(f"the table of the {sg} near the {o}", f"the table of the {pl} near the {o}", " is", " are")
    for sg, pl in NOUNS[:2]
    for o in ("table", "key")
]  # fmt: skip  (a shared prefix of four tokens)
MIXED = [
    *PAIRS[:4],
    Pair("dogs near the table", "dog near the table", " are", " is"),
]  # no shared first token


def masks_for(model, t: int, g: torch.Generator) -> list[torch.Tensor | None]:
    """Masks that take every path: all ablated, a few neurons kept (sparse MLPs, some layers with none), most kept
    (dense MLPs), a layer kept whole, per-unit masks, and the full model."""
    L, d = model.n_layers, model.d_ff
    few = torch.rand(L, t, d, generator=g) > 0.93
    few[1] = False  # a layer with no kept neuron
    most = torch.rand(L, t, d, generator=g) > 0.2
    whole = few.clone()
    whole[0] = True
    return [
        torch.zeros(L, t, d, dtype=torch.bool),
        few,
        most,
        whole,
        None,
        torch.rand(L, t, d, generator=g) > 0.97,
    ]


class Spy:
    """Records the last dimension of what the projections and the unembedding put out, and the sequence lengths
    the embedding sees."""

    def __init__(self, model):
        a = model.adapter
        self.widths, self.logits, self.lengths, self.handles = [], [], [], []
        for layer in range(model.n_layers):
            up = model.layer_module(layer, a.up)
            self.handles.append(up.register_forward_hook(lambda m, i, o: self.widths.append(o.shape[-1])))
        head = model.hf.get_submodule(a.unembed)
        self.handles.append(head.register_forward_hook(lambda m, i, o: self.logits.append(o.shape[-1])))
        embed = model.hf.get_submodule(a.embed)
        self.handles.append(embed.register_forward_hook(lambda m, i, o: self.lengths.append(i[0].shape[1])))
        self.rows = []  # rows of every embedded batch
        self.handles.append(embed.register_forward_hook(lambda m, i, o: self.rows.append(i[0].shape[0])))
        self.last_mlp = []  # positions the last layer's MLP sees
        last = model.layer_module(model.n_layers - 1, a.mlp)
        self.handles.append(last.register_forward_hook(lambda m, i, o: self.last_mlp.append(i[0].shape[1])))

    def remove(self):
        for h in self.handles:
            h.remove()


def test_shared_prefix_length():
    ids = lambda *rows: [torch.tensor(r) for r in rows]  # noqa: E731
    assert shortcut.shared_prefix_length(ids([5, 6, 7, 8], [5, 6, 9, 8], [5, 6, 7, 1]), "mean") == 2
    assert (
        shortcut.shared_prefix_length(ids([5, 6, 7], [5, 6, 7]), "resample") == 2
    )  # short of the last token
    assert shortcut.shared_prefix_length(ids([5, 6, 7, 8], [5, 6, 7]), "mean") == 1  # several lengths: one
    assert shortcut.shared_prefix_length(ids([5, 6, 7], [4, 6, 7]), "mean") == 0
    assert shortcut.shared_prefix_length(ids([5, 6, 7], [5, 6, 8]), "zero") == 0  # zero ablation changes them


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("ablation", ["mean", "zero", "resample"])
def test_shortcut_passes_give_the_full_passes_metric(family, ablation):
    model = make_tiny(family, seed=1)
    full = prepare_eval(model, PAIRS, ablation=ablation, batch_size=4, shortcuts=False)
    fast = prepare_eval(model, PAIRS, ablation=ablation, batch_size=4)
    assert fast.prefix == (0 if ablation == "zero" else 1)
    masks = masks_for(model, fast.width, torch.Generator().manual_seed(2))
    want = full.metric_values_many(masks, circuits_per_pass=3)
    spy = Spy(model)
    try:
        got = fast.metric_values_many(masks, circuits_per_pass=3)
    finally:
        spy.remove()
    for a, b in zip(want, got, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert min(spy.widths) < model.d_ff  # some MLPs ran on kept neurons only
    assert max(spy.widths) >= model.d_ff  # and dense ones on all (a fused Phi-3 projection: both halves)
    # two logits per prompt (the batch's answers), not the vocabulary
    assert max(spy.logits) <= 2 * len(NOUNS)
    # the last MLP ran at the last position only (and in the one-token prefix run)
    assert set(spy.last_mlp) == {1}
    if fast.prefix:
        # passes ran after the shared prefix (the prefix itself once, one row, for every pass), never in full
        assert set(spy.lengths) == {fast.prefix, fast.width - fast.prefix} and fast.width > 2 * fast.prefix
        assert [r for r, n in zip(spy.rows, spy.lengths, strict=True) if n == fast.prefix] == [1]
    # Agreement is not vacuous: the masks change the metric.
    assert (want[0] - want[4]).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3", "gemma3"])
def test_per_unit_masks_and_a_longer_shared_prefix(family):
    model = make_tiny(family, seed=2)
    g = torch.Generator().manual_seed(3)
    L, d = model.n_layers, model.d_ff
    cases = [(LONGER, "mean"), (MIXED, "resample")]  # a prefix of 4 tokens; several lengths (no prefix)
    for pairs, ablation in cases:
        full = prepare_eval(model, pairs, ablation=ablation, batch_size=4, shortcuts=False)
        fast = prepare_eval(model, pairs, ablation=ablation, batch_size=4)
        assert fast.prefix == (4 if pairs is LONGER else 0)
        masks = [torch.rand(L, d, generator=g) > p for p in (0.9, 0.3)] + [
            torch.zeros(L, d, dtype=torch.bool)
        ]
        for a, b in zip(full.metric_values_many(masks), fast.metric_values_many(masks), strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_a_sweep_with_shortcuts_matches_the_full_sweep():
    model = make_tiny("llama", seed=3)
    scores = torch.randn(model.n_layers, 5, model.d_ff, generator=torch.Generator().manual_seed(1))
    curves = []
    for fast in (False, True):
        ev = prepare_eval(model, PAIRS, ablation="mean", batch_size=8, shortcuts=fast)
        curves.append(sweep(ev, scores, method="m", levels=(0.5, 0.8), max_circuits=1 if not fast else 4))
    full, fast = curves
    assert [p.n_nodes for p in full.points] == [p.n_nodes for p in fast.points]
    for a, b in zip(full.points, fast.points, strict=True):
        assert abs(a.faithfulness - b.faithfulness) < 1e-4 and abs(a.completeness - b.completeness) < 1e-4
        assert a.random_faithfulness == pytest.approx(b.random_faithfulness, abs=1e-4)
    assert [(lv.n_nodes, lv.exact) for lv in full.levels] == [(lv.n_nodes, lv.exact) for lv in fast.levels]
    assert any(lv.n_nodes for lv in full.levels)


def test_passes_group_circuits_that_keep_few_neurons():
    """A pass's MLPs run sparse only where its circuits' union keeps few neurons: the grouping puts the top-k
    circuits of one ranking together (they keep the same neurons), not with random circuits of their sizes (that
    keep others) nor with the complements (that keep nearly all), whatever order they come in; by estimated cost
    it does at least as well as passes in order of size."""
    model = make_tiny("llama", seed=4)
    ev = prepare_eval(model, PAIRS, ablation="mean", batch_size=8)
    scores = torch.randn(model.n_layers, ev.width, model.d_ff, generator=torch.Generator().manual_seed(2))
    order, g = ranking(scores), torch.Generator().manual_seed(0)
    masks, kinds = [], []
    for k in (3, 10, 30):
        for kind in ("top", "random", "complement"):
            flat = torch.zeros(scores.numel(), dtype=torch.bool)
            flat[order[:k] if kind != "random" else torch.randperm(scores.numel(), generator=g)[:k]] = True
            masks.append(~flat.view(scores.shape) if kind == "complement" else flat.view(scores.shape))
            kinds.append(kind)
    units = [ev._kept_units(m) for m in masks]
    chunks = shortcut.group_passes(units, 8, tokens=128)  # 32 prompts of 4 positions per circuit
    top = [i for i, kind in enumerate(kinds) if kind == "top"]
    assert any(set(top) <= set(c) for c in chunks)  # the top-k circuits share one pass
    assert [2, 5, 8] in [sorted(c) for c in chunks]  # the complements go together, with nothing else
    assert not any(7 in c and 6 in c for c in chunks)  # the largest random circuit keeps other neurons
    cost = lambda groups: sum(  # noqa: E731
        shortcut.pass_cost(torch.stack([units[i] for i in c]).any(0), len(c), 128) for c in groups
    )
    by_size = sorted(range(len(masks)), key=lambda i: int(masks[i].sum()))
    assert cost(chunks) <= cost([by_size[:8], by_size[8:]])
    # the evaluation set's passes: the same grouping at its own token count (8 prompts of 4 positions here)
    assert ev._tokens() == 8 * (ev.width - ev.prefix)
    assert ev._chunks(masks, list(range(len(masks))), 8) == shortcut.group_passes(units, 8, ev._tokens())
    assert all(len(c) <= 2 for c in ev._chunks(masks, list(range(len(masks))), 2))
    assert sorted(i for c in ev._chunks(masks, list(range(len(masks))), 2) for i in c) == list(range(9))
    ev.shortcuts = False  # full passes: in the order given
    assert ev._chunks(masks, list(range(len(masks))), 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8]]


def test_a_mask_evaluated_before_is_not_run_again():
    """With the shortcuts and a ``seen`` memo (a sweep's own), a mask's values are kept: the same mask again (in the
    same call or later), and the all-kept mask after the full model, cost no forward and give the same values;
    without the memo, or with full passes, every mask runs."""
    model = make_tiny("llama", seed=1)
    ev = prepare_eval(model, PAIRS, ablation="mean", batch_size=8)
    scores = torch.randn(model.n_layers, ev.width, model.d_ff, generator=torch.Generator().manual_seed(3))
    small, seen = scores > 1.0, {}
    start = ev.forwards
    a, b, model_values = ev.metric_values_many([small, small.clone(), None], seen=seen)
    assert ev.forwards - start == 2 * len(ev.batches)
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # exact: b is a's values, copied from the memo
    again, full = ev.metric_values_many([small, torch.ones_like(small)], seen=seen)
    assert ev.forwards - start == 2 * len(ev.batches)  # nothing new ran
    torch.testing.assert_close(again, a, rtol=0, atol=0)  # copies from the memo: exact
    torch.testing.assert_close(full, model_values, rtol=0, atol=0)
    other = ev.metric_values_many([scores > 0.5], seen=seen)[0]
    assert ev.forwards - start == 3 * len(ev.batches)
    assert not torch.equal(other, a)
    ev.metric_values_many([small, small])  # no memo: both run
    assert ev.forwards - start == 5 * len(ev.batches)
    ev_full = prepare_eval(model, PAIRS, ablation="mean", batch_size=8, shortcuts=False)
    start = ev_full.forwards
    ev_full.metric_values_many(
        [small, small], seen={}
    )  # full passes: every mask runs, as before the shortcuts
    assert ev_full.forwards - start == 2 * len(ev_full.batches)


def test_no_sparse_mlp_on_dispatched_modules_and_no_subset_for_other_metrics():
    from neurontrace.attribution.metrics import make_metric

    model = make_tiny("llama")
    assert shortcut.sparse_mlp_modules(model, 0) is not None
    down = model.layer_module(0, model.adapter.down)
    down._hf_hook = object()  # accelerate's dispatch wraps forward itself: leave it alone
    try:
        assert shortcut.sparse_mlp_modules(model, 0) is None
    finally:
        del down._hf_hook
    assert shortcut.subset_metric(make_metric("logprob", answer=[5])) is None
    ids, metric = shortcut.subset_metric(make_metric("logit-diff", answer=[9, 5], contrast=[5, 7]))
    assert ids.tolist() == [5, 7, 9]
    logits = torch.randn(2, 1, 3)
    torch.testing.assert_close(metric(logits), torch.stack([logits[0, 0, 2] - logits[0, 0, 0],
                                                            logits[1, 0, 0] - logits[1, 0, 1]]))  # fmt: skip


def test_an_evaluation_run_with_full_passes():
    from neurontrace.evaluation.runner import EvaluationRun, _evalset

    model = make_tiny("llama")
    run = EvaluationRun(model="m", data="d", methods=["relp"], bases=["neurons"])
    assert "full_passes" not in run.to_dict()  # the default: older results folders resume
    assert _evalset(model, run, "neurons", 0, PAIRS, {}).shortcuts
    run.full_passes = True
    assert run.to_dict()["full_passes"] is True
    assert not _evalset(model, run, "neurons", 0, PAIRS, {}).shortcuts

"""IG on activations with prefix caching (issue 15): the layers below the interpolated site run once per batch and
each step runs the model from that layer on. The scores must be those of the old path, which runs the whole
model at every step (``ig_prefix=False`` / ``NEURONTRACE_IG_PREFIX=0``), for every family, site, rule, padded
batch and baseline; and the layers below the site must really run fewer times."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from conftest import FAMILIES, make_tiny

from neurontrace.attribution.api import attribute
from neurontrace.attribution.engine import BatchAttributor, _repeat, frozen_parameters, run_sites
from neurontrace.attribution.metrics import make_metric
from neurontrace.attribution.replacement import RelPRules, replacement_model
from neurontrace.models.suffix import SuffixUnsupported, record_forward, run_from
from neurontrace.sites import SITES, hook_site
from neurontrace.tokens import single_token_id, tokenize_pairs

CLEAN = ["the keys to the cabinet", "dogs run", "the dog near the tables is"]
PATCH = ["the key to the cabinets", "dog runs", "the dogs near the table are"]


def _model(family: str):
    model = make_tiny(family, seed=1)
    # transformers' eager Gemma 2 attention gives NaN on left-padded rows in float64 (in the old path too), so
    # Gemma 2 stays in float32: the paths differ only by the rounding of the unembedding's product there.
    if family != "gemma2":
        model.hf.double()
    return model


def _batch(model, n: int = 3):
    clean, patch = tokenize_pairs(model, CLEAN[:n], PATCH[:n])
    metric = make_metric(
        "logit-diff",
        answer=[single_token_id(model, " are")] * n,
        contrast=[single_token_id(model, " is")] * n,
    )
    return clean, patch, metric


def _ig(model, clean, metric, *, prefix: bool, patch=None, baseline=None, **kw):
    attributor = BatchAttributor(model, method="ig", ig_prefix=prefix, **kw)
    out = attributor(clean, metric, patch=patch, baseline=baseline)
    return out.scores, attributor.ig_path


def _same(cached: torch.Tensor, full: torch.Tensor) -> None:
    assert cached.shape == full.shape
    assert float((cached - full).abs().max()) <= 1e-6 * max(1.0, float(full.abs().max()))


@pytest.mark.parametrize("rule", ["midpoint", "left"])
@pytest.mark.parametrize("family", FAMILIES)
def test_cached_ig_equals_the_whole_model_path_for_every_family_site_and_rule(family, rule):
    """A left-padded batch of 3 pairs of different lengths; 3 steps in chunks of 2 and 1 alphas (max_rows 6), so
    two recorded passes of different sizes are used."""
    model = _model(family)
    clean, patch, metric = _batch(model)
    assert len(set(clean.lengths.tolist())) == 3  # really padded
    for site in SITES:
        kw = dict(site=site, steps=3, ig_rule=rule, max_rows=6, patch=patch)
        full, full_path = _ig(model, clean, metric, prefix=False, **kw)
        cached, cached_path = _ig(model, clean, metric, prefix=True, **kw)
        assert full_path.startswith("full") and cached_path == "prefix-cached", (site, cached_path)
        assert full.abs().max() > 0
        _same(cached, full)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3", "gpt_neox"])
def test_cached_ig_equals_the_whole_model_path_for_zero_and_mean_baselines_and_layer_subsets(family):
    model = _model(family)
    clean, _, metric = _batch(model)
    width = model.d_ff
    mean = torch.randn(2, width, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for baseline in (None, mean):
        kw = dict(steps=4, layers=[2, 0], baseline=baseline)
        full, _ = _ig(model, clean, metric, prefix=False, **kw)
        cached, path = _ig(model, clean, metric, prefix=True, **kw)
        assert path == "prefix-cached"
        _same(cached, full)


def test_attribute_gives_the_same_result_with_prefix_caching_off_by_environment(monkeypatch):
    """Through the public API: pairs in batches of 2 (so one batch is padded), and a custom metric that reads
    every position (no logits_to_keep)."""
    model = _model("qwen3")
    pairs = [
        {"clean_prefix": c, "patch_prefix": p, "clean_answer": " are", "patch_answer": " is"}
        for c, p in zip(CLEAN, PATCH, strict=True)
    ]
    are = single_token_id(model, " are")
    runs = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("NEURONTRACE_IG_PREFIX", flag)
        runs[flag] = (
            attribute(model, pairs=pairs, method="ig", steps=3, batch_size=2),
            attribute(
                model, prompts=CLEAN, metric_fn=lambda logits: logits[:, :, are].mean(1), method="ig", steps=2
            ),
        )
    for off, on in zip(runs["0"], runs["1"], strict=True):
        assert off.scores is None  # prompts of several lengths: scores summed over positions
        assert off.scores_sum.abs().max() > 0
        _same(on.scores_sum, off.scores_sum)
        _same(on.metric_clean, off.metric_clean)


def _count_calls(model, fn) -> list[int]:
    counts = [0] * model.n_layers

    def counter(index):
        def hook(*_):
            counts[index] += 1

        return hook

    handles = [model.layer(i).register_forward_hook(counter(i)) for i in range(model.n_layers)]
    try:
        fn()
    finally:
        for h in handles:
            h.remove()
    return counts


@pytest.mark.parametrize("site", ["neurons", "resid"])
def test_the_cached_path_runs_each_layer_below_the_site_fewer_times(site):
    model = _model("llama")
    clean, patch, metric = _batch(model)
    L, chunks = model.n_layers, 2  # 4 steps, 2 alphas (6 rows) per chunk
    counts = {}
    for prefix in (False, True):
        attributor = BatchAttributor(model, method="ig", site=site, steps=4, max_rows=6, ig_prefix=prefix)
        counts[prefix] = _count_calls(model, lambda a=attributor: a(clean, metric, patch=patch))
    # values of the counterfactual and clean runs, then one whole forward per (layer, chunk)
    assert counts[False] == [2 + L * chunks] * L
    # ... against one recorded pass (one chunk size), then layer i runs for the sites of layers 0..i only
    # (0..i-1 for resid, whose steps start at the next layer)
    below = (lambda i: i) if site == "resid" else (lambda i: i + 1)
    assert counts[True] == [2 + 1 + below(i) * chunks for i in range(L)]
    assert all(c < f for c, f in zip(counts[True][:-1], counts[False][:-1], strict=True))


@pytest.mark.parametrize("family", FAMILIES)
def test_run_from_reproduces_the_forward_and_its_relp_gradients(family):
    """``run_from`` with the RelP replacement model on: the logits and the replacement model's gradient at a
    layer's neurons are those of a whole forward pass."""
    model = _model(family)
    clean, _, metric = _batch(model)
    rules, layer = RelPRules(), 1
    with frozen_parameters(model):
        acts = run_sites(model, clean, metric, site="neurons", layers=[layer], grad=False).acts[layer]
        recorded = record_forward(model, clean, keep_inputs=[0, layer], logits_to_keep=1, keep_logits=True)
        with torch.no_grad():
            torch.testing.assert_close(run_from(model, recorded, 0, recorded.inputs[0]), recorded.logits)

        leaf = acts.detach().requires_grad_(True)
        full = run_sites(
            model, clean, metric, site="neurons", layers=[layer], rules=rules, replace={layer: leaf}
        )
        (g_full,) = torch.autograd.grad(full.metric.sum(), [leaf])

        leaf2 = acts.detach().requires_grad_(True)
        with replacement_model(model, rules) as rep, torch.enable_grad():
            handle = hook_site(model, "neurons", layer, lambda x: leaf2)
            try:
                logits = rep.logits(
                    SimpleNamespace(logits=run_from(model, recorded, layer, recorded.inputs[layer]))
                )
            finally:
                handle.remove()
            value = metric(logits)
        (g_cached,) = torch.autograd.grad(value.sum(), [leaf2])
    torch.testing.assert_close(value.detach(), full.metric.detach())
    assert g_full.abs().max() > 0
    torch.testing.assert_close(g_cached, g_full, rtol=0, atol=1e-6 * float(g_full.abs().max()))


def test_models_the_cached_path_cannot_replay_fall_back_to_the_whole_model():
    model = _model("llama")
    clean, patch, metric = _batch(model)
    full, _ = _ig(model, clean, metric, prefix=False, steps=2, patch=patch)

    # a tail the recorded pass does not reproduce: a logit soft-cap the model does not apply
    real = model.adapter
    model.adapter = dataclasses.replace(real, logit_softcap_attr="rms_norm_eps")
    try:
        with pytest.raises(SuffixUnsupported, match="do not reproduce"):
            record_forward(model, _repeat(clean, 2), logits_to_keep=1)
        scores, path = _ig(model, clean, metric, prefix=True, steps=2, patch=patch)
    finally:
        model.adapter = real
    assert path.startswith("full: the final norm")
    _same(scores, full)

    # a model dispatched by accelerate (device maps, offload)
    model.layer(0)._hf_hook = object()
    try:
        scores, path = _ig(model, clean, metric, prefix=True, steps=2, patch=patch)
    finally:
        del model.layer(0)._hf_hook
    assert path == "full: the model is dispatched by accelerate (device_map or offload)"
    _same(scores, full)


def test_a_hidden_state_changed_between_layers_is_refused():
    """The recorded pass must chain the layers: layer i + 1 gets exactly layer i's output. (A global hook stands in
    for a model loop that changes the hidden state between two layers.)"""
    model = _model("llama")
    clean, _, _ = _batch(model)
    target = model.layer(2)

    def shift(module, args):
        return (args[0] + 1.0, *args[1:]) if module is target else None

    handle = torch.nn.modules.module.register_module_forward_pre_hook(shift)
    try:
        with pytest.raises(SuffixUnsupported, match="between decoder layers 1 and 2"):
            record_forward(model, clean)
    finally:
        handle.remove()


def test_hooks_on_the_layers_are_replayed_once():
    """A pre-hook that edits a layer's input is part of the layer: the replay runs it once, as the model does."""
    model = _model("llama")
    clean, patch, metric = _batch(model)
    handle = model.layer(2).register_forward_pre_hook(lambda _m, args: (args[0] * 1.5, *args[1:]))
    try:
        full, _ = _ig(model, clean, metric, prefix=False, steps=2, patch=patch)
        cached, path = _ig(model, clean, metric, prefix=True, steps=2, patch=patch)
    finally:
        handle.remove()
    assert path == "prefix-cached"
    _same(cached, full)

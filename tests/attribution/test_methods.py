"""Attribution methods against ground truth on tiny models (float64, so slopes are exact to many digits)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny

from neurontrace.attribution import engine
from neurontrace.attribution.api import attribute
from neurontrace.attribution.replacement import NO_RULES
from neurontrace.interventions import Edit, intervene
from neurontrace.sites import capture
from neurontrace.tokens import single_token_id

CLEAN, CF = "the keys to the cabinet", "the key to the cabinets"


def _model(family: str = "llama"):
    model = make_tiny(family)
    model.hf.double()
    return model


def _logit_diff(model, batch) -> float:
    logits = model.logits(batch)[0, -1]
    return float(logits[single_token_id(model, " are")] - logits[single_token_id(model, " is")])


def _pair(model, method: str, **kw):
    return attribute(
        model, prompt=CLEAN, counterfactual=CF, answer=" are", contrast=" is", method=method, **kw
    )


def _nodes(result, k: int = 6):
    """A few nodes of large and small score at several layers and positions."""
    top = result.top(k)
    return [(n.layer, n.position, n.neuron) for n in top] + [(0, 1, 5), (1, 4, 7), (2, 0, 11)]


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
def test_atp_equals_the_finite_difference_slope(family):
    model = _model(family)
    result = _pair(model, "atp")
    clean, cf = model.tokenize(CLEAN), model.tokenize(CF)
    a, a_cf = capture(model, clean), capture(model, cf)
    eps = 3e-3  # the models compute norms in float32 even in float64 mode; central differences, O(eps^2)
    for layer, pos, unit in _nodes(result):
        delta = float(a_cf.get(layer)[0, pos, unit] - a.get(layer)[0, pos, unit])
        values = []
        for sign in (1, -1):
            edit = Edit(layer=layer, neurons=[unit], positions=[pos], op="add", value=sign * eps * delta)
            with intervene(model, edit):
                values.append(_logit_diff(model, clean))
        slope = (values[0] - values[1]) / (2 * eps)
        assert float(result.scores[0, layer, pos, unit]) == pytest.approx(slope, rel=1e-3, abs=5e-5)


def test_exact_patching_equals_running_the_model_with_the_patch():
    model = _model()
    result = _pair(model, "exact")
    clean, cf = model.tokenize(CLEAN), model.tokenize(CF)
    a_cf = capture(model, cf)
    base = _logit_diff(model, clean)
    for layer, pos, unit in _nodes(result):
        value = a_cf.get(layer)[0, pos, unit].reshape(1)
        with intervene(model, Edit(layer=layer, neurons=[unit], positions=[pos], op="set", value=value)):
            patched = _logit_diff(model, clean)
        assert float(result.scores[0, layer, pos, unit]) == pytest.approx(patched - base, rel=1e-6, abs=1e-7)


def test_exact_patching_for_single_prompts_uses_the_contribution_sign():
    model = _model()
    result = attribute(model, prompt=CLEAN, answer=" are", method="exact")
    clean = model.tokenize(CLEAN)
    logit = lambda: float(model.logits(clean)[0, -1, single_token_id(model, " are")])  # noqa: E731
    base = logit()
    for layer, pos, unit in _nodes(result, 3):
        with intervene(model, Edit(layer=layer, neurons=[unit], positions=[pos], op="zero")):
            ablated = logit()
        assert float(result.scores[0, layer, pos, unit]) == pytest.approx(base - ablated, rel=1e-6, abs=1e-7)


@pytest.mark.parametrize(
    ("family", "rule", "steps"),
    [
        ("llama", "midpoint", 64),
        ("gpt_neox", "midpoint", 64),
        ("gemma3", "midpoint", 64),
        ("gpt_neox", "left", 256),
    ],
)
def test_ig_on_activations_is_complete_per_layer(family, rule, steps):
    """Summed IG scores of one layer = m(layer patched to the counterfactual) - m(clean), within 2%."""
    model = _model(family)
    result = _pair(model, "ig", steps=steps, ig_rule=rule)
    clean, cf = model.tokenize(CLEAN), model.tokenize(CF)
    base = _logit_diff(model, clean)
    for layer in range(model.n_layers):
        with intervene(model, Edit(layer=layer, op="patch", value=capture(model, cf).get(layer))):
            target = _logit_diff(model, clean) - base
        total = float(result.scores[0, layer].sum())
        assert total == pytest.approx(target, rel=0.02, abs=1e-6)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_ig_on_inputs_sums_to_the_metric_change(family):
    model = _model(family)
    result = _pair(model, "ig-inputs", steps=64)  # midpoint rule
    target = _logit_diff(model, model.tokenize(CF)) - _logit_diff(model, model.tokenize(CLEAN))
    assert float(result.extra["embed_scores"].sum()) == pytest.approx(target, rel=0.02)
    assert float(result.metric_patch[0] - result.metric_clean[0]) == pytest.approx(target, rel=1e-6)


def test_relp_without_rules_is_atp():
    model = _model()
    atp = _pair(model, "atp")
    relp_plain = _pair(model, "relp", rules=NO_RULES)
    relp = _pair(model, "relp")
    torch.testing.assert_close(relp_plain.scores, atp.scores)
    assert not torch.allclose(relp.scores, atp.scores)


def test_relp_scores_all_layers_from_one_forward_and_one_backward(monkeypatch):
    model = _model()
    calls = {"forward": 0, "backward": 0}
    handle = model.hf.register_forward_pre_hook(lambda *_: calls.__setitem__("forward", calls["forward"] + 1))
    real_grad = torch.autograd.grad

    def counting_grad(*args, **kwargs):
        calls["backward"] += 1
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(engine.torch.autograd, "grad", counting_grad)
    try:
        result = _pair(model, "relp")
    finally:
        handle.remove()
    assert calls == {"forward": 2, "backward": 1}  # clean (with graph) + counterfactual (values only)
    assert (result.scores[0].abs().sum(dim=(1, 2)) > 0).all()  # every layer got scores


def test_relp_node_scores_conserve_the_logit_at_the_embeddings():
    """Zero baseline, bias-free model: RelP scores at the input embeddings sum to the metric (LRP conservation)."""
    model = _model("llama")
    result = attribute(model, prompt=CLEAN, answer=" are", method="relp", site="resid", layers=[0])
    # The residual stream after layer 0 carries the whole input: its RelP scores sum to the logit.
    logit = float(model.logits(model.tokenize(CLEAN))[0, -1, single_token_id(model, " are")])
    assert float(result.scores.sum()) == pytest.approx(logit, rel=1e-6)

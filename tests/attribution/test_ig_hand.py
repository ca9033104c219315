"""Attribution scores against independent hand computations on a tiny random Llama (float64).

Nothing here compares the code with its own output. The hand side talks to the Hugging Face modules directly:
token ids from the word-level vocabulary, forward pre-hooks on each layer's ``mlp.down_proj`` (the neuron site)
and on ``embed_tokens``, ``torch.autograd.grad`` of the metric, and Riemann sums written out step by step. Each
test catches a plausible slip: an IG sum divided by the wrong number of steps, the wrong integration nodes, a
flipped sign convention, a score read at the wrong position or a padding column.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny

from neurontrace.attribution.api import attribute, verify_top

CLEAN, CF = "the keys to the cabinet", "the key to the cabinets"


@pytest.fixture(scope="module")
def model():
    m = make_tiny("llama", seed=3)
    m.hf.double()
    return m


# ------------------------------------------------------------------ the hand side
def _ids(model, text: str) -> torch.Tensor:
    """Token ids straight from the vocabulary (the word tokenizer has no special tokens to add)."""
    return torch.tensor([model.tokenizer.convert_tokens_to_ids(text.split())])


def _tok(model, word: str) -> int:
    return model.tokenizer.convert_tokens_to_ids(word)


def _down(model, layer: int) -> torch.nn.Module:
    return model.hf.model.layers[layer].mlp.down_proj


def _run(model, ids, *, sites=None, embeds=None, rec=None):
    """Logits ``[B, T, V]``. ``sites``: layer -> tensor substituted for the down-projection input;
    ``embeds``: tensor substituted for the embedding output; ``rec``: dict filled with every layer's site input."""
    sites = sites or {}
    handles = []

    def pre(layer):
        def fn(_mod, args):
            x = sites.get(layer, args[0])
            if rec is not None:
                rec[layer] = x
            return (x, *args[1:]) if layer in sites else None

        return fn

    for layer in range(model.n_layers):
        handles.append(_down(model, layer).register_forward_pre_hook(pre(layer)))
    if embeds is not None:
        handles.append(model.hf.model.embed_tokens.register_forward_hook(lambda *_: embeds))
    try:
        return model.hf(input_ids=ids, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()


def _acts(model, ids) -> dict[int, torch.Tensor]:
    rec = {}
    with torch.no_grad():
        _run(model, ids, rec=rec)
    return {layer: x.detach() for layer, x in rec.items()}


def _embeds(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model.hf.model.embed_tokens(ids)


def _logit_diff(model, logits: torch.Tensor) -> torch.Tensor:
    """``logit(are) - logit(is)`` at the last position, one value per row."""
    return logits[:, -1, _tok(model, "are")] - logits[:, -1, _tok(model, "is")]


def _hand_ig_layer(model, ids, metric, start: torch.Tensor, end: torch.Tensor, layer: int, alphas):
    """``(end - start) * mean_j dm/da`` at ``a = start + alpha_j (end - start)``, layer ``layer`` only."""
    grad_sum = torch.zeros_like(start)
    for alpha in alphas:
        leaf = (start + alpha * (end - start)).detach().requires_grad_(True)
        with torch.enable_grad():
            value = metric(_run(model, ids, sites={layer: leaf}))[0]
            (g,) = torch.autograd.grad(value, [leaf])
        grad_sum += g
    return (end - start) * grad_sum / len(alphas)


def _alphas(rule: str, steps: int) -> list[float]:
    offset = 0.5 if rule == "midpoint" else 0.0
    return [(j + offset) / steps for j in range(steps)]


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-4) -> None:
    expected = expected.to(actual.dtype)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=1e-6 * float(expected.abs().max()))


# ------------------------------------------------------------------ integrated gradients on activations
@pytest.mark.parametrize(("rule", "steps"), [("midpoint", 3), ("left", 4), ("left", 1), ("midpoint", 2)])
def test_ig_on_activations_equals_a_hand_riemann_sum_for_pairs(model, rule, steps):
    """Paired: start at the clean activations, end at the counterfactual ones (score ~ m(patched) - m(clean))."""
    clean, cf = _ids(model, CLEAN), _ids(model, CF)
    a, a_cf = _acts(model, clean), _acts(model, cf)
    result = attribute(
        model, prompt=CLEAN, counterfactual=CF, answer=" are", contrast=" is", method="ig", steps=steps,
        ig_rule=rule,
    )  # fmt: skip
    metric = lambda logits: _logit_diff(model, logits)  # noqa: E731
    for layer in range(model.n_layers):
        hand = _hand_ig_layer(model, clean, metric, a[layer], a_cf[layer], layer, _alphas(rule, steps))
        _close(result.scores[0, layer], hand[0])


@pytest.mark.parametrize("rule", ["midpoint", "left"])
def test_ig_on_activations_equals_a_hand_riemann_sum_for_the_zero_baseline(model, rule):
    """Unpaired: the path runs from the zero baseline to the clean activations (score ~ m(clean) - m(0))."""
    clean = _ids(model, CLEAN)
    a = _acts(model, clean)
    steps = 3
    result = attribute(model, prompt=CLEAN, answer=" are", method="ig", steps=steps, ig_rule=rule)
    metric = lambda logits: logits[:, -1, _tok(model, "are")]  # noqa: E731
    for layer in range(model.n_layers):
        hand = _hand_ig_layer(
            model, clean, metric, torch.zeros_like(a[layer]), a[layer], layer, _alphas(rule, steps)
        )
        _close(result.scores[0, layer], hand[0])


def test_ig_with_many_steps_approaches_the_exact_layer_patch(model):
    """Sanity of the hand maths itself: at 24 midpoint steps the hand sum of a layer is the exact patch effect."""
    clean, cf = _ids(model, CLEAN), _ids(model, CF)
    a, a_cf = _acts(model, clean), _acts(model, cf)
    metric = lambda logits: _logit_diff(model, logits)  # noqa: E731
    with torch.no_grad():
        base = float(metric(_run(model, clean))[0])
        patched = float(metric(_run(model, clean, sites={1: a_cf[1]}))[0])
    hand = _hand_ig_layer(model, clean, metric, a[1], a_cf[1], 1, _alphas("midpoint", 24))
    assert float(hand.sum()) == pytest.approx(patched - base, rel=5e-3, abs=1e-6)


# ------------------------------------------------------------------ integrated gradients on inputs
def _hand_ig_inputs(model, ids, metric, e_start, e_end, start_acts, end_acts, alphas):
    """Embedding path ``e_start -> e_end``: embedding scores ``[T]`` and per-layer scores ``{layer: [T, d]}``."""
    g_e = torch.zeros_like(e_start)
    g_a = {layer: torch.zeros_like(x) for layer, x in start_acts.items()}
    for alpha in alphas:
        leaf = (e_start + alpha * (e_end - e_start)).detach().requires_grad_(True)
        rec = {}
        with torch.enable_grad():
            value = metric(_run(model, ids, embeds=leaf, rec=rec))[0]
            layers = sorted(rec)
            grads = torch.autograd.grad(value, [leaf] + [rec[layer] for layer in layers])
        g_e += grads[0]
        for layer, g in zip(layers, grads[1:], strict=True):
            g_a[layer] += g
    n = len(alphas)
    embed_scores = ((e_end - e_start) * g_e / n).sum(-1)
    layer_scores = {layer: (end_acts[layer] - start_acts[layer]) * g_a[layer] / n for layer in g_a}
    return embed_scores, layer_scores


@pytest.mark.parametrize("rule", ["midpoint", "left"])
def test_ig_on_inputs_equals_a_hand_riemann_sum_for_pairs(model, rule):
    clean, cf = _ids(model, CLEAN), _ids(model, CF)
    steps = 3
    result = attribute(
        model, prompt=CLEAN, counterfactual=CF, answer=" are", contrast=" is", method="ig-inputs",
        steps=steps, ig_rule=rule,
    )  # fmt: skip
    metric = lambda logits: _logit_diff(model, logits)  # noqa: E731
    emb, layers = _hand_ig_inputs(
        model, clean, metric, _embeds(model, clean), _embeds(model, cf), _acts(model, clean), _acts(model, cf),
        _alphas(rule, steps),
    )  # fmt: skip
    _close(result.extra["embed_scores"][0], emb[0])
    for layer in range(model.n_layers):
        _close(result.scores[0, layer], layers[layer][0])


def test_ig_on_inputs_equals_a_hand_riemann_sum_for_the_zero_baseline(model):
    clean = _ids(model, CLEAN)
    steps = 3
    result = attribute(model, prompt=CLEAN, answer=" are", method="ig-inputs", steps=steps)
    metric = lambda logits: logits[:, -1, _tok(model, "are")]  # noqa: E731
    e = _embeds(model, clean)
    zero_acts = {}
    with torch.no_grad():
        _run(model, clean, embeds=torch.zeros_like(e), rec=zero_acts)
    emb, layers = _hand_ig_inputs(
        model,
        clean,
        metric,
        torch.zeros_like(e),
        e,
        zero_acts,
        _acts(model, clean),
        _alphas("midpoint", steps),
    )
    _close(result.extra["embed_scores"][0], emb[0])
    for layer in range(model.n_layers):
        _close(result.scores[0, layer], layers[layer][0])


# ------------------------------------------------------------------ signs and positions
NODES = [(0, 0, 3), (0, 4, 17), (1, 1, 30), (1, 3, 5), (2, 2, 41), (2, 4, 0)]


def _patched(model, ids, metric, layer, pos, unit, value) -> float:
    site = _acts(model, ids)[layer].clone()
    site[0, pos, unit] = value
    with torch.no_grad():
        return float(metric(_run(model, ids, sites={layer: site}))[0])


def test_exact_scores_are_m_patched_minus_m_clean_for_pairs(model):
    clean = _ids(model, CLEAN)
    a_cf = _acts(model, _ids(model, CF))
    result = attribute(model, prompt=CLEAN, counterfactual=CF, answer=" are", contrast=" is", method="exact")
    metric = lambda logits: _logit_diff(model, logits)  # noqa: E731
    with torch.no_grad():
        base = float(metric(_run(model, clean))[0])
    for layer, pos, unit in NODES:
        patched = _patched(model, clean, metric, layer, pos, unit, a_cf[layer][0, pos, unit])
        assert float(result.scores[0, layer, pos, unit]) == pytest.approx(patched - base, rel=1e-5, abs=1e-7)


def test_exact_scores_are_m_clean_minus_m_zeroed_for_single_prompts(model):
    clean = _ids(model, CLEAN)
    result = attribute(model, prompt=CLEAN, answer=" are", method="exact")
    metric = lambda logits: logits[:, -1, _tok(model, "are")]  # noqa: E731
    with torch.no_grad():
        base = float(metric(_run(model, clean))[0])
    for layer, pos, unit in NODES:
        zeroed = _patched(model, clean, metric, layer, pos, unit, 0.0)
        assert float(result.scores[0, layer, pos, unit]) == pytest.approx(base - zeroed, rel=1e-5, abs=1e-7)


def test_top_nodes_carry_the_hand_activation_and_score_of_their_position(model):
    """AtP, zero baseline: score = a * dm/da; every top node's (layer, position, neuron) points at that value."""
    clean = _ids(model, CLEAN)
    rec = {}
    with torch.enable_grad():
        value = _run(model, clean, rec=rec)[0, -1, _tok(model, "are")]
        grads = torch.autograd.grad(value, [rec[layer] for layer in range(model.n_layers)])
    result = attribute(model, prompt=CLEAN, answer=" are", method="atp")
    top = result.top(8)
    assert len({n.position for n in top}) > 1  # the check spans several positions
    for n in top:
        a = float(rec[n.layer][0, n.position, n.neuron].detach())
        assert n.activation == pytest.approx(a, rel=1e-6, abs=1e-9)
        assert n.score == pytest.approx(
            a * float(grads[n.layer][0, n.position, n.neuron]), rel=1e-5, abs=1e-9
        )
        assert n.token == CLEAN.split()[n.position]


def test_verify_top_patches_the_reported_nodes(model):
    """``verify_top`` is on the result's scale (m(clean) - m(zeroed)) and patches the node it reports."""
    clean = _ids(model, CLEAN)
    result = attribute(model, prompt=CLEAN, answer=" are", method="atp")
    checked = verify_top(model, result, k=5, prompt=CLEAN, answer=" are")
    metric = lambda logits: logits[:, -1, _tok(model, "are")]  # noqa: E731
    with torch.no_grad():
        base = float(metric(_run(model, clean))[0])
    for n, value in zip(result.top(5, per_position=True), checked, strict=True):
        zeroed = _patched(model, clean, metric, n.layer, n.position, n.neuron, 0.0)
        assert value == pytest.approx(base - zeroed, rel=1e-5, abs=1e-7)


PAIRS = [
    {"clean_prefix": CLEAN, "patch_prefix": CF, "clean_answer": " are", "patch_answer": " is"},
    {
        "clean_prefix": "dogs run",
        "patch_prefix": "dog runs",
        "clean_answer": " are",
        "patch_answer": " is",
    },
]


def _hand_exact_position_sums(model, clean, cf, metric) -> torch.Tensor:
    """``[L, d]``: sum over positions of m(one neuron patched to its counterfactual value) - m(clean).

    The prompt runs alone (no padding); the T*d single-node patches of a layer go in one batch of T*d rows.
    """
    a, a_cf = _acts(model, clean), _acts(model, cf)
    T, d = a[0].shape[1:]
    with torch.no_grad():
        base = float(metric(_run(model, clean))[0])
        out = torch.zeros(model.n_layers, d, dtype=torch.float64)
        for layer in range(model.n_layers):
            site = a[layer].repeat(T * d, 1, 1)  # row r patches position r // d, unit r % d
            rows = torch.arange(T * d)
            site[rows, rows // d, rows % d] = a_cf[layer][0, rows // d, rows % d]
            values = metric(_run(model, clean.repeat(T * d, 1), sites={layer: site}))
            out[layer] = (values - base).view(T, d).sum(0)
    return out


def test_exact_and_atp_position_sums_of_a_left_padded_batch_match_each_prompt_alone(model):
    """Pairs of 5 and 2 tokens (both differing at position 0) share one left-padded batch: each score must come
    from its own columns."""
    metric = lambda logits: _logit_diff(model, logits)  # noqa: E731
    exact = attribute(model, pairs=PAIRS, method="exact", batch_size=2)
    atp = attribute(model, pairs=PAIRS, method="atp", batch_size=2)
    for b, pair in enumerate(PAIRS):
        clean, cf = _ids(model, pair["clean_prefix"]), _ids(model, pair["patch_prefix"])
        _close(exact.scores_sum[b], _hand_exact_position_sums(model, clean, cf, metric), rtol=1e-4)
        rec = {}
        with torch.enable_grad():
            value = metric(_run(model, clean, rec=rec))[0]
            grads = torch.autograd.grad(value, [rec[layer] for layer in range(model.n_layers)])
        a_cf = _acts(model, cf)
        hand = torch.stack([((a_cf[li] - rec[li]) * g)[0].sum(0) for li, g in enumerate(grads)])
        _close(atp.scores_sum[b], hand.detach())
        assert float(exact.metric_clean[b]) == pytest.approx(float(value.detach()), rel=1e-6)

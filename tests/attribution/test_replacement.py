"""The RelP replacement model: identical forward values, and the LRP conservation identity of METHOD.md §2."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, make_tiny

from neurontrace.attribution.replacement import RelPRules, replacement_model
from neurontrace.hooks import add_input_hook, add_output_hook

PROMPTS = ["the keys to the cabinet are", "a dog runs", "what capital"]
# Families with no additive biases: sum over inputs of e * dm/de = m exactly.
BIAS_FREE = ["llama", "mistral", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "olmo", "olmo2"]
# Families with biases (qkv/MLP/LayerNorm): the identity needs the bias terms b * dm/db counted too.
WITH_BIASES = ["gpt2", "gpt_neox", "qwen2"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_forward_equivalence_batched_padded_and_single(family, attn):
    if family == "gemma2" and attn == "sdpa":
        pytest.skip("Gemma 2 has eager attention only (soft-capped scores)")
    model = make_tiny(family, attn_implementation=attn)
    batch = model.tokenize(PROMPTS)
    plain = model.logits(batch)
    with replacement_model(model) as rep, torch.no_grad():
        replaced = rep.logits(model.forward(batch))
        singles = [rep.logits(model.forward(model.tokenize(p)))[0] for p in PROMPTS]
    torch.testing.assert_close(replaced, plain, rtol=1e-5, atol=1e-5)
    for row, single in enumerate(singles):
        torch.testing.assert_close(batch.unpad(replaced, row), single, rtol=1e-5, atol=1e-5)


def test_replacement_keeps_the_causal_mask():
    """A later token must not change an earlier position's logits (the reference code's bug)."""
    model = make_tiny("llama")
    a, b = model.tokenize("the keys to the cabinet"), model.tokenize("the keys to the table")
    with replacement_model(model), torch.no_grad():
        la, lb = model.forward(a).logits, model.forward(b).logits
    # exact: one shape, so the same kernels; the last token reaches the first four positions only through
    # masked attention weights, which are exactly 0
    torch.testing.assert_close(la[0, :4], lb[0, :4], rtol=0, atol=0)
    assert (la[0, 4] - lb[0, 4]).abs().max() > 1e-4


def _input_leaves(model):
    """Make the embedding outputs leaves that require grad; returns (handles, list of leaves)."""
    leaves: list[torch.Tensor] = []

    def leaf(y):
        y = y.detach().requires_grad_(True)
        leaves.append(y)
        return y

    modules = [model.embed] + ([model.module(model.adapter.pos_embed)] if model.adapter.pos_embed else [])
    return [add_output_hook(m, leaf) for m in modules], leaves


def _conservation_terms(model, prompt: str, with_biases: bool):
    batch = model.tokenize(prompt)
    handles, leaves = _input_leaves(model)
    biases = [p for n, p in model.hf.named_parameters() if n.endswith(".bias")] if with_biases else []
    for p in model.hf.parameters():
        p.requires_grad_(False)
    for p in biases:
        p.requires_grad_(True)
    try:
        with replacement_model(model) as rep:
            logits = rep.logits(model.forward(batch))
        target = int(logits[0, -1].argmax())
        m = logits[0, -1, target]
        grads = torch.autograd.grad(
            m, leaves + biases, allow_unused=True
        )  # q/k biases sit behind the AH rule
    finally:
        for h in handles:
            h.remove()
    inputs = sum(float((x * g).detach().sum()) for x, g in zip(leaves, grads[: len(leaves)], strict=True))
    bias_terms = sum(
        float((b * g).sum()) for b, g in zip(biases, grads[len(leaves) :], strict=True) if g is not None
    )
    return float(m.detach()), inputs, bias_terms


@pytest.mark.parametrize("family", BIAS_FREE)
def test_conservation_bias_free(family):
    model = make_tiny(family)
    for prompt in PROMPTS:
        m, inputs, _ = _conservation_terms(model, prompt, with_biases=False)
        assert inputs == pytest.approx(m, rel=1e-4, abs=1e-5), f"{family}: sum e*dm/de={inputs} vs m={m}"


@pytest.mark.parametrize("family", WITH_BIASES)
def test_conservation_with_bias_terms(family):
    model = make_tiny(family)
    for prompt in PROMPTS:
        m, inputs, bias_terms = _conservation_terms(model, prompt, with_biases=True)
        assert inputs + bias_terms == pytest.approx(m, rel=1e-4, abs=1e-5)
        assert abs(bias_terms) > 1e-3  # the biases really matter: inputs alone do not conserve


def test_conservation_fails_without_the_rules():
    """A control: plain gradients do not conserve (so the test above can fail)."""
    model = make_tiny("llama")
    handles, leaves = _input_leaves(model)
    try:
        with replacement_model(
            model, RelPRules(norm=False, attention=False, nonlinearity=False, gate="plain")
        ):
            logits = model.forward(model.tokenize(PROMPTS[0])).logits
        m = logits[0, -1].max()
        (g,) = torch.autograd.grad(m, leaves)
    finally:
        for h in handles:
            h.remove()
    assert float((leaves[0] * g).sum()) != pytest.approx(float(m), rel=1e-2)


@pytest.mark.parametrize("gate", ["half", "detach"])
def test_gate_rules_split_the_gradient(gate):
    """d a / d g and d a / d u at a neuron follow the half rule (0.5 u, 0.5 g) or the no-gate variant (0, g)."""
    model = make_tiny("llama")
    layer = 1
    mlp = model.layer_module(layer, "mlp")
    seen = {}
    for p in model.hf.parameters():
        p.requires_grad_(True)
    with replacement_model(
        model, RelPRules(gate=gate)
    ):  # recorders go after the rules: they see rule outputs
        hs = [
            add_output_hook(mlp.act_fn, lambda y: seen.__setitem__("g", y)),
            add_output_hook(mlp.up_proj, lambda y: seen.__setitem__("u", y)),
            add_input_hook(mlp.down_proj, lambda x: seen.__setitem__("a", x)),
        ]
        try:
            model.forward(model.tokenize("the keys"))
        finally:
            for h in hs:
                h.remove()
    a, g, u = seen["a"], seen["g"], seen["u"]
    dg, du = torch.autograd.grad(a[0, -1, 3], [g, u], allow_unused=True)
    dg = torch.zeros_like(g) if dg is None else dg
    expected_dg = 0.5 * u[0, -1, 3] if gate == "half" else torch.tensor(0.0)
    expected_du = 0.5 * g[0, -1, 3] if gate == "half" else g[0, -1, 3]
    torch.testing.assert_close(dg[0, -1, 3], expected_dg.detach())
    torch.testing.assert_close(du[0, -1, 3], expected_du.detach())

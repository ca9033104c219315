"""Slow tier: the second real architecture, Gemma 3 270M (GeGLU, (1+w) RMSNorm). Run with `make test-slow`."""

from __future__ import annotations

import pytest
import torch
from conftest import hand_neurons

from neurontrace.hooks import add_input_hook
from neurontrace.interventions import Edit, intervene
from neurontrace.sites import capture

pytestmark = pytest.mark.gemma


@pytest.fixture(scope="module")
def gemma():
    from neurontrace.models.loading import load_model

    return load_model("gemma3-270m", device="cpu")


def test_gemma_adapter_and_neurons(gemma):
    assert gemma.adapter.family == "Gemma 3 (text)"
    batch = gemma.tokenize(["The keys to the cabinet", "Paris is the capital of"])
    inputs = {}
    handle = add_input_hook(gemma.layer_module(5, "mlp"), lambda x: inputs.__setitem__(5, x))
    try:
        acts = capture(gemma, batch, layers=[5])
    finally:
        handle.remove()
    torch.testing.assert_close(acts.get(5), hand_neurons(gemma, 5, inputs[5]), rtol=1e-4, atol=1e-4)
    with intervene(gemma, Edit(layer=5, op="scale", value=1.0)):
        # exact: the same forward (same kernels, same shapes), and x * 1.0 is x
        torch.testing.assert_close(gemma.logits(batch), acts.logits, rtol=0, atol=0)


def test_gemma_agreement(gemma):
    from neurontrace.tokens import single_token_id

    logits = gemma.logits(gemma.tokenize(["The keys to the cabinet", "The key to the cabinets"]))[:, -1]
    are, is_ = single_token_id(gemma, " are"), single_token_id(gemma, " is")
    diff = logits[:, are] - logits[:, is_]
    assert diff[0] > diff[1]


def test_gemma_relp_replacement_is_exact_and_conserves(gemma):
    from neurontrace.attribution.engine import frozen_parameters
    from neurontrace.attribution.replacement import replacement_model
    from neurontrace.hooks import add_output_hook

    batch = gemma.tokenize(["The keys to the cabinet", "Hi"])
    plain = gemma.logits(batch)
    leaves = []

    def leaf(y):
        y = y.detach().requires_grad_(True)
        leaves.append(y)
        return y

    with frozen_parameters(gemma), replacement_model(gemma) as rep:
        handle = add_output_hook(gemma.embed, leaf)
        try:
            logits = rep.logits(gemma.forward(batch))
        finally:
            handle.remove()
    torch.testing.assert_close(logits.detach(), plain, rtol=1e-4, atol=1e-4)
    m = logits[0, -1].max()
    (g,) = torch.autograd.grad(m, leaves)
    total = float((leaves[0][0] * g[0]).sum())
    assert total == pytest.approx(float(m), rel=1e-3)

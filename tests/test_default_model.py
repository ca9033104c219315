"""Behaviour of the embedded default model (SmolLM2-135M), loaded offline from the packaged GGUF."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import hand_neurons

from neurontrace.hooks import add_input_hook, add_output_hook
from neurontrace.models.loading import file_sha256, gguf_cache_dir, resolve_spec
from neurontrace.sites import capture
from neurontrace.tokens import single_token_id

pytestmark = pytest.mark.default_model


def test_default_model_is_the_llama_smollm2(default_model):
    m = default_model
    assert m.adapter.family == "Llama"
    assert (m.n_layers, m.d_ff, m.d_model) == (30, 1536, 576)


def test_cached_copy_is_keyed_by_the_gguf_hash(default_model):
    from pathlib import Path

    gguf = Path(resolve_spec("smollm2-135m").location)
    folder = gguf_cache_dir(gguf)
    source = json.loads((folder / "neurontrace-source.json").read_text())
    assert source["sha256"] == file_sha256(gguf) and folder.name.endswith(source["sha256"][:16])
    assert (folder / "model.safetensors").is_file()
    assert default_model.source == str(folder)


@pytest.mark.parametrize(
    ("prompt", "plural"),
    [("The keys to the cabinet", True), ("The key to the cabinets", False)],
)
def test_subject_verb_agreement(default_model, prompt, plural):
    m = default_model
    logits = m.logits(m.tokenize(prompt))[0, -1]
    diff = float(logits[single_token_id(m, " are")] - logits[single_token_id(m, " is")])
    assert (diff > 0) == plural, f"{prompt!r}: logit(' are') - logit(' is') = {diff:.3f}"


def test_real_model_batch_padding_and_hand_computed_neurons(default_model):
    m = default_model
    prompts = ["The keys to the cabinet", "The author that the guards like", "Hi"]
    batch = m.tokenize(prompts)
    inputs = {}
    handle = add_input_hook(m.layer_module(12, "mlp"), lambda x: inputs.__setitem__(12, x))
    try:
        acts = capture(m, batch, layers=[12])
    finally:
        handle.remove()
    torch.testing.assert_close(acts.get(12), hand_neurons(m, 12, inputs[12]), rtol=1e-4, atol=1e-4)
    for row, prompt in enumerate(prompts):
        alone = capture(m, m.tokenize(prompt), layers=[12])
        torch.testing.assert_close(batch.unpad(acts.logits, row), alone.logits[0], rtol=1e-4, atol=2e-4)
        torch.testing.assert_close(acts.unpadded(row, 12), alone.unpadded(0, 12), rtol=1e-4, atol=1e-4)


def test_default_model_relp_conserves_the_logit(default_model):
    from neurontrace.attribution.engine import frozen_parameters
    from neurontrace.attribution.replacement import replacement_model

    m = default_model
    leaves = []

    def leaf(y):
        y = y.detach().requires_grad_(True)
        leaves.append(y)
        return y

    batch = m.tokenize("The keys to the cabinet")
    with frozen_parameters(m), replacement_model(m) as rep:
        handle = add_output_hook(m.embed, leaf)
        try:
            logits = rep.logits(m.forward(batch))
        finally:
            handle.remove()
    torch.testing.assert_close(logits.detach(), m.logits(batch), rtol=1e-4, atol=1e-4)
    target = logits[0, -1, single_token_id(m, " are")]
    (g,) = torch.autograd.grad(target, leaves)
    assert float((leaves[0] * g).sum()) == pytest.approx(float(target), rel=1e-4)


def test_zeroing_the_top_relp_neurons_breaks_agreement_and_random_ones_do_not(default_model):
    """Issue 6 acceptance on the real model: the RelP circuit is causal, a random node set is not."""
    from neurontrace.attribution.api import attribute
    from neurontrace.attribution.metrics import make_metric
    from neurontrace.interventions import Edit, intervene
    from neurontrace.tasks import generate_sva, train_test_split
    from neurontrace.tokens import tokenize_pairs

    m = default_model
    train, test = train_test_split(
        generate_sva("nounpp", n=48, seed=0, tokenizer=m.tokenizer), test_fraction=1 / 3
    )
    scores = attribute(m, pairs=train, method="relp").mean_scores
    L, T, d = scores.shape
    clean, _ = tokenize_pairs(m, [p.clean_prefix for p in test], [p.patch_prefix for p in test])
    metric = make_metric(
        "logit-diff",
        answer=[single_token_id(m, p.clean_answer) for p in test],
        contrast=[single_token_id(m, p.patch_answer) for p in test],
    )

    def preference(flat_indices) -> float:
        edits = [
            Edit(layer=int(i) // (T * d), neurons=[int(i) % d], positions=[(int(i) // d) % T], op="zero")
            for i in flat_indices
        ]
        with intervene(m, edits):
            return float(metric(m.logits(clean)).mean())

    base = preference([])
    top = preference(scores.flatten().abs().argsort(descending=True)[:50])
    rand = preference(torch.randperm(L * T * d, generator=torch.Generator().manual_seed(0))[:50])
    assert base > 1.0
    assert top < 0.5 * base  # sharply reduced
    assert abs(rand - base) < 0.1 * base  # random neurons: no real change

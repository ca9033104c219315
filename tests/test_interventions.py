"""Interventions: identity edits change nothing, zeroing equals weight surgery, positions follow left padding,
patching equals the other run, and hooks are always removed."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, make_tiny

from neurontrace.errors import InterventionError, NeurontraceError
from neurontrace.interventions import Edit, intervene
from neurontrace.sites import capture

PROMPTS = ["the keys to the cabinet are", "a dog runs", "what capital"]


def _n_hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.hf.modules())


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_interventions_leave_logits_unchanged(family):
    model = make_tiny(family)
    batch = model.tokenize(PROMPTS)
    clean = model.logits(batch)
    edits = [Edit(layer=l, op="scale", value=1.0) for l in range(model.n_layers)]
    edits += [Edit(layer=l, op="add", value=0.0, positions=[0, -1]) for l in range(model.n_layers)]
    edits += [Edit(layer=1, op="scale", value=1.0, site=s) for s in ("mlp_out", "attn_out", "resid")]
    with intervene(model, edits):
        edited = model.logits(batch)
    # exact: the same forward (same kernels, same shapes), and x * 1.0 and x + 0.0 are x in IEEE arithmetic
    torch.testing.assert_close(edited, clean, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_zeroing_a_neuron_equals_zeroing_its_down_projection_column(family):
    model = make_tiny(family)
    batch = model.tokenize(PROMPTS)
    clean = model.logits(batch)
    layer, neuron = 1, 7
    with intervene(model, Edit(layer=layer, neurons=[neuron], op="zero")):
        zeroed = model.logits(batch)
    weight = model.down_proj(layer).weight
    saved = weight.detach().clone()
    with torch.no_grad():
        if model.adapter.down_is_conv1d:
            weight[neuron, :] = 0
        else:
            weight[:, neuron] = 0
    try:
        surgery = model.logits(batch)
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    assert (zeroed - clean).abs().max() > 1e-5  # the neuron matters
    torch.testing.assert_close(zeroed, surgery, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batch_equals_each_prompt_alone(family):
    model = make_tiny(family)
    batch = model.tokenize(PROMPTS)
    assert batch.pad.tolist() != [0, 0, 0]
    acts = capture(model, batch, sites=("neurons", "resid"))
    for row, prompt in enumerate(PROMPTS):
        alone = capture(model, model.tokenize(prompt), sites=("neurons", "resid"))
        torch.testing.assert_close(batch.unpad(acts.logits, row), alone.logits[0], rtol=1e-5, atol=1e-5)
        for layer in range(model.n_layers):
            for site in ("neurons", "resid"):
                torch.testing.assert_close(
                    acts.unpadded(row, layer, site), alone.unpadded(0, layer, site), rtol=1e-5, atol=5e-5
                )


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_positions_are_prompt_relative_under_left_padding(family):
    model = make_tiny(family)
    batch = model.tokenize(PROMPTS)
    for positions in ([0], [-1], [1, -2]):
        edit = Edit(layer=1, neurons=[3, 5], positions=positions, op="set", value=torch.tensor([2.0, -1.0]))
        with intervene(model, edit):
            together = model.logits(batch)
        for row, prompt in enumerate(PROMPTS):
            single = model.tokenize(prompt)
            if not all(-single.width <= p < single.width for p in positions):
                continue
            with intervene(model, edit):
                alone = model.logits(single)[0]
            torch.testing.assert_close(batch.unpad(together, row), alone, rtol=1e-5, atol=1e-5)


def test_edit_touches_only_the_positions_and_neurons_asked():
    model = make_tiny("llama")
    batch = model.tokenize(PROMPTS)
    clean = capture(model, batch).get(1)
    seen = {}
    edit = Edit(layer=1, neurons=[4], positions=[1], op="add", value=10.0)
    with intervene(model, edit):
        from neurontrace.sites import hook_site

        handle = hook_site(model, "neurons", 1, lambda x: seen.__setitem__("x", x.detach()))
        try:
            model.logits(batch)
        finally:
            handle.remove()
    diff = seen["x"] - clean
    for row in range(batch.size):
        col = batch.column(row, 1)
        assert diff[row, col, 4] == pytest.approx(10.0)
        diff[row, col, 4] = 0
    assert diff.abs().max() == 0


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_patch_equals_running_with_the_other_prompts_activations(family):
    model = make_tiny(family)
    clean, other = model.tokenize(["the keys to the cabinet"]), model.tokenize(["the key to the cabinets"])
    other_acts = capture(model, other)
    # Patching every neuron of the last layer at every position gives the other prompt's final MLP output.
    last = model.n_layers - 1
    with intervene(model, Edit(layer=last, op="patch", value=other_acts.get(last))):
        patched = capture(model, clean, sites=("mlp_out",), layers=[last])
    reference = capture(model, other, sites=("mlp_out",), layers=[last])
    torch.testing.assert_close(
        patched.get(last, "mlp_out"), reference.get(last, "mlp_out"), rtol=1e-5, atol=1e-6
    )
    # Patching the last residual stream reproduces the other run's logits.
    other_resid = capture(model, other, sites="resid", layers=[last]).get(last, "resid")
    with intervene(model, Edit(layer=last, op="patch", value=other_resid, site="resid")):
        torch.testing.assert_close(model.logits(clean), other_acts.logits, rtol=1e-5, atol=1e-5)


def test_mean_and_set_and_scale_values():
    model = make_tiny("qwen2")
    batch = model.tokenize(PROMPTS)
    mean = torch.randn(model.d_ff)
    seen = {}
    from neurontrace.sites import hook_site

    edits = [Edit(layer=0, op="mean", value=mean), Edit(layer=2, neurons=[1, 2], op="scale", value=3.0)]
    with intervene(model, edits):
        handles = [
            hook_site(model, "neurons", l, lambda x, l=l: seen.__setitem__(l, x.detach())) for l in (0, 2)
        ]
        try:
            model.logits(batch)
        finally:
            for h in handles:
                h.remove()
    assert torch.equal(seen[0], mean.expand_as(seen[0]))  # a copy of the given value: exact
    with intervene(model, edits[0]):
        clean = capture(model, batch).get(2)
    torch.testing.assert_close(seen[2][..., [1, 2]], 3 * clean[..., [1, 2]])


def test_hooks_removed_on_exit_and_after_exception():
    model = make_tiny("llama")
    batch = model.tokenize(PROMPTS)
    before = _n_hooks(model)
    clean = model.logits(batch)
    with pytest.raises(RuntimeError, match="boom"), intervene(model, Edit(layer=0, op="zero")):
        assert _n_hooks(model) > before
        raise RuntimeError("boom")
    assert _n_hooks(model) == before
    torch.testing.assert_close(model.logits(batch), clean, rtol=0, atol=0)  # the same forward again: exact


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (Edit(layer=9, op="zero"), "layer 9 does not exist"),
        (Edit(layer=0, neurons=[48], op="zero"), "unit 48 does not exist"),
        (Edit(layer=0, op="scale"), "needs a value"),
        (Edit(layer=0, op="explode", value=1.0), "unknown intervention"),
        (Edit(layer=0, neurons=[1, 2], op="set", value=torch.ones(3)), "3 entries for 2 neurons"),
        (Edit(layer=0, op="zero", site="logits"), "unknown site"),
        (Edit(layer=0, op="patch", value=1.0), "needs the other run"),
    ],
)
def test_bad_edits_are_clear_errors(edit, message):
    model = make_tiny("llama")
    batch = model.tokenize(PROMPTS)
    with pytest.raises(NeurontraceError, match=message), intervene(model, edit):
        model.logits(batch)


def test_position_outside_prompt_is_an_error():
    model = make_tiny("llama")
    batch = model.tokenize(PROMPTS)
    with (
        pytest.raises(InterventionError, match="position 5 is outside prompt"),
        intervene(model, Edit(layer=0, positions=[5], op="zero")),
    ):
        model.logits(batch)
    assert _n_hooks(model) == 0


def test_cache_offset_across_transformers_versions():
    """generate() passes the cache offset differently across transformers releases; all forms are read."""
    from neurontrace.hooks import _cache_offset

    class Cache:
        def get_seq_length(self) -> int:
            return 7

    assert _cache_offset({"cache_position": torch.tensor([3, 4])}) == 3
    assert _cache_offset({"past_key_values": Cache()}) == 7  # transformers 5.23
    assert _cache_offset({"cache": Cache(), "position_ids": torch.tensor([[7]])}) == 7  # 5.24
    assert _cache_offset({"position_ids": torch.tensor([[5]])}) == 5
    assert _cache_offset({}) == 0

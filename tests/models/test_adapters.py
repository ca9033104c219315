"""Every family's adapter names real modules, covers every norm, and reads neuron activations correctly."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, hand_neurons, make_tiny

from neurontrace.errors import UnsupportedArchitectureError
from neurontrace.hooks import add_input_hook
from neurontrace.models.adapters import ADAPTERS, adapter_for
from neurontrace.models.model import get_module
from neurontrace.sites import capture


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_paths_resolve(family):
    model = make_tiny(family)
    a = model.adapter
    for path in (a.embed, a.final_norm, a.unembed, *(p for p in [a.pos_embed] if p)):
        get_module(model.hf, path)
    for layer in range(model.n_layers):
        for path in (
            a.attn,
            a.attn_out,
            a.mlp,
            a.down,
            a.act,
            a.up,
            *(p for p in (a.gate, a.q, a.k, a.v, a.qkv) if p),
        ):
            model.layer_module(layer, path)
    assert model.d_ff == 48 and model.w_out(0).shape == (48, model.d_model)


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_names_every_norm(family):
    """The RelP norm rule needs every normalisation module; a missed one would silently break conservation."""
    model = make_tiny(family)
    a = model.adapter
    named = {id(model.final_norm)}
    for layer in range(model.n_layers):
        for path in (*a.norms, *a.attn_norms):
            named.add(id(model.layer_module(layer, path)))
    found = {
        name
        for name, m in model.hf.named_modules()
        if isinstance(m, torch.nn.LayerNorm) or type(m).__name__.endswith(("RMSNorm", "LayerNorm"))
    }
    missed = [name for name in found if id(get_module(model.hf, name)) not in named]
    assert not missed, f"norm modules not in the adapter: {missed}"


def test_v_column_mask_matches_value_split():
    """Fused q/k/v projections: the mask marks exactly the columns the model uses as values."""
    model = make_tiny("gpt_neox")
    qkv = model.layer_module(0, model.adapter.qkv)
    mask = model.adapter.v_column_mask(model.config, qkv.out_features)
    heads, head_dim = model.config.num_attention_heads, model.d_model // model.config.num_attention_heads
    out = torch.arange(qkv.out_features).view(1, 1, heads, 3 * head_dim).transpose(1, 2)
    _, _, v = out.chunk(3, dim=-1)  # how GPT-NeoX splits its fused output
    assert set(v.flatten().tolist()) == set(mask.nonzero().flatten().tolist())
    phi = make_tiny("phi3")
    qkv = phi.layer_module(0, phi.adapter.qkv)
    mask = phi.adapter.v_column_mask(phi.config, qkv.out_features)
    n_kv, hd = phi.config.num_key_value_heads, phi.d_model // phi.config.num_attention_heads
    assert mask.sum() == n_kv * hd and mask[-n_kv * hd :].all()


@pytest.mark.parametrize("family", FAMILIES)
def test_captured_neurons_equal_hand_computation(family):
    model = make_tiny(family)
    batch = model.tokenize(["the keys to the cabinet are", "a dog runs"])
    mlp_inputs = {}
    handles = [
        add_input_hook(
            model.layer_module(layer, model.adapter.mlp),
            lambda x, layer=layer: mlp_inputs.__setitem__(layer, x),
        )
        for layer in range(model.n_layers)
    ]
    try:
        acts = capture(model, batch)
    finally:
        for h in handles:
            h.remove()
    for layer in range(model.n_layers):
        expected = hand_neurons(model, layer, mlp_inputs[layer])
        got = acts.get(layer)
        assert got.shape == (2, batch.width, model.d_ff)
        assert got.abs().max() > 1e-2  # not a degenerate all-zero site
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_unknown_architecture_error_names_families_and_file():
    with pytest.raises(UnsupportedArchitectureError) as info:
        adapter_for("bert")
    message = str(info.value)
    assert "'bert'" in message and "Llama" in message and "GPT-NeoX" in message
    assert "src/neurontrace/models/adapters.py" in message and "\n" not in message


def test_every_family_has_a_tiny_test_model():
    tested = {make_tiny(f).adapter.family for f in FAMILIES}
    assert tested == {a.family for a in ADAPTERS}

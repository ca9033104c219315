"""SAEs in SAELens's format: reading both cfg layouts, writing, encoding by hand, and splicing that keeps logits."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny

from neurontrace.dictionaries import SAE, load_sae, save_sae, site_of_hook, splice
from neurontrace.errors import NeurontraceError
from neurontrace.sites import site_width


def random_sae(
    d_in: int, d_sae: int, site: str, layer: int, architecture: str = "standard", seed: int = 0
) -> SAE:
    g = torch.Generator().manual_seed(seed)
    w_enc = torch.randn(d_in, d_sae, generator=g) / d_in**0.5
    threshold = torch.rand(d_sae, generator=g) * 0.1 if architecture == "jumprelu" else None
    return SAE(w_enc, torch.randn(d_sae, generator=g) * 0.1, torch.randn(d_sae, d_in, generator=g) / d_sae**0.5,
               torch.randn(d_in, generator=g) * 0.1, site, layer, architecture, 5 if architecture == "topk" else None,
               threshold)  # fmt: skip


@pytest.fixture(scope="module")
def model():
    return make_tiny("llama")


@pytest.mark.parametrize("site", ["resid", "mlp_out", "attn_out", "neurons"])
@pytest.mark.parametrize("architecture", ["standard", "jumprelu", "topk"])
def test_splicing_keeps_the_logits_and_records_latents_and_errors(model, site, architecture):
    batch = model.tokenize(["the keys to the cabinet", "the dog near the table is"])
    want = model.logits(batch)
    sae = random_sae(site_width(model, site), 64, site, 1, architecture)
    with splice(model, sae) as seen:
        got = model.logits(batch)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    (latents,), (errors,) = seen.latents, seen.errors
    assert latents.shape == (*batch.input_ids.shape, 64) and errors.shape == (
        *batch.input_ids.shape,
        sae.d_in,
    )
    assert (
        errors.abs().max() > 1e-3
    )  # a random dictionary reconstructs badly: the error term carries the rest
    if architecture == "topk":
        assert int((latents != 0).sum(-1).max()) <= 5
    torch.testing.assert_close(model.logits(batch), want)  # the hook is gone afterwards


def test_encoding_by_hand():
    eye = torch.eye(3)
    base = dict(W_enc=eye, b_enc=torch.zeros(3), W_dec=eye, b_dec=torch.zeros(3), site="resid", layer=0)
    x = torch.tensor([[0.5, -1.0, 2.0]])
    assert SAE(**base).encode(x).tolist() == [[0.5, 0.0, 2.0]]
    jump = SAE(**base, architecture="jumprelu", threshold=torch.tensor([0.6, 0.0, 1.0]))
    assert jump.encode(x).tolist() == [[0.0, 0.0, 2.0]]  # 0.5 is under its threshold
    top = SAE(**base, architecture="topk", k=1)
    assert top.encode(x).tolist() == [[0.0, 0.0, 2.0]]
    shifted = SAE(**{**base, "b_dec": torch.tensor([1.0, 0.0, 0.0])}, apply_b_dec_to_input=True)
    assert shifted.encode(x).tolist() == [[0.0, 0.0, 2.0]] and shifted.decode(shifted.encode(x)).tolist() == [
        [1.0, 0.0, 2.0]
    ]


@pytest.mark.parametrize("architecture", ["standard", "jumprelu", "topk"])
def test_save_writes_the_saelens_6_layout_and_loads_back(tmp_path, architecture):
    sae = random_sae(32, 48, "mlp_out", 2, architecture)
    folder = save_sae(sae, tmp_path / "sae")
    cfg = json.loads((folder / "cfg.json").read_text())
    # the fields SAELens 6 reads (its documented cfg.json), with the hook point in metadata
    assert {"architecture", "d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input", "normalize_activations",
            "metadata"} <= set(cfg)  # fmt: skip
    assert cfg["metadata"]["hook_name"] == "blocks.2.hook_mlp_out" and (cfg["d_in"], cfg["d_sae"]) == (32, 48)
    back = load_sae(folder)
    assert (back.site, back.layer, back.architecture, back.k) == ("mlp_out", 2, architecture, sae.k)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
        a, b = getattr(sae, name), getattr(back, name)
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b))  # saved and loaded: a copy


def test_the_older_cfg_layout_is_read(tmp_path):
    from safetensors.torch import save_file

    sae = random_sae(32, 16, "resid", 3, "topk")
    save_file({"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec},
              tmp_path / "sae_weights.safetensors")  # fmt: skip
    cfg = {"hook_name": "blocks.4.hook_resid_pre", "hook_layer": 4, "architecture": "standard", "d_in": 32,
           "d_sae": 16, "activation_fn": "topk", "activation_fn_kwargs": {"k": 5}, "normalize_activations": "none"}  # fmt: skip
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    back = load_sae(tmp_path)
    assert (back.site, back.layer, back.architecture, back.k) == ("resid", 3, "topk", 5)


@pytest.mark.parametrize(
    "hook, want",
    [("blocks.0.hook_resid_post", ("resid", 0)), ("blocks.5.hook_resid_pre", ("resid", 4)),
     ("blocks.2.hook_mlp_out", ("mlp_out", 2)), ("blocks.2.hook_attn_out", ("attn_out", 2)),
     ("blocks.7.mlp.hook_post", ("neurons", 7))],
)  # fmt: skip
def test_hook_names_map_to_sites(hook, want):
    assert site_of_hook(hook) == want


def test_bad_dictionaries_are_one_line_errors(tmp_path, model):
    with pytest.raises(NeurontraceError, match=r"cfg\.json is missing"):
        load_sae(tmp_path)
    with pytest.raises(NeurontraceError, match="embeddings"):
        site_of_hook("blocks.0.hook_resid_pre")
    with pytest.raises(NeurontraceError, match="not one neurontrace splices into"):
        site_of_hook("blocks.0.attn.hook_z")
    with pytest.raises(NeurontraceError, match="expected"):
        SAE(torch.zeros(4, 8), torch.zeros(7), torch.zeros(8, 4), torch.zeros(4), "resid", 0)
    with pytest.raises(NeurontraceError, match="needs k"):
        SAE(torch.zeros(4, 8), torch.zeros(8), torch.zeros(8, 4), torch.zeros(4), "resid", 0, "topk")
    with (
        pytest.raises(NeurontraceError, match="reads 4 values"),
        splice(model, SAE(torch.zeros(4, 8), torch.zeros(8), torch.zeros(8, 4), torch.zeros(4), "resid", 0)),
    ):
        pass
    sae_dir = save_sae(random_sae(8, 4, "resid", 0), tmp_path / "x")
    cfg = json.loads((sae_dir / "cfg.json").read_text())
    (sae_dir / "cfg.json").write_text(
        json.dumps({**cfg, "normalize_activations": "expected_average_only_in"})
    )
    with pytest.raises(NeurontraceError, match="normalize_activations"):
        load_sae(sae_dir)

"""SAELens itself reads what neurontrace writes, and neurontrace reads what SAELens writes, with equal encodings.

Runs where ``sae_lens`` is importable (a separate environment: it pulls transformer-lens, datasets, wandb) and is
skipped otherwise. Tiny random dictionaries (d_in 16, d_sae 32), the three architectures neurontrace supports.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, fields, replace

import pytest
import torch

sae_lens = pytest.importorskip("sae_lens")

from neurontrace.dictionaries import SAE, load_sae, save_sae  # noqa: E402
from neurontrace.errors import NeurontraceError  # noqa: E402

D_IN, D_SAE, K = 16, 32, 5
ARCHITECTURES = ["standard", "jumprelu", "topk"]
HOOK = "blocks.2.hook_mlp_out"


def random_sae(architecture: str, apply_b_dec_to_input: bool, seed: int = 0) -> SAE:
    g = torch.Generator().manual_seed(seed)
    threshold = torch.rand(D_SAE, generator=g) * 0.5 if architecture == "jumprelu" else None
    return SAE(torch.randn(D_IN, D_SAE, generator=g) / D_IN**0.5, torch.randn(D_SAE, generator=g) * 0.1,
               torch.randn(D_SAE, D_IN, generator=g) / D_SAE**0.5, torch.randn(D_IN, generator=g) * 0.1,
               "mlp_out", 2, architecture, K if architecture == "topk" else None, threshold,
               apply_b_dec_to_input, {"model_name": "tiny-llama"})  # fmt: skip


def random_saelens(architecture: str, seed: int = 1, **cfg_kwargs):
    """An SAE built by SAELens's own classes, its parameters set to random values."""
    from sae_lens.saes.sae import SAEMetadata

    sae_cls, cfg_cls = sae_lens.registry.get_sae_class(architecture)
    extra = {"k": K} if architecture == "topk" else {}
    cfg = cfg_cls(d_in=D_IN, d_sae=D_SAE, metadata=SAEMetadata(hook_name=HOOK, model_name="tiny-llama"),
                  **extra, **cfg_kwargs)  # fmt: skip
    sae = sae_cls(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            draw, scale = (torch.rand, 0.5) if name == "threshold" else (torch.randn, 0.3)  # threshold >= 0
            p.copy_(draw(p.shape, generator=g) * scale)
    return sae


def assert_same_codes(ours: SAE, theirs, seed: int = 2) -> None:
    x = torch.randn(3, 7, D_IN, generator=torch.Generator().manual_seed(seed))  # [batch, position, d_in]
    with torch.no_grad():
        f_ours, f_theirs = ours.encode(x), theirs.encode(x)
        torch.testing.assert_close(f_ours, f_theirs, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.decode(f_ours), theirs.decode(f_ours), atol=1e-5, rtol=0)
    # sparse but not all zero, so that the comparison means something
    assert 0 < int((f_ours != 0).sum()) < f_ours.numel()


@pytest.mark.parametrize("apply_b_dec_to_input", [False, True])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_saelens_loads_what_neurontrace_writes(tmp_path, architecture, apply_b_dec_to_input):
    ours = random_sae(architecture, apply_b_dec_to_input)
    theirs = sae_lens.SAE.load_from_disk(save_sae(ours, tmp_path / "sae"), device="cpu")
    assert (
        theirs.cfg.architecture() == architecture and theirs.cfg.apply_b_dec_to_input is apply_b_dec_to_input
    )
    assert (theirs.cfg.d_in, theirs.cfg.d_sae, getattr(theirs.cfg, "k", None)) == (D_IN, D_SAE, ours.k)
    # the metadata survives: SAELens reads the file as its 6.x layout, not as an older one
    assert theirs.cfg.metadata.hook_name == HOOK and theirs.cfg.metadata.model_name == "tiny-llama"
    assert_same_codes(ours, theirs)
    if architecture == "jumprelu":  # the threshold is read and used: it zeroes some of ReLU's latents
        x = torch.randn(64, D_IN)
        with torch.no_grad():
            assert not torch.equal(
                theirs.encode(x), replace(ours, architecture="standard", threshold=None).encode(x)
            )


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_neurontrace_loads_what_saelens_writes(tmp_path, architecture):
    theirs = random_saelens(architecture)
    theirs.save_model(tmp_path / "sae")
    ours = load_sae(tmp_path / "sae")
    k = K if architecture == "topk" else None
    assert (ours.site, ours.layer, ours.architecture, ours.k) == ("mlp_out", 2, architecture, k)
    assert ours.apply_b_dec_to_input is True  # SAELens's default
    assert ours.metadata["model_name"] == "tiny-llama"
    assert_same_codes(ours, theirs)
    # and back: neurontrace's copy of it loads in SAELens with the same config
    again = sae_lens.SAE.load_from_disk(save_sae(ours, tmp_path / "again"), device="cpu")
    assert again.cfg.to_dict() | {"metadata": None} == theirs.cfg.to_dict() | {"metadata": None}
    assert_same_codes(ours, again)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_our_cfg_json_has_every_field_of_saelens_config(tmp_path, architecture):
    folder = save_sae(random_sae(architecture, False), tmp_path / "sae")
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg_cls = sae_lens.registry.get_sae_class(architecture)[1]
    defaults = {f.name: f.default for f in fields(cfg_cls) if f.default is not MISSING}
    # fields we leave out are ones where SAELens's default is right (rescale_acts_by_decoder_norm=False, topk)
    assert {f.name for f in fields(cfg_cls)} - set(cfg) <= {"rescale_acts_by_decoder_norm"}
    assert all(defaults[name] is False for name in {f.name for f in fields(cfg_cls)} - set(cfg))
    loaded = sae_lens.SAE.load_from_disk(folder, device="cpu").cfg.to_dict()
    for name, value in loaded.items():
        if name == "metadata":
            assert cfg["metadata"].items() <= value.items()
        else:
            assert cfg.get(name, defaults.get(name)) == value, name


def test_the_older_layout_without_apply_b_dec_to_input_reads_alike(tmp_path):
    """A pre-6 cfg.json that leaves apply_b_dec_to_input out: both take it as true."""
    from safetensors.torch import save_file

    ours = random_sae("topk", True)
    weights = {n: getattr(ours, n) for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    save_file(weights, tmp_path / "sae_weights.safetensors")
    cfg = {"hook_name": HOOK, "hook_layer": 2, "architecture": "standard", "d_in": D_IN, "d_sae": D_SAE,
           "dtype": "float32", "activation_fn": "topk", "activation_fn_kwargs": {"k": K}}  # fmt: skip
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    back, theirs = load_sae(tmp_path), sae_lens.SAE.load_from_disk(tmp_path, device="cpu")
    assert back.apply_b_dec_to_input is True and theirs.cfg.apply_b_dec_to_input is True
    assert (back.architecture, back.k, theirs.cfg.architecture(), theirs.cfg.k) == ("topk", K, "topk", K)
    assert_same_codes(back, theirs)


def test_a_topk_that_rescales_by_decoder_norm_is_refused(tmp_path):
    theirs = random_saelens("topk", rescale_acts_by_decoder_norm=True)
    theirs.save_model(tmp_path / "sae")
    with pytest.raises(NeurontraceError, match="rescale_acts_by_decoder_norm"):
        load_sae(tmp_path / "sae")


def test_saelens_loads_what_train_sae_writes(tmp_path):
    """A dictionary trained by `train_dictionaries` (the engine of `neurontrace train-sae`) is a folder of
    SAELens folders: each loads in SAELens with its hook name and encodes like neurontrace's."""
    from conftest import WORDS, make_tiny

    from neurontrace.dictionaries.basis import load_basis
    from neurontrace.dictionaries.train import TrainConfig, train_dictionaries

    model = make_tiny("llama")
    g = torch.Generator().manual_seed(0)
    text = "\n\n".join(
        " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (20,), generator=g)) for _ in range(60)
    )
    (tmp_path / "text.txt").write_text(text)
    cfg = TrainConfig(
        layers=[0, 1], d_sae=48, k=4, tokens=1500, batch_size=128, context=16, held_out=200, buffer_tokens=512
    )
    train_dictionaries(model, tmp_path / "out", cfg, corpus=str(tmp_path / "text.txt"))
    basis = load_basis(str(tmp_path / "out"))
    assert sorted(basis.saes) == [0, 1]
    for layer, ours in basis.saes.items():
        folder = tmp_path / "out" / f"blocks.{layer}.hook_mlp_out"
        theirs = sae_lens.SAE.load_from_disk(str(folder), device="cpu")
        assert theirs.cfg.architecture() == "topk" and theirs.cfg.k == 4
        assert theirs.cfg.metadata.hook_name == f"blocks.{layer}.hook_mlp_out"
        x = torch.randn(5, ours.d_in, generator=g) * 3
        with torch.no_grad():
            torch.testing.assert_close(ours.encode(x), theirs.encode(x), atol=1e-4, rtol=1e-4)

"""Steering a dictionary's latents: setting latent j moves the site by (v - f_j) * W_dec[j], checked by hand."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny, save_tiny_folder
from test_sae import random_sae

from neurontrace.cli import main
from neurontrace.dictionaries import save_sae
from neurontrace.errors import NeurontraceError
from neurontrace.hooks import add_output_hook
from neurontrace.neurons import parse_neurons
from neurontrace.steering.steer import steer

PROMPT = "the keys to the cabinet"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = make_tiny("llama")
    folder = tmp_path_factory.mktemp("steer-dict")
    sae = random_sae(model.d_model, 24, "mlp_out", 1, "standard", seed=3)
    sae.b_enc += 1.0  # most latents fire
    save_sae(sae, folder / "L1")
    return model, sae, f"sae:{folder}"


def test_setting_a_latent_moves_the_site_along_its_decoder_row(setup):
    model, sae, basis = setup
    j, value = 5, 2.5
    result = steer(
        model, prompt=PROMPT, neurons=parse_neurons(f"L1/N{j}"), mode="set", value=value, site=basis
    )
    mlp = model.layer_module(1, model.adapter.mlp)

    def by_hand(y: torch.Tensor) -> torch.Tensor:
        f = sae.encode(y)[..., j : j + 1]
        return y + (value - f) * sae.W_dec[j]

    handle = add_output_hook(mlp, by_hand)
    try:
        expected = model.logits(model.tokenize(PROMPT))[0, -1].float().softmax(-1)
    finally:
        handle.remove()
    assert result.kl_divergence > 1e-4  # the edit does something
    for t in result.top_after:
        assert t.prob == pytest.approx(float(expected[t.token_id]), abs=1e-6)
    same = steer(model, prompt=PROMPT, neurons=parse_neurons(f"L1/N{j}"), mode="scale", value=1.0, site=basis)
    assert [t.prob for t in same.top_after] == pytest.approx([t.prob for t in same.top_before], abs=1e-6)


def test_latent_ids_are_checked_against_the_dictionary(setup, tmp_path, capsys):
    model, _, basis = setup
    with pytest.raises(NeurontraceError, match="does not exist at site"):
        steer(model, prompt=PROMPT, neurons=parse_neurons("L0/N1"), site=basis)  # no SAE at layer 0
    folder = save_tiny_folder(tmp_path / "m")
    argv = [
        "steer",
        "--model",
        folder,
        "--prompt",
        PROMPT,
        "--neurons",
        "L1/N3",
        "--site",
        basis,
        "--value",
        "0",
    ]
    assert main(argv) == 0
    assert main([*argv[:-4], "--neurons", "L1/N999", "--site", basis]) == 2
    assert "does not exist at site" in capsys.readouterr().err

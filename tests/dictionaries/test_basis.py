"""A dictionary as a site (``sae:DIR``): attribution through latents and error terms, on a tiny model.

An identity SAE (encoder and decoder the identity, ReLU) splits each dimension x into relu(x) (a latent) and
min(x, 0) (the error): both see the same gradient, so a latent's score plus its error component's score is the
raw site's score, exactly, for AtP, RelP and IG alike (the split is linear in x on each side of 0).
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny
from test_sae import random_sae

from neurontrace.attribution.api import attribute
from neurontrace.dictionaries import SAE, save_sae
from neurontrace.errors import NeurontraceError
from neurontrace.sites import capture, site_layers, site_width
from neurontrace.tasks.pairs import Pair

PAIRS = [
    Pair("the keys to the cabinet", "the key to the cabinet", " are", " is"),
    Pair("the key to the cabinets", "the keys to the cabinets", " is", " are"),
]


@pytest.fixture(scope="module")
def model():
    return make_tiny("llama")


def identity_sae(d: int, site: str, layer: int) -> SAE:
    eye = torch.eye(d)
    return SAE(eye.clone(), torch.zeros(d), eye.clone(), torch.zeros(d), site, layer)


@pytest.mark.parametrize("method", ["atp", "relp", "ig"])
@pytest.mark.parametrize("site", ["resid", "mlp_out", "neurons"])
def test_identity_dictionary_scores_add_up_to_the_raw_site(model, tmp_path, method, site):
    d = site_width(model, site)
    folder = tmp_path / "dict"
    for layer in (0, 2):  # a folder of SAELens folders, one a layer
        save_sae(identity_sae(d, site, layer), folder / f"layer{layer}")
    dictionary = f"sae:{folder}"
    assert site_layers(model, dictionary) == [0, 2] and site_width(model, dictionary) == 2 * d
    raw = attribute(model, pairs=PAIRS, method=method, site=site, layers=[0, 2])
    got = attribute(model, pairs=PAIRS, method=method, site=dictionary)  # layers: the dictionary's
    torch.testing.assert_close(got.metric_clean, raw.metric_clean)  # the spliced model computes the same
    latents, errors = got.mean_scores[..., :d], got.mean_scores[..., d:]
    torch.testing.assert_close(latents + errors, raw.mean_scores, atol=1e-5, rtol=1e-5)
    assert latents.abs().sum() > 0 and errors.abs().sum() > 0  # both halves carry part of it


def test_a_random_dictionary_conserves_the_site_total(model, tmp_path):
    """Per layer and example, latents plus error nodes hold the raw site's AtP total: an error node is the sum of
    its components, and the decoder is linear, so nothing is lost or doubled."""
    d = site_width(model, "resid")
    save_sae(random_sae(d, 3 * d, "resid", 1, "topk"), tmp_path / "sae")
    raw = attribute(model, pairs=PAIRS, method="atp", site="resid", layers=[1])
    got = attribute(model, pairs=PAIRS, method="atp", site=f"sae:{tmp_path / 'sae'}")
    torch.testing.assert_close(got.scores_sum.sum(-1), raw.scores_sum.sum(-1), atol=1e-4, rtol=1e-4)


def test_dictionary_sites_are_checked(model, tmp_path):
    with pytest.raises(NeurontraceError, match="no such dictionary folder"):
        attribute(model, pairs=PAIRS, site=f"sae:{tmp_path / 'nothing'}")
    save_sae(identity_sae(8, "resid", 1), tmp_path / "small")
    with pytest.raises(NeurontraceError, match="reads 8 values"):
        attribute(model, pairs=PAIRS, site=f"sae:{tmp_path / 'small'}")
    save_sae(identity_sae(site_width(model, "resid"), "resid", 1), tmp_path / "one")
    with pytest.raises(NeurontraceError, match="no SAE for layer 0"):
        attribute(model, pairs=PAIRS, site=f"sae:{tmp_path / 'one'}", layers=[0, 1])


def test_the_cli_attributes_through_a_dictionary(tmp_path, capsys):
    from conftest import save_tiny_folder

    from neurontrace.cli import main

    folder = save_tiny_folder(tmp_path / "model")
    save_sae(random_sae(32, 64, "resid", 1, "topk"), tmp_path / "sae")
    argv = ["attribute", "--model", folder, "--prompt", "the keys to the cabinet", "--answer", " are"]
    assert main([*argv, "--site", f"sae:{tmp_path / 'sae'}", "--top", "3", "--verify", "3"]) == 0
    out = capsys.readouterr().out
    assert "L1/N" in out and "exact" in out  # the top units, checked by exact patching through the splice


@pytest.mark.parametrize("layer", [0, 2])
def test_relp_conservation_holds_with_error_nodes_counted(model, tmp_path, layer):
    """Zero baseline, bias-free Llama, every RelP rule on: the residual stream after a layer carries the whole
    input, so its RelP scores sum to the logit; through a dictionary there (decoder bias 0) the latents plus the
    error nodes hold that same total, and the latents alone do not."""
    from neurontrace.tokens import single_token_id

    d = site_width(model, "resid")
    sae = random_sae(d, 3 * d, "resid", layer, "topk")
    sae.b_dec.zero_()
    save_sae(sae, tmp_path / "sae")
    prompt = "the keys to the cabinet"
    got = attribute(model, prompt=prompt, answer=" are", method="relp", site=f"sae:{tmp_path / 'sae'}")
    logit = float(model.logits(model.tokenize(prompt))[0, -1, single_token_id(model, " are")])
    assert float(got.scores.sum()) == pytest.approx(logit, rel=1e-5)
    latents_only = float(got.scores[..., : sae.d_sae].sum())
    assert abs(latents_only - logit) > 1e-3 * abs(logit)  # the error nodes carry a share


def test_exact_patching_of_a_latent_is_the_hand_edit(model, tmp_path):
    """Identity SAE on resid: patching latent j (relu of x_j) to its counterfactual value sets x_j to
    relu(x'_j) + min(x_j, 0) and leaves everything else alone."""
    from neurontrace.hooks import add_output_hook
    from neurontrace.tokens import tokenize_pairs

    d = site_width(model, "resid")
    save_sae(identity_sae(d, "resid", 1), tmp_path / "sae")
    pair = PAIRS[0]
    got = attribute(model, pairs=[pair], method="exact", site=f"sae:{tmp_path / 'sae'}")
    clean, patch = tokenize_pairs(model, [pair.clean_prefix], [pair.patch_prefix])
    x_clean = capture(model, clean, sites="resid", layers=[1]).get(1, "resid")
    x_patch = capture(model, patch, sites="resid", layers=[1]).get(1, "resid")
    answer, contrast = (model.tokenizer.convert_tokens_to_ids(model.tokenizer.tokenize(a))[0]
                        for a in (pair.clean_answer, pair.patch_answer))  # fmt: skip

    def metric(hook=None) -> float:
        handle = None if hook is None else add_output_hook(model.layer(1), hook)
        try:
            logits = model.logits(clean)[0, -1]
        finally:
            if handle is not None:
                handle.remove()
        return float(logits[answer] - logits[contrast])

    base = metric()
    checked = 0
    for pos, j in [(4, 0), (4, 7), (2, 3), (1, 11)]:
        new = torch.relu(x_patch[0, pos, j]) + torch.clamp(x_clean[0, pos, j], max=0)

        def edit(y, pos=pos, j=j, new=new):
            y = y.clone()
            y[0, pos, j] = new
            return y

        expected = metric(edit) - base
        assert float(got.scores[0, 0, pos, j]) == pytest.approx(expected, abs=1e-5)
        checked += abs(expected) > 1e-6
    assert checked >= 2

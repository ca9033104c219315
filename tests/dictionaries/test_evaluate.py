"""Faithfulness sweeps on a dictionary basis: error components are one node per (layer, position), and the
error-node rules (count, keep, ablate) do what they say, checked against hand-made ablations."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny, make_tiny_hf, word_tokenizer
from test_sae import random_sae

from neurontrace.cli import main
from neurontrace.dictionaries import save_sae
from neurontrace.evaluation import prepare_eval, sweep
from neurontrace.evaluation.faithfulness import expand_error_nodes, group_error_nodes
from neurontrace.sites import hook_site, site_width
from neurontrace.tasks import Pair, save_pairs

NOUNS = [("dog", "dogs"), ("key", "keys"), ("table", "tables"), ("cabinet", "cabinets")]
PAIRS = [
    Pair(f"the {sg} near the {o}", f"the {pl} near the {o}", " is", " are")
    for sg, pl in NOUNS
    for o in ("table", "cabinet", "dog")
] + [
    Pair(f"the {pl} near the {o}", f"the {sg} near the {o}", " are", " is")
    for sg, pl in NOUNS
    for o in ("key", "dog")
]
T = 5  # tokens of every prompt


@pytest.fixture(scope="module")
def model():
    return make_tiny("llama", seed=3)


@pytest.fixture(scope="module")
def dictionary(model, tmp_path_factory):
    """A random TopK SAE on mlp_out at every layer (a poor one: its error nodes matter)."""
    folder = tmp_path_factory.mktemp("dict") / "mlp"
    for layer in range(model.n_layers):
        save_sae(random_sae(model.d_model, 24, "mlp_out", layer, "topk", seed=layer), folder / f"L{layer}")
    return f"sae:{folder}"


def _metric_with_hand_ablation(ev, model, replace) -> float:
    """Mean metric with ``replace(layer, z, mean_z) -> z'`` applied at every layer of the dictionary site."""
    values = []
    for eb in ev.batches:
        handles = [
            hook_site(
                model,
                ev.site,
                layer,
                lambda z, li=li, layer=layer, eb=eb: replace(layer, z, ev.mean[eb.keys, li].to(z.dtype)),
            )
            for li, layer in enumerate(ev.layers)
        ]
        try:
            with torch.no_grad():
                logits = model.forward(eb.batch, logits_to_keep=1).logits
        finally:
            for h in handles:
                h.remove()
        values.append(eb.metric(logits).double())
    return float(torch.cat(values).mean())


def test_grouping_and_expanding_error_nodes():
    scores = torch.arange(2 * 3 * 7, dtype=torch.float).view(2, 3, 7)
    nodes = group_error_nodes(scores, 4)
    assert nodes.shape == (2, 3, 5)
    assert torch.equal(nodes[..., :4], scores[..., :4])
    assert torch.equal(nodes[..., 4], scores[..., 4:].sum(-1))  # the same sum of the same values: exact
    keep = torch.rand(2, 3, 5) > 0.5
    full = expand_error_nodes(keep, 4, 7)
    assert torch.equal(full[..., :4], keep[..., :4])
    assert torch.equal(full[..., 4:], keep[..., 4:5].expand(2, 3, 3))


def test_one_error_node_ablates_all_its_components_and_only_them(model, dictionary):
    ev = prepare_eval(model, PAIRS, site=dictionary, ablation="mean", batch_size=8)
    d_sae = ev.latents
    assert d_sae == 24 and ev.node_width == 25
    keep = torch.ones(model.n_layers, T, d_sae + 1, dtype=torch.bool)
    keep[1, 2, d_sae] = False  # the error node of layer 1, position 2
    keep[0, 3, 5] = False  # and one latent

    def replace(layer, z, mean):
        z = z.clone()
        if layer == 1:
            z[:, 2, d_sae:] = mean[2, d_sae:]
        if layer == 0:
            z[:, 3, 5] = mean[3, 5]
        return z

    assert ev.metric_with(keep) == pytest.approx(_metric_with_hand_ablation(ev, model, replace), abs=1e-5)
    assert ev.metric_with(torch.ones_like(keep)) == pytest.approx(ev.metric_with(None), abs=1e-5)


def test_mean_ablating_every_dictionary_node_is_mean_ablating_the_site(model, dictionary):
    """decode is affine, so the mean of [latents, error] decodes to the mean of the site: F(empty) agrees."""
    ev = prepare_eval(model, PAIRS, site=dictionary, ablation="mean", batch_size=8)
    raw = prepare_eval(model, PAIRS, site="mlp_out", ablation="mean", batch_size=8)
    none = torch.zeros(model.n_layers, T, ev.node_width, dtype=torch.bool)
    none_raw = torch.zeros(model.n_layers, T, model.d_model, dtype=torch.bool)
    assert ev.metric_with(none) == pytest.approx(raw.metric_with(none_raw), abs=1e-4)


@pytest.mark.parametrize("rule", ["count", "keep", "ablate"])
def test_error_node_rules(model, dictionary, rule):
    ev = prepare_eval(model, PAIRS, site=dictionary, ablation="mean", batch_size=8)
    d_sae, L = ev.latents, model.n_layers
    scores = torch.randn(L, T, site_width(model, dictionary), generator=torch.Generator().manual_seed(0))
    curve = sweep(ev, scores, method="random", thresholds=[-1.0], levels=(), error_nodes=rule, seed=1)
    n_latents = L * T * d_sae
    assert curve.n_total == (n_latents + L * T if rule == "count" else n_latents)
    everything = curve.points[-1]
    assert everything.n_nodes == curve.n_total

    def errors_only(layer, z, mean):  # latents ablated, errors kept
        return torch.cat([mean[None, :, :d_sae].expand_as(z[..., :d_sae]), z[..., d_sae:]], -1)

    def latents_only(layer, z, mean):  # errors ablated, latents kept
        return torch.cat([z[..., :d_sae], mean[None, :, d_sae:].expand_as(z[..., d_sae:])], -1)

    if rule == "count":  # every node ablated in F(empty); the whole ranking is the full model
        assert everything.faithfulness == pytest.approx(1.0, abs=1e-5)
    elif rule == "keep":  # F(empty) keeps every error node; complement of everything = errors only too
        assert curve.f_empty == pytest.approx(_metric_with_hand_ablation(ev, model, errors_only), abs=1e-5)
        assert everything.faithfulness == pytest.approx(1.0, abs=1e-5)
        assert everything.completeness == pytest.approx(0.0, abs=1e-5)
    else:  # every latent kept but every error ablated is the best a circuit can do
        f_latents = _metric_with_hand_ablation(ev, model, latents_only)
        assert everything.f_circuit == pytest.approx(f_latents, abs=1e-5)
        assert curve.f_empty == pytest.approx(
            ev.metric_with(torch.zeros(L, T, d_sae + 1, dtype=torch.bool)), abs=1e-6
        )


def test_evaluate_command_compares_neurons_with_a_dictionary(model, dictionary, tmp_path, capsys):
    folder = tmp_path / "model"
    make_tiny_hf("llama", seed=3).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    data = tmp_path / "pairs.jsonl"
    save_pairs(data, PAIRS)
    out = tmp_path / "run"
    argv = ["evaluate", "--model", str(folder), "--dataset", str(data), "--methods", "relp",
            "--bases", f"neurons,{dictionary}", "--points", "6", "--levels", "0.5", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr()
    assert "| relp | sae-mlp |" in printed.out and "| relp | neurons |" in printed.out
    assert (out / "curves" / "relp-sae-mlp-seed0.json").is_file()
    curves = {c["basis"]: c for c in json.loads((out / "curves.json").read_text())}
    assert curves["sae-mlp"]["meta"]["dictionary"] == dictionary
    assert curves["sae-mlp"]["n_total"] == model.n_layers * T * 25
    config = json.loads((out / "config.json").read_text())
    assert config["error_nodes"] == "count" and dictionary in config["extra"]["dictionaries"]
    assert main(argv) == 0  # resumes
    assert "done already" in capsys.readouterr().err
    assert main([*argv, "--error-nodes", "keep"]) == 2  # another run: another folder
    assert "different run" in capsys.readouterr().err
    assert main([*argv[:-1], str(tmp_path / "bad"), "--bases", "sae:/no/such/folder"]) == 2
    assert "no such dictionary folder" in capsys.readouterr().err


@pytest.mark.parametrize("rule", ["keep", "ablate"])
def test_an_evaluation_scales_its_grid_to_the_latents_when_error_nodes_are_not_ranked(
    model, dictionary, tmp_path, monkeypatch, rule
):
    """Under keep/ablate the error nodes are out of the ranking, so the log grid's top threshold is the largest
    |latent score|, not the (larger) error nodes' (with which every threshold would sit above most latents)."""
    from neurontrace.evaluation import runner

    seen = {}
    real = runner.sweep

    def recording(evalset, scores, **kwargs):
        seen.update(scores=evalset.nodes_of(scores), latents=evalset.latents, thresholds=kwargs["thresholds"])
        return real(evalset, scores, **kwargs)

    monkeypatch.setattr(runner, "sweep", recording)
    run = runner.EvaluationRun(model="tiny", data="pairs", methods=["atp"], bases=[dictionary], points=6,
                               levels=[0.5], error_nodes=rule)  # fmt: skip
    runner.run_evaluation(model, run, train=PAIRS[:10], test=PAIRS[10:], out=tmp_path, progress=False,
                          log=lambda message: None)  # fmt: skip
    nodes, latents = seen["scores"], seen["latents"]
    top = float(nodes[..., :latents].abs().max())
    assert float(nodes[..., latents:].abs().max()) > 2 * top  # the error nodes would set another scale
    want = [0.0] + [top * float(x) for x in torch.logspace(-6, 0, 6)]
    assert seen["thresholds"] == want

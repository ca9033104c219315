"""RelP rule options from the command line and the API, the neuron blacklist, centred logits and the suffix
length: each against an independent computation (the API with the rules spelled out, hand-centred metrics,
hand-shifted positions, conservation)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny, save_tiny_folder

from neurontrace.attribution.api import attribute
from neurontrace.attribution.blacklist import Blacklist, load_blacklist
from neurontrace.attribution.engine import frozen_parameters, run_sites
from neurontrace.attribution.metrics import make_metric
from neurontrace.attribution.replacement import (
    NO_RULES,
    RULE_PRESETS,
    TRANSLUCE_RULES,
    RelPRules,
    rules_from,
)
from neurontrace.attribution.result import AttributionResult
from neurontrace.circuits import select_circuit
from neurontrace.cli import main
from neurontrace.errors import NeurontraceError
from neurontrace.graphs.build import LOGIT, NEURON, build_graph
from neurontrace.tokens import single_token_id

PROMPT, ANSWER = "the keys to the cabinet", " are"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("rules-model")
    return save_tiny_folder(path)


@pytest.fixture(scope="module")
def model(folder):
    from neurontrace.models.loading import load_model

    return load_model(folder, device="cpu")  # the very weights the CLI loads


def _scores(model, **kwargs) -> torch.Tensor:
    return attribute(model, prompt=PROMPT, answer=ANSWER, metric="logit", **kwargs).mean_scores


# ------------------------------------------------------------------ rules


def test_presets_and_overrides():
    assert RelPRules(norm=True, attention=False, nonlinearity=True, gate="half") == TRANSLUCE_RULES
    assert rules_from("transluce") == TRANSLUCE_RULES and rules_from() == RelPRules()
    assert rules_from("none") == NO_RULES == RelPRules(False, False, False, "plain")
    assert rules_from("transluce", attention=True) == RelPRules()  # a flag overrides its preset
    assert rules_from("none", norm=True, gate="half") == RelPRules(True, False, False, "half")
    assert set(RULE_PRESETS) == {"relp", "transluce", "none"}
    with pytest.raises(NeurontraceError, match="unknown rule preset"):
        rules_from("lrp")
    with pytest.raises(NeurontraceError, match="unknown gate rule"):
        rules_from(gate="third")


FLAGS = [
    (["--rules", "transluce"], RelPRules(attention=False)),
    (["--attention", "off"], RelPRules(attention=False)),
    (["--norm", "off"], RelPRules(norm=False)),
    (["--identity", "off"], RelPRules(nonlinearity=False)),
    (["--gate", "detach"], RelPRules(gate="detach")),
    (["--rules", "none", "--gate", "half"], RelPRules(False, False, False, "half")),
    (["--rules", "transluce", "--attention", "on"], RelPRules()),
]


@pytest.mark.parametrize(("flags", "expected"), FLAGS)
def test_attribute_flags_set_the_rules_used(folder, model, tmp_path, capsys, flags, expected):
    out = tmp_path / "r.safetensors"
    argv = ["attribute", "--model", folder, "--prompt", PROMPT, "--answer", ANSWER, "--out", str(out)]
    assert main([*argv, *flags]) == 0
    assert "RelP rules: norm=" in capsys.readouterr().out
    result = AttributionResult.load(out)
    assert result.meta["rules"] == expected.to_dict()
    # the scores are the API's with those rules spelled out...
    torch.testing.assert_close(result.mean_scores, _scores(model, rules=expected), rtol=1e-6, atol=1e-7)
    # ...and each rule changes them on this model (attention matters: several positions feed the last)
    default = _scores(model)
    if expected == RelPRules():
        torch.testing.assert_close(result.mean_scores, default, rtol=1e-6, atol=1e-7)
    else:
        assert (result.mean_scores - default).abs().max() > 1e-3 * default.abs().max()


def test_rule_flags_without_relp_are_refused(folder, capsys):
    argv = ["attribute", "--model", folder, "--prompt", PROMPT, "--answer", ANSWER, "--method", "atp"]
    assert main([*argv, "--attention", "off"]) == 2
    assert "does not use them" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:  # argparse: on or off only
        main([*argv[:-2], "--attention", "maybe"])
    assert stop.value.code == 2 and "must be on or off" in capsys.readouterr().err


def test_transluce_rules_do_not_conserve_but_relp_does():
    """The preset's docstring: with gradient through the softmax, embedding attributions do not sum to m."""
    model = make_tiny("llama")
    batch = model.tokenize(PROMPT)
    metric = make_metric("logit", answer=[single_token_id(model, ANSWER)])
    totals = {}
    for name, rules in (("relp", RelPRules()), ("transluce", TRANSLUCE_RULES)):
        with frozen_parameters(model):
            run = run_sites(model, batch, metric, site="neurons", layers=[0], rules=rules)
            (g,) = torch.autograd.grad(run.metric.sum(), [run.embeds])
        totals[name] = (float((run.embeds.detach() * g).sum()), float(run.metric[0].detach()))
    assert totals["relp"][0] == pytest.approx(totals["relp"][1], rel=1e-4, abs=1e-5)
    assert totals["transluce"][0] != pytest.approx(totals["transluce"][1], rel=1e-2)


def test_graph_flags_set_the_rules_used(folder, model, tmp_path):
    argv = ["graph", "--model", folder, "--prompt", PROMPT, "--answer", ANSWER, "--out", str(tmp_path)]
    assert main([*argv, "--node-threshold", "0.02", "--no-prune", "--rules", "transluce"]) == 0
    data = json.loads((tmp_path / "graph.json").read_text())
    assert data["metadata"]["neurontrace"]["rules"] == TRANSLUCE_RULES.to_dict()
    expected = build_graph(model, PROMPT, answers=[ANSWER], node_threshold=0.02, rules=TRANSLUCE_RULES)
    default = build_graph(model, PROMPT, answers=[ANSWER], node_threshold=0.02)
    full = json.loads((tmp_path / "graph.neurontrace.json").read_text())
    assert full["meta"]["rules"] == TRANSLUCE_RULES.to_dict()
    chosen = {(n.layer, n.position, n.index) for n in expected.nodes if n.kind == NEURON}
    assert chosen != {(n.layer, n.position, n.index) for n in default.nodes if n.kind == NEURON}
    written = {(n["layer"], n["position"], n["index"]) for n in full["nodes"] if n["kind"] == NEURON}
    assert written == chosen


def test_evaluate_records_and_uses_rules_blacklist_and_suffix(folder, tmp_path, capsys):
    from neurontrace.tasks import Pair, save_pairs

    pairs = [
        Pair(f"the {sg} near the {o}", f"the {pl} near the {o}", " is", " are")
        for sg, pl in [("dog", "dogs"), ("key", "keys"), ("table", "tables"), ("cabinet", "cabinets")]
        for o in ("table", "dog", "key")
    ]
    save_pairs(tmp_path / "pairs.jsonl", pairs)
    (tmp_path / "bl.json").write_text(json.dumps([[0, 3], "L2/N7"]))
    out = tmp_path / "run"
    argv = ["evaluate", "--model", folder, "--dataset", str(tmp_path / "pairs.jsonl"), "--methods", "relp",
            "--bases", "neurons", "--points", "4", "--out", str(out)]  # fmt: skip
    assert (
        main([*argv, "--attention", "off", "--blacklist", str(tmp_path / "bl.json"), "--suffix-length", "2"])
        == 0
    )
    config = json.loads((out / "config.json").read_text())
    assert config["rules"] == TRANSLUCE_RULES.to_dict()
    assert config["blacklist"] == [[0, 3], [2, 7]] and config["suffix_length"] == 2
    result = AttributionResult.load(out / "attributions" / "relp-neurons-seed0.safetensors")
    assert result.meta["rules"] == TRANSLUCE_RULES.to_dict() and result.meta["suffix_length"] == 2
    scores = result.mean_scores  # [L, T, d]
    assert (scores[0, :, 3] == 0).all() and (scores[2, :, 7] == 0).all()
    assert (scores[:, :-2] == 0).all() and scores[:, -2:].abs().sum() > 0
    # the default run records none of the three (older results folders resume)
    assert main([*argv[:-1], str(tmp_path / "plain")]) == 0
    plain = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert not {"rules", "blacklist", "suffix_length"} & set(plain)
    capsys.readouterr()


# ------------------------------------------------------------------ blacklist


def _top_neurons(scores: torch.Tensor, k: int) -> list[list[int]]:
    """The (layer, neuron) pairs of the k largest |score| nodes of ``[L, T, d]`` scores (distinct pairs)."""
    summed = scores.abs().sum(1)
    flat = summed.flatten().topk(k).indices
    return [[int(i) // summed.shape[1], int(i) % summed.shape[1]] for i in flat]


def test_blacklisted_neurons_score_zero_and_never_join_a_circuit(model):
    plain = _scores(model)
    banned = _top_neurons(plain, 3)
    result = attribute(model, prompt=PROMPT, answer=ANSWER, metric="logit", blacklist=banned)
    assert result.meta["blacklist"] == sorted(banned)
    keep = torch.ones_like(plain)
    for layer, neuron in banned:
        keep[layer, :, neuron] = 0
        assert (result.mean_scores[layer, :, neuron] == 0).all()
        assert (result.scores_sum[:, layer, neuron] == 0).all()
    # the rest unchanged, exactly: the same forward and backward (same kernels, same shapes), then zeros set
    torch.testing.assert_close(result.mean_scores, plain * keep, rtol=0, atol=0)
    circuit = select_circuit(result.mean_scores, layers=result.layers, top_k=20)
    members = {(n["layer"], n["unit"]) for n in circuit.nodes()}
    assert members.isdisjoint(map(tuple, banned))
    before = {(n["layer"], n["unit"]) for n in select_circuit(plain, layers=result.layers, top_k=20).nodes()}
    assert not before.isdisjoint(map(tuple, banned))  # without the blacklist they would be in it


def test_blacklisted_neurons_never_become_graph_nodes(model):
    kwargs = dict(answers=[ANSWER], node_threshold=0.01, max_nodes=None)
    plain = build_graph(model, PROMPT, **kwargs)
    neurons = [n for n in plain.nodes if n.kind == NEURON]
    strongest = sorted(neurons, key=lambda n: -abs(n.attribution))[:3]
    banned = sorted({(n.layer, n.index) for n in strongest})
    graph = build_graph(model, PROMPT, blacklist=banned, **kwargs)
    assert graph.meta["blacklist"] == [list(b) for b in banned]
    kept = [i for i, n in enumerate(plain.nodes) if n.kind != NEURON or (n.layer, n.index) not in banned]
    assert [plain.nodes[i].key for i in kept] == [n.key for n in graph.nodes]  # the others, all of them
    # the edges among the remaining nodes are unchanged (direct effects do not depend on the other nodes)
    torch.testing.assert_close(graph.adjacency, plain.adjacency[kept][:, kept], rtol=1e-5, atol=1e-6)


def test_blacklist_files(tmp_path, model):
    path = tmp_path / "bl.json"
    path.write_text(json.dumps([[1, 5], "L0/N7", [1, 5]]))
    assert load_blacklist(path).neurons == ((0, 7), (1, 5))
    for content, message in [
        ('{"layer": 1}', "must be a JSON list"),
        ("[[1, 2, 3]]", "not a \\[layer, neuron\\] pair"),
        ('["L1/N2+"]', "has a sign or position"),
        ("[[1, 2", "is not JSON"),
        ("[[99, 0]]", "does not exist"),
    ]:
        path.write_text(content)
        with pytest.raises(NeurontraceError, match=message):
            load_blacklist(path).check(model)
    with pytest.raises(NeurontraceError, match="no such blacklist file"):
        load_blacklist(tmp_path / "missing.json")
    with pytest.raises(NeurontraceError, match="neurons site only"):
        attribute(model, prompt=PROMPT, answer=ANSWER, site="mlp_out", blacklist=[[0, 1]])
    assert Blacklist.of([[2, 1]]).keep_mask([0, 2], 4).tolist() == [[1, 1, 1, 1], [1, 0, 1, 1]]


def test_attribute_cli_blacklist(folder, tmp_path, model):
    banned = _top_neurons(_scores(model), 2)
    (tmp_path / "bl.json").write_text(json.dumps(banned))
    out = tmp_path / "r.safetensors"
    argv = ["attribute", "--model", folder, "--prompt", PROMPT, "--answer", ANSWER, "--metric", "logit"]
    assert main([*argv, "--blacklist", str(tmp_path / "bl.json"), "--out", str(out)]) == 0
    result = AttributionResult.load(out)
    assert result.meta["blacklist"] == sorted(banned)
    for layer, neuron in banned:
        assert (result.mean_scores[layer, :, neuron] == 0).all()


# ------------------------------------------------------------------ centred logits


def test_centred_logit_equals_the_hand_centred_metric(model):
    answer = single_token_id(model, ANSWER)

    def by_hand(logits):  # logit minus its mean over the vocabulary, written out
        last = logits[:, -1].float()
        return last[:, answer] - last.sum(-1) / last.shape[-1]

    for method in ("relp", "atp"):
        centred = attribute(
            model, prompt=PROMPT, answer=ANSWER, metric="logit", center_logits=True, method=method
        )
        hand = attribute(model, prompt=PROMPT, metric_fn=by_hand, method=method)
        assert centred.meta["center_logits"] is True
        torch.testing.assert_close(centred.metric_clean, hand.metric_clean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(centred.mean_scores, hand.mean_scores, rtol=1e-5, atol=1e-6)
        plain = attribute(model, prompt=PROMPT, answer=ANSWER, metric="logit", method=method)
        assert (plain.mean_scores - centred.mean_scores).abs().max() > 1e-3 * plain.mean_scores.abs().max()


def test_centred_topk_is_the_top_logits_minus_k_means(model):
    with torch.no_grad():
        top = model.logits(model.tokenize(PROMPT))[0, -1].topk(3).indices

    def by_hand(logits):
        last = logits[:, -1].float()
        return last[:, top].sum(-1) - 3 * last.mean(-1)

    centred = attribute(model, prompt=PROMPT, metric="topk", topk=3, center_logits=True)
    hand = attribute(model, prompt=PROMPT, metric_fn=by_hand)
    torch.testing.assert_close(centred.mean_scores, hand.mean_scores, rtol=1e-5, atol=1e-6)


def test_relp_still_conserves_with_centred_logits():
    """Bias-free Llama: the embeddings' RelP attributions sum to the centred logit (METHOD.md section 2)."""
    model = make_tiny("llama")
    batch = model.tokenize(PROMPT)
    metric = make_metric("logit", answer=[single_token_id(model, ANSWER)], center=True)
    with frozen_parameters(model):
        run = run_sites(model, batch, metric, site="neurons", layers=[0], rules=RelPRules())
        (g,) = torch.autograd.grad(run.metric.sum(), [run.embeds])
    m = float(run.metric[0].detach())
    logits = model.logits(batch)[0, -1].float()
    assert m == pytest.approx(float(logits[single_token_id(model, ANSWER)] - logits.mean()), rel=1e-5)
    assert float((run.embeds.detach() * g).sum()) == pytest.approx(m, rel=1e-4, abs=1e-5)


def test_centred_graph_logits_and_their_incoming_edges():
    """A complete graph: each centred logit node's value is the hand-centred logit, and its incoming edges
    (embeddings and every neuron) sum to it."""
    model = make_tiny("llama")
    graph = build_graph(model, PROMPT, answers=[ANSWER, " is"], node_threshold=0.0, max_nodes=None,
                        center_logits=True)  # fmt: skip
    logits = model.logits(model.tokenize(PROMPT))[0, -1].float()
    centred = logits - logits.mean()
    rows = [i for i, n in enumerate(graph.nodes) if n.kind == LOGIT]
    for i in rows:
        assert graph.nodes[i].activation == pytest.approx(float(centred[graph.nodes[i].index]), rel=1e-5)
    act = torch.tensor([graph.nodes[i].activation for i in rows])
    torch.testing.assert_close(graph.adjacency[rows].sum(1), act, rtol=1e-3, atol=1e-4)
    weights = torch.tensor([graph.nodes[i].attribution for i in rows])
    assert graph.meta["metric_value"] == pytest.approx(float((weights * act).sum()), rel=1e-5)
    assert graph.meta["center_logits"] is True


@pytest.mark.parametrize("metric", ["logit-diff", "logprob", "prob"])
def test_centred_logits_refuse_metrics_they_do_not_change(model, metric):
    with pytest.raises(NeurontraceError, match="centred logits do not change"):
        attribute(model, prompt=PROMPT, answer=ANSWER, contrast=" is" if metric == "logit-diff" else None,
                  metric=metric, center_logits=True)  # fmt: skip


def test_attribute_cli_center_logits(folder, tmp_path, model):
    out = tmp_path / "c.safetensors"
    argv = ["attribute", "--model", folder, "--prompt", PROMPT, "--answer", ANSWER, "--metric", "logit"]
    assert main([*argv, "--center-logits", "--out", str(out)]) == 0
    result = AttributionResult.load(out)
    assert result.meta["center_logits"] is True
    expected = _scores(model, center_logits=True)
    torch.testing.assert_close(result.mean_scores, expected, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ suffix length

PROMPTS = ["the keys to the cabinet", "a dog runs", "what capital state is texas of"]
ANSWERS = [" are", " to", " the"]


def test_suffix_keeps_only_the_last_positions_of_each_prompt(model):
    """Prompts of three lengths in one left-padded batch: each example's position-summed score equals the sum
    of its own last N per-position scores, computed alone without the suffix (positions shifted by hand)."""
    n = 2
    result = attribute(model, prompts=PROMPTS, answers=ANSWERS, metric="logit", suffix_length=n, batch_size=3)
    assert result.meta["suffix_length"] == n
    for row, (prompt, answer) in enumerate(zip(PROMPTS, ANSWERS, strict=True)):
        alone = attribute(model, prompt=prompt, answer=answer, metric="logit").mean_scores  # [L, T, d]
        length = alone.shape[1]
        expected = alone[:, length - n :].sum(1)
        torch.testing.assert_close(result.scores_sum[row], expected, rtol=1e-4, atol=1e-6)
        assert (alone[:, : length - n].abs().sum() > 0) and not torch.allclose(expected, alone.sum(1))


def test_suffix_per_position_scores(model):
    plain = _scores(model)
    cut = _scores(model, suffix_length=2)
    assert (cut[:, :-2] == 0).all()
    # exact: the suffix only zeroes the scores of one computation (same kernels, same shapes) afterwards
    torch.testing.assert_close(cut[:, -2:], plain[:, -2:], rtol=0, atol=0)
    whole = _scores(model, suffix_length=50)  # longer than the prompt: everything kept
    torch.testing.assert_close(whole, plain, rtol=0, atol=0)
    with pytest.raises(NeurontraceError, match="suffix length must be"):
        _scores(model, suffix_length=0)


def test_suffix_limits_graph_nodes_to_the_last_positions(model):
    kwargs = dict(answers=[ANSWER], node_threshold=0.005, max_nodes=None)
    plain = build_graph(model, PROMPT, **kwargs)
    graph = build_graph(model, PROMPT, suffix_length=2, **kwargs)
    T = len(graph.tokens)
    got = [n.key for n in graph.nodes if n.kind == NEURON]
    assert got and all(n.position >= T - 2 for n in graph.nodes if n.kind == NEURON)
    assert got == [n.key for n in plain.nodes if n.kind == NEURON and n.position >= T - 2]
    assert any(n.kind == NEURON and n.position < T - 2 for n in plain.nodes)
    assert graph.meta["suffix_length"] == 2


def test_attribute_cli_suffix_length(folder, tmp_path, model):
    out = tmp_path / "s.safetensors"
    argv = ["attribute", "--model", folder, "--prompt", PROMPT, "--answer", ANSWER, "--metric", "logit"]
    assert main([*argv, "--suffix-length", "3", "--out", str(out)]) == 0
    result = AttributionResult.load(out)
    assert result.meta["suffix_length"] == 3
    torch.testing.assert_close(result.mean_scores, _scores(model, suffix_length=3), rtol=1e-6, atol=1e-7)

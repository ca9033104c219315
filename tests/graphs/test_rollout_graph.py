"""Rollout graphs against per-position graphs built with teacher forcing (the prefix up to each target as the
prompt, the next token as the answer) on the same neurons, and the greedy continuation against ``generate``."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny, save_tiny_folder

from neurontrace.cli import main
from neurontrace.errors import NeurontraceError
from neurontrace.graphs.build import LOGIT, NEURON, build_graph
from neurontrace.graphs.export import from_circuit_tracer, to_circuit_tracer, validate_circuit_tracer
from neurontrace.graphs.prune import prune_graph
from neurontrace.graphs.rollout import build_rollout_graph, greedy_continuation

PROMPT = "the keys to the cabinet"


@pytest.mark.parametrize(
    ("family", "seed"), [("llama", 4), ("llama", 2), ("gpt2", 5), ("gemma3", 5), ("phi3", 1)]
)
def test_greedy_continuation_is_what_generate_gives(family, seed):
    model = make_tiny(family, seed=seed)
    ids = model.tokenizer.encode(PROMPT)
    tokens = greedy_continuation(model, prompt_ids=ids, n=6)
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False,
                                pad_token_id=0)  # fmt: skip
    assert tokens == out[0, len(ids) :].tolist()
    assert len(set(tokens)) >= 2 or tokens == [model.config.eos_token_id]  # llama seed 2 ends at once


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_rollout_graph_equals_the_per_position_teacher_forced_graphs(family):
    model = make_tiny(family)
    model.hf.double()
    graph = build_rollout_graph(
        model, PROMPT, continuation=" are on the table", node_threshold=0.01, max_nodes=400
    )
    ids = model.tokenizer.encode(PROMPT + " are on the table")
    targets = ids[5:]
    assert graph.token_ids == ids[:-1]  # teacher forcing: the last target is never an input
    logits = [n for n in graph.nodes if n.kind == LOGIT]
    assert [(n.position, n.index) for n in logits] == list(zip(range(4, 8), targets, strict=True))
    assert graph.meta["target_positions"] == [4, 5, 6, 7]
    assert sum(n.attribution for n in logits) == pytest.approx(1.0)
    where = {n.key: i for i, n in enumerate(graph.nodes)}
    neurons = [n for n in graph.nodes if n.kind == NEURON]
    assert len({n.position for n in neurons}) > 3
    for j, t in enumerate(range(4, 8)):
        word = model.tokenizer.decode([targets[j]])
        mine = [(n.layer, n.position, n.index) for n in neurons if n.position <= t]
        step = build_graph(model, ids[: t + 1], answers=[" " + word], neurons=mine, max_nodes=None)
        step_logit = next(i for i, n in enumerate(step.nodes) if n.kind == LOGIT)
        row = where[logits[j].key]
        # edges into the logit at t: the per-position graph's, and none from later positions
        got = torch.zeros(len(step.nodes), dtype=torch.float64)
        for s, n in enumerate(step.nodes):
            got[s] = float(graph.adjacency[row, where[n.key]])
        expected = step.adjacency[step_logit].double()
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-7)
        assert expected.abs().max() > 0.05
        sources = graph.adjacency[row].nonzero().flatten().tolist()
        assert len(sources) > 5 and all(graph.nodes[c].position <= t for c in sources)
        # every neuron's score for this target, and the logit's value and probability
        scores = {(n.layer, n.position, n.index): n.attribution for n in step.nodes if n.kind == NEURON}
        for n in neurons:
            expected_score = scores.get((n.layer, n.position, n.index), 0.0)
            assert n.extra["attribution_by_target"][j] == pytest.approx(expected_score, rel=1e-5, abs=1e-8)
        assert logits[j].activation == pytest.approx(step.nodes[step_logit].activation, rel=1e-6)
        assert logits[j].prob == pytest.approx(step.nodes[step_logit].prob, rel=1e-6)
    # a neuron's own score is the mean of its scores for the targets (the metric is the mean target logit)
    for n in neurons[:50]:
        assert n.attribution == pytest.approx(sum(n.extra["attribution_by_target"]) / 4, rel=1e-5, abs=1e-9)


def test_rollout_selection_keeps_neurons_important_for_any_target():
    model = make_tiny("llama")
    model.hf.double()  # the prefix graphs' scores then equal the rollout's far below any threshold's margin
    p = 0.02
    graph = build_rollout_graph(model, PROMPT, continuation=" are on the", node_threshold=p, max_nodes=None)
    ids = model.tokenizer.encode(PROMPT + " are on the")
    expected = set()
    for _j, t in enumerate(range(4, 7)):
        full = build_graph(
            model, ids[: t + 1], targets=[(-1, ids[t + 1])], node_threshold=0.0, max_nodes=None
        )
        m = abs(full.meta["metric_value"])
        expected |= {(n.layer, n.position, n.index) for n in full.nodes
                     if n.kind == NEURON and abs(n.attribution) >= p * m}  # fmt: skip
    assert {(n.layer, n.position, n.index) for n in graph.nodes if n.kind == NEURON} == expected


def test_generated_rollout_exports_logits_at_their_positions():
    model = make_tiny("llama", seed=4)
    graph = build_rollout_graph(model, PROMPT, generate=3, node_threshold=0.02)
    tokens = greedy_continuation(model, prompt_ids=model.tokenizer.encode(PROMPT), n=3)
    assert graph.meta["rollout"]["continuation_ids"] == tokens and graph.meta["rollout"]["generated"]
    pruned = prune_graph(graph)
    data = to_circuit_tracer(pruned)
    validate_circuit_tracer(data)
    logit_nodes = [n for n in data["nodes"] if n["feature_type"] == "logit"]
    assert [(n["ctx_idx"], n["feature"]) for n in logit_nodes] == [(4 + j, t) for j, t in enumerate(tokens)]
    assert len({n["node_id"] for n in data["nodes"]}) == len(data["nodes"])
    back = from_circuit_tracer(data)
    assert [(n.position, n.index) for n in back.nodes if n.kind == LOGIT] == [
        (4 + j, t) for j, t in enumerate(tokens)
    ]


def test_rollout_errors():
    model = make_tiny("llama")
    with pytest.raises(NeurontraceError, match="either"):
        build_rollout_graph(model, PROMPT, continuation=" are", generate=2)
    with pytest.raises(NeurontraceError, match="either"):
        build_rollout_graph(model, PROMPT)
    with pytest.raises(NeurontraceError, match=">= 1"):
        build_rollout_graph(model, PROMPT, generate=0)
    with pytest.raises(NeurontraceError, match="targets are its continuation"):
        build_rollout_graph(model, PROMPT, generate=2, answers=[" are"])
    with pytest.raises(NeurontraceError, match="position"):
        build_graph(model, PROMPT, targets=[(7, " are")])


def test_graph_command_builds_a_rollout_graph(tmp_path, capsys):
    folder = save_tiny_folder(tmp_path / "model")
    out = tmp_path / "out"
    argv = [
        "graph",
        "--model",
        folder,
        "--prompt",
        PROMPT,
        "--continuation",
        " are on the",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    data = json.loads((out / "graph.json").read_text())
    assert sorted(n["ctx_idx"] for n in data["nodes"] if n["feature_type"] == "logit") == [4, 5, 6]
    assert data["metadata"]["prompt"] == PROMPT + " are on the"
    assert main(["graph", "--model", folder, "--prompt", PROMPT, "--rollout", "2", "--out", str(out)]) == 0
    assert "targets" in capsys.readouterr().out
    bad = [
        "graph",
        "--model",
        folder,
        "--prompt",
        PROMPT,
        "--rollout",
        "2",
        "--answer",
        " are",
        "--out",
        str(out),
    ]
    assert main(bad) == 2
    assert main(["graph", "--model", folder, "--prompts", "x.txt", "--rollout", "2", "--out", str(out)]) == 2

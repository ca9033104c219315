"""Edge-based circuits: selection on hand-built graphs with known answers, and their faithfulness equal to the
node-based code path and to a hand ablation with hooks on a tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import make_tiny
from rounding import largest_logit, metric_tolerance, normalised_tolerance

from neurontrace.circuits.edges import (
    edge_percentiles,
    edge_scores,
    percentile_of,
    select_by_edges,
    sweep_edges,
)
from neurontrace.circuits.selection import Circuit
from neurontrace.errors import NeurontraceError
from neurontrace.evaluation import faithfulness_of, prepare_eval
from neurontrace.evaluation.runner import EvaluationRun, run_evaluation
from neurontrace.graphs.build import EMBEDDING, LOGIT, NEURON, AttributionGraph, GraphNode, build_graph
from neurontrace.sites import capture
from neurontrace.tasks import Pair
from neurontrace.tokens import tokenize_pairs

# graph nodes: 0 E@0, 1 E@1, 2 A = L0/N2@0, 3 B = L1/N3@1, 4 C = L1/N4@1 (only incoming edges),
# 5 D = L0/N5@1 (only outgoing edges), 6 the logit
A, B, C, D, LOGIT_ROW = 2, 3, 4, 5, 6
RAW_EDGES = {  # (target, source): raw weight
    (A, 0): 4.0,
    (B, A): 2.0,
    (B, 1): -1.0,
    (LOGIT_ROW, B): 3.0,
    (C, A): -5.0,  # C's strongest edge, but C has no outgoing edge
    (LOGIT_ROW, D): 6.0,  # D's only edge: outgoing
    (LOGIT_ROW, A): 2.0,  # ties with B <- A
}


def _graph(edges=RAW_EDGES, activations=(2.0, -0.5, 1.0, 1.0, 10.0)) -> AttributionGraph:
    a, b, c, d, logit = activations
    nodes = [
        GraphNode(EMBEDDING, -1, 0, 10, 0.0, token="the"),
        GraphNode(EMBEDDING, -1, 1, 11, 0.0, token=" keys"),
        GraphNode(NEURON, 0, 0, 2, a, 0.1, token="the"),
        GraphNode(NEURON, 1, 1, 3, b, 0.1, token=" keys"),
        GraphNode(NEURON, 1, 1, 4, c, 0.1, token=" keys"),
        GraphNode(NEURON, 0, 1, 5, d, 0.1, token=" keys"),
        GraphNode(LOGIT, 2, 1, 20, logit, attribution=1.0, token=" are", prob=0.6),
    ]
    adjacency = torch.zeros(7, 7)
    for (t, s), w in edges.items():
        adjacency[t, s] = w
    return AttributionGraph(
        "the keys", ["the", " keys"], [10, 11], nodes, adjacency, {"n_layers": 2, "d_ff": 8}
    )


def _members(circuit: Circuit) -> set[tuple[int, int, int]]:
    return {tuple(i) for i in circuit.mask.nonzero().tolist()}


A_KEY, B_KEY, C_KEY = (0, 0, 2), (1, 1, 3), (1, 1, 4)


def test_percentile_is_numpys_linear_percentile():
    values = torch.tensor([6.0, 2.0, 1.0, 3.0, 2.0, 5.0, 4.0]).sort().values
    for p in (0, 10, 25, 33.3, 50, 90, 99.9, 100):
        assert percentile_of(values, p) == pytest.approx(
            float(np.percentile(values.double().numpy(), p)), abs=1e-12
        )
    with pytest.raises(NeurontraceError):
        percentile_of(values, 101)


def test_selection_by_hand_raw_weights():
    g = _graph()
    # |w| sorted: 1 2 2 3 4 5 6. Scores min(max in, max out): A min(4, 5) = 4, B min(2, 3) = 2, C and D 0.
    scores = edge_scores(graphs=g, weights="raw")
    assert scores.edge_weights.tolist() == [1, 2, 2, 3, 4, 5, 6]
    assert scores.scores.shape == (2, 2, 8)
    assert scores.scores[A_KEY] == 4 and scores.scores[B_KEY] == 2
    assert scores.scores[C_KEY] == 0 and scores.scores[0, 1, 5] == 0
    every = select_by_edges(graph=g, percentile=0, weights="raw")  # threshold 1: every edge is strong
    assert _members(every) == {A_KEY, B_KEY}  # C (only incoming) and D (only outgoing) are dropped
    assert every.meta == {"weights": "raw", "edge_percentile": 0.0, "edge_threshold": 1.0}
    tie = select_by_edges(graph=g, percentile=25, weights="raw")  # position 1.5 between the two 2s: exactly 2
    assert tie.meta["edge_threshold"] == 2.0 and _members(tie) == {A_KEY, B_KEY}  # B's score 2 is at it: kept
    assert _members(select_by_edges(graph=g, percentile=50, weights="raw")) == {A_KEY}  # threshold 3
    assert _members(scores.circuit(threshold=4.0)) == {A_KEY}  # A's incoming edge is exactly at the threshold
    assert _members(scores.circuit(threshold=np.nextafter(4.0, 5.0))) == set()
    assert select_by_edges(graph=g, percentile=100, weights="raw").n_nodes == 0  # threshold 6: only D's edge
    with pytest.raises(NeurontraceError, match="exactly one"):
        scores.circuit(percentile=10, threshold=1.0)


def test_selection_by_hand_normalised_weights():
    # divided by the target's activation: A <- E 4/2, B <- A 2/-0.5, B <- E -1/-0.5, logit <- B 0.3, C <- A -5,
    # logit <- D 0.6, logit <- A 0.2. A: min(2, 5) = 2; B: min(4, 0.3) = 0.3.
    scores = edge_scores(graphs=_graph())
    torch.testing.assert_close(scores.edge_weights, torch.tensor([0.2, 0.3, 0.6, 2.0, 2.0, 4.0, 5.0]))
    assert scores.scores[A_KEY] == pytest.approx(2.0) and scores.scores[B_KEY] == pytest.approx(0.3)
    assert _members(scores.circuit(percentile=0)) == {A_KEY, B_KEY}
    assert _members(scores.circuit(threshold=0.5)) == {A_KEY}


def test_dataset_of_graphs_takes_the_strongest_edge_over_prompts():
    first = _graph()
    second = _graph({**RAW_EDGES, (LOGIT_ROW, C): 0.5, (A, 0): 0.1})  # C gets a (weak) outgoing edge
    scores = edge_scores(graphs=iter([first, second]), weights="raw")  # an iterator: folded one at a time
    assert scores.n_graphs == 2 and scores.edge_weights.numel() == 7 + 8
    assert scores.scores[C_KEY] == 0.5  # min(5 in the first graph, 0.5 in the second)
    assert scores.scores[A_KEY] == 4  # the first graph's incoming edge is the stronger
    assert _members(scores.circuit(threshold=0.5)) == {A_KEY, B_KEY, C_KEY}
    assert _members(scores.circuit(threshold=0.6)) == {A_KEY, B_KEY}
    summed = edge_scores(graphs=[first, second], weights="raw", summed=True)
    assert summed.scores.shape == (2, 8) and summed.scores[1, 3] == 2 and summed.scores[1, 4] == 0.5
    longer = _graph()
    longer.tokens = ["the", " keys", " near"]
    with pytest.raises(NeurontraceError, match="one token length"):
        edge_scores(graphs=[first, longer])
    assert edge_scores(graphs=[first, longer], summed=True).n_graphs == 2


def test_percentile_grid():
    grid = edge_percentiles(24)
    assert grid[0] == pytest.approx(0.0, abs=1e-9) and grid[-1] == pytest.approx(99.99)
    assert grid == sorted(grid) and len(grid) == 24


# -------------------------------------------------------------------------------------- on a tiny model
NOUNS = [("dog", "dogs"), ("key", "keys"), ("table", "tables"), ("cabinet", "cabinets")]
PAIRS = [
    Pair(f"the {sg} near the {o}", f"the {pl} near the {o}", " is", " are")
    for sg, pl in NOUNS
    for o in ("table", "cabinet")
] + [
    Pair(f"the {pl} near the {o}", f"the {sg} near the {o}", " are", " is")
    for sg, pl in NOUNS
    for o in ("dog",)
]
TRAIN, TEST = PAIRS[::2], PAIRS[1::2]


@pytest.fixture(scope="module")
def model():
    return make_tiny("llama", seed=3)


@pytest.fixture(scope="module")
def scores(model):
    graphs = [
        build_graph(model, p.clean_prefix, answers=[p.clean_answer, p.patch_answer], node_threshold=0.02)
        for p in TRAIN
    ]
    return edge_scores(graphs=graphs)


def _hand_metric(model, pairs, keep: torch.Tensor | None) -> float:
    """Mean logit difference with every neuron outside ``keep`` ([L, T, d]) set to its counterfactual mean at its
    position, by forward pre-hooks on each down projection."""
    clean, patch = tokenize_pairs(model, [p.clean_prefix for p in pairs], [p.patch_prefix for p in pairs])
    acts = capture(model, patch)
    handles = []
    for layer in range(model.n_layers) if keep is not None else ():
        mean = acts.get(layer).mean(0)  # [T, d]

        def hook(module, args, mean=mean, kept=keep[layer]):
            (x,) = args
            return (torch.where(kept, x, mean),)

        handles.append(model.hf.model.layers[layer].mlp.down_proj.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            logits = model.hf(input_ids=clean.input_ids, attention_mask=clean.attention_mask).logits[:, -1]
    finally:
        for h in handles:
            h.remove()
    ids = lambda s: [model.tokenizer.convert_tokens_to_ids(s.strip())]  # noqa: E731
    answer = torch.tensor([ids(p.clean_answer)[0] for p in pairs])
    contrast = torch.tensor([ids(p.patch_answer)[0] for p in pairs])
    rows = torch.arange(len(pairs))
    return float((logits[rows, answer] - logits[rows, contrast]).double().mean())


def test_edge_circuit_faithfulness_equals_node_path_and_hand_ablation(model, scores):
    """The three computations run the same float32 model on other batch shapes (the sweep's passes, one circuit per
    pass, the hand forward of the whole test set), so they agree to float32 rounding: each metric value within
    ``t`` of tests/rounding.py, a faithfulness within its normalised_tolerance (the hand path also takes its mean
    ablation value as a float32 mean where the library rounds a float64 one: one rounding more of an input, within
    the 2 ulps a reduction is allowed)."""
    # full passes: the two code paths group circuits into passes differently, which moves the shortcuts' rounding
    ev = prepare_eval(model, TEST, ablation="mean", batch_size=32, shortcuts=False)
    percentiles = [0.0, 50.0, 90.0, 99.0]
    sizes = [scores.circuit(percentile=p).n_nodes for p in percentiles]
    assert len(set(sizes)) >= 3 and sizes == sorted(sizes, reverse=True)  # nested, of different sizes
    shape = (model.n_layers, scores.scores.shape[1], model.d_ff)
    with largest_logit(model) as scale:  # S of the tolerance: the largest |logit| of every forward below
        curve = sweep_edges(ev, scores=scores, percentiles=percentiles, levels=(), random_control=False)
        f_model = _hand_metric(model, TEST, None)
        f_empty = _hand_metric(model, TEST, torch.zeros(shape, dtype=torch.bool))
        # the node-based code path, called on its own with the same node sets, and a hand ablation with hooks
        node_path = {
            p: faithfulness_of(ev, scores.circuit(percentile=p), f_model=ev.metric_with(None), f_empty=curve.f_empty)
            for p in percentiles
        }  # fmt: skip
        hand = {p: _hand_metric(model, TEST, scores.circuit(percentile=p).mask) for p in percentiles}
    t = metric_tolerance(model, logit_scale=scale[0])
    assert sorted(p.n_nodes for p in curve.points) == sorted(set(sizes))
    assert curve.f_model == pytest.approx(f_model, abs=t) and curve.f_empty == pytest.approx(f_empty, abs=t)
    denom = curve.f_model - curve.f_empty
    for p in percentiles:
        circuit = scores.circuit(percentile=p)
        point = next(q for q in curve.points if q.n_nodes == circuit.n_nodes)
        assert curve.meta["edge_percentiles"][str(circuit.n_nodes)] <= p
        faith, comp = node_path[p]
        assert point.faithfulness == pytest.approx(faith, abs=normalised_tolerance(faith, denom, t))
        assert point.completeness == pytest.approx(comp, abs=normalised_tolerance(comp, denom, t))
        by_hand = (hand[p] - f_empty) / (f_model - f_empty)
        assert point.faithfulness == pytest.approx(by_hand, abs=normalised_tolerance(by_hand, denom, t))
    # every two points differ by more than twice their tolerances: a point compared with another circuit's value
    # would fail
    faiths = [(q.faithfulness, normalised_tolerance(q.faithfulness, denom, t)) for q in curve.points]
    for i, (a, ta) in enumerate(faiths):
        assert all(abs(a - b) > 2 * (ta + tb) for b, tb in faiths[i + 1 :]), faiths
    assert curve.method == "relp-edges" and curve.meta["selection"] == "edges"


def test_sweep_edges_refuses_mismatched_grids(model, scores):
    ev = prepare_eval(model, [Pair("the dog near the table on the cabinet", "the dogs near the table on the cabinet",
                                   " is", " are")])  # fmt: skip
    with pytest.raises(NeurontraceError, match="token length"):
        sweep_edges(ev, scores=scores, percentiles=[50.0], levels=())


def test_evaluation_run_adds_the_edge_curve(model, scores, tmp_path):
    run = EvaluationRun(
        model="tiny", data="test", methods=["relp"], bases=["neurons"], n_train=len(TRAIN), n_test=len(TEST),
        points=5, batch_size=4, select=["nodes", "edges"], levels=[0.8],
    )  # fmt: skip
    assert run.to_dict()["select"] == ["nodes", "edges"]
    assert "select" not in EvaluationRun(model="m", data="d", methods=["relp"], bases=["neurons"]).to_dict()
    curves = run_evaluation(
        model, run, train=TRAIN, test=TEST, out=tmp_path, progress=False, log=lambda m: None
    )
    assert [(c.method, c.basis) for c in curves] == [("relp", "neurons"), ("relp-edges", "neurons")]
    edges = curves[1]
    # the run's graphs use build_graph's default node threshold; rebuild its scores by hand and compare sizes
    graphs = [build_graph(model, p.clean_prefix, answers=[p.clean_answer, p.patch_answer]) for p in TRAIN]
    again = edge_scores(graphs=graphs)
    expected = {again.circuit(percentile=p).n_nodes for p in edge_percentiles(5)}
    assert {p.n_nodes for p in edges.points} == expected
    assert (tmp_path / "curves" / "relp-edges-neurons-seed0.json").is_file()
    with pytest.raises(NeurontraceError, match="--select"):
        EvaluationRun(model="m", data="d", methods=["relp"], bases=["neurons"], select=["paths"]).validate()


def test_cli_evaluate_select_edges(tmp_path, capsys):
    from conftest import save_tiny_folder

    from neurontrace.cli import main
    from neurontrace.tasks import save_pairs

    folder = save_tiny_folder(tmp_path / "model", "llama", seed=3)
    data = tmp_path / "pairs.jsonl"
    save_pairs(data, PAIRS)
    out = tmp_path / "run"
    argv = ["evaluate", "--model", folder, "--dataset", str(data), "--methods", "relp", "--bases", "neurons"]
    argv += ["--select", "nodes,edges", "--points", "6", "--out", str(out)]
    assert main(argv) == 0
    assert "| relp-edges | neurons |" in (out / "report.md").read_text()
    curves = json.loads((out / "curves.json").read_text())
    assert [(c["method"], c["basis"]) for c in curves] == [("relp", "neurons"), ("relp-edges", "neurons")]
    assert json.loads((out / "config.json").read_text())["select"] == ["nodes", "edges"]
    capsys.readouterr()
    assert main([*argv[:-2], "--select", "paths", "--out", str(tmp_path / "bad")]) == 2
    assert "--select" in capsys.readouterr().err

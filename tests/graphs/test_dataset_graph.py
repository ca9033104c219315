"""Dataset graphs against the per-prompt graphs combined by hand: node values and edges for every combination,
alignment from the end, and each selection rule (threshold, cumulative mass, per-example top-k, ``any``)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny, save_tiny_folder

from neurontrace.cli import main
from neurontrace.errors import NeurontraceError
from neurontrace.graphs.build import EMBEDDING, LOGIT, NEURON, build_graph
from neurontrace.graphs.dataset import build_dataset_graph

# four prompts, the last two shorter (aligned from the end: offsets 0, 0, 1, 2)
PROMPTS = ["the keys to the cabinet", "the key to the cabinets", "dogs near the table", "the dogs run"]
ANSWERS = [" are", " is", " are", " runs"]
OFFSETS = [0, 0, 1, 2]
WIDTH = 5


@pytest.fixture(scope="module")
def model():
    return make_tiny("llama", seed=1)


@pytest.fixture(scope="module")
def complete(model):
    """Each prompt's complete graph (every neuron a node): its scores are the dense per-prompt scores."""
    return [
        build_graph(model, p, answers=[a], node_threshold=0.0, max_nodes=None)
        for p, a in zip(PROMPTS, ANSWERS, strict=True)
    ]


def _dense(graphs) -> torch.Tensor:
    """``[prompt, layer, position, neuron]`` node scores aligned from the end (0 where a prompt has no position)."""
    out = torch.zeros(len(graphs), 3, WIDTH, 48, dtype=torch.float64)
    for i, g in enumerate(graphs):
        for n in g.nodes:
            if n.kind == NEURON:
                out[i, n.layer, n.position + OFFSETS[i], n.index] = n.attribution
    return out


def _combine(stack: torch.Tensor, combine: str) -> torch.Tensor:
    if combine in ("mean", "any"):
        return stack.mean(0)
    if combine == "max":
        return stack.max(0).values
    pick = stack.abs().argmax(0, keepdim=True)  # max_abs: the value of largest magnitude, sign kept
    return stack.gather(0, pick)[0]


def _keys(mask: torch.Tensor) -> set[tuple[int, int, int]]:
    return {tuple(k) for k in mask.nonzero().tolist()}


def _neurons(graph) -> set[tuple[int, int, int]]:
    return {(n.layer, n.position, n.index) for n in graph.nodes if n.kind == NEURON}


def _gap_value(values: torch.Tensor, near: float) -> float:
    """A value near ``near`` half-way (in log) across the widest gap between neighbouring ``values``, so float
    rounding cannot move an element across it."""
    r = values.flatten().abs().sort().values
    r = r[r > 0]
    i = int(torch.searchsorted(r, torch.tensor(near, dtype=r.dtype)))
    window = range(max(1, i - 15), min(len(r), i + 15))
    j = max(window, key=lambda k: float(r[k] / r[k - 1]))
    return float((r[j] * r[j - 1]).sqrt())


@pytest.mark.parametrize("combine", ["mean", "max", "max_abs", "any"])
def test_dataset_graph_is_the_per_prompt_graphs_combined_by_hand(model, combine):
    graph = build_dataset_graph(model, PROMPTS, answers=ANSWERS, combine=combine, per_example_topk=40)
    chosen = sorted(_neurons(graph))
    assert len(chosen) > 6 and any(
        p < 2 for _, p, _ in chosen
    )  # several prompts' neurons, short prompts' gaps
    # each prompt's graph on the same neurons (where its positions exist), placed at the dataset's positions
    keys = [n.key for n in graph.nodes]
    index = {k: j for j, k in enumerate(keys)}
    N = len(keys)
    adjacency = torch.zeros(len(PROMPTS), N, N, dtype=torch.float64)
    values = torch.zeros(len(PROMPTS), 3, N, dtype=torch.float64)
    for i, (prompt, answer) in enumerate(zip(PROMPTS, ANSWERS, strict=True)):
        o = OFFSETS[i]
        mine = [(layer, pos - o, unit) for layer, pos, unit in chosen if pos >= o]
        g = build_graph(model, prompt, answers=[answer], neurons=mine, max_nodes=None)
        assert len(_neurons(g)) == len(mine)
        at = torch.tensor([index[(n.kind, n.layer, n.position + o, n.index)] for n in g.nodes])
        adjacency[i][at[:, None], at[None, :]] = g.adjacency.double()
        values[i][:, at] = torch.tensor([[n.activation, n.attribution, n.prob] for n in g.nodes]).double().T
    expected = _combine(adjacency, combine)
    assert torch.allclose(graph.adjacency.double(), expected, rtol=1e-6, atol=1e-7)
    assert graph.adjacency.abs().max() > 0.1
    got = torch.tensor([[n.activation, n.attribution, n.prob] for n in graph.nodes], dtype=torch.float64).T
    assert torch.allclose(got, _combine(values, combine), rtol=1e-6, atol=1e-7)
    # alignment: every prompt's answer is a logit at the last position; the short prompts' tokens sit at the end
    logits = {(n.position, n.token) for n in graph.nodes if n.kind == LOGIT}
    assert logits == {(WIDTH - 1, a.strip()) for a in ANSWERS}
    embeds = [(n.position, n.token) for n in graph.nodes if n.kind == EMBEDDING]
    assert len(embeds) == len(set(embeds))  # one embedding node per (position, token)
    assert {e for e in embeds if e[0] in (0, 2, 4)} == {
        (0, "the"), (2, "to"), (2, "near"), (2, "the"), (4, "cabinet"), (4, "cabinets"), (4, "table"), (4, "run")
    }  # fmt: skip
    assert graph.tokens == ["the", "keys|key|dogs", "to|near|the", "the|dogs", "cabinet|cabinets|table|…"]
    assert graph.meta["dataset"]["offsets"] == OFFSETS and graph.meta["dataset"]["combine"] == combine


@pytest.mark.parametrize("combine", ["mean", "max", "max_abs"])
def test_threshold_selection_on_the_combined_scores(model, complete, combine):
    combined = _combine(_dense(complete), combine)
    m = float(
        _combine(torch.tensor([g.meta["metric_value"] for g in complete], dtype=torch.float64), combine)
    )
    ratios = combined.abs() / abs(m)
    p = _gap_value(ratios, float(ratios.flatten().sort(descending=True).values[30]))  # about 30 nodes
    expected = _keys(combined.abs() >= p * abs(m))
    assert 5 < len(expected) < 300
    graph = build_dataset_graph(
        model, PROMPTS, answers=ANSWERS, combine=combine, node_threshold=p, max_nodes=None
    )
    assert _neurons(graph) == expected
    assert graph.meta["metric_value"] == pytest.approx(m, rel=1e-6)
    # max_nodes keeps the largest |combined score|
    k = len(expected) // 2
    capped = build_dataset_graph(
        model, PROMPTS, answers=ANSWERS, combine=combine, node_threshold=p, max_nodes=k
    )
    top = sorted(expected, key=lambda key: -abs(float(combined[key])))[:k]
    assert _neurons(capped) == set(top)


@pytest.mark.parametrize("combine", ["mean", "max_abs"])
def test_mass_selection_keeps_the_largest_until_the_fraction(model, complete, combine):
    combined = _combine(_dense(complete), combine).abs().flatten()
    values = combined.sort(descending=True).values
    cumulative = values.cumsum(0) / values.sum()
    fraction = _gap_value(cumulative[5:200], 0.6)  # a fraction between two neighbouring cumulative shares
    expected, total = set(), 0.0
    for flat in combined.argsort(descending=True).tolist():  # by hand: add the largest until the fraction
        if total >= fraction * float(values.sum()):
            break
        expected.add((flat // (WIDTH * 48), (flat // 48) % WIDTH, flat % 48))
        total += float(combined[flat])
    graph = build_dataset_graph(
        model, PROMPTS, answers=ANSWERS, combine=combine, mass=fraction, max_nodes=None
    )
    assert _neurons(graph) == expected
    assert 5 < len(expected) < 200


def test_per_example_top_k_and_any_are_unions_of_each_prompts_own_selection(model, complete):
    dense = _dense(complete)
    k = 7
    expected = set()
    for i in range(len(PROMPTS)):
        own = dense[i].abs().flatten()
        expected |= {(f // (WIDTH * 48), (f // 48) % WIDTH, f % 48) for f in own.topk(k).indices.tolist()}
    graph = build_dataset_graph(model, PROMPTS, answers=ANSWERS, combine="mean", per_example_topk=k)
    assert _neurons(graph) == expected and len(expected) > k
    # any: each prompt's own threshold relative to its own metric
    m = [abs(g.meta["metric_value"]) for g in complete]
    p = _gap_value(dense[0] / m[0], 0.05)
    expected = set().union(*(_keys(dense[i].abs() >= p * m[i]) for i in range(len(PROMPTS))))
    graph = build_dataset_graph(
        model, PROMPTS, answers=ANSWERS, combine="any", node_threshold=p, max_nodes=None
    )
    assert _neurons(graph) == expected
    combined_mean = _keys(dense.mean(0).abs() >= p * abs(sum(g.meta["metric_value"] for g in complete) / 4))
    assert expected != combined_mean


def test_a_graph_on_given_neurons_is_the_complete_graph_restricted(model, complete):
    """Direct effects do not depend on which other neurons are nodes."""
    full = complete[0]
    torch.manual_seed(0)
    neurons = [n for n in full.nodes if n.kind == NEURON]
    picks = [neurons[i] for i in torch.randperm(len(neurons))[:25].tolist()]
    g = build_graph(
        model, PROMPTS[0], answers=[ANSWERS[0]], neurons=[(n.layer, n.position, n.index) for n in picks]
    )
    where = {n.key: i for i, n in enumerate(full.nodes)}
    rows = torch.tensor([where[n.key] for n in g.nodes])
    assert torch.allclose(g.adjacency, full.adjacency[rows][:, rows], rtol=1e-5, atol=1e-7)
    assert [n.attribution for n in g.nodes] == pytest.approx(
        [full.nodes[r].attribution for r in rows], rel=1e-6
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(combine="median"), "unknown combination"),
        (dict(per_example_topk=3, mass=0.5), "at most one"),
        (dict(mass=1.5), "fraction"),
        (dict(per_example_topk=0), "top-k"),
        (dict(answers=[" are"]), "one entry per prompt"),
    ],
)
def test_bad_options_are_one_line_errors(model, kwargs, match):
    with pytest.raises(NeurontraceError, match=match):
        build_dataset_graph(model, PROMPTS, **{"answers": ANSWERS, **kwargs})
    with pytest.raises(NeurontraceError, match="neuron"):
        build_graph(model, PROMPTS[0], neurons=[(0, 9, 1)])


def test_graph_command_builds_a_dataset_graph(tmp_path, capsys):
    from neurontrace.graphs.export import load_graph, validate_circuit_tracer

    folder = save_tiny_folder(tmp_path / "model", seed=1)
    data = tmp_path / "pairs.jsonl"
    lines = [
        {"clean_prefix": p, "patch_prefix": p, "clean_answer": a, "patch_answer": a}
        for p, a in zip(PROMPTS, ANSWERS, strict=True)
    ]
    data.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    out = tmp_path / "out"
    argv = [
        "graph",
        "--model",
        folder,
        "--dataset",
        str(data),
        "--combine",
        "max_abs",
        "--per-example-topk",
        "6",
    ]
    assert main([*argv, "--out", str(out), "--no-prune"]) == 0
    assert "4 prompts" in capsys.readouterr().out
    written = json.loads((out / "graph.json").read_text())
    validate_circuit_tracer(written)
    full = load_graph(out / "graph.neurontrace.json")
    expected = build_dataset_graph(make_tiny("llama", seed=1), PROMPTS, answers=ANSWERS, combine="max_abs",
                                   per_example_topk=6)  # fmt: skip
    assert [n.key for n in full.nodes] == [n.key for n in expected.nodes]
    assert torch.allclose(full.adjacency, expected.adjacency, atol=1e-6)
    assert main(["graph", "--model", folder, "--dataset", str(data), "--prompt", "x", "--out", str(out)]) == 2
    assert (
        main(["graph", "--model", folder, "--prompt", "the keys", "--combine", "max", "--out", str(out)]) == 2
    )


def test_options_reach_every_prompts_selection(model):
    """``suffix_length`` counts from each prompt's end, which is where the prompts align."""
    graph = build_dataset_graph(model, PROMPTS, answers=ANSWERS, per_example_topk=10, suffix_length=2)
    positions = {p for _, p, _ in _neurons(graph)}
    assert positions == {3, 4}

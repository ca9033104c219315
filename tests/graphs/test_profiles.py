"""Node profiles against independent computations: a graph worked by hand, sums over explicitly enumerated paths,
and, on a complete graph, the replacement model's own total gradients (one backward per node, no graph)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny

from neurontrace.attribution.replacement import RelPRules, replacement_model
from neurontrace.graphs.build import EMBEDDING, LOGIT, NEURON, AttributionGraph, GraphNode, build_graph
from neurontrace.graphs.profiles import node_profiles
from neurontrace.graphs.prune import node_influence, prune_graph
from neurontrace.hooks import add_output_hook
from neurontrace.sites import hook_site

PROMPT = "the keys to the cabinet"


def _hand_graph() -> AttributionGraph:
    """E0, E1 -> n1 (a=2) -> n2 (a=3) -> logit (5); incoming edges sum to each target's value."""
    nodes = [
        GraphNode(EMBEDDING, -1, 0, 10, 0.0),
        GraphNode(EMBEDDING, -1, 1, 11, 0.0),
        GraphNode(NEURON, 0, 1, 4, 2.0),
        GraphNode(NEURON, 1, 1, 6, 3.0),
        GraphNode(LOGIT, 2, 1, 12, 5.0, attribution=1.0),
    ]
    A = torch.zeros(5, 5)
    A[2, 0], A[2, 1] = 0.5, 1.5
    A[3, 1], A[3, 2] = 1.0, 2.0
    A[4, 0], A[4, 2], A[4, 3] = 1.0, 1.0, 3.0
    return AttributionGraph("x y", ["x", "y"], [10, 11], nodes, A, {"n_layers": 2})


def test_profiles_of_a_graph_worked_by_hand():
    p = node_profiles(_hand_graph())
    # n2 from E0: only via n1 (2/2 * 0.5); from E1: 1.0 direct + 2/2 * 1.5. The logit: 1 + (1/2)*0.5 + (3/3)*0.5
    expected_attr = [[1, 0], [0, 1], [0.5, 1.5], [0.5, 2.5], [1.75, 3.25]]
    torch.testing.assert_close(p.source_attribution, torch.tensor(expected_attr, dtype=torch.float64))
    # contributions to the logit: E0 1.75, E1 3.25, n1 2 * (1/2 + 1 * 3/3), n2 3 * 3/3, the logit itself 5
    torch.testing.assert_close(p.logit_contribution[:, 0], torch.tensor([1.75, 3.25, 3.0, 3.0, 5.0]).double())
    # shares: weight * d m / d target / m; d m / d n1 = 1/2 + 1 = 1.5
    share = torch.zeros(5, 5, dtype=torch.float64)
    share[2, 0], share[2, 1] = 0.5 * 1.5 / 5, 1.5 * 1.5 / 5
    share[3, 1], share[3, 2] = 1.0 / 5, 2.0 / 5
    share[4, 0], share[4, 2], share[4, 3] = 1.0 / 5, 1.0 / 5, 3.0 / 5
    torch.testing.assert_close(p.edge_share, share)
    data = json.loads(p.to_json())
    assert data["edges"][0] == {"source": "E_10_0", "target": "0_4_1", "weight": 0.5, "share": 0.15}
    assert data["nodes"][3]["source_attribution"] == pytest.approx([0.5, 2.5]) and data["metric"] == 5.0


def _paths(graph, start: int, end: int) -> float:
    """Sum over every path from ``start`` to ``end`` of the product of its edges' ``A / source value``."""
    A = graph.adjacency.double()
    unit = [1.0 if n.kind == EMBEDDING else n.activation for n in graph.nodes]
    total = 0.0
    stack = [(start, 1.0)]
    while stack:
        node, product = stack.pop()
        if node == end:
            total += product
            continue
        for t in (A[:, node] != 0).nonzero().flatten().tolist():
            stack.append((t, product * float(A[t, node]) / unit[node]))
    return total


def test_profiles_equal_sums_over_enumerated_paths():
    model = make_tiny("llama")
    graph = build_graph(model, PROMPT, answers=[" are", " is"], node_threshold=0.03, max_nodes=12)
    p = node_profiles(graph)
    nodes = graph.nodes
    embeds = sorted((n.position, i) for i, n in enumerate(nodes) if n.kind == EMBEDDING)
    logits = [i for i, n in enumerate(nodes) if n.kind == LOGIT]
    n_paths = 0
    for i, n in enumerate(nodes):
        for col, (_, e) in enumerate(embeds):
            expected = 1.0 if i == e else _paths(graph, e, i)
            assert float(p.source_attribution[i, col]) == pytest.approx(expected, rel=1e-9, abs=1e-12)
            n_paths += expected != 0
        for col, ell in enumerate(logits):
            unit = 1.0 if n.kind == EMBEDDING else n.activation
            expected = n.activation if i == ell else unit * _paths(graph, i, ell)
            assert float(p.logit_contribution[i, col]) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert n_paths > 20


@pytest.fixture(scope="module")
def complete():
    model = make_tiny("llama")
    model.hf.double()
    return model, build_graph(model, PROMPT, answers=[" are", " is"], node_threshold=0.0, max_nodes=None)


def _total_gradients(model, node_rows, graph):
    """Replacement-model gradients with no graph: ``sum_d e_p * d a_i / d e_p`` for every node ``i`` and
    ``a_i * d logit_l / d a_i`` for every neuron ``i`` and logit ``l`` (one backward per node or logit)."""
    seen: dict = {}

    def on_embed(y):
        seen["e"] = y.detach().requires_grad_(True)
        return seen["e"]

    def record(layer):
        def fn(x):
            seen[layer] = x

        return fn

    with replacement_model(model, RelPRules()) as rep:
        handles = [add_output_hook(model.embed, on_embed)]
        handles += [hook_site(model, "neurons", layer, record(layer)) for layer in range(model.n_layers)]
        with torch.enable_grad():
            logits = rep.logits(model.forward(model.tokenize(PROMPT)))[0, -1]
        for h in handles:
            h.remove()
    e = seen["e"]
    attr, contrib = {}, {}
    for i in node_rows:
        n = graph.nodes[i]
        value = logits[n.index] if n.kind == LOGIT else seen[n.layer][0, n.position, n.index]
        (g,) = torch.autograd.grad(value, [e], retain_graph=True)
        attr[i] = (g * e.detach())[0].sum(-1)
    for ell in [i for i, n in enumerate(graph.nodes) if n.kind == LOGIT]:
        grads = torch.autograd.grad(logits[graph.nodes[ell].index], [seen[la] for la in range(model.n_layers)],
                                    retain_graph=True)  # fmt: skip
        contrib[ell] = {la: (g * seen[la].detach())[0] for la, g in enumerate(grads)}
    return attr, contrib


def test_profiles_of_a_complete_graph_are_the_replacement_models_total_attributions(complete):
    model, graph = complete
    p = node_profiles(graph)
    nodes = graph.nodes
    neurons = [i for i, n in enumerate(nodes) if n.kind == NEURON]
    logits = [i for i, n in enumerate(nodes) if n.kind == LOGIT]
    torch.manual_seed(0)
    sample = [neurons[i] for i in torch.randperm(len(neurons))[:40].tolist()] + logits
    attr, contrib = _total_gradients(model, sample, graph)
    for i in sample:
        scale = max(abs(nodes[i].activation), 1e-3)
        torch.testing.assert_close(p.source_attribution[i], attr[i].double(), rtol=1e-4, atol=1e-5 * scale)
    for col, ell in enumerate(logits):
        truth = torch.tensor([float(contrib[ell][nodes[i].layer][nodes[i].position, nodes[i].index])
                              for i in neurons], dtype=torch.float64)  # fmt: skip
        scale = float(truth.abs().max())
        torch.testing.assert_close(p.logit_contribution[neurons, col], truth, rtol=1e-4, atol=1e-5 * scale)
    # weighted over the logits: each neuron's RelP node score (build_graph's selection pass)
    scores = torch.tensor([nodes[i].attribution for i in neurons], dtype=torch.float64)
    torch.testing.assert_close(
        p.metric_attribution[neurons], scores, rtol=1e-4, atol=1e-5 * float(scores.abs().max())
    )


def test_conservation_identities_of_a_complete_graph(complete):
    """Bias-free llama, every neuron a node: rows of the source-token attribution sum to the activation, the
    edge shares crossing any layer boundary sum to 1, and pruning's influence is the weighted per-logit one."""
    _, graph = complete
    p = node_profiles(graph)
    act = torch.tensor([n.activation for n in graph.nodes], dtype=torch.float64)
    rows = [i for i, n in enumerate(graph.nodes) if n.kind != EMBEDDING]
    torch.testing.assert_close(p.source_attribution[rows].sum(1), act[rows], rtol=1e-4, atol=1e-4)
    layer = torch.tensor([n.layer for n in graph.nodes])
    for boundary in range(graph.n_layers + 1):  # edges from below the boundary to at or above it
        crossing = (layer[:, None] >= boundary) & (layer[None, :] < boundary)
        assert float(p.edge_share[crossing].sum()) == pytest.approx(1.0, abs=1e-4), boundary
    weights = torch.tensor(p.logit_weights, dtype=torch.float64)
    torch.testing.assert_close(p.logit_influence @ weights, node_influence(graph))


def test_profiles_of_a_pruned_graph_carry_less_and_save(tmp_path, complete):
    _, graph = complete
    pruned = prune_graph(graph, node_fraction=0.5, edge_fraction=0.9)
    p = node_profiles(pruned)
    weights = torch.tensor(p.logit_weights, dtype=torch.float64)
    torch.testing.assert_close(p.logit_influence @ weights, node_influence(pruned))
    boundary = graph.n_layers  # the edges into the logits: what the kept ones carry of the metric
    layer = torch.tensor([n.layer for n in pruned.nodes])
    crossing = (layer[:, None] >= boundary) & (layer[None, :] < boundary)
    kept = float(p.edge_share[crossing].sum())
    logits = [i for i, n in enumerate(pruned.nodes) if n.kind == LOGIT]
    carried = sum(pruned.nodes[i].attribution * float(pruned.adjacency[i].double().sum()) for i in logits)
    assert kept == pytest.approx(carried / p.metric) and abs(kept - 1) > 1e-3
    act = torch.tensor([n.activation for n in pruned.nodes], dtype=torch.float64)
    neurons = [i for i, n in enumerate(pruned.nodes) if n.kind == NEURON]
    assert (p.source_attribution[neurons].sum(1) - act[neurons]).abs().max() > 1e-3  # paths were dropped
    path = p.save(tmp_path / "profiles.json")
    data = json.loads(path.read_text())
    assert data["format"] == "neurontrace-profiles" and len(data["nodes"]) == len(pruned.nodes)
    assert len(data["edges"]) == pruned.n_edges
    assert sum(e["share"] for e in data["edges"] if e["target"].startswith(f"{graph.n_layers + 1}_")) == (
        pytest.approx(kept)
    )


def test_graph_command_writes_profiles_with_ig_edges(tmp_path, capsys):
    from conftest import save_tiny_folder

    from neurontrace.cli import main
    from neurontrace.graphs.export import load_graph

    folder = save_tiny_folder(tmp_path / "model")
    argv = [
        "graph",
        "--model",
        folder,
        "--prompt",
        PROMPT,
        "--answer",
        " are",
        "--out",
        str(tmp_path / "out"),
    ]
    argv += ["--node-threshold", "0.02", "--edges", "ig", "--edge-steps", "2", "--profiles", "--no-prune"]
    assert main(argv) == 0
    assert "profiles:" in capsys.readouterr().out
    graph = load_graph(tmp_path / "out" / "graph.neurontrace.json")
    assert graph.meta["edges"] == "ig" and graph.meta["edge_steps"] == 2
    data = json.loads((tmp_path / "out" / "graph.profiles.json").read_text())
    expected = node_profiles(graph)
    assert [n["node_id"] for n in data["nodes"]] == expected.node_ids
    got = torch.tensor([n["source_attribution"] for n in data["nodes"]], dtype=torch.float64)
    torch.testing.assert_close(got, expected.source_attribution)
    assert main([*argv, "--edge-steps", "0"]) == 2  # the last one given counts
    assert "edge steps" in capsys.readouterr().err

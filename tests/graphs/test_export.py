"""Pruning by influence, the circuit-tracer JSON (validated against its JSON Schema) and loss-free round trips."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny

from neurontrace.errors import NeurontraceError
from neurontrace.graphs.build import EMBEDDING, LOGIT, NEURON, AttributionGraph, GraphNode, build_graph
from neurontrace.graphs.export import (
    cantor,
    from_circuit_tracer,
    load_graph,
    save_graph,
    to_circuit_tracer,
    validate_circuit_tracer,
)
from neurontrace.graphs.prune import node_influence, prune_graph


@pytest.fixture(scope="module")
def graph():
    return build_graph(make_tiny("llama"), "the keys to the cabinet", node_threshold=0.0, max_nodes=120)


def _chain() -> AttributionGraph:
    """E -> N1 -> logit, and E -> N2 (a dead end): hand-checkable influence."""
    nodes = [
        GraphNode(EMBEDDING, -1, 0, 7, 0.0, token="a"),
        GraphNode(NEURON, 0, 0, 1, 1.0, token="a"),
        GraphNode(NEURON, 0, 0, 2, 1.0, token="a"),
        GraphNode(NEURON, 1, 0, 3, 1.0, token="a"),
        GraphNode(LOGIT, 2, 0, 9, 2.0, attribution=1.0, token="b", prob=0.5),
    ]
    A = torch.zeros(5, 5)
    A[1, 0], A[2, 0], A[3, 1] = 1.0, 1.0, 2.0  # N3 gets all its input from N1
    A[4, 3], A[4, 0] = 3.0, 1.0  # the logit: 3/4 from N3, 1/4 from the embedding
    return AttributionGraph("a", ["a"], [7], nodes, A, {"n_layers": 2})


def test_influence_and_pruning_by_hand():
    g = _chain()
    influence = node_influence(g)
    assert influence[3] == pytest.approx(0.75) and influence[1] == pytest.approx(0.75)
    assert influence[2] == pytest.approx(0.0) and influence[0] == pytest.approx(0.25 + 0.75)
    pruned = prune_graph(g, node_fraction=0.8, edge_fraction=0.99)
    kinds = [(n.kind, n.index) for n in pruned.nodes]
    assert (NEURON, 2) not in kinds and (NEURON, 1) in kinds and (NEURON, 3) in kinds  # the dead end is gone
    assert pruned.nodes[-1].kind == LOGIT and pruned.adjacency.shape == (4, 4)


def test_pruned_graph_keeps_the_influential_core(graph):
    pruned = prune_graph(graph)
    neurons = [n for n in pruned.nodes if n.kind == NEURON]
    assert 0 < len(neurons) < len([n for n in graph.nodes if n.kind == NEURON])
    assert all(n.influence is not None for n in pruned.nodes)
    for i, n in enumerate(pruned.nodes):  # no dangling neurons
        if n.kind == NEURON:
            assert (pruned.adjacency[i] != 0).any() and (pruned.adjacency[:, i] != 0).any()
    assert len([n for n in pruned.nodes if n.kind == EMBEDDING]) == 5


def test_circuit_tracer_json_validates_and_round_trips(graph, tmp_path):
    pruned = prune_graph(graph)
    data = to_circuit_tracer(pruned, slug="keys")
    validate_circuit_tracer(data)
    node = next(n for n in data["nodes"] if n["feature_type"] == "mlp neuron")
    layer, index, pos = (int(x) for x in node["node_id"].split("_"))
    assert node["feature"] == cantor(layer, index) and node["ctx_idx"] == pos
    assert any(n["node_id"].startswith("E_") for n in data["nodes"])
    assert any(
        n["node_id"].startswith(f"{graph.n_layers + 1}_") and n["is_target_logit"] for n in data["nodes"]
    )
    path = save_graph(pruned, tmp_path / "graph.json", slug="keys")
    back = load_graph(path)
    assert [n.key for n in back.nodes] == [n.key for n in pruned.nodes]
    torch.testing.assert_close(back.adjacency, pruned.adjacency)
    assert [n.influence for n in back.nodes] == [n.influence for n in pruned.nodes]
    assert back.tokens == pruned.tokens and back.prompt == pruned.prompt


def test_own_format_round_trip(graph, tmp_path):
    path = save_graph(graph, tmp_path / "graph.neurontrace.json")
    back = load_graph(path)
    assert [n.__dict__ for n in back.nodes] == [n.__dict__ for n in graph.nodes]
    torch.testing.assert_close(back.adjacency, graph.adjacency)
    assert json.loads(path.read_text())["schema_version"] == 1


def test_schema_rejects_broken_graphs(graph):
    import jsonschema

    data = to_circuit_tracer(graph)
    del data["nodes"][0]["node_id"]
    with pytest.raises(jsonschema.ValidationError):
        validate_circuit_tracer(data)


def test_bad_graph_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(NeurontraceError, match="is not JSON"):
        load_graph(bad)
    with pytest.raises(NeurontraceError, match="no such graph file"):
        load_graph(tmp_path / "missing.json")
    with pytest.raises(NeurontraceError, match="not an attribution-graph JSON"):
        from_circuit_tracer({"metadata": {}})

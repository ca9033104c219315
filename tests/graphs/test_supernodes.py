"""Supernodes: path-share profiles, deterministic clustering, labels, and the circuit-tracer JSON."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny

from neurontrace.errors import NeurontraceError
from neurontrace.graphs.build import EMBEDDING, LOGIT, NEURON, AttributionGraph, GraphNode, build_graph
from neurontrace.graphs.export import to_circuit_tracer, validate_circuit_tracer
from neurontrace.graphs.prune import prune_graph
from neurontrace.graphs.supernodes import average_linkage, find_supernodes, path_shares, with_supernodes


def _two_streams() -> AttributionGraph:
    """' keys'@1 drives neurons A1 -> A2 -> ' are'; ' cabinet'@2 drives B1 -> B2 -> ' is' (small cross-talk)."""
    nodes = [
        GraphNode(EMBEDDING, -1, 0, 10, 0.0, token="the"),
        GraphNode(EMBEDDING, -1, 1, 11, 0.0, token=" keys"),
        GraphNode(EMBEDDING, -1, 2, 12, 0.0, token=" cabinet"),
        GraphNode(NEURON, 0, 1, 5, 1.0, 0.5, token=" keys"),  # 3: A1
        GraphNode(NEURON, 0, 2, 6, 1.0, 0.3, token=" cabinet"),  # 4: B1
        GraphNode(NEURON, 1, 2, 7, 1.0, 0.6, token=" cabinet"),  # 5: A2 (reads keys via attention)
        GraphNode(NEURON, 1, 2, 8, -1.0, 0.2, token=" cabinet"),  # 6: B2
        GraphNode(LOGIT, 2, 2, 20, 3.0, attribution=0.7, token=" are", prob=0.6),
        GraphNode(LOGIT, 2, 2, 21, 2.0, attribution=0.3, token=" is", prob=0.25),
    ]
    A = torch.zeros(9, 9)
    A[3, 1], A[3, 0] = 2.0, 0.1
    A[4, 2], A[4, 0] = 2.0, 0.1
    A[5, 3], A[5, 1], A[5, 2] = 1.5, 0.5, 0.1
    A[6, 4], A[6, 2], A[6, 1] = -1.5, 0.5, 0.1
    A[7, 5], A[7, 3], A[7, 6] = 2.0, 0.5, 0.1
    A[8, 6], A[8, 4], A[8, 5] = 2.0, 0.5, 0.1
    A[7, 2], A[8, 1] = 0.2, 0.2  # direct embedding -> logit paths
    return AttributionGraph(
        "the keys cabinet", ["the", " keys", " cabinet"], [10, 11, 12], nodes, A, {"n_layers": 2}
    )


@pytest.fixture(scope="module")
def tiny_graph():
    return build_graph(make_tiny("llama"), "the keys to the cabinet", node_threshold=0.0, max_nodes=60)


def test_path_shares_by_hand():
    g = _two_streams()
    into, out = path_shares(g)
    assert into.shape == (4, 3) and out.shape == (4, 2)
    torch.testing.assert_close(into.sum(1), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(into[0], torch.tensor([0.1, 2.0, 0.0], dtype=torch.float64) / 2.1)
    # A2 (row 2): direct 0.5 from keys, 0.1 from cabinet, 1.5 through A1 (which is 2/2.1 keys, 0.1/2.1 the)
    expected = torch.tensor([1.5 * 0.1 / 2.1, 0.5 + 1.5 * 2 / 2.1, 0.1], dtype=torch.float64) / 2.1
    torch.testing.assert_close(into[2], expected)
    torch.testing.assert_close(out.abs().sum(1), torch.ones(4, dtype=torch.float64))
    assert out[0, 0] > 0.9 and out[1, 1] > 0.9  # A1 pushes ' are', B1 pushes ' is'
    # B1 -> B2 is negative, but B2 fires negatively: B1 makes it more negative, which pushes ' is' up
    g.adjacency[8, 4] = 0.0
    assert path_shares(g)[1][1, 1] > 0.9
    g.nodes[6].activation = 1.0  # now the same edge weakens B2: B1 suppresses ' is' through it
    assert path_shares(g)[1][1, 1] < -0.9


def test_two_streams_make_two_labelled_supernodes():
    g = _two_streams()  # the streams cross positions: grouped only when positions may mix
    supernodes = find_supernodes(g, same_position=False, layer_weight=0.0)
    assert len(supernodes) == 2
    a, b = supernodes  # strongest first: A has summed |attribution| 1.1, B 0.5
    assert a.nodes == [3, 5] and b.nodes == [4, 6]
    assert a.node_ids == ["0_5_1", "1_7_2"] and b.node_ids == ["0_6_2", "1_8_2"]
    assert a.label == "from ' keys'@1 → ' are' (L0–L1)"
    assert b.label == "from ' cabinet'@2 → ' is' (L0–L1)"
    assert a.input_position == 1 and a.output_token == " are" and a.layers == (0, 1)
    assert 0.5 < a.input_share <= 1 and 0.5 < b.output_share <= 1
    assert a.to_list() == [a.label, "0_5_1", "1_7_2"]
    assert (
        len(find_supernodes(g, n_clusters=1, same_position=False, layer_weight=0.0)) == 1
    )  # one cluster of all four
    assert (
        find_supernodes(g, distance_threshold=0.0, same_position=False, layer_weight=0.0) == []
    )  # nothing identical: singletons, below min_size
    assert (
        len(find_supernodes(g, distance_threshold=0.0, min_size=1, same_position=False, layer_weight=0.0))
        == 4
    )
    g.adjacency[8] *= -1  # B now pushes ' is' down
    assert (
        find_supernodes(g, same_position=False, layer_weight=0.0)[1].label
        == "from ' cabinet'@2 ⊣ ' is' (L0–L1)"
    )
    assert find_supernodes(g, same_position=False, layer_weight=0.0)[1].output_share < -0.5


def test_default_supernodes_stay_at_one_position_and_split_far_layers():
    g = _two_streams()
    for s in find_supernodes(g, min_size=1):
        assert len({g.nodes[i].position for i in s.nodes}) == 1
    # two neurons with identical profiles at one position: together when adjacent, apart when 29 layers apart
    nodes = [
        GraphNode(EMBEDDING, -1, 0, 10, 0.0, token="a"),
        GraphNode(NEURON, 0, 0, 1, 1.0, 0.5, token="a"),
        GraphNode(NEURON, 1, 0, 2, 1.0, 0.5, token="a"),
        GraphNode(LOGIT, 30, 0, 20, 3.0, attribution=1.0, token="b", prob=0.6),
    ]
    A = torch.zeros(4, 4)
    A[1, 0] = A[2, 0] = A[3, 1] = A[3, 2] = 1.0
    near = AttributionGraph("a", ["a"], [10], nodes, A, {"n_layers": 30})
    assert [s.nodes for s in find_supernodes(near)] == [[1, 2]]
    nodes[2] = GraphNode(NEURON, 29, 0, 2, 1.0, 0.5, token="a")
    far = AttributionGraph("a", ["a"], [10], nodes, A, {"n_layers": 30})
    assert find_supernodes(far) == [] and len(find_supernodes(far, layer_weight=0.0)) == 1


def test_average_linkage_by_hand():
    points = torch.tensor([0.0, 0.1, 0.25, 5.0, 5.2, 20.0])
    distance = (points[:, None] - points[None, :]).abs()
    assert average_linkage(distance, threshold=1.0) == [[0, 1, 2], [3, 4], [5]]
    assert average_linkage(distance, n_clusters=2) == [[0, 1, 2, 3, 4], [5]]
    assert average_linkage(distance, n_clusters=6) == [[i] for i in range(6)]
    # average linkage, not single: {0,1,2} to {3,4} is the mean 4.98, not the minimum 4.75
    assert average_linkage(distance, threshold=4.8) == [[0, 1, 2], [3, 4], [5]]
    assert average_linkage(distance, threshold=5.0) == [[0, 1, 2, 3, 4], [5]]


def test_tiny_model_supernodes_validate(tiny_graph):
    supernodes = find_supernodes(tiny_graph)
    assert supernodes, "a 60-neuron graph should have some groups"
    seen: set[int] = set()
    for s in supernodes:
        assert len(s.nodes) >= 2 and len(s.node_ids) == len(s.nodes) and s.label
        assert all(tiny_graph.nodes[i].kind == NEURON for i in s.nodes)
        assert not seen & set(s.nodes)  # every neuron in at most one supernode
        seen |= set(s.nodes)
    assert len({s.label for s in supernodes}) == len(supernodes)
    again = find_supernodes(tiny_graph)
    assert [s.to_list() for s in again] == [s.to_list() for s in supernodes]  # deterministic
    data = with_supernodes(to_circuit_tracer(tiny_graph), supernodes)
    validate_circuit_tracer(data)
    ids = {n["node_id"] for n in data["nodes"]}
    assert data["qParams"]["supernodes"] == [s.to_list() for s in supernodes]
    assert all(i in ids for entry in data["qParams"]["supernodes"] for i in entry[1:])
    fixed = find_supernodes(tiny_graph, n_clusters=5, min_size=1)
    assert len(fixed) == 5 and sum(len(s.nodes) for s in fixed) <= 60


def test_with_supernodes_checks_ids_and_keeps_existing(tiny_graph):
    pruned = prune_graph(tiny_graph)
    data = to_circuit_tracer(pruned)
    data["qParams"]["supernodes"] = [["drawn by hand", data["nodes"][0]["node_id"]]]
    supernodes = find_supernodes(pruned, min_size=1)
    kept = with_supernodes(data, supernodes, keep_existing=True)
    validate_circuit_tracer(kept)
    assert kept["qParams"]["supernodes"][0] == ["drawn by hand", data["nodes"][0]["node_id"]]
    assert len(kept["qParams"]["supernodes"]) == 1 + len(supernodes)
    assert len(data["qParams"]["supernodes"]) == 1  # the input is not modified
    dropped = [
        i
        for i, n in enumerate(tiny_graph.nodes)
        if n.kind == NEURON and n.key not in {m.key for m in pruned.nodes}
    ]
    assert dropped
    unpruned = find_supernodes(tiny_graph, n_clusters=1)  # names neurons that pruning removed
    with pytest.raises(NeurontraceError, match="not in the graph JSON"):
        with_supernodes(data, unpruned)


@pytest.mark.parametrize("kwargs", [{"n_clusters": 0}, {"distance_threshold": -1}, {"min_size": 0}])
def test_bad_arguments(kwargs):
    with pytest.raises(NeurontraceError):
        find_supernodes(_two_streams(), **kwargs)

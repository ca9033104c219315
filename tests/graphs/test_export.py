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
    node = next(n for n in data["nodes"] if n["feature_type"] == "cross layer transcoder")
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


def test_fields_mean_what_they_mean_in_circuit_tracer(graph):
    from circuit_tracer.frontend.graph_models import Model, Node

    pruned = prune_graph(graph)
    pruned.nodes[-1].token = 'say "hi"'  # a logit token with a double quote
    data = to_circuit_tracer(pruned, slug="keys")
    Model(**data)  # circuit-tracer's own graph-file model
    by_type: dict[str, list] = {}
    for n in data["nodes"]:
        by_type.setdefault(n["feature_type"], []).append(n)
    assert set(by_type) == {"cross layer transcoder", "embedding", "logit"}
    for n in by_type["embedding"]:  # circuit-tracer: feature is the position
        want = Node.token_node(n["ctx_idx"], n["index"])
        assert (n["node_id"], n["feature"], n["jsNodeId"]) == (want.node_id, want.feature, want.jsNodeId)
    logits = by_type["logit"]
    for i, n in enumerate(logits):
        token = n["token"].replace('"', "\uff02")
        want = Node.logit_node(n["ctx_idx"], n["index"], token, graph.n_layers, i == 0, n["token_prob"])
        assert (n["node_id"], n["feature"], n["jsNodeId"], n["clerp"], n["is_target_logit"]) == (
            want.node_id, want.feature, want.jsNodeId, want.clerp, want.is_target_logit,
        )  # fmt: skip
        assert n["clerp"].split('"')[1] == token  # what the frontend reads as the label
    assert logits[-1]["token"] == 'say "hi"'
    for n in by_type["cross layer transcoder"]:
        layer, index, pos = (int(x) for x in n["node_id"].split("_"))
        want = Node.feature_node(layer, pos, index)
        assert (n["feature"], n["jsNodeId"], n["reverse_ctx_idx"]) == (want.feature, want.jsNodeId, 0)
    # influence on circuit-tracer's scale: cumulative over the unpruned graph, not renormalised to 1
    neurons = by_type["cross layer transcoder"]
    assert max(n["influence"] for n in neurons) == data["metadata"]["node_threshold"] < 1.0
    assert all(isinstance(n["influence"], float) for n in by_type["embedding"])
    assert all(n["influence"] is None for n in logits)


def test_unpruned_export_computes_the_cumulative_influence_itself(graph):
    from neurontrace.graphs.prune import cumulative_influence, path_influence

    data = to_circuit_tracer(graph)
    ranked = path_influence(graph)
    ranked[[i for i, n in enumerate(graph.nodes) if n.kind == LOGIT]] = 0
    want = cumulative_influence(ranked)
    got = [n["influence"] for n in data["nodes"]]
    for i, n in enumerate(graph.nodes):
        assert got[i] is None if n.kind == LOGIT else got[i] == pytest.approx(float(want[i]))
    neurons = [n["influence"] for n in data["nodes"] if n["feature_type"] == "cross layer transcoder"]
    assert data["metadata"]["node_threshold"] == max(neurons)


def test_saved_q_params_strings_are_read_back():
    from neurontrace.graphs.export import import_graph_json, normalise_q_params

    saved = {
        "pinnedIds": "1_2_3,E_5_0",
        "supernodes": '[["plural", "1_2_3", "E_5_0"]]',
        "clerps": '[["7", "my label"]]',
        "pruningThreshold": "0.55",
        "linkType": None,
        "clickedId": "null",
        "extra": {"kept": True},
    }
    q = normalise_q_params(saved)
    assert q["pinnedIds"] == ["1_2_3", "E_5_0"] and q["supernodes"] == [["plural", "1_2_3", "E_5_0"]]
    assert q["clerps"] == [["7", "my label"]] and q["pruningThreshold"] == 0.55
    assert (q["linkType"], q["clickedId"], q["sg_pos"], q["extra"]) == ("both", "", "", {"kept": True})
    nodes = [{"node_id": "1_2_3", "x": 1}, {"node_id": "E_5_0"}]
    data = {"metadata": {"slug": "s"}, "qParams": saved, "nodes": nodes, "links": [
        {"source": "E_5_0", "target": "1_2_3", "weight": 0.5}]}  # fmt: skip
    out = import_graph_json(data)
    assert out["nodes"] is nodes and out["qParams"]["pinnedIds"] == ["1_2_3", "E_5_0"]
    for broken, match in [
        ({**data, "nodes": [*nodes, {"node_id": "E_5_0"}]}, "twice"),
        ({**data, "links": [{"source": "E_5_0", "target": "9_9_9", "weight": 1.0}]}, "unknown nodes"),
        ({**data, "links": [{"source": "E_5_0", "target": "1_2_3", "weight": float("nan")}]}, "finite"),
        ({**data, "qParams": {**saved, "pinnedIds": "1_2_3,4_4_4"}}, "4_4_4"),
        ({**data, "qParams": {**saved, "supernodes": "[[oops"}}, "neither a list nor JSON"),
        ({"nodes": []}, "no 'metadata'"),
    ]:
        with pytest.raises(NeurontraceError, match=match):
            import_graph_json(broken)


def test_graph_index_keeps_other_graphs_and_replaces_by_slug(tmp_path):
    from neurontrace.graphs.export import update_graph_index

    update_graph_index(tmp_path, [{"slug": "a", "prompt": "1"}, {"slug": "b", "prompt": "2"}])
    update_graph_index(tmp_path, [{"slug": "a", "prompt": "3"}])
    index = json.loads((tmp_path / "graph-metadata.json").read_text())
    assert index == {"graphs": [{"slug": "b", "prompt": "2"}, {"slug": "a", "prompt": "3"}]}
    (tmp_path / "graph-metadata.json").write_text("not json")
    with pytest.raises(NeurontraceError, match="not a graph index"):
        update_graph_index(tmp_path, [{"slug": "c"}])
    assert (tmp_path / "graph-metadata.json").read_text() == "not json"  # nothing destroyed


def test_feature_file_flips_outputs_for_a_negative_neuron_and_merges_polarities():
    from neurontrace.graphs.export import feature_file

    ctx = [{"activation": -4.0, "before": ["a", " b"], "token": " c", "after": [" d"]}]
    neg = {"feature": 12, "activation": -2.0, "top_logit_effects": ["x"], "bottom_logit_effects": ["y"],
           "top_contexts": ctx}  # fmt: skip
    f = feature_file(neg, "./graph_data/features/m")
    assert (f["top_logits"], f["bottom_logits"]) == (["y"], ["x"])  # what positive activation promotes
    (q,) = f["examples_quantiles"]
    assert q["examples"][0]["tokens"] == ["a", " b", " c", " d"]
    assert (
        q["examples"][0]["tokens_acts_list"] == [None, None, -4.0, None]
        and q["examples"][0]["train_token_ind"] == 2
    )
    pos = {**neg, "activation": 1.0, "top_contexts": [{**ctx[0], "activation": 3.0}]}
    merged = feature_file(pos, "./graph_data/features/m", existing=f)
    assert len(merged["examples_quantiles"]) == 2 and (merged["top_logits"], merged["act_max"]) == (
        ["x"],
        4.0,
    )

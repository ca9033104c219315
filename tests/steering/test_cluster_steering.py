"""Cluster (supernode) steering: one multiplier equals per-neuron steering, downstream ratios equal two hooked
forward passes, clusters upstream of the steered one keep ratio exactly 1, graph supernodes and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny, save_tiny_folder

from neurontrace.cli import main
from neurontrace.errors import NeurontraceError
from neurontrace.graphs.build import build_graph
from neurontrace.graphs.export import to_circuit_tracer
from neurontrace.graphs.supernodes import find_supernodes, with_supernodes
from neurontrace.interventions import Edit, intervene
from neurontrace.neurons import NeuronId, parse_neurons
from neurontrace.steering import steer
from neurontrace.steering.clusters import (
    Cluster,
    cluster_ratio,
    clusters_of_graph,
    find_cluster,
    read_cluster,
    steer_cluster,
)

PROMPT = "the keys to the cabinet"  # 5 tokens
STEERED = Cluster("steered", parse_neurons("L1/N3@2,L1/N10@2,L1/N11@4,L1/N40@-1"))
LATER = Cluster("later", parse_neurons("L2/N0@4,L2/N5@3,L2/N7@4,L2/N30@2"))
EARLIER = Cluster("earlier", parse_neurons("L0/N1@4,L0/N2@2,L1/N9@4,L1/N12@3"))  # none above layer 1


@pytest.fixture(scope="module")
def llama():
    return make_tiny("llama")


def _all_logits(result) -> torch.Tensor:
    return torch.tensor([t.logit for t in sorted(result.top_after, key=lambda t: t.token_id)])


def _down_proj(model, layer):
    return model.hf.model.layers[layer].mlp.down_proj


def _hand_run(model, scale_members=None, factor=1.0):
    """Every layer's neuron activations [T, d] and the last logits of PROMPT, with the members (layer, pos, idx)
    multiplied by ``factor`` through forward pre-hooks on the down projections."""
    ids = model.tokenize(PROMPT).input_ids
    T = ids.shape[1]
    seen, handles = {}, []
    for layer in range(model.n_layers):

        def hook(module, args, layer=layer):
            (x,) = args
            x = x.clone()
            for m in scale_members or ():
                if m.layer == layer:
                    x[0, m.position % T, m.index] *= factor
            seen[layer] = x[0].detach().clone()
            return (x,)

        handles.append(_down_proj(model, layer).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            logits = model.hf(input_ids=ids).logits[0, -1]
    finally:
        for h in handles:
            h.remove()
    return seen, logits


def _members(acts, cluster, T=5):
    return torch.stack([acts[n.layer][n.position % T, n.index].double() for n in cluster.neurons])


@pytest.mark.parametrize("m", [0.0, 0.5, -2.0])
def test_one_multiplier_equals_scaling_each_neuron(llama, m):
    result = steer_cluster(llama, prompt=PROMPT, cluster=STEERED, value=m, top=llama.vocab_size)
    per_neuron = steer(
        llama, prompt=PROMPT, neurons=STEERED.neurons, mode="scale", value=m, top=llama.vocab_size
    )
    torch.testing.assert_close(_all_logits(result.steer), _all_logits(per_neuron), rtol=0, atol=1e-6)
    edits = [
        Edit(layer=n.layer, neurons=[n.index], positions=[n.position], op="scale", value=m)
        for n in STEERED.neurons
    ]
    with intervene(llama, edits):  # one edit per neuron
        by_hand = llama.logits(llama.tokenize(PROMPT))[0, -1]
    torch.testing.assert_close(_all_logits(result.steer), by_hand.float(), rtol=0, atol=1e-6)
    _, hooked = _hand_run(llama, STEERED.neurons, m)
    torch.testing.assert_close(_all_logits(result.steer), hooked.float(), rtol=0, atol=1e-5)
    if m != 1.0:
        assert result.steer.kl_divergence > 0


def test_downstream_ratio_equals_two_hooked_forward_passes(llama):
    result = steer_cluster(llama, prompt=PROMPT, cluster=STEERED, value=0.5, others=[LATER, EARLIER, STEERED])
    assert [r.name for r in result.downstream] == [
        "later",
        "earlier",
    ]  # the steered cluster is not its own other
    before, _ = _hand_run(llama)
    after, _ = _hand_run(llama, STEERED.neurons, 0.5)
    a, b = _members(before, LATER), _members(after, LATER)
    later = result.downstream[0]
    assert later.mean_ratio == pytest.approx(float((b / a).mean()), rel=1e-5)
    assert later.sum_ratio == pytest.approx(float(b.sum() / a.sum()), rel=1e-5)
    assert later.sum_before == pytest.approx(float(a.sum()), abs=1e-6)
    assert later.layers == (2, 2) and later.n_neurons == 4
    assert abs(later.mean_ratio - 1) > 1e-3  # the steering does reach layer 2
    data = json.loads(result.to_json())
    assert data["downstream"][0]["name"] == "later" and data["steer"]["mode"] == "scale"


def test_clusters_upstream_of_the_steered_one_keep_ratio_exactly_one(llama):
    upstream = Cluster("upstream", EARLIER.neurons + STEERED.neurons)  # layers 0 and 1, below layer 2
    for value in (0.0, 3.0):
        result = steer_cluster(llama, prompt=PROMPT, cluster=LATER, value=value, others=[upstream, EARLIER])
        for r in result.downstream:
            assert r.mean_ratio == 1.0 and r.sum_ratio == 1.0 and r.sum_after == r.sum_before


def test_ratio_definitions_by_hand():
    c = Cluster("c", parse_neurons("L0/N1@0,L0/N2@0,L0/N3@0"))
    r = cluster_ratio(
        c, torch.tensor([2.0, -1.0, 0.0], dtype=torch.float64), torch.tensor([1.0, -3.0, 5.0]).double()
    )
    assert r.mean_ratio == pytest.approx((0.5 + 3.0) / 2)  # the member with a zero activation has no ratio
    assert r.sum_ratio == pytest.approx(3.0 / 1.0)
    zero = cluster_ratio(c, torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
    assert zero.mean_ratio is None and zero.sum_ratio is None


def test_cluster_files(tmp_path):
    for i, data in enumerate(
        [
            ["L1/N3@2", "2_5_3", {"layer": 0, "index": 7, "position": 1}],
            {"name": "mine", "nodes": ["L1/N3@2", "2_5_3", {"layer": 0, "neuron": 7, "position": 1}]},
            ["mine", "1_3_2", "2_5_3", "0_7_1"],
        ]
    ):
        path = tmp_path / f"c{i}.json"
        path.write_text(json.dumps(data))
        c = read_cluster(path)
        assert c.neurons == [NeuronId(1, 3, None, 2), NeuronId(2, 5, None, 3), NeuronId(0, 7, None, 1)]
        assert c.name == ("c0" if i == 0 else "mine")
    (tmp_path / "bad.json").write_text('["L1/N3@2", "nonsense"]')
    with pytest.raises(NeurontraceError, match="cannot read cluster member"):
        read_cluster(tmp_path / "bad.json")
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(NeurontraceError, match="no neurons"):
        read_cluster(tmp_path / "empty.json")
    clusters = [Cluster("from 'keys' → ' are' (L1)", []), Cluster("from 'the' → ' is' (L2)", [])]
    assert find_cluster(clusters, "keys").name.startswith("from 'keys'")
    with pytest.raises(NeurontraceError, match="several"):
        find_cluster(clusters, "from")


def test_cli_steers_a_graph_supernode(tmp_path, capsys):
    folder = save_tiny_folder(tmp_path / "model", "llama", seed=0)
    model = make_tiny("llama", seed=0)  # the same weights as the folder
    graph = build_graph(model, PROMPT, node_threshold=0.0, max_nodes=60)
    supernodes = find_supernodes(graph)
    assert len(supernodes) >= 2
    path = tmp_path / "graph.json"
    path.write_text(json.dumps(with_supernodes(to_circuit_tracer(graph), supernodes)))
    clusters = clusters_of_graph(path)
    assert [c.name for c in clusters] == [s.label for s in supernodes]
    assert clusters[0].neurons == [
        NeuronId(graph.nodes[i].layer, graph.nodes[i].index, None, graph.nodes[i].position)
        for i in supernodes[0].nodes
    ]
    out = tmp_path / "steer.json"
    argv = [
        "steer",
        "--model",
        folder,
        "--graph",
        str(path),
        "--cluster",
        supernodes[0].label,
        "--value",
        "0",
    ]
    assert main([*argv, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Downstream clusters" in printed and supernodes[1].label in printed
    saved = json.loads(out.read_text())
    expected = steer_cluster(model, prompt=PROMPT, cluster=clusters[0], value=0.0, others=clusters)
    assert [r["name"] for r in saved["downstream"]] == [r.name for r in expected.downstream]
    for got, want in zip(saved["downstream"], expected.downstream, strict=True):
        assert got["sum_ratio"] == pytest.approx(want.sum_ratio, rel=1e-6)
    # a graph without supernodes: found on it; a JSON file of nodes as the cluster
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(to_circuit_tracer(graph)))
    assert [c.name for c in clusters_of_graph(plain)] == [s.label for s in supernodes]
    nodes = tmp_path / "nodes.json"
    nodes.write_text(json.dumps([str(n) for n in clusters[0].neurons]))
    assert (
        main(["steer", "--model", folder, "--graph", str(plain), "--cluster", str(nodes), "--value", "2"])
        == 0
    )
    assert main(["steer", "--model", folder, "--cluster", "no such label", "--prompt", PROMPT]) == 2
    assert "is not a file" in capsys.readouterr().err
    assert main(["steer", "--model", folder, "--prompt", PROMPT]) == 2

"""Attribution graphs on a dictionary basis: latent and error-node edges against real interventions in the
direct-effect model (every other layer's dictionary site patched to its clean value, the replacement model's
factors frozen), and conservation of a target's incoming edges with error nodes counted."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny
from test_sae import random_sae

from neurontrace.attribution.replacement import FrozenFactors, RelPRules, replacement_model
from neurontrace.dictionaries import save_sae
from neurontrace.graphs.build import EMBEDDING, ERROR, LOGIT, NEURON, build_graph
from neurontrace.hooks import add_output_hook
from neurontrace.interventions import Edit, intervene
from neurontrace.sites import capture, hook_site

PROMPT = "the keys to the cabinet"


def _dictionary(model, tmp_path, site: str, architecture: str) -> str:
    folder = tmp_path / f"{site}-{architecture}"
    width = model.d_ff if site == "neurons" else model.d_model
    for layer in range(model.n_layers):
        sae = random_sae(width, 40, site, layer, architecture, seed=layer).to(dtype=torch.float64)
        save_sae(sae, folder / f"L{layer}")
    return f"sae:{folder}"


def _target_value(model, site, node, rules, frozen, edits, embed_scale=None):
    seen = {}
    with replacement_model(model, rules, frozen) as rep, intervene(model, edits), torch.no_grad():
        handles = []
        if node.kind == NEURON:
            handles.append(hook_site(model, site, node.layer, lambda z: seen.__setitem__("z", z)))
        if embed_scale is not None:
            pos, factor = embed_scale
            scale = lambda y: torch.cat([y[:, :pos], y[:, pos : pos + 1] * factor, y[:, pos + 1 :]], 1)  # noqa: E731
            handles.append(add_output_hook(model.embed, scale))
        try:
            logits = rep.logits(model.forward(model.tokenize(PROMPT)))
        finally:
            for h in handles:
                h.remove()
    if node.kind == NEURON:
        return float(seen["z"][0, node.position, node.index])
    return float(logits[0, -1, node.index])


@pytest.mark.parametrize(
    ("family", "site", "architecture"),
    [("llama", "mlp_out", "standard"), ("gemma3", "resid", "standard"), ("llama", "neurons", "jumprelu")],
)
def test_latent_and_error_edges_equal_interventions(tmp_path, family, site, architecture):
    model = make_tiny(family)
    model.hf.double()
    basis = _dictionary(model, tmp_path, site, architecture)
    d_sae = 40
    rules = RelPRules()
    graph = build_graph(model, PROMPT, node_threshold=0.02, max_nodes=40, site=basis)
    kinds = {n.kind for n in graph.nodes}
    assert kinds == {EMBEDDING, NEURON, ERROR, LOGIT}
    assert all(n.index < d_sae for n in graph.nodes if n.kind == NEURON)  # latents only
    frozen = FrozenFactors()
    batch = model.tokenize(PROMPT)
    clean = capture(
        model,
        batch,
        sites=basis,
        layers=sorted({n.layer for n in graph.nodes if n.layer >= 0 and n.kind != LOGIT}),
    )
    _target_value(model, basis, graph.nodes[-1], rules, frozen, [])  # record the clean factors
    frozen.replaying = True
    A = graph.adjacency
    eps = 1e-3
    checked = {EMBEDDING: 0, NEURON: 0, ERROR: 0, LOGIT: 0}
    strongest = (A.abs() > 1e-3 * A.abs().max()).nonzero().tolist()
    torch.manual_seed(0)
    picks = [strongest[i] for i in torch.randperm(len(strongest))[:50].tolist()]
    for t, s in picks:
        src, tgt = graph.nodes[s], graph.nodes[t]
        others = [l for l in range(model.n_layers) if l not in (src.layer, tgt.layer)]
        edits = [Edit(layer=l, op="patch", value=clean.get(l, basis), site=basis) for l in others]
        base = _target_value(model, basis, tgt, rules, frozen, edits)
        if src.kind == EMBEDDING:
            moved = _target_value(
                model, basis, tgt, rules, frozen, edits, embed_scale=(src.position, 1 + eps)
            )
        else:
            units = (
                [src.index]
                if src.kind == NEURON
                else list(range(d_sae, clean.get(src.layer, basis).shape[-1]))
            )
            scale = Edit(layer=src.layer, neurons=units, positions=[src.position], op="scale", value=1 + eps,
                         site=basis)  # fmt: skip
            moved = _target_value(model, basis, tgt, rules, frozen, [*edits, scale])
        assert moved - base == pytest.approx(eps * float(A[t, s]), rel=1e-3, abs=1e-9), (src, tgt)
        checked[src.kind if tgt.kind != LOGIT else LOGIT] += 1
    assert all(v > 0 for v in checked.values()), checked


def test_incoming_edges_with_error_nodes_sum_to_the_target(tmp_path):
    """Bias-free Llama, every latent a node: a latent target's incoming edges (embeddings, earlier latents and
    error nodes) add up to its pre-activation minus what the biases put in, so compare logits instead: a logit
    is linear in the cut sites and the embeddings (frozen factors), and the SAE decoder bias is a constant."""
    model = make_tiny("llama")
    basis = _dictionary(model, tmp_path, "mlp_out", "standard")
    graph = build_graph(model, PROMPT, node_threshold=0.0, max_nodes=None, site=basis)
    logits = [i for i, n in enumerate(graph.nodes) if n.kind == LOGIT]
    total = graph.adjacency[logits].sum(1)
    # the decoder biases' contribution to each logit, by running with every site set to decode(0) + 0
    batch = model.tokenize(PROMPT)
    z = capture(model, batch, sites=basis).acts
    rules = RelPRules()
    frozen = FrozenFactors()
    with replacement_model(model, rules, frozen) as rep, torch.no_grad():
        full = rep.logits(model.forward(batch))[0, -1]
    frozen.replaying = True
    edits = [Edit(layer=layer, op="set", value=0.0, site=basis) for (_, layer) in z]
    with replacement_model(model, rules, frozen) as rep, intervene(model, edits), torch.no_grad():
        handle = add_output_hook(model.embed, torch.zeros_like)
        try:
            biases = rep.logits(model.forward(batch))[0, -1]
        finally:
            handle.remove()
    ids = [graph.nodes[i].index for i in logits]
    torch.testing.assert_close(total, (full - biases)[ids].float(), rtol=1e-3, atol=1e-4)


def test_graph_command_on_a_dictionary_writes_files_both_frontends_read(tmp_path, capsys):
    import json

    from conftest import save_tiny_folder

    from neurontrace.cli import main
    from neurontrace.graphs.export import from_circuit_tracer, validate_circuit_tracer

    folder = save_tiny_folder(tmp_path / "model")
    model = make_tiny("llama")
    basis = _dictionary(model, tmp_path, "mlp_out", "topk")
    out = tmp_path / "graphs"
    argv = ["graph", "--model", folder, "--prompt", PROMPT, "--site", basis, "--out", str(out)]
    assert main(argv) == 0
    data = json.loads((out / "graph.json").read_text())
    validate_circuit_tracer(data)  # our schema
    pytest.importorskip("circuit_tracer")
    from circuit_tracer.frontend.graph_models import Model

    Model(**data)  # circuit-tracer's own graph-file model
    types = {n["feature_type"] for n in data["nodes"]}
    assert "mlp reconstruction error" in types
    latents = [n for n in data["nodes"] if n.get("unit") == "sae latent"]
    assert latents and all(n["clerp"].startswith(f"L{n['layer']}/F") for n in latents)
    ids = [n["node_id"] for n in data["nodes"]]
    assert len(ids) == len(set(ids))
    back = from_circuit_tracer(data)
    assert sum(n.kind == ERROR for n in back.nodes) == sum(
        n["feature_type"] == "mlp reconstruction error" for n in data["nodes"]
    )
    assert main([*argv[:-2], "--site", "sae:/no/such", "--out", str(tmp_path / "x")]) == 2
    assert "no such dictionary folder" in capsys.readouterr().err

"""Graph edges against ground truth: real interventions in the direct-effect (frozen replacement) model,
conservation of incoming edges, causal structure, and the naive per-layer-pair computation."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny

from neurontrace.attribution.replacement import FrozenFactors, RelPRules, replacement_model
from neurontrace.graphs.build import EMBEDDING, LOGIT, NEURON, build_graph
from neurontrace.graphs.reference import direct_effects_per_layer_pair
from neurontrace.hooks import add_output_hook
from neurontrace.interventions import Edit, intervene
from neurontrace.sites import capture, hook_site

PROMPT = "the keys to the cabinet"


def _target_value(model, node, rules, frozen, edits, embed_scale=None):
    """Run the (recording or replaying) replacement model with edits; return the target node's value."""
    seen = {}
    with replacement_model(model, rules, frozen) as rep, intervene(model, edits), torch.no_grad():
        handles = []
        if node.kind == NEURON:
            handles.append(hook_site(model, "neurons", node.layer, lambda x: seen.__setitem__("a", x)))
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
        return float(seen["a"][0, node.position, node.index])
    return float(logits[0, -1, node.index])


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2", "phi3"])
def test_edges_equal_interventions_in_the_direct_effect_model(family):
    model = make_tiny(family)
    model.hf.double()
    rules = RelPRules()
    graph = build_graph(model, PROMPT, node_threshold=0.02, max_nodes=60)
    frozen = FrozenFactors()
    clean_sites = capture(model, model.tokenize(PROMPT))
    _target_value(model, graph.nodes[-1], rules, frozen, [])  # record the clean factors
    frozen.replaying = True
    A = graph.adjacency
    eps = 1e-2
    checked = {EMBEDDING: 0, NEURON: 0, LOGIT: 0}
    strongest = (A.abs() > 1e-3 * A.abs().max()).nonzero().tolist()
    torch.manual_seed(0)
    picks = [strongest[i] for i in torch.randperm(len(strongest))[:40].tolist()]
    for t, s in picks:
        src, tgt = graph.nodes[s], graph.nodes[t]
        # freeze every MLP except the source's and the target's own
        frozen_layers = [l for l in range(model.n_layers) if l not in (src.layer, tgt.layer)]
        edits = [Edit(layer=l, op="patch", value=clean_sites.get(l)) for l in frozen_layers]
        base = _target_value(model, tgt, rules, frozen, edits)
        if src.kind == NEURON:
            scale = Edit(
                layer=src.layer, neurons=[src.index], positions=[src.position], op="scale", value=1 + eps
            )
            edits = [*edits, scale]
            moved = _target_value(model, tgt, rules, frozen, edits)
        else:
            moved = _target_value(model, tgt, rules, frozen, edits, embed_scale=(src.position, 1 + eps))
        assert moved - base == pytest.approx(eps * float(A[t, s]), rel=1e-3, abs=1e-9), (src, tgt)
        checked[src.kind if tgt.kind != LOGIT else LOGIT] += 1
    assert all(v > 0 for v in checked.values()), checked


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen3", "gemma3", "phi3", "olmo2"])
def test_incoming_edges_of_a_complete_graph_sum_to_the_target(family):
    """Bias-free families: a target is homogeneous in the embeddings and earlier neurons (all MLPs frozen)."""
    model = make_tiny(family)
    graph = build_graph(model, PROMPT, node_threshold=0.0, max_nodes=None)
    act = torch.tensor([n.activation for n in graph.nodes])
    rows = [i for i, n in enumerate(graph.nodes) if n.kind != EMBEDDING]
    torch.testing.assert_close(graph.adjacency[rows].sum(1), act[rows], rtol=1e-3, atol=1e-4)


def test_edges_respect_layers_and_positions():
    model = make_tiny("llama")
    graph = build_graph(model, PROMPT, node_threshold=0.0, max_nodes=None)
    nz = graph.adjacency.nonzero().tolist()
    assert nz
    for t, s in nz:
        src, tgt = graph.nodes[s], graph.nodes[t]
        assert src.position <= tgt.position  # never from a later position to an earlier one
        assert src.layer < tgt.layer
        assert src.kind != LOGIT and tgt.kind != EMBEDDING


def test_one_forward_edges_equal_the_per_layer_pair_computation():
    model = make_tiny("gemma2")
    graph = build_graph(model, PROMPT, node_threshold=0.01, max_nodes=80, chunk_size=7)
    reference = direct_effects_per_layer_pair(model, model.tokenize(PROMPT), graph.nodes)
    torch.testing.assert_close(graph.adjacency, reference, rtol=1e-5, atol=1e-6)


def test_targets_and_node_selection():
    model = make_tiny("llama")
    graph = build_graph(model, PROMPT, answers=[" are", " is"], node_threshold=0.01, max_nodes=25)
    logits = [n for n in graph.nodes if n.kind == LOGIT]
    assert [n.token for n in logits] == ["are", "is"] and sum(n.attribution for n in logits) == pytest.approx(
        1.0
    )
    neurons = [n for n in graph.nodes if n.kind == NEURON]
    assert len(neurons) == 25
    assert len([n for n in graph.nodes if n.kind == EMBEDDING]) == 5


def _sae_basis(model, folder, site: str, architecture: str = "standard", d_sae: int = 24) -> str:
    from neurontrace.dictionaries import SAE, save_sae
    from neurontrace.sites import site_width

    width = site_width(model, site)
    for layer in range(model.n_layers):
        g = torch.Generator().manual_seed(layer)
        threshold = torch.rand(d_sae, generator=g) * 0.1 if architecture == "jumprelu" else None
        sae = SAE(torch.randn(width, d_sae, generator=g) / width**0.5, torch.randn(d_sae, generator=g) * 0.1,
                  torch.randn(d_sae, width, generator=g) / d_sae**0.5, torch.randn(width, generator=g) * 0.1,
                  site, layer, architecture, None, threshold)  # fmt: skip
        save_sae(sae.to(dtype=torch.float64), folder / f"L{layer}")
    return f"sae:{folder}"


def _transcoder_basis(model, folder, d_sae: int = 24) -> str:
    from neurontrace.dictionaries import Transcoder, save_transcoders

    d = model.d_model
    tcs = {}
    for layer in range(model.n_layers):
        g = torch.Generator().manual_seed(layer)
        tcs[layer] = Transcoder(torch.randn(d, d_sae, generator=g) / d**0.5, torch.randn(d_sae, generator=g) * 0.1,
                                torch.randn(d_sae, d, generator=g) / d_sae**0.5, torch.randn(d, generator=g) * 0.3,
                                layer, "relu", W_skip=torch.randn(d, d, generator=g) * 0.1)  # fmt: skip
    save_transcoders(tcs, folder, model_name=model.name)
    return f"transcoder:{folder}"


@pytest.mark.parametrize(
    ("family", "site"),
    [("llama", "neurons"), ("gemma2", "neurons"), ("gpt2", "neurons"), ("phi3", "neurons"), ("qwen3", "neurons"),
     ("gpt_neox", "neurons"), ("llama", "sae:mlp_out"), ("gemma3", "sae:resid"), ("llama", "sae:neurons"),
     ("llama", "transcoder")],
)  # fmt: skip
def test_node_leaves_give_the_edges_of_full_site_leaves(tmp_path, family, site):
    """Leaves of the node units only (and one scale per error node and embedding position), chunks in one layer,
    against every site tensor a leaf (the former computation): the same edges, with and without small chunks."""
    from neurontrace.graphs.build import ERROR, direct_effects

    model = make_tiny(family)
    model.hf.double()
    if site.startswith("sae:"):
        inner = site.removeprefix("sae:")
        site = _sae_basis(model, tmp_path / "sae", inner, "jumprelu" if inner == "neurons" else "standard")
    elif site == "transcoder":
        site = _transcoder_basis(model, tmp_path / "tc")
    graph = build_graph(model, PROMPT, node_threshold=0.0, max_nodes=70, site=site)
    assert sum(n.kind == NEURON for n in graph.nodes) == 70
    assert len({n.layer for n in graph.nodes if n.kind == NEURON}) > 1
    assert (ERROR in {n.kind for n in graph.nodes}) == (site != "neurons")
    batch = model.tokenize(PROMPT)
    old = direct_effects(model, batch, graph.nodes, rules=RelPRules(), site=site, _full_leaves=True)
    assert (old != 0).sum() > 100
    for chunk in (None, 3):
        new = direct_effects(model, batch, graph.nodes, rules=RelPRules(), site=site, chunk_size=chunk)
        torch.testing.assert_close(new, old, rtol=1e-6, atol=1e-6 * float(old.abs().max()))
        # the zeros are structural (no path from the source to the target), the same in both computations
        assert torch.equal(new != 0, old != 0)

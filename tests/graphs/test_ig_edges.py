"""IG and conductance graph edges against independent computations: Riemann sums written out with hooks and
``autograd.grad`` one step at a time, exact ablations of the direct-effect (cut) model for completeness, and the
plain-gradient edges where the target is linear in its inputs."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny

from neurontrace.attribution.replacement import NO_RULES, RelPRules
from neurontrace.errors import NeurontraceError
from neurontrace.graphs.build import EMBEDDING, LOGIT, NEURON, GraphNode, build_graph, direct_effects
from neurontrace.graphs.ig_edges import integrated_edges
from neurontrace.hooks import add_output_hook
from neurontrace.sites import hook_site

PROMPT = "the keys to the cabinet"


def _clean(model, batch, site: str = "neurons"):
    """The real model's embeddings and site tensors."""
    return _state(model, batch, 1.0, site)


def _state(model, batch, beta: float, site: str = "neurons"):
    """The real model's embeddings and site tensors, its input embeddings times ``beta``."""
    seen: dict = {}

    def on_embed(y):
        seen["e"] = (y * beta).detach()
        return y * beta

    def record(layer):
        def fn(x):
            seen[layer] = x.detach()

        return fn

    handles = [add_output_hook(model.embed, on_embed)]
    handles += [hook_site(model, site, layer, record(layer)) for layer in range(model.n_layers)]
    with torch.no_grad():
        model.forward(batch)
    for h in handles:
        h.remove()
    return seen["e"], {layer: seen[layer] for layer in range(model.n_layers)}


def _cut_value(model, batch, embeds, sites, target: GraphNode, source=None, site: str = "neurons"):
    """The target's value with the embeddings and every layer's neuron site fed the given tensors (the
    direct-effect model); ``source`` ``(layer, position, unit, value)`` puts ``value`` (a leaf) at one unit
    (layer -1: the embedding row at ``position``, ``unit`` ignored)."""
    live: dict = {}

    def on_embed(_y):
        e = embeds.clone()
        if source is not None and source[0] == -1:
            e[0, source[1]] = source[3]
        return e

    def feed(layer):
        def fn(x):
            live[layer] = x
            z = sites[layer].clone()
            if source is not None and source[0] == layer:
                z[0, source[1], source[2]] = source[3]
            return z

        return fn

    handles = [add_output_hook(model.embed, on_embed)]
    handles += [hook_site(model, site, layer, feed(layer)) for layer in range(model.n_layers)]
    try:
        with torch.enable_grad():
            logits = model.forward(batch).logits[0, -1]
    finally:
        for h in handles:
            h.remove()
    if target.kind == LOGIT:
        return logits[target.index]
    return live[target.layer][0, target.position, target.index]


def _hand_ig(model, batch, nodes, s: int, t: int, steps: int) -> float:
    """IG edge by hand: the source layer's nodes scaled by alpha, the source a leaf, everything else clean."""
    embeds, sites = _clean(model, batch)
    src, tgt = nodes[s], nodes[t]
    grads = []
    for j in range(steps):
        alpha = (j + 0.5) / steps
        e, z = embeds, dict(sites)
        if src.kind == EMBEDDING:
            e = embeds * alpha
            leaf = (embeds[0, src.position] * alpha).clone().requires_grad_(True)
        else:
            z[src.layer] = sites[src.layer].clone()
            for n in nodes:
                if n.kind == NEURON and n.layer == src.layer:
                    z[src.layer][0, n.position, n.index] *= alpha
            leaf = (sites[src.layer][0, src.position, src.index] * alpha).clone().requires_grad_(True)
        value = _cut_value(model, batch, e, z, tgt, (src.layer, src.position, src.index, leaf))
        (g,) = torch.autograd.grad(value, [leaf])
        grads.append(g)
    mean = torch.stack(grads).mean(0)
    if src.kind == EMBEDDING:
        return float((embeds[0, src.position] * mean).sum())
    return float(sites[src.layer][0, src.position, src.index] * mean)


def _hand_conductance(model, batch, s: int, t: int, nodes, steps: int) -> float:
    """Conductance by hand: at each midpoint the real model's state, the source a leaf, times its step."""
    src, tgt = nodes[s], nodes[t]
    total = 0.0
    for j in range(steps):
        lo, hi = _state(model, batch, j / steps), _state(model, batch, (j + 1) / steps)
        mid = _state(model, batch, (j + 0.5) / steps)
        if src.kind == EMBEDDING:
            leaf = mid[0][0, src.position].clone().requires_grad_(True)
            step = hi[0][0, src.position] - lo[0][0, src.position]
        else:
            leaf = mid[1][src.layer][0, src.position, src.index].clone().requires_grad_(True)
            step = hi[1][src.layer][0, src.position, src.index] - lo[1][src.layer][0, src.position, src.index]
        value = _cut_value(model, batch, mid[0], mid[1], tgt, (src.layer, src.position, src.index, leaf))
        (g,) = torch.autograd.grad(value, [leaf])
        total += float((g * step).sum())
    return total


def _pairs(graph, n: int = 12) -> list[tuple[int, int]]:
    """Strong edges of several kinds: from embeddings and neurons, into neurons and logits."""
    A = graph.adjacency
    nz = (A.abs() > 1e-3 * A.abs().max()).nonzero().tolist()
    torch.manual_seed(0)
    picks = [nz[i] for i in torch.randperm(len(nz)).tolist()]
    kinds: dict = {}
    for t, s in picks:
        key = (graph.nodes[s].kind, graph.nodes[t].kind)
        kinds.setdefault(key, []).append((s, t))
    out = [pair for group in kinds.values() for pair in group[:3]]
    return out[:n]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_ig_edges_equal_a_riemann_sum_written_out(family):
    model = make_tiny(family)
    model.hf.double()
    graph = build_graph(model, PROMPT, node_threshold=0.02, max_nodes=30)
    batch = model.tokenize(PROMPT)
    A = integrated_edges(model, batch, graph.nodes, method="ig", steps=5)
    pairs = _pairs(graph)
    assert {graph.nodes[s].kind for s, _ in pairs} == {EMBEDDING, NEURON}
    assert {graph.nodes[t].kind for _, t in pairs} == {NEURON, LOGIT}
    for s, t in pairs:
        hand = _hand_ig(model, batch, graph.nodes, s, t, 5)
        assert float(A[t, s]) == pytest.approx(hand, rel=1e-5, abs=1e-7), (graph.nodes[s], graph.nodes[t])


def test_conductance_edges_equal_a_riemann_stieltjes_sum_written_out():
    model = make_tiny("llama")
    model.hf.double()
    graph = build_graph(model, PROMPT, node_threshold=0.02, max_nodes=30)
    batch = model.tokenize(PROMPT)
    A = integrated_edges(model, batch, graph.nodes, method="conductance", steps=4)
    pairs = _pairs(graph, n=8)
    for s, t in pairs:
        hand = _hand_conductance(model, batch, s, t, graph.nodes, 4)
        assert float(A[t, s]) == pytest.approx(hand, rel=1e-5, abs=1e-7), (graph.nodes[s], graph.nodes[t])
    assert not torch.allclose(A, integrated_edges(model, batch, graph.nodes, method="ig", steps=4))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_ig_edges_of_a_layer_sum_to_the_exact_effect_of_ablating_its_nodes(family):
    """Completeness: the edges from one layer's nodes into a target add up to the change of the target when
    those nodes go to zero in the direct-effect model (a forward with the clean values fed everywhere else); the
    quadrature error falls with the steps."""
    model = make_tiny(family)
    model.hf.double()
    graph = build_graph(model, PROMPT, node_threshold=0.01, max_nodes=60)
    nodes, batch = graph.nodes, model.tokenize(PROMPT)
    embeds, sites = _clean(model, batch)
    errors = {}
    for steps in (2, 8, 32):
        A = integrated_edges(model, batch, nodes, method="ig", steps=steps)
        worst = 0.0
        for layer in range(model.n_layers - 1):
            members = [i for i, n in enumerate(nodes) if n.kind == NEURON and n.layer == layer]
            ablated = {**sites, layer: sites[layer].clone()}
            for i in members:
                ablated[layer][0, nodes[i].position, nodes[i].index] = 0.0
            for t, tgt in enumerate(nodes):
                if tgt.kind == EMBEDDING or tgt.layer <= layer:
                    continue
                with torch.no_grad():
                    clean = float(_cut_value(model, batch, embeds, sites, tgt))
                    zeroed = float(_cut_value(model, batch, embeds, ablated, tgt))
                worst = max(worst, abs(float(A[t, members].double().sum()) - (clean - zeroed)))
        errors[steps] = worst
    scale = max(abs(n.activation) for n in nodes if n.kind != EMBEDDING)
    assert errors[32] < 1e-3 * scale, errors
    assert errors[32] < errors[8] / 8 < errors[2] / 64, errors  # the midpoint rule: error ~ 1/steps^2


def test_ig_edge_of_a_lone_source_is_the_exact_effect_of_ablating_it():
    """A layer holding one node: its IG edge into each later node is exactly (up to quadrature) the change of the
    target when that source alone goes to zero, all else frozen."""
    model = make_tiny("llama")
    model.hf.double()
    batch = model.tokenize(PROMPT)
    embeds, sites = _clean(model, batch)
    T = batch.width
    nodes = [GraphNode(EMBEDDING, -1, p, int(batch.input_ids[0, p]), 0.0) for p in range(T)]
    chosen = [(0, 3, 7), (1, 4, 11), (2, 4, 5), (2, 3, 30)]
    nodes += [GraphNode(NEURON, la, p, u, float(sites[la][0, p, u])) for la, p, u in chosen]
    nodes.append(GraphNode(LOGIT, model.n_layers, T - 1, 9, 0.0, 1.0))
    source = T  # the layer-0 node
    errors = []
    for steps in (2, 8, 32):
        A = integrated_edges(model, batch, nodes, method="ig", steps=steps)
        ablated = {**sites, 0: sites[0].clone()}
        ablated[0][0, 3, 7] = 0.0
        worst = 0.0
        for t in range(T + 1, len(nodes)):
            with torch.no_grad():
                change = float(_cut_value(model, batch, embeds, sites, nodes[t])) - float(
                    _cut_value(model, batch, embeds, ablated, nodes[t])
                )
            worst = max(worst, abs(float(A[t, source]) - change))
            assert abs(change) > 1e-6  # the check is not vacuous
        errors.append(worst)
    assert errors[2] < 1e-6 and errors[2] < errors[1] / 8 < errors[0] / 64, errors


def _sae_site(model, folder, d_sae: int = 16) -> str:
    """Random SAEs on every layer's MLP output, saved as a dictionary folder: the site ``sae:FOLDER``."""
    from neurontrace.dictionaries import SAE, save_sae

    d = model.d_model
    for layer in range(model.n_layers):
        g = torch.Generator().manual_seed(10 + layer)
        sae = SAE(torch.randn(d, d_sae, generator=g) / d**0.5, torch.randn(d_sae, generator=g) * 0.1,
                  torch.randn(d_sae, d, generator=g) / d_sae**0.5, torch.randn(d, generator=g) * 0.1,
                  "mlp_out", layer, "standard", None, None)  # fmt: skip
        save_sae(sae.to(dtype=torch.float64), folder / f"L{layer}")
    return f"sae:{folder}"


def test_ig_edges_of_latents_and_error_nodes_sum_to_the_exact_effect_of_ablating_them(tmp_path):
    """A dictionary site: a layer's latent nodes and error nodes (each the error components at one position)
    are interpolated together; their edges into a later node sum to the effect of zeroing all of them (up to a
    quadrature error that falls with the steps)."""
    from neurontrace.graphs.build import ERROR

    model = make_tiny("llama")
    model.hf.double()
    site = _sae_site(model, tmp_path / "sae")
    graph = build_graph(model, PROMPT, node_threshold=0.01, max_nodes=30, site=site)
    nodes, batch = graph.nodes, model.tokenize(PROMPT)
    latents = 16
    embeds, sites = _clean(model, batch, site)
    changes = {}
    for layer in range(model.n_layers - 1):
        members = [i for i, n in enumerate(nodes) if n.kind in (NEURON, ERROR) and n.layer == layer]
        assert any(nodes[i].kind == ERROR for i in members)
        ablated = {**sites, layer: sites[layer].clone()}
        for i in members:
            n = nodes[i]
            if n.kind == NEURON:
                ablated[layer][0, n.position, n.index] = 0.0
            else:
                ablated[layer][0, n.position, latents:] = 0.0
        for t, tgt in enumerate(nodes):
            if tgt.kind not in (EMBEDDING, ERROR) and tgt.layer > layer:
                with torch.no_grad():
                    changes[members[0], t] = float(
                        _cut_value(model, batch, embeds, sites, tgt, site=site)
                    ) - float(_cut_value(model, batch, embeds, ablated, tgt, site=site))
    errors = []
    for steps in (8, 32, 128):
        A = integrated_edges(model, batch, nodes, method="ig", steps=steps, site=site).double()
        worst = 0.0
        for (first, t), change in changes.items():
            members = [
                i for i, n in enumerate(nodes) if n.kind in (NEURON, ERROR) and n.layer == nodes[first].layer
            ]
            worst = max(worst, abs(float(A[t, members].sum()) - change))
        errors.append(worst)
    scale = max(abs(c) for c in changes.values())
    assert sum(abs(c) > 1e-4 for c in changes.values()) > 10
    # the latents' ReLU kinks make the error fall more slowly than 1/steps^2 at first
    assert errors[2] < 1e-2 * scale and errors[2] < errors[1] / 2 < errors[0] / 4, errors


def _smooth(family: str = "llama", *, linear_attention: bool = False):
    """A tiny model whose norms are linear (``x * w``): no scale invariance, no jump at zero. With
    ``linear_attention`` its queries are zero too (uniform attention), so every logit is linear in the
    direct-effect model's inputs."""
    model = make_tiny(family)
    model.hf.double()
    for module in model.hf.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = (lambda m: lambda x: x * m.weight)(module)
    if linear_attention:
        with torch.no_grad():
            for layer in model.hf.model.layers:
                layer.self_attn.q_proj.weight.zero_()
    return model


def test_edges_of_a_target_linear_in_its_inputs_are_the_gradient_edges():
    model = _smooth(linear_attention=True)
    graph = build_graph(model, PROMPT, node_threshold=0.01, max_nodes=60, rules=NO_RULES)
    batch = model.tokenize(PROMPT)
    plain = direct_effects(model, batch, graph.nodes, rules=NO_RULES)
    # RelP without the LN rule, which needs a real norm
    relp = direct_effects(model, batch, graph.nodes, rules=RelPRules(norm=False))
    logits = [i for i, n in enumerate(graph.nodes) if n.kind == LOGIT]
    neurons = [i for i, n in enumerate(graph.nodes) if n.kind == NEURON]
    scale = float(plain[logits].abs().max())
    for method in ("ig", "conductance"):
        for steps in (1, 3):
            A = integrated_edges(model, batch, graph.nodes, method=method, steps=steps)
            torch.testing.assert_close(A[logits], plain[logits], rtol=1e-5, atol=1e-6 * scale)
            torch.testing.assert_close(A[logits], relp[logits], rtol=1e-5, atol=1e-6 * scale)
    # neuron targets are not linear (act(gate) * up): there the methods differ
    A = integrated_edges(model, batch, graph.nodes, method="ig", steps=8)
    assert (A[neurons] - plain[neurons]).abs().max() > 1e-3 * plain[neurons].abs().max()


@pytest.mark.parametrize("method", ["ig", "conductance"])
def test_completeness_over_all_inputs_on_a_model_without_jumps(method):
    """With linear norms nothing jumps at zero: conductance's incoming edges from all inputs (a complete graph)
    sum to the target's change along the path, ``a_t - 0``; IG's edges from the embeddings sum to the effect of
    zeroing every embedding. The error falls with the steps."""
    model = _smooth()
    graph = build_graph(model, PROMPT, node_threshold=0.0, max_nodes=None, rules=NO_RULES)
    nodes, batch = graph.nodes, model.tokenize(PROMPT)
    embeds, sites = _clean(model, batch)
    targets = [i for i, n in enumerate(nodes) if n.kind != EMBEDDING]
    emb = [i for i, n in enumerate(nodes) if n.kind == EMBEDDING]
    with torch.no_grad():
        if method == "conductance":  # a bias-free model at zero input is zero everywhere
            expected = torch.tensor([nodes[t].activation for t in targets], dtype=torch.float64)
        else:
            zero = torch.zeros_like(embeds)
            expected = torch.tensor([float(_cut_value(model, batch, embeds, sites, nodes[t]))
                                     - float(_cut_value(model, batch, zero, sites, nodes[t])) for t in targets])  # fmt: skip
    columns = list(range(len(nodes))) if method == "conductance" else emb
    errors = []
    for steps in (2, 8):
        A = integrated_edges(model, batch, nodes, method=method, steps=steps).double()
        errors.append(float((A[targets][:, columns].sum(1) - expected).abs().max()))
    scale = float(expected.abs().max())
    assert errors[1] < 1e-2 * scale and errors[1] < errors[0] / 8, errors


def test_build_graph_dispatches_edges_and_refuses_bad_options():
    model = make_tiny("llama")
    graph = build_graph(model, PROMPT, node_threshold=0.02, max_nodes=20, edges="conductance", edge_steps=3)
    assert graph.meta["edges"] == "conductance" and graph.meta["edge_steps"] == 3
    again = integrated_edges(model, model.tokenize(PROMPT), graph.nodes, method="conductance", steps=3)
    torch.testing.assert_close(graph.adjacency, again)
    relp = build_graph(model, PROMPT, node_threshold=0.02, max_nodes=20)
    assert [n.key for n in relp.nodes] == [n.key for n in graph.nodes]  # nodes chosen by RelP either way
    assert not torch.allclose(relp.adjacency, graph.adjacency)
    with pytest.raises(NeurontraceError, match="unknown edge method"):
        build_graph(model, PROMPT, edges="shapley")
    with pytest.raises(NeurontraceError, match="edge steps"):
        build_graph(model, PROMPT, edges="ig", edge_steps=0)

"""Graph node selection and influence pruning against independent hand computations.

Node selection (METHOD.md section 6): neurons with ``|a * dm/da| >= p * |m|`` (then at most ``max_nodes`` of the
largest), ``m`` the probability-weighted sum of the target logits. With the replacement rules off the replacement
model is the original one, so ``a * dm/da`` is plain autograd through forward pre-hooks on each layer's
``mlp.down_proj``; the unembedding is rescaled so that ``|m|`` is far from 1 and a relative threshold selects
other nodes than an absolute one would. With the default RelP rules the node score is, by its documented
definition, the zero-baseline RelP score of ``attribute``.

Pruning: influence = logit weights @ (A + A^2 + ...) on the row-normalised ``|A|``, summed term by term (no
matrix inverse); the influential neurons up to ``node_fraction``; edges scored by (influence of the target + its
logit weight) times their share, kept up to ``edge_fraction``; then dangling neurons dropped until none is left.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny

from neurontrace.attribution.api import attribute
from neurontrace.attribution.replacement import NO_RULES
from neurontrace.graphs.build import EMBEDDING, LOGIT, NEURON, AttributionGraph, GraphNode, build_graph
from neurontrace.graphs.export import to_circuit_tracer
from neurontrace.graphs.prune import prune_graph

PROMPT = "the keys to the cabinet"
ANSWERS = ["are", "is"]


def _model(scale: float):
    """A tiny Llama whose unembedding is multiplied by ``scale`` (so the metric is ``scale`` times larger)."""
    model = make_tiny("llama", seed=3)
    model.hf.double()
    with torch.no_grad():
        model.hf.lm_head.weight.mul_(scale)
    return model


def _ids(model, text: str) -> torch.Tensor:
    return torch.tensor([model.tokenizer.convert_tokens_to_ids(text.split())])


def _run(model, ids, *, sites=None, rec=None):
    """Logits; ``sites`` substitutes down-projection inputs, ``rec`` records them (hooks on the HF modules)."""
    sites = sites or {}
    handles = []

    def pre(layer):
        def fn(_mod, args):
            x = sites.get(layer, args[0])
            if rec is not None:
                rec[layer] = x
            return (x, *args[1:]) if layer in sites else None

        return fn

    for layer in range(model.n_layers):
        handles.append(model.hf.model.layers[layer].mlp.down_proj.register_forward_pre_hook(pre(layer)))
    try:
        return model.hf(input_ids=ids, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()


def _target_weights(model, ids) -> tuple[list[int], torch.Tensor]:
    targets = model.tokenizer.convert_tokens_to_ids(ANSWERS)
    with torch.no_grad():
        probs = _run(model, ids)[0, -1].softmax(-1)[targets]
    return targets, probs / probs.sum()


def _hand_scores(model):
    """Plain-gradient node scores ``a * dm/da`` ``[L, T, d]``, the activations, and ``m``."""
    ids = _ids(model, PROMPT)
    targets, w = _target_weights(model, ids)
    rec = {}
    with torch.enable_grad():
        m = (_run(model, ids, rec=rec)[0, -1, targets] * w).sum()
        grads = torch.autograd.grad(m, [rec[layer] for layer in range(model.n_layers)])
    acts = torch.stack([rec[layer][0].detach() for layer in range(model.n_layers)])
    return acts * torch.stack([g[0] for g in grads]), acts, float(m.detach())


def _select(scores: torch.Tensor, cut: float, max_nodes: int | None = None) -> set[tuple[int, int, int]]:
    """Nodes ``(layer, position, neuron)`` with ``|score| >= cut``, at most ``max_nodes`` of the largest."""
    L, T, d = scores.shape
    picked = [
        (abs(float(scores[l, t, u])), (l, t, u))
        for l in range(L)
        for t in range(T)
        for u in range(d)
        if abs(float(scores[l, t, u])) >= cut
    ]
    picked.sort(reverse=True)
    if max_nodes is not None:
        picked = picked[:max_nodes]
    return {key for _, key in picked}


def _threshold_in_a_gap(ratios: torch.Tensor, near: float) -> float:
    """A threshold near ``near`` half-way across the widest (log) gap of ``ratios`` around it, so float32 vs
    float64 rounding cannot move a node across it."""
    r = ratios.flatten().abs().sort().values
    r = r[r > 0]
    i = int(torch.searchsorted(r, torch.tensor(near, dtype=r.dtype)))
    window = range(max(1, i - 20), min(len(r), i + 20))
    j = max(window, key=lambda k: float(r[k] / r[k - 1]))
    return float((r[j] * r[j - 1]).sqrt())


def _neurons(graph: AttributionGraph) -> dict[tuple[int, int, int], GraphNode]:
    return {(n.layer, n.position, n.index): n for n in graph.nodes if n.kind == NEURON}


# ------------------------------------------------------------------ node selection
@pytest.mark.parametrize("scale", [1.0, 30.0, -30.0])  # |m| ~ 0.13 (m < 0), |m| ~ 2.6 (m < 0), m ~ +5.7
def test_node_selection_is_relative_to_the_metric(scale):
    model = _model(scale)
    scores, acts, m = _hand_scores(model)
    p = _threshold_in_a_gap(scores / abs(m), 0.02)
    graph = build_graph(
        model, PROMPT, answers=[" are", " is"], node_threshold=p, max_nodes=None, rules=NO_RULES
    )
    expected = _select(scores, p * abs(m))
    assert expected != _select(scores, p)  # an absolute threshold would select another set
    assert 0 < len(expected) < scores.numel()
    nodes = _neurons(graph)
    assert set(nodes) == expected
    assert graph.meta["metric_value"] == pytest.approx(m, rel=1e-6)
    # each node holds the value at its own layer, position and neuron
    for (layer, pos, unit), n in nodes.items():
        assert n.activation == pytest.approx(float(acts[layer, pos, unit]), rel=1e-6, abs=1e-9)
        assert n.attribution == pytest.approx(float(scores[layer, pos, unit]), rel=1e-5, abs=1e-9)
        assert n.token == PROMPT.split()[pos]
    logits = [n for n in graph.nodes if n.kind == LOGIT]
    _, w = _target_weights(model, _ids(model, PROMPT))
    assert [n.attribution for n in logits] == pytest.approx(w.tolist(), abs=1e-6)  # float32 weights
    embeds = [n for n in graph.nodes if n.kind == EMBEDDING]
    assert [n.index for n in embeds] == _ids(model, PROMPT)[0].tolist()


def test_node_selection_keeps_the_top_k_above_the_threshold():
    model = _model(-30.0)
    scores, _, m = _hand_scores(model)
    p = _threshold_in_a_gap(scores / abs(m), 0.002)
    above = _select(scores, p * abs(m))
    k = 37
    assert len(above) > k
    graph = build_graph(model, PROMPT, answers=[" are", " is"], node_threshold=p, max_nodes=k, rules=NO_RULES)
    assert set(_neurons(graph)) == _select(scores, p * abs(m), max_nodes=k)
    assert graph.meta["neurons_above_threshold"] == len(above)


def test_max_nodes_ranks_each_target_position_relative_to_its_own_metric():
    """Two target positions with metrics 10 and -0.5; one layer, two positions, three units (flat index u).
    Scores for position 0: u0 5, u1 -4, u5 0.5; for position 1: u2 0.35, u3 0.15, u4 0.05. At p = 0.2 the
    cuts are 2 and 0.1: u0, u1, u2 and u3 are above. Relative to their metric: u2 0.7, u0 0.5, u1 0.4, u3 0.3,
    so the top 2 are u2 and u0 (by raw |score| they would be u0 and u1), the top 1 is u2 (raw: u0)."""
    from neurontrace.graphs.build import GraphScores, select_neurons

    by_target = torch.zeros(2, 1, 2, 3)
    by_target[0].view(-1)[[0, 1, 5]] = torch.tensor([5.0, -4.0, 0.5])
    by_target[1].view(-1)[[2, 3, 4]] = torch.tensor([0.35, 0.15, 0.05])
    scores = GraphScores(None, [], [], torch.zeros(1, 2, 3), by_target, [10.0, -0.5], by_target)
    unit = lambda u: (0, u // 3, u % 3)  # noqa: E731  (layer index, position, unit) of flat index u
    assert select_neurons(scores, node_threshold=0.2, max_nodes=None) == ([unit(u) for u in (0, 1, 2, 3)], 4)
    assert select_neurons(scores, node_threshold=0.2, max_nodes=2) == (sorted([unit(2), unit(0)]), 4)
    assert select_neurons(scores, node_threshold=0.2, max_nodes=1) == ([unit(2)], 4)


def test_relp_node_selection_uses_the_zero_baseline_relp_scores():
    """Default rules: the selection equals the one from ``attribute(method="relp")`` of the same metric."""
    model = _model(-30.0)
    ids = _ids(model, PROMPT)
    targets, w = _target_weights(model, ids)
    result = attribute(
        model, prompt=PROMPT, method="relp", metric_fn=lambda logits: (logits[:, -1, targets] * w).sum(-1)
    )
    scores = result.scores[0].double()
    m = float(result.metric_clean[0])
    p = _threshold_in_a_gap(scores / abs(m), 0.02)
    graph = build_graph(model, PROMPT, answers=[" are", " is"], node_threshold=p, max_nodes=None)
    expected = _select(scores, p * abs(m))
    assert expected != _select(scores, p)
    assert set(_neurons(graph)) == expected


def test_a_graph_node_is_the_neuron_at_its_token():
    """Scaling the neuron at the node's (layer, position) by 1 +- eps moves m by +- eps * the node's score."""
    model = _model(1.0)
    ids = _ids(model, PROMPT)
    targets, w = _target_weights(model, ids)
    graph = build_graph(
        model, PROMPT, answers=[" are", " is"], node_threshold=0.05, max_nodes=None, rules=NO_RULES
    )
    nodes = sorted(_neurons(graph).values(), key=lambda n: -abs(n.attribution))
    picks = [n for n in nodes if n.position < len(ids[0]) - 1][:4] + nodes[:2]
    assert len({n.position for n in picks}) > 1
    rec = {}
    with torch.no_grad():
        _run(model, ids, rec=rec)
    eps = 1e-3
    for n in picks:
        moved = []
        for sign in (1, -1):
            site = rec[n.layer].clone()
            site[0, n.position, n.index] *= 1 + sign * eps
            with torch.no_grad():
                moved.append(float((_run(model, ids, sites={n.layer: site})[0, -1, targets] * w).sum()))
        assert (moved[0] - moved[1]) / 2 == pytest.approx(eps * n.attribution, rel=1e-3, abs=1e-9)


# ------------------------------------------------------------------ pruning
def hand_prune(
    graph: AttributionGraph, node_fraction: float, edge_fraction: float, *, logit_weight: bool = True
):
    """The kept node keys, the kept edges (as key pairs, target first) and every node's influence.

    ``logit_weight=False`` is the variant without the logit weight in the edge scores (to check that the
    example tells the two apart).
    """
    nodes, A = graph.nodes, graph.adjacency.double()
    N = len(nodes)
    absA = A.abs()
    An = torch.zeros(N, N, dtype=torch.float64)
    for t in range(N):
        total = float(absA[t].sum())
        if total > 0:
            An[t] = absA[t] / total
    w = torch.tensor([n.attribution if n.kind == LOGIT else 0.0 for n in nodes], dtype=torch.float64)
    influence = torch.zeros(N, dtype=torch.float64)
    term = w @ An  # paths of length 1, then 2, ...
    for _ in range(N + 1):
        influence += term
        term = term @ An
    assert float(term.abs().sum()) == 0.0  # acyclic: the series ends
    paths = influence.clone()  # through paths only: 0 at the logits (they have no outgoing edges)
    influence = torch.where(w > 0, w, influence)  # a logit's influence is its weight

    def cumulative(items: list[tuple[float, object]], fraction: float) -> set:
        items = sorted((v, k) for v, k in items if v > 0)[::-1]
        total, run, kept = sum(v for v, _ in items), 0.0, set()
        for v, k in items:
            if total <= 0 or run >= fraction * total - 1e-12 * total:
                break
            kept.add(k)
            run += v
        return kept

    # as circuit-tracer: every node but the logits is ranked (embeddings too); the neurons of the prefix stay
    ranked = [(float(influence[i]), i) for i, n in enumerate(nodes) if n.kind != LOGIT]
    keep = {i for i in range(N) if nodes[i].kind != NEURON}
    keep |= {i for i in cumulative(ranked, node_fraction) if nodes[i].kind == NEURON}
    factor = paths + w if logit_weight else paths  # a logit edge: its logit's weight times its share
    edge_scores = [
        (float(factor[t] * An[t, s]), (t, s)) for t in keep for s in keep if A[t, s] != 0 and An[t, s] > 0
    ]
    edges = cumulative(edge_scores, edge_fraction)
    while True:
        dangling = {
            i
            for i in keep
            if nodes[i].kind == NEURON
            and not (any(t == i for t, _ in edges) and any(s == i for _, s in edges))
        }
        if not dangling:
            break
        keep -= dangling
        edges = {(t, s) for t, s in edges if t not in dangling and s not in dangling}
    kept_nodes = {nodes[i].key for i in keep}
    kept_edges = {(nodes[t].key, nodes[s].key) for t, s in edges}
    return kept_nodes, kept_edges, {n.key: float(influence[i]) for i, n in enumerate(nodes)}


def hand_cumulative(graph: AttributionGraph) -> dict:
    """Each non-logit node's cumulative influence: its share of the total with every node ranked above it."""
    _, _, influence = hand_prune(graph, 1.0, 1.0)
    ranked = sorted(((v, k) for k, v in influence.items() if k[0] != LOGIT), key=lambda x: -x[0])
    total, run, out = sum(v for v, _ in ranked), 0.0, {}
    for v, k in ranked:
        run += v
        out[k] = run / total
    return out


def _pruned_sets(pruned: AttributionGraph):
    nodes = {n.key for n in pruned.nodes}
    edges = {
        (pruned.nodes[t].key, pruned.nodes[s].key) for t, s in (pruned.adjacency != 0).nonzero().tolist()
    }
    return nodes, edges


def _hand_graph() -> AttributionGraph:
    """Two embeddings, five neurons, two logits (weights 0.6 / 0.4); N4 and N5 also write straight to the logits."""
    E0 = GraphNode(EMBEDDING, -1, 0, 11, 0.0, token="a")
    E1 = GraphNode(EMBEDDING, -1, 1, 12, 0.0, token="b")
    N1 = GraphNode(NEURON, 0, 0, 1, 1.0, token="a")
    N2 = GraphNode(NEURON, 0, 1, 2, -1.0, token="b")
    N3 = GraphNode(NEURON, 1, 1, 3, 1.0, token="b")
    N4 = GraphNode(NEURON, 1, 1, 4, 0.5, token="b")
    N5 = GraphNode(NEURON, 2, 1, 5, 2.0, token="b")
    L1 = GraphNode(LOGIT, 3, 1, 20, 3.0, attribution=0.6, token="x", prob=0.3)
    L2 = GraphNode(LOGIT, 3, 1, 21, 1.0, attribution=0.4, token="y", prob=0.2)
    nodes = [E0, E1, N1, N2, N3, N4, N5, L1, L2]
    index = {n.index: i for i, n in enumerate(nodes)}
    A = torch.zeros(len(nodes), len(nodes))
    for t, s, v in [
        (1, 11, 1.0), (2, 12, 1.0),  # embeddings -> layer 0
        (3, 1, 2.0), (3, 2, -1.0), (3, 12, 0.5),  # N3
        (4, 1, 0.3), (4, 12, 0.7),  # N4
        (5, 3, 1.5), (5, 4, -0.5), (5, 2, 0.8),  # N5
        (20, 5, 2.0), (20, 4, 0.9), (20, 12, 0.6),  # logit x
        (21, 5, -0.7), (21, 3, 0.4), (21, 11, 0.3),  # logit y
    ]:  # fmt: skip
        A[index[t], index[s]] = v
    return AttributionGraph("a b", ["a", "b"], [11, 12], nodes, A, {"n_layers": 3})


@pytest.mark.parametrize(("node_fraction", "edge_fraction"), [(0.8, 0.98), (0.8, 0.8), (0.9, 0.7)])
def test_pruning_keeps_exactly_the_hand_selection_on_a_hand_graph(node_fraction, edge_fraction):
    graph = _hand_graph()
    nodes, edges, influence = hand_prune(graph, node_fraction, edge_fraction)
    nodes_wo, edges_wo, _ = hand_prune(graph, node_fraction, edge_fraction, logit_weight=False)
    assert (nodes, edges) != (nodes_wo, edges_wo)  # the logit weight in the edge scores matters here
    pruned = prune_graph(graph, node_fraction=node_fraction, edge_fraction=edge_fraction)
    assert _pruned_sets(pruned) == (nodes, edges)
    cumulative = hand_cumulative(graph)  # over the unpruned graph, as the exported ``influence`` field
    for n in pruned.nodes:
        assert n.influence == pytest.approx(influence[n.key], rel=1e-9, abs=1e-12)
        assert n.cumulative == (None if n.kind == LOGIT else pytest.approx(cumulative[n.key], rel=1e-9))
    reached = max(cumulative[n.key] for n in pruned.nodes if n.kind == NEURON)
    assert reached == pytest.approx(to_circuit_tracer(pruned)["metadata"]["node_threshold"], rel=1e-12)
    kept = {n.key: i for i, n in enumerate(pruned.nodes)}
    for t, s in edges:  # kept edges keep their raw weights
        old = {n.key: i for i, n in enumerate(graph.nodes)}
        assert float(pruned.adjacency[kept[t], kept[s]]) == float(graph.adjacency[old[t], old[s]])


def test_hand_influence_by_paths():
    """The series itself on the hand graph: N4 reaches the logits directly and through N5."""
    _, _, influence = hand_prune(_hand_graph(), 0.8, 0.98)
    share_x, share_y = 2.0 / 3.5, 0.7 / 1.4  # N5's shares of logit x's and logit y's input
    n5 = 0.6 * share_x + 0.4 * share_y
    n4 = 0.6 * 0.9 / 3.5 + n5 * 0.5 / 2.8
    assert influence[(NEURON, 2, 1, 5)] == pytest.approx(n5, rel=1e-6)  # float32 weights
    assert influence[(NEURON, 1, 1, 4)] == pytest.approx(n4, rel=1e-6)
    assert influence[(LOGIT, 3, 1, 20)] == pytest.approx(0.6)


@pytest.fixture(scope="module")
def tiny_graph():
    return build_graph(make_tiny("llama", seed=3), PROMPT, node_threshold=0.0, max_nodes=60)


@pytest.mark.parametrize(("node_fraction", "edge_fraction"), [(0.8, 0.98), (0.6, 0.9)])
def test_pruning_keeps_exactly_the_hand_selection_on_a_model_graph(tiny_graph, node_fraction, edge_fraction):
    nodes, edges, influence = hand_prune(tiny_graph, node_fraction, edge_fraction)
    assert (nodes, edges) != hand_prune(tiny_graph, node_fraction, edge_fraction, logit_weight=False)[:2]
    pruned = prune_graph(tiny_graph, node_fraction=node_fraction, edge_fraction=edge_fraction)
    assert _pruned_sets(pruned) == (nodes, edges)
    for n in pruned.nodes:
        assert n.influence == pytest.approx(influence[n.key], rel=1e-6, abs=1e-12)

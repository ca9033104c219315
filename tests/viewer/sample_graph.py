"""A realistic synthetic attribution graph (circuit-tracer / Neuronpedia schema version 1) for viewer tests.

Shaped like a SmolLM2-135M graph for subject-verb agreement: 30 layers, 6 prompt tokens, ~240 neurons
concentrated on the subject and the last position, embeddings for every token, three target logits and
a few hundred signed edges that run upwards (source layer below target layer, source position <= target).

Written the way ``neurontrace graph`` exports a pruned graph: neurons are circuit-tracer feature nodes
(``feature_type: "cross layer transcoder"``, ``unit: "mlp neuron"``); ``influence`` is circuit-tracer's
cumulative influence over the *unpruned* graph (ranked by importance, the running share of the total, so lower
means more important), so the kept neurons reach only ~0.8 and ``metadata.node_threshold`` is the largest
influence of a kept neuron. Helpers below turn it into the other shapes the viewer must read: a long prompt,
a graph saved by circuit-tracer's own frontend (qParams as strings), one with error nodes, the legacy names.
"""

from __future__ import annotations

import json
import random
from typing import Any

N_LAYERS = 30
D_FF = 1536
NEURON_TYPE = "cross layer transcoder"
ERROR_TYPE = "mlp reconstruction error"
TOKENS = ["The", " keys", " to", " the", " old", " cabinet"]
TOKEN_IDS = [504, 4845, 288, 260, 1166, 20811]
LOGITS = [(" are", 359, 0.623), (" is", 314, 0.214), (" were", 665, 0.048)]
VOCAB = [
    " are",
    " is",
    " were",
    " was",
    " have",
    " has",
    " keys",
    " locks",
    " doors",
    " cabinets",
    " they",
    " it",
    " them",
    " their",
    " plural",
    " many",
    " all",
    " both",
    " these",
    " those",
]
KEPT_SHARE = 0.8  # the share of the unpruned graph's influence the kept nodes hold


def cantor(layer: int, index: int) -> int:
    """circuit-tracer's ``feature`` field: the Cantor pair of layer and index (METHOD.md section 7)."""
    return (layer + index) * (layer + index + 1) // 2 + index


def logit_clerp(token: str, prob: float) -> str:
    """``Output "TOKEN" (p=...)``, a ``"`` inside the token written as U+FF02 (circuit-tracer splits on ``"``)."""
    return f'Output "{token.replace(chr(34), chr(0xFF02))}" (p={prob:.3f})'


def is_neuron(node: dict[str, Any]) -> bool:
    return node["feature_type"] in (NEURON_TYPE, "mlp neuron")


def build_sample_graph(
    seed: int = 0,
    n_neurons: int = 240,
    tokens: list[str] | None = None,
    token_ids: list[int] | None = None,
    slug: str = "keys-cabinet-sva",
) -> dict[str, Any]:
    """A graph dict with ``n_neurons`` neurons, one embedding per token, 3 logits and signed links."""
    rng = random.Random(seed)
    tokens = list(TOKENS if tokens is None else tokens)
    if token_ids is None:
        token_ids = list(TOKEN_IDS) if tokens == TOKENS else [1000 + 7 * i for i in range(len(tokens))]
    n_pos = len(tokens)
    last = n_pos - 1
    logit_layer = str(N_LAYERS + 1)

    embeddings = []
    for pos, (tok, tid) in enumerate(zip(tokens, token_ids, strict=True)):
        node = _node(f"E_{tid}_{pos}", pos, "E", pos, "embedding", f"E_{tid}-{pos}", activation=None)
        node.update(clerp=f"Emb: {tok!r}", token=tok, index=tid)
        node["attribution"] = round(rng.uniform(0.5, 2.0), 4)
        embeddings.append(node)

    # the subject and the last position hold most of the circuit
    pos_weights = [1, 6, 1, 1, 2, 10] if n_pos == len(TOKENS) else [1] * last + [max(4, n_pos // 4)]
    seen: set[tuple[int, int, int]] = set()
    neurons: list[dict[str, Any]] = []
    while len(neurons) < n_neurons:
        pos = rng.choices(range(n_pos), pos_weights)[0]
        # early layers near the subject, late layers at the last position
        layer = min(N_LAYERS - 1, int(rng.betavariate(2.2 if pos == last else 1.3, 1.2) * N_LAYERS))
        index = rng.randrange(D_FF)
        if (layer, index, pos) in seen:
            continue
        seen.add((layer, index, pos))
        sign = -1 if rng.random() < 0.3 else 1
        act = round(sign * rng.uniform(0.05, 6.0), 3)
        node = _node(
            f"{layer}_{index}_{pos}",
            cantor(layer, index),
            str(layer),
            pos,
            NEURON_TYPE,
            f"{layer}_{index}-0",
            act,
        )
        node["clerp"] = f"L{layer}/N{index}{'-' if act < 0 else '+'}"
        node["attribution"] = round(rng.gauss(0, 1) * (0.2 + layer / N_LAYERS), 4) or 0.0001
        node.update(token=tokens[pos], index=index, unit="mlp neuron")
        node["top_logit_effects"] = rng.sample(VOCAB, 5)
        if rng.random() < 0.6:
            node["bottom_logit_effects"] = rng.sample(VOCAB, 3)
        neurons.append(node)

    # cumulative influence over the unpruned graph: the kept nodes (most important first) hold KEPT_SHARE of
    # it, the pruned rest (each smaller than any kept one) the remainder
    ranked = sorted(neurons + embeddings, key=lambda n: -abs(n["attribution"]))
    total = sum(abs(n["attribution"]) for n in ranked) / KEPT_SHARE
    running = 0.0
    for n in ranked:
        running += abs(n["attribution"])
        n["influence_raw"] = round(abs(n["attribution"]), 4)
        n["influence"] = round(running / total, 4)

    logits = []
    for i, (tok, tid, prob) in enumerate(LOGITS):
        node = _node(
            f"{logit_layer}_{tid}_{last}", tid, logit_layer, last, "logit", f"L_{tid}-{last}", round(9 - i, 3)
        )
        node.update(
            clerp=logit_clerp(tok, prob), token_prob=prob, is_target_logit=i == 0, token=tok, index=tid
        )
        node["attribution"] = None
        logits.append(node)

    nodes = embeddings + neurons + logits
    links = _links(rng, embeddings, neurons, logits)
    by_importance = sorted(neurons, key=lambda n: n["influence"])
    late = [n for n in by_importance if n["influence"] > 0.7] or by_importance[-1:]
    pinned = [
        by_importance[0]["node_id"],
        by_importance[3]["node_id"],
        late[0]["node_id"],
        logits[0]["node_id"],
    ]
    group = [n["node_id"] for n in by_importance if n["ctx_idx"] == 1][:3]
    node_threshold = max(n["influence"] for n in neurons)
    return {
        "metadata": {
            "slug": slug,
            "scan": "./graph_data/features/SmolLM2-135M",
            "transcoder_list": [],
            "prompt_tokens": list(tokens),
            "prompt": "".join(tokens),
            "node_threshold": node_threshold,
            "schema_version": 1,
            "neurontrace": {
                "model": "HuggingFaceTB/SmolLM2-135M",
                "generator": "neurontrace tests (synthetic)",
                "method": "relp",
            },
            "token_ids": list(token_ids),
        },
        "qParams": {
            "pinnedIds": pinned,
            "supernodes": [["plural subject", *group]],
            "linkType": "both",
            "clickedId": "",
            "sg_pos": "",
        },
        "nodes": nodes,
        "links": links,
    }


def _node(node_id, feature, layer, pos, ftype, js_id, activation) -> dict[str, Any]:
    return {
        "node_id": node_id,
        "feature": feature,
        "layer": layer,
        "ctx_idx": pos,
        "feature_type": ftype,
        "jsNodeId": js_id,
        "clerp": "",
        "influence": None,
        "activation": activation,
        "token_prob": 0.0,
        "is_target_logit": False,
        "run_idx": 0,
        "reverse_ctx_idx": 0,
    }


def _links(rng: random.Random, embeddings, neurons, logits) -> list[dict[str, Any]]:
    """Signed upward edges: embeddings and lower neurons into each neuron, late last-position neurons to logits."""
    links: dict[tuple[str, str], float] = {}

    def add(src, dst, scale):
        sign = -1 if rng.random() < 0.3 else 1
        links.setdefault((src["node_id"], dst["node_id"]), round(sign * rng.uniform(0.02, 1.0) * scale, 4))

    for dst in neurons:
        layer, pos = int(dst["layer"]), dst["ctx_idx"]
        below = [s for s in neurons if int(s["layer"]) < layer and s["ctx_idx"] <= pos]
        below.sort(key=lambda s: (s["ctx_idx"] != pos, layer - int(s["layer"])))
        for src in rng.sample(below[:12], min(len(below[:12]), rng.randint(0, 3))):
            add(src, dst, 1.0)
        if layer < 8 or not below or rng.random() < 0.15:
            add(embeddings[pos], dst, 1.5)
    for logit in logits:
        feeders = [n for n in neurons if n["ctx_idx"] == logit["ctx_idx"] and int(n["layer"]) >= 18]
        for src in rng.sample(feeders, min(len(feeders), 12)):
            add(src, logit, 2.0)
    return [{"source": s, "target": t, "weight": w} for (s, t), w in links.items()]


# ---------------------------------------------------------------- other shapes of the same graph


def long_prompt_graph(n_tokens: int = 40, n_neurons: int = 160) -> dict[str, Any]:
    """A graph of an ``n_tokens``-token prompt, some tokens long enough that a label cannot fit its column."""
    words = ["The", " cabinet", " keys", " near", " an", " extraordinarily", " old", " wooden", " door"]
    tokens = [words[i % len(words)] + (f" {i}" if i % 7 == 3 else "") for i in range(n_tokens)]
    tokens[5] = " supercalifragilisticexpialidocious"
    return build_sample_graph(seed=3, n_neurons=n_neurons, tokens=tokens, slug="long-prompt")


def with_error_nodes(graph: dict[str, Any], layers=(3, 12, 25)) -> dict[str, Any]:
    """``graph`` plus circuit-tracer MLP reconstruction-error nodes (``0_{layer}_{pos}``) feeding some neurons."""
    last = len(graph["metadata"]["prompt_tokens"]) - 1
    neurons = [n for n in graph["nodes"] if is_neuron(n)]
    for k, layer in enumerate(layers):
        pos = last if k % 2 == 0 else 1
        node = {
            "node_id": f"0_{layer}_{pos}",
            "feature": -1,
            "layer": str(layer),
            "ctx_idx": pos,
            "feature_type": ERROR_TYPE,
            "jsNodeId": f"0_{layer}-{pos}",
            "clerp": f"Err: mlp “{layer}”",
            "influence": round(0.1 + 0.2 * k, 4),
            "activation": None,
            "token_prob": 0.0,
            "is_target_logit": False,
            "run_idx": 0,
            "reverse_ctx_idx": 0,
        }
        graph["nodes"].append(node)
        for dst in [n for n in neurons if n["ctx_idx"] == pos and int(n["layer"]) > layer][:3]:
            graph["links"].append({"source": node["node_id"], "target": dst["node_id"], "weight": 0.25})
    return graph


OUR_KEYS = (
    "token",
    "index",
    "attribution",
    "influence_raw",
    "unit",
    "top_logit_effects",
    "bottom_logit_effects",
    "top_contexts",
)


def circuit_tracer_style(graph: dict[str, Any]) -> dict[str, Any]:
    """``graph`` as circuit-tracer itself would write it: no neurontrace extra keys on any node."""
    for n in graph["nodes"]:
        for key in OUR_KEYS:
            n.pop(key, None)
    return graph


def saved_by_circuit_tracer(
    graph: dict[str, Any],
    pinned: list[str],
    supernodes: list[list[str]],
    clerps: list[list[str]],
    pruning_threshold: str,
) -> dict[str, Any]:
    """``graph`` with qParams as circuit-tracer's own frontend saves them: every value a string."""
    graph["qParams"] = {
        "pinnedIds": ",".join(pinned),
        "supernodes": json.dumps(supernodes),
        "clerps": json.dumps(clerps),
        "pruningThreshold": pruning_threshold,
        "clickedId": "",
        "linkType": "both",
        "sg_pos": "",
        "unknownKey": "kept as it is",
    }
    return graph


def legacy_names(graph: dict[str, Any]) -> dict[str, Any]:
    """``graph`` in the earlier export's names: ``feature_type: "mlp neuron"``, ``top_tokens``/``bottom_tokens``."""
    for n in graph["nodes"]:
        if is_neuron(n):
            n["feature_type"] = "mlp neuron"
            n.pop("unit", None)
            for new, old in (("top_logit_effects", "top_tokens"), ("bottom_logit_effects", "bottom_tokens")):
                if new in n:
                    n[old] = n.pop(new)
    return graph


# ---------------------------------------------------------------- what the viewer should show


def pct_input(graph: dict[str, Any]) -> dict[tuple[str, str], float]:
    """Each link's share of its target's input: weight / sum(|weight|) of every link into that target."""
    totals: dict[str, float] = {}
    for link in graph["links"]:
        totals[link["target"]] = totals.get(link["target"], 0.0) + abs(link["weight"])
    return {
        (link["source"], link["target"]): link["weight"] / totals[link["target"]]
        if totals[link["target"]]
        else 0.0
        for link in graph["links"]
    }


def pinned_ids(graph: dict[str, Any]) -> set[str]:
    pinned = graph["qParams"]["pinnedIds"]
    return set(pinned.split(",") if isinstance(pinned, str) else pinned)


def visible_count(graph: dict[str, Any], threshold: float) -> int:
    """How many nodes the viewer shows at ``threshold``: embeddings, logits, pinned and influence <= threshold."""
    pinned = pinned_ids(graph)
    return sum(
        1
        for n in graph["nodes"]
        if n["feature_type"] in ("embedding", "logit")
        or n["node_id"] in pinned
        or n["influence"] is None
        or n["influence"] <= threshold
    )

"""A realistic synthetic attribution graph (circuit-tracer / Neuronpedia schema version 1) for viewer tests.

Shaped like a SmolLM2-135M graph for subject-verb agreement: 30 layers, 6 prompt tokens, ~240 neurons
concentrated on the subject and the last position, embeddings for every token, three target logits and
a few hundred signed edges that run upwards (source layer below target layer, source position <= target).
Influence is circuit-tracer's cumulative style: sorted by importance, the running share of the total, so
lower means more important.
"""

from __future__ import annotations

import random
from typing import Any

N_LAYERS = 30
D_FF = 1536
TOKENS = ["The", " keys", " to", " the", " old", " cabinet"]
TOKEN_IDS = [504, 4845, 288, 260, 1166, 20811]
LOGITS = [(" are", 359, 0.623), (" is", 314, 0.214), (" were", 665, 0.048)]
CLERPS = [
    "plural subject noun",
    "number agreement: plural",
    "'keys' / 'key' lexical",
    "preposition 'to' after noun",
    "say a plural verb",
    "say ' is'",
    "end of noun phrase",
    "determiner 'the'",
    "physical objects: furniture",
    "subject tracking across a PP",
]
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


def cantor(layer: int, index: int) -> int:
    """circuit-tracer's ``feature`` field: the Cantor pair of layer and index (METHOD.md section 7)."""
    return (layer + index) * (layer + index + 1) // 2 + index


def build_sample_graph(seed: int = 0, n_neurons: int = 240) -> dict[str, Any]:
    """A graph dict with ``n_neurons`` neurons, one embedding per token, 3 logits and signed links."""
    rng = random.Random(seed)
    n_pos = len(TOKENS)
    last = n_pos - 1
    logit_layer = str(N_LAYERS + 1)

    nodes: list[dict[str, Any]] = []
    for pos, (tok, tid) in enumerate(zip(TOKENS, TOKEN_IDS, strict=True)):
        nodes.append(_node(f"E_{tid}_{pos}", tid, "E", pos, n_pos, "embedding", activation=None, token=tok))

    seen: set[tuple[int, int, int]] = set()
    neurons: list[dict[str, Any]] = []
    pos_weights = [1, 6, 1, 1, 2, 10]  # subject and last position hold most of the circuit
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
            f"{layer}_{index}_{pos}", cantor(layer, index), str(layer), pos, n_pos, "mlp neuron", act
        )
        node["attribution"] = round(rng.gauss(0, 1) * (0.2 + layer / N_LAYERS), 4) or 0.0001
        node["clerp"] = rng.choice(CLERPS) if rng.random() < 0.35 else ""
        node["top_tokens"] = rng.sample(VOCAB, 5)
        if rng.random() < 0.6:
            node["bottom_tokens"] = rng.sample(VOCAB, 3)
        node["token"] = TOKENS[pos]
        neurons.append(node)

    # cumulative influence: most important (largest |attribution|) first
    total = sum(abs(n["attribution"]) for n in neurons)
    running = 0.0
    for n in sorted(neurons, key=lambda n: -abs(n["attribution"])):
        running += abs(n["attribution"])
        n["influence"] = round(running / total, 4)
    nodes.extend(neurons)

    logits = []
    for tok, tid, prob in LOGITS:
        node = _node(f"{logit_layer}_{tid}_{last}", tid, logit_layer, last, n_pos, "logit", activation=None)
        node.update(clerp=f'Output "{tok}" (p={prob:.3f})', token_prob=prob, is_target_logit=True, token=tok)
        logits.append(node)
    nodes.extend(logits)

    links = _links(rng, nodes, neurons, logits)
    by_importance = sorted(neurons, key=lambda n: n["influence"])
    late = [n for n in by_importance if n["influence"] > 0.9]
    pinned = [
        by_importance[0]["node_id"],
        by_importance[3]["node_id"],
        late[0]["node_id"],
        logits[0]["node_id"],
    ]
    group = [n["node_id"] for n in by_importance if n["ctx_idx"] == 1][:3]
    return {
        "metadata": {
            "slug": "keys-cabinet-sva",
            "scan": "smollm2-135m",
            "prompt_tokens": list(TOKENS),
            "prompt": "".join(TOKENS),
            "node_threshold": 0.8,
            "schema_version": 1,
            "info": {"generator": "neurontrace tests (synthetic)", "method": "relp"},
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


def _node(node_id, feature, layer, pos, n_pos, ftype, activation, token=None) -> dict[str, Any]:
    node = {
        "node_id": node_id,
        "feature": feature,
        "layer": layer,
        "ctx_idx": pos,
        "feature_type": ftype,
        "jsNodeId": f"{layer}_{feature}-0",
        "clerp": "",
        "influence": None,
        "activation": activation,
        "token_prob": 0.0,
        "is_target_logit": False,
        "run_idx": 0,
        "reverse_ctx_idx": n_pos - 1 - pos,
    }
    if token is not None:
        node["token"] = token
    return node


def _links(rng: random.Random, nodes, neurons, logits) -> list[dict[str, Any]]:
    """Signed upward edges: embeddings and lower neurons into each neuron, late last-position neurons to logits."""
    embeddings = [n for n in nodes if n["feature_type"] == "embedding"]
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


def visible_count(graph: dict[str, Any], threshold: float) -> int:
    """How many nodes the viewer shows at ``threshold``: embeddings, logits, pinned and influence <= threshold."""
    pinned = set(graph["qParams"]["pinnedIds"])
    return sum(
        1
        for n in graph["nodes"]
        if n["feature_type"] in ("embedding", "logit")
        or n["node_id"] in pinned
        or n["influence"] is None
        or n["influence"] <= threshold
    )

"""Pieces shared by the case studies: chat prompts, token spans, next-token readouts, graph bundles, plots."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from neurontrace.attribution.api import attribute
from neurontrace.models.model import NeuronModel
from neurontrace.tokens import Batch, encode, pad_id_of, tokenize


def chat_prompt(model: NeuronModel, question: str, answer_prefix: str = "") -> str:
    """``question`` as a user turn in the model's chat template (plain ``Q: ... A:`` without one), then the
    start of the assistant's answer, so that the next token is the answer itself."""
    tok = model.tokenizer
    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = f"Q: {question}\nA: "
    return text + answer_prefix


def spans(model: NeuronModel, prompt: str, word: str) -> list[list[int]]:
    """Token positions of every occurrence of ``word`` in ``prompt`` (one list of positions per occurrence)."""
    tok = model.tokenizer
    enc = tok(prompt, return_offsets_mapping=True, add_special_tokens=True)
    if list(enc["input_ids"]) != encode(model, prompt):
        raise RuntimeError("offsets do not match the model's tokenisation")  # pragma: no cover
    out, start = [], prompt.find(word)
    while start >= 0:
        end = start + len(word)
        out.append([i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > start and b > a])
        start = prompt.find(word, end)
    return [s for s in out if s]


def first_token(model: NeuronModel, text: str) -> int:
    return encode(model, text, add_special_tokens=False)[0]


def next_token_logprobs(model: NeuronModel, prompts: Sequence[str], batch_size: int = 16) -> torch.Tensor:
    """Log-probabilities of the next token after each prompt, ``[N, vocab]`` (float32, CPU)."""
    rows = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenize(model, list(prompts[start : start + batch_size]))
        with torch.no_grad():
            logits = model.forward(batch, logits_to_keep=1).logits[:, -1].float()
        rows.append(logits.log_softmax(-1).cpu())
    return torch.cat(rows)


def answer_readout(
    model: NeuronModel,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    edits: Sequence[Any] = (),
    batch_size: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per prompt, with every answer token teacher-forced (and ``edits`` applied, if any): the answer's
    log-probability ``[N]`` and whether the argmax reproduces every answer token ``[N]`` (bool)."""
    from neurontrace.interventions import intervene

    logprobs, correct = [], []
    for start in range(0, len(prompts), batch_size):
        pairs = list(
            zip(prompts[start : start + batch_size], answers[start : start + batch_size], strict=True)
        )
        targets = [encode(model, a, add_special_tokens=False) for _, a in pairs]
        rows = [encode(model, p) + t for (p, _), t in zip(pairs, targets, strict=True)]
        batch = Batch.from_ids(rows, pad_id=pad_id_of(model.tokenizer))
        with torch.no_grad(), intervene(model, list(edits)):
            logits = model.forward(batch).logits.float()
        for i, t in enumerate(targets):
            logp = logits[i, -len(t) - 1 : -1].log_softmax(-1)  # position j predicts answer token j
            logprobs.append(float(logp.gather(-1, torch.tensor(t, device=logp.device)[:, None]).sum()))
            correct.append(logp.argmax(-1).tolist() == t)
    return torch.tensor(logprobs), torch.tensor(correct)


def teacher_forced_correct(
    model: NeuronModel, prompts: list[str], answers: list[str], batch_size: int = 32
) -> torch.Tensor:
    """Per prompt: does the model's argmax reproduce every token of the answer (given the ones before)?"""
    return answer_readout(model, prompts, answers, batch_size=batch_size)[1]


@dataclass
class PromptScores:
    """One prompt's per-position RelP scores and activations, ``[L, T, d]``."""

    prompt: str
    scores: torch.Tensor
    acts: torch.Tensor

    def top_nodes(self, k: int) -> list[tuple[int, int, int, float]]:
        """The ``k`` (layer, position, neuron, score) of largest |score|."""
        flat = self.scores.flatten()
        idx = flat.abs().topk(min(k, flat.numel())).indices.tolist()
        _, t, d = self.scores.shape
        return [(i // (t * d), (i // d) % t, i % d, float(flat[i])) for i in idx]


def attribute_each(
    model: NeuronModel,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    method: str = "relp",
    progress: bool = True,
) -> list[PromptScores]:
    """Per-prompt, per-position attribution of the teacher-forced log-probability of each prompt's answer."""
    from tqdm.auto import tqdm

    out = []
    for prompt, answer in tqdm(
        list(zip(prompts, answers, strict=True)),
        desc=f"{method} per prompt",
        disable=not progress,
        leave=False,
    ):
        r = attribute(model, prompt=prompt, answer=answer, metric="logprob", method=method)
        out.append(PromptScores(prompt, r.mean_scores, r.acts_mean))
    return out


def write_graph_bundle(
    model: NeuronModel,
    prompt: str,
    *,
    answers: Sequence[str],
    out: Path,
    slug: str,
    node_fraction: float = 0.8,
    edge_fraction: float = 0.98,
    max_nodes: int = 200,
) -> dict[str, Any]:
    """Build, prune and export one prompt's attribution graph: circuit-tracer JSON and the offline viewer."""
    from neurontrace.describe import graph_node_describer
    from neurontrace.graphs.build import NEURON, build_graph
    from neurontrace.graphs.export import to_circuit_tracer
    from neurontrace.graphs.prune import prune_graph
    from neurontrace.graphs.supernodes import find_supernodes, with_supernodes
    from neurontrace.io import write_text_atomic
    from neurontrace.viewer import write_viewer

    graph = build_graph(model, prompt, answers=list(answers), max_nodes=max_nodes)
    pruned = prune_graph(graph, node_fraction=node_fraction, edge_fraction=edge_fraction)
    data = to_circuit_tracer(pruned, slug=slug, describe=graph_node_describer(model))
    data = with_supernodes(data, find_supernodes(pruned))
    write_text_atomic(out / f"{slug}.json", json.dumps(data))
    write_viewer(data, out / f"{slug}.html")
    return {
        "json": f"{slug}.json",
        "html": f"{slug}.html",
        "neurons": sum(n.kind == NEURON for n in graph.nodes),
        "edges": graph.n_edges,
        "pruned_neurons": sum(n.kind == NEURON for n in pruned.nodes),
        "pruned_edges": pruned.n_edges,
    }


def bar_plot(path: Path, labels: Sequence[str], values: Sequence[float], *, title: str, ylabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(labels) + 1.5), 3.6), constrained_layout=True)
    ax.bar(range(len(labels)), values, color="#4c72b0")
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.2g}", ha="center", va="bottom", fontsize=7)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def layer_histogram(path: Path, groups: dict[str, list[int]], n_layers: int, *, title: str) -> None:
    """Counts per layer of several groups of nodes, one line each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.4), constrained_layout=True)
    for name, layers in groups.items():
        counts = (
            torch.bincount(torch.tensor(layers, dtype=torch.long), minlength=n_layers) if layers else None
        )
        ax.plot(
            range(n_layers),
            counts.tolist() if counts is not None else [0] * n_layers,
            marker="o",
            ms=3,
            label=name,
        )
    ax.set_xlabel("layer")
    ax.set_ylabel("nodes")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=100)
    plt.close(fig)

"""Rollout graphs: one attribution graph for several next-token predictions of a continuation.

A prompt is followed by a continuation ``c_0 ... c_{n-1}``, given as text or generated greedily. The graph's input
is the prompt followed by ``c_0 ... c_{n-2}`` (teacher forcing), and it has one logit node per continuation token:
``c_j`` at the position that predicts it (the prompt's last position plus ``j``). Neurons are nodes at every
position; edges are direct effects as in every graph (:mod:`neurontrace.graphs.build`). Since the model is causal,
the part of the graph that reaches the logit at position ``t`` (its incoming edges and every node's score for it,
``extra["attribution_by_target"]``) is the graph of the prefix up to ``t`` with the next token as its target.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from neurontrace.errors import NeurontraceError
from neurontrace.graphs.build import AttributionGraph, build_graph
from neurontrace.models.model import NeuronModel
from neurontrace.tokens import Batch, encode, pad_id_of


def _eos_ids(model: NeuronModel) -> set[int]:
    """The ids that end a generation, as ``model.hf.generate`` reads them (its generation config)."""
    config = getattr(model.hf, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


def greedy_continuation(model: NeuronModel, *, prompt_ids: Sequence[int], n: int) -> list[int]:
    """The ``n`` tokens the model generates greedily after ``prompt_ids`` (the most likely token each step; it
    stops after an end-of-sequence token, which it keeps, as ``model.hf.generate(do_sample=False)`` does)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise NeurontraceError(f"the number of tokens to generate must be a whole number >= 1, got {n!r}")
    ids, out = list(prompt_ids), []
    eos = _eos_ids(model)
    pad = pad_id_of(model.tokenizer) if model.tokenizer is not None else 0
    with torch.no_grad():
        for _ in range(n):
            logits = model.forward(Batch.from_ids([ids + out], pad_id=pad), logits_to_keep=1).logits[0, -1]
            out.append(int(logits.argmax()))
            if out[-1] in eos:
                break
    return out


def continuation_ids(model: NeuronModel, *, prompt: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of the prompt and of the continuation, tokenised together (what the model reads).

    The prompt's own tokens must be a prefix of the joint tokenisation, else a token merges across the boundary.
    """
    prompt_ids = encode(model, prompt)
    if continuation == "":
        raise NeurontraceError("the continuation is empty; give the text that follows the prompt")
    joint = encode(model, prompt + continuation)
    if joint[: len(prompt_ids)] != prompt_ids or len(joint) == len(prompt_ids):
        raise NeurontraceError(
            f"the prompt {prompt!r} tokenises differently once {continuation!r} follows it (a token spans the "
            "boundary); end the prompt where a token ends, e.g. start the continuation with its space"
        )
    return prompt_ids, joint[len(prompt_ids) :]


def _generated_text(model: NeuronModel, prompt_ids: list[int], tokens: list[int]) -> str:
    """The text the generated tokens add to the prompt (decoded with it, so spaces come out as they read)."""
    head, full = model.tokenizer.decode(prompt_ids), model.tokenizer.decode(prompt_ids + tokens)
    return full[len(head) :] if full.startswith(head) else model.tokenizer.decode(tokens)


def build_rollout_graph(
    model: NeuronModel,
    prompt: str,
    *,
    continuation: str | None = None,
    generate: int | None = None,
    **options: Any,
) -> AttributionGraph:
    """The attribution graph of a prompt and its continuation, with a logit node at each continuation position.

    Give either ``continuation`` (text that follows the prompt) or ``generate`` (a number of tokens generated
    greedily). Each target position's metric is its continuation token's logit; the graph's metric is their mean
    (each logit node weighs ``1/n``). A neuron is kept when its score for some target is at least
    ``node_threshold`` times that target's logit (at most ``max_nodes``, the largest relative scores first).
    ``options`` go to :func:`neurontrace.graphs.build.build_graph` (``node_threshold``, ``max_nodes``, ``rules``,
    ``site``, ...). ``meta["rollout"]`` records the prompt, the continuation and whether it was generated.
    """
    if (continuation is None) == (generate is None):
        raise NeurontraceError(
            "give either a continuation (text) or generate (a number of tokens to generate), not both"
        )
    if "answers" in options or "targets" in options:
        raise NeurontraceError(
            "a rollout graph's targets are its continuation tokens; give no answers or targets"
        )
    if generate is not None:
        prompt_ids = encode(model, prompt)
        tokens = greedy_continuation(model, prompt_ids=prompt_ids, n=generate)
    else:
        prompt_ids, tokens = continuation_ids(model, prompt=prompt, continuation=continuation)
    start = len(prompt_ids) - 1
    targets = [(start + j, token) for j, token in enumerate(tokens)]
    graph = build_graph(model, prompt_ids + tokens[:-1], targets=targets, **options)
    text = continuation if continuation is not None else _generated_text(model, prompt_ids, tokens)
    graph.prompt = prompt + text
    graph.meta["rollout"] = {
        "prompt": prompt,
        "continuation": text,
        "continuation_ids": tokens,
        "generated": generate is not None,
        "target_positions": [p for p, _ in targets],
    }
    return graph

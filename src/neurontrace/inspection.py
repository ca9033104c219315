"""One-prompt inspection: top next tokens, most active neurons per layer, and the effect of zeroing neurons."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from neurontrace.errors import NeurontraceError, check_finite
from neurontrace.interventions import Edit, intervene
from neurontrace.io import JsonResult
from neurontrace.models.model import NeuronModel
from neurontrace.neurons import NeuronId
from neurontrace.sites import capture
from neurontrace.tokens import single_token_id, token_strings, tokenize_pairs

SCHEMA_VERSION = 1


@dataclass
class TokenProb:
    token_id: int
    token: str
    prob: float
    logit: float


@dataclass
class ActiveNeuron:
    neuron: str  # "L5/N123+"
    layer: int
    index: int
    activation: float


@dataclass
class AnswerScore:
    answer: str
    contrast: str | None
    logit_diff: float  # logit(answer) - logit(contrast), or logit(answer) without a contrast
    logit_diff_after_zero: float | None = None


@dataclass
class ZeroEffect:
    zeroed: list[str]
    top_after: list[TokenProb]
    changes: list[dict]  # token, prob_before, prob_after, logit_before, logit_after
    kl_divergence: float  # KL(before || after) of the next-token distribution


@dataclass
class InspectResult(JsonResult):
    model: str
    prompt: str
    tokens: list[str]
    position: int
    top: list[TokenProb]
    active: list[list[ActiveNeuron]]  # per layer
    zero: ZeroEffect | None = None
    answer: AnswerScore | None = None
    counterfactual: str | None = None
    most_changed: list[ActiveNeuron] = field(default_factory=list)  # activation(clean) - activation(cf)
    schema_version: int = field(default=SCHEMA_VERSION)


def _top_tokens(model: NeuronModel, logits: torch.Tensor, k: int) -> list[TokenProb]:
    probs = logits.float().softmax(-1)
    values, ids = probs.topk(k)
    strings = token_strings(model, ids.tolist()) if model.tokenizer is not None else [f"<{i}>" for i in ids]
    return [
        TokenProb(int(i), s, float(p), float(logits[i]))
        for i, s, p in zip(ids.tolist(), strings, values.tolist(), strict=True)
    ]


def inspect_prompt(
    model: NeuronModel,
    prompt: str,
    *,
    top: int = 10,
    per_layer: int = 3,
    position: int = -1,
    zero: Sequence[NeuronId] = (),
    answer: str | None = None,
    contrast: str | None = None,
    counterfactual: str | None = None,
) -> InspectResult:
    """Run ``prompt``; report the top ``top`` next tokens and the ``per_layer`` neurons of largest |activation|
    per layer at ``position``.

    With ``zero``, also the prediction with those neurons zeroed. With ``answer`` (and ``contrast``), the logit
    (difference) of those single-token answers. With ``counterfactual`` (same token length), the neurons whose
    activation at ``position`` differs most between the two prompts.
    """
    answer_ids = [single_token_id(model, t) for t in (answer, contrast) if t is not None]
    if contrast is not None and answer is None:
        raise NeurontraceError("a contrast answer needs an answer too")
    if counterfactual is not None:
        batch, cf_batch = tokenize_pairs(model, [prompt], [counterfactual])
    else:
        batch = model.tokenize(prompt)
    column = batch.column(0, position)  # validates the position
    acts = capture(model, batch, sites="neurons")
    last = acts.logits[0, -1]
    check_finite(last, "next-token logits")
    active = []
    for layer in range(model.n_layers):
        a = acts.get(layer)[0, column]
        idx = a.abs().topk(min(per_layer, a.numel())).indices.tolist()
        active.append(
            [
                ActiveNeuron(str(NeuronId(layer, i, NeuronId.polarity(float(a[i])))), layer, i, float(a[i]))
                for i in idx
            ]
        )
    result = InspectResult(
        model=model.name,
        prompt=prompt,
        tokens=token_strings(model, batch.ids(0)),
        position=position,
        top=_top_tokens(model, last, top),
        active=active,
    )

    def answer_score(logits: torch.Tensor) -> float:
        value = logits[answer_ids[0]]
        return float(value - logits[answer_ids[1]]) if len(answer_ids) == 2 else float(value)

    if answer_ids:
        result.answer = AnswerScore(answer, contrast, answer_score(last))
    if counterfactual is not None:
        cf = capture(model, cf_batch, sites="neurons")
        diff = (acts.stack()[:, 0, column] - cf.stack()[:, 0, column]).flatten()
        idx = diff.abs().topk(min(per_layer * 5, diff.numel())).indices.tolist()
        result.counterfactual = counterfactual
        result.most_changed = [
            ActiveNeuron(
                str(NeuronId(i // model.d_ff, i % model.d_ff)),
                i // model.d_ff,
                i % model.d_ff,
                float(diff[i]),
            )
            for i in idx
        ]
    if zero:
        edits = [
            Edit(
                layer=n.layer,
                neurons=[n.index],
                positions=None if n.position is None else [n.position],
                op="zero",
            )
            for n in zero
        ]
        with intervene(model, edits):
            after = model.logits(batch)[0, -1]
        before_lp, after_lp = last.float().log_softmax(-1), after.float().log_softmax(-1)
        kl = float((before_lp.exp() * (before_lp - after_lp)).sum())
        changes = [
            {
                "token": t.token,
                "token_id": t.token_id,
                "prob_before": t.prob,
                "prob_after": float(after_lp[t.token_id].exp()),
                "logit_before": t.logit,
                "logit_after": float(after[t.token_id]),
            }
            for t in result.top
        ]
        result.zero = ZeroEffect([str(n) for n in zero], _top_tokens(model, after, top), changes, kl)
        if result.answer is not None:
            result.answer.logit_diff_after_zero = answer_score(after)
    return result

"""What a neuron writes: its output weights read out through the final norm and the unembedding (no forward pass).

A neuron's down-projection row ``w = W_out[i]`` (``d_model``) is what one unit of its activation adds to the
residual stream. Read out as logits with the normalisation *scale* held constant (the same linearisation as
RelP's LN-rule), one unit of activation at a position changes the logits there by ``scale * U (g * w)``:
``g`` is the final norm's weight (``1 + weight`` for the Gemma family, none for parameter-free norms), a
LayerNorm also centres ``w``, and ``U`` is the unembedding. Where a layer normalises its MLP output before the
residual add (Gemma 2/3 and OLMo 2 ``post_feedforward_layernorm``) that norm's weight is applied first, its
scale also held constant. The positive scale factors do not change the ranking, so the *logit-effect vector*
``U (g * w)`` ranks the tokens a neuron promotes and suppresses when it fires positively; when it fires
negatively (polarity ``-``) the roles swap. A final-logit soft-cap (Gemma 2/3) is monotonic and leaves the
ranking as it is; the vector is in pre-cap logit units.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from neurontrace.errors import NeurontraceError, check_finite
from neurontrace.io import JsonResult
from neurontrace.models.model import NeuronModel, has_module
from neurontrace.models.placement import loaded_weights
from neurontrace.neurons import NeuronId, check_neuron
from neurontrace.tokens import token_strings

SCHEMA_VERSION = 1
POST_MLP_NORM = "post_feedforward_layernorm"


@dataclass
class TokenEffect:
    token_id: int
    token: str
    value: float  # logit change per unit of activation in the polarity's direction (normalisation scale 1)


@dataclass
class WritesDescription(JsonResult):
    """The tokens a neuron promotes and suppresses when it fires with the given polarity."""

    neuron: str  # "L5/N3+"
    layer: int
    index: int
    polarity: str  # "+" or "-"
    promoted: list[TokenEffect]
    suppressed: list[TokenEffect]
    schema_version: int = field(default=SCHEMA_VERSION)


def _norm_gain(model: NeuronModel, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` through a norm with its scale held at 1: centring (LayerNorm) and weight (``1 + w`` for Gemma)."""
    if model.adapter.norm_kind == "layernorm":
        x = x - x.mean(-1, keepdim=True)
    weight = getattr(norm, "weight", None)
    if weight is None:
        return x
    w = weight.detach().float().to(x.device)
    return x * (1.0 + w if model.adapter.norm_kind == "rms_offset" else w)


def logit_effects(model: NeuronModel, layer: int, index: int | Sequence[int]) -> torch.Tensor:
    """The logit-effect vector ``[vocab]`` of neuron ``index`` of ``layer`` (positive polarity, float32, CPU);
    ``[k, vocab]`` for a list of ``k`` indices (one matrix product for all of them).

    Reads the weights directly, each on its own device; those accelerate offloads are loaded for the read.
    """
    indices = [index] if isinstance(index, int) else list(index)
    for i in indices:
        check_neuron(model, NeuronId(layer, i))
    path = f"{model.adapter.layers}.{layer}.{POST_MLP_NORM}"
    post = model.module(path) if POST_MLP_NORM in model.adapter.norms and has_module(model.hf, path) else None
    with torch.no_grad():
        with loaded_weights(model.down_proj(layer)):
            w = model.w_out(layer)[indices].detach().float()  # [k, d_model]
        with loaded_weights([m for m in (post, model.final_norm) if m is not None]):
            if post is not None:
                w = _norm_gain(model, post, w)
            w = _norm_gain(model, model.final_norm, w)
        with loaded_weights(model.unembed):
            unembed = model.unembed.weight.detach()
            effects = (w.to(unembed.device) @ unembed.float().T).cpu()
    return effects[0] if isinstance(index, int) else effects


def describe_writes(model: NeuronModel, neuron: NeuronId, *, k: int = 10) -> WritesDescription:
    """The ``k`` tokens ``neuron`` promotes most and the ``k`` it suppresses most, for its polarity.

    A neuron without a sign is described for the positive polarity; ``L5/N3-`` (firing negatively) promotes
    the tokens of most negative effect. An ``@pos`` is ignored (a neuron writes the same vector everywhere).
    """
    check_neuron(model, neuron)
    if k < 1:
        raise NeurontraceError("k must be at least 1")
    polarity = neuron.sign or "+"
    effects = logit_effects(model, neuron.layer, neuron.index)
    check_finite(effects, f"logit effects of {neuron}")
    if polarity == "-":
        effects = -effects
    k = min(k, effects.numel())

    def table(values: torch.Tensor, ids: torch.Tensor) -> list[TokenEffect]:
        ids = ids.tolist()
        strings = token_strings(model, ids) if model.tokenizer is not None else [f"<{i}>" for i in ids]
        return [TokenEffect(i, s, float(v)) for i, s, v in zip(ids, strings, values.tolist(), strict=True)]

    top, bottom = effects.topk(k), effects.topk(k, largest=False)
    return WritesDescription(
        neuron=str(NeuronId(neuron.layer, neuron.index, polarity)),
        layer=neuron.layer,
        index=neuron.index,
        polarity=polarity,
        promoted=table(top.values, top.indices),
        suppressed=table(bottom.values, bottom.indices),
    )

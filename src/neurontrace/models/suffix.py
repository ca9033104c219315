"""Re-running the top of a model from one decoder layer on (prefix caching), without re-implementing it.

One ordinary forward pass is *recorded*: a forward pre-hook (``with_kwargs=True``) on every decoder layer keeps
what the Hugging Face model loop passed it (the hidden state, and every other argument: attention masks,
position embeddings, position ids...). :func:`run_from` then calls the decoder layer modules ``l..L-1``
directly, with those recorded arguments and a new hidden state, then the final norm and the unembedding, through
the module names of the family adapter. Everything hooked on those modules (sites, the RelP rules) sees the
same calls as in a full forward pass; the layers below ``l`` do not run.

This relies on the model loop of every supported family (``hidden = layer(hidden, **same_kwargs)``, then the
final norm, the last ``logits_to_keep`` positions, the unembedding and, for Gemma 2/3, the logit soft-cap).
:func:`record_forward` checks it on the recorded pass and raises :class:`SuffixUnsupported` (callers then run
the whole model) when anything differs: a layer called other than once in order, a hidden state changed between
two layers, a cache object among the arguments, or a tail (norm, unembedding, soft-cap) whose logits are not
exactly the model's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from neurontrace.errors import NeurontraceError
from neurontrace.models.model import NeuronModel

if TYPE_CHECKING:  # pragma: no cover
    from neurontrace.tokens import Batch


class SuffixUnsupported(NeurontraceError):
    """The recorded pass cannot be replayed from a layer on (the message says why)."""


@dataclass
class LayerCall:
    """The arguments one decoder layer received, without its hidden state."""

    args: tuple  # positional arguments after the hidden state (GPT-2 passes its mask positionally)
    kwargs: dict[str, Any]
    hidden_as_kwarg: bool = False  # the hidden state came as ``hidden_states=`` rather than first

    def call(self, module: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        if self.hidden_as_kwarg:
            out = module(*self.args, **{**self.kwargs, "hidden_states": hidden})
        else:
            out = module(hidden, *self.args, **self.kwargs)
        return out[0] if isinstance(out, tuple) else out


@dataclass
class RecordedForward:
    """One recorded forward pass: every layer's call, and the hidden-state inputs of the layers asked for."""

    rows: int  # batch rows of the recorded pass; :func:`run_from` takes hidden states of this many rows
    logits_to_keep: int
    calls: list[LayerCall]
    inputs: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> its input hidden state
    logits: torch.Tensor | None = None  # the recorded pass's logits (kept only on request)


def suffix_blocker(model: NeuronModel) -> str | None:
    """Why a model cannot be replayed from a layer on at all (None if it can be tried)."""
    if model.hf.training:
        return "the model is in training mode (dropout would differ between the passes)"
    for module in model.hf.modules():
        # accelerate dispatch (a device_map spread over devices, CPU or disk offload) wraps forward methods and
        # moves tensors between devices; the recorded arguments would sit where the loop left them. Untested here,
        # so such models keep the whole forward pass.
        if getattr(module, "_hf_hook", None) is not None:
            return "the model is dispatched by accelerate (device_map or offload)"
    return None


def _is_cache(value: Any) -> bool:
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # pragma: no cover
        return False
    return isinstance(value, Cache)


def record_forward(
    model: NeuronModel,
    batch: Batch,
    *,
    keep_inputs: Iterable[int] = (),
    logits_to_keep: int = 0,
    keep_logits: bool = False,
) -> RecordedForward:
    """Run ``batch`` once (no gradients) and record every decoder layer's call.

    ``keep_inputs``: layers whose input hidden state is kept (what :func:`run_from` starts from). Raises
    :class:`SuffixUnsupported` when the pass does not have the structure :func:`run_from` replays.
    """
    reason = suffix_blocker(model)
    if reason is not None:
        raise SuffixUnsupported(reason)
    L = model.n_layers
    keep = set(keep_inputs)
    calls: list[LayerCall | None] = [None] * L
    inputs: dict[int, torch.Tensor] = {}
    state: dict[str, Any] = {"next": 0, "last": None, "problem": None}

    def fail(message: str) -> None:
        if state["problem"] is None:
            state["problem"] = message

    def pre(index: int):
        def hook(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
            if state["next"] != index:
                fail(f"decoder layer {index} was called out of order or more than once")
                return
            state["next"] += 1
            if args:
                hidden, call = args[0], LayerCall(tuple(args[1:]), dict(kwargs))
            elif "hidden_states" in kwargs:
                rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                hidden, call = kwargs["hidden_states"], LayerCall((), rest, hidden_as_kwarg=True)
            else:
                fail(f"decoder layer {index} got no hidden state")
                return
            values = list(call.args) + list(call.kwargs.values())
            if any(_is_cache(v) for v in values):
                fail("the decoder layers get a key/value cache object")
            last = state["last"]
            if index > 0 and not (last is hidden or (last is not None and torch.equal(last, hidden))):
                fail(f"the hidden state changes between decoder layers {index - 1} and {index}")
            calls[index] = call
            if index in keep:
                inputs[index] = hidden

        return hook

    def post(_mod: nn.Module, _args: tuple, out: Any) -> None:
        state["last"] = out[0] if isinstance(out, tuple) else out

    handles = []
    try:
        for index in range(L):
            layer = model.layer(index)
            # first of the layer's pre-hooks (what the loop passed: replaying the call runs the others again),
            # last of its forward hooks (what the loop gets back)
            handles.append(layer.register_forward_pre_hook(pre(index), with_kwargs=True, prepend=True))
            handles.append(layer.register_forward_hook(post))
        kwargs = {"logits_to_keep": logits_to_keep} if logits_to_keep else {}
        with torch.no_grad():
            out = model.forward(batch, **kwargs)
    finally:
        for h in handles:
            h.remove()
    if state["problem"] is None and state["next"] != L:
        fail(f"only {state['next']} of the {L} decoder layers ran")
    if state["problem"] is not None:
        raise SuffixUnsupported(state["problem"])
    recorded = RecordedForward(batch.size, logits_to_keep, [c for c in calls if c is not None], inputs)
    with torch.no_grad():  # the tail as the model computes it: bit for bit, or something differs
        tail = run_from(model, recorded, L, state["last"], as_model=True)
    if tail.shape != out.logits.shape or not torch.equal(tail, out.logits.to(tail.device)):
        raise SuffixUnsupported(
            "the final norm, unembedding and soft-cap do not reproduce the model's logits"
        )
    if keep_logits:
        recorded.logits = out.logits
    return recorded


def run_from(
    model: NeuronModel,
    recorded: RecordedForward,
    layer: int,
    hidden: torch.Tensor,
    *,
    as_model: bool = False,
) -> torch.Tensor:
    """The logits of the recorded pass with ``hidden`` as the input of decoder layer ``layer``.

    Calls the decoder layers ``layer..L-1`` with their recorded arguments, then the final norm, keeps the last
    ``logits_to_keep`` positions (all with 0) and applies the unembedding and the family's logit soft-cap, as the
    Hugging Face model does. ``layer = L`` runs only that tail (``hidden`` is then the last layer's output).
    Gradients flow as usual (wrap in ``torch.no_grad()`` for values only).

    transformers hands the unembedding a strided slice of the positions kept, which torch multiplies as one
    matrix-vector product per row: with a large vocabulary that is most of a small model's step (SmolLM2-135M,
    64 rows: 0.33 s against 0.03 s). Here the slice is made contiguous first (one matrix product; the same
    values up to rounding); ``as_model`` keeps the strided slice, for logits bit-identical to the model's.
    """
    if hidden.shape[0] != recorded.rows:
        raise NeurontraceError(
            f"the hidden state has {hidden.shape[0]} rows but the recorded pass had {recorded.rows}"
        )
    for index in range(layer, model.n_layers):
        hidden = recorded.calls[index].call(model.layer(index), hidden)
    hidden = model.final_norm(hidden)
    if recorded.logits_to_keep:
        hidden = hidden[:, -recorded.logits_to_keep :, :]
        if not as_model:
            hidden = hidden.contiguous()
    logits = model.unembed(hidden)
    cap = model.logit_softcap
    if cap is not None:  # the Gemma 2/3 soft-cap, written as transformers writes it
        logits = logits / cap
        logits = torch.tanh(logits)
        logits = logits * cap
    return logits

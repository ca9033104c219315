"""The RelP replacement model: the original forward values with an LRP backward pass (METHOD.md section 2).

Every rule is a hook on an existing Hugging Face module that returns ``value.detach() + (lin - lin.detach())``,
where ``lin`` is the function whose gradient the rule wants. The forward value is therefore the original
tensor, bit for bit, and the backward pass sees only ``lin``. Nothing about attention masks, caches or module
code changes (the public reference code lost its causal mask by registering a new attention implementation;
we never touch the attention implementation at all):

- **norm** (LN-rule): the normalisation factor is a constant. RMSNorm ``lin = x * (w * rsqrt(mean x^2 + eps))``
  with the factor detached (``1 + w`` for Gemma); LayerNorm ``lin = (x - mean x) * (w / std)``, std detached.
- **attention** (AH-rule): queries and keys are detached at their projections, so the softmax pattern is a
  constant and gradient flows through the values (OV circuit) only. Works with eager, SDPA or flash kernels.
- **nonlinearity** (identity rule): ``act(z) -> z * (act(z) / z)`` with the ratio detached; also applied to
  the final-logit soft-cap (Gemma 2/3).
- **gate** (half rule): in ``g * u`` each factor gets half the gradient; ``"detach"`` is the no-gate variant
  (the gate is a constant, all gradient goes through ``u``); ``"plain"`` leaves the product alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn

from neurontrace.hooks import add_input_hook, add_output_hook
from neurontrace.models.model import NeuronModel, has_module

GateRule = Literal["half", "detach", "plain"]


@dataclass(frozen=True)
class RelPRules:
    """Which LRP rules the replacement model applies (all on by default: RelP as in METHOD.md)."""

    norm: bool = True
    attention: bool = True
    nonlinearity: bool = True
    gate: GateRule = "half"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


NO_RULES = RelPRules(norm=False, attention=False, nonlinearity=False, gate="plain")


def _swap_gradient(value: torch.Tensor, lin: torch.Tensor) -> torch.Tensor:
    """``value`` in the forward pass, the gradient of ``lin`` in the backward pass."""
    return value.detach() + (lin - lin.detach()).to(value.dtype)


def _norm_eps(module: nn.Module) -> float:
    for attr in ("variance_epsilon", "eps"):
        value = getattr(module, attr, None)
        if isinstance(value, float):
            return value
    return 1e-5  # OLMo's parameter-free LayerNorm hard-codes this


def _norm_hook(module: nn.Module, kind: str):
    eps = _norm_eps(module)

    def hook(_mod: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        x = args[0]
        xf = x.float()
        weight = getattr(module, "weight", None)
        if kind == "layernorm":
            centred = xf - xf.mean(-1, keepdim=True)
            scale = torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps)
            lin = centred * scale.detach()
        else:
            scale = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
            lin = xf * scale.detach()
        if weight is not None:
            w = weight.float()
            lin = lin * (1.0 + w if kind == "rms_offset" else w)
        bias = getattr(module, "bias", None)
        if bias is not None:  # LayerNorm's additive bias keeps its own (plain) gradient
            lin = lin + bias.float()
        return _swap_gradient(out, lin)

    return hook


def _identity_rule(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y = f(z)`` elementwise, re-expressed as ``z * (y / z)`` with the ratio detached."""
    zf, yf = z.float(), y.float()
    ratio = torch.where(zf == 0, torch.zeros_like(zf), yf / torch.where(zf == 0, torch.ones_like(zf), zf))
    return _swap_gradient(y, zf * ratio.detach())


class _MLPState:
    """The gate and up factors of the MLP in flight, handed from their hooks to the down projection's."""

    def __init__(self) -> None:
        self.gate: torch.Tensor | None = None
        self.up: torch.Tensor | None = None


class Replacement:
    """Handle of an active replacement model (from :func:`replacement_model`)."""

    def __init__(self, model: NeuronModel, rules: RelPRules) -> None:
        self.model, self.rules = model, rules
        self._unembed_out: torch.Tensor | None = None

    def logits(self, output: Any) -> torch.Tensor:
        """The logits of a forward pass, with the identity rule on the final soft-cap where the family has one."""
        logits = output.logits
        cap = self.model.logit_softcap
        if cap is None or not self.rules.nonlinearity or self._unembed_out is None:
            return logits
        return _identity_rule(self._unembed_out, logits)


@contextmanager
def replacement_model(model: NeuronModel, rules: RelPRules | None = None) -> Iterator[Replacement]:
    """Turn ``model`` into its RelP replacement model inside the block (forward values unchanged).

    Hooks installed here must run *before* any capture hook on the same module, so enter this context first.
    """
    rules = rules or RelPRules()
    a = model.adapter
    handle = Replacement(model, rules)
    handles: list = []
    seen: set[int] = set()

    def once(module: nn.Module) -> bool:
        if id(module) in seen:
            return False
        seen.add(id(module))
        return True

    try:
        if rules.norm:
            norms = [model.final_norm]
            for layer in range(model.n_layers):
                for path in a.norms if rules.attention else (*a.norms, *a.attn_norms):
                    if has_module(model.layer(layer), path):
                        norms.append(model.layer_module(layer, path))
            for m in norms:
                if once(m):
                    handles.append(m.register_forward_hook(_norm_hook(m, a.norm_kind)))
        if rules.attention:
            for layer in range(model.n_layers):
                if a.qkv is None:
                    for path in (a.q, a.k):
                        handles.append(add_output_hook(model.layer_module(layer, path), lambda y: y.detach()))
                else:
                    qkv = model.layer_module(layer, a.qkv)
                    mask = a.v_column_mask(
                        model.config, qkv.out_features if hasattr(qkv, "out_features") else qkv.nf
                    )

                    def fused(y: torch.Tensor, mask=mask) -> torch.Tensor:
                        m = mask.to(y.device, y.dtype)
                        return y.detach() + (y - y.detach()) * m

                    handles.append(add_output_hook(qkv, fused))
        if rules.nonlinearity:
            acts = [model.layer_module(layer, a.act) for layer in range(model.n_layers)]
            for m in acts:
                if once(m):
                    handles.append(
                        m.register_forward_hook(lambda _m, args, out: _identity_rule(args[0], out))
                    )
            if model.logit_softcap is not None:

                def keep_unembed(y: torch.Tensor) -> None:
                    handle._unembed_out = y

                handles.append(add_output_hook(model.unembed, keep_unembed))
        if a.gated and rules.gate != "plain":
            handles += _gate_hooks(model, rules.gate)
        yield handle
    finally:
        for h in handles:
            h.remove()


def _gate_hooks(model: NeuronModel, gate_rule: GateRule) -> list:
    """Half rule (or no-gate variant) on ``act(gate) * up`` at every layer's neuron site."""
    a = model.adapter
    state = _MLPState()
    handles: list = []
    seen: set[int] = set()

    def keep_gate(_m: nn.Module, _args: tuple, out: torch.Tensor) -> None:
        state.gate = out

    def keep_up(y: torch.Tensor) -> None:
        state.up = y.chunk(2, dim=-1)[1] if a.gate_up_fused else y

    def mix(x: torch.Tensor) -> torch.Tensor:
        g, u = state.gate, state.up
        state.gate = state.up = None
        if g is None or u is None or g.shape != x.shape:  # pragma: no cover - unexpected module order
            raise RuntimeError("the gate/up factors were not seen before the down projection")
        if gate_rule == "detach":  # the no-gate variant: the gate is a constant
            return _swap_gradient(x, g.detach() * u)
        return _swap_gradient(x, 0.5 * (g * u.detach()) + 0.5 * (g.detach() * u))

    for layer in range(model.n_layers):
        act = model.layer_module(layer, a.act)
        if id(act) not in seen:  # act modules may be shared; the hook only records the latest output
            seen.add(id(act))
            # registered with prepend=False after the identity rule hook, so it records the rule's output
            handles.append(act.register_forward_hook(keep_gate))
        handles.append(add_output_hook(model.layer_module(layer, a.up), keep_up))
        handles.append(add_input_hook(model.down_proj(layer), mix))
    return handles

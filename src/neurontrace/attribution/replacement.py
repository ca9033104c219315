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
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import torch
from torch import nn

from neurontrace.errors import NeurontraceError
from neurontrace.hooks import add_input_hook, add_output_hook
from neurontrace.models.model import NeuronModel, has_module
from neurontrace.models.placement import loaded_weights

GateRule = Literal["half", "detach", "plain"]
GATE_RULES: tuple[str, ...] = ("half", "detach", "plain")


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

TRANSLUCE_RULES = RelPRules(attention=False)
"""The rules of the paper's released code (TransluceAI/circuits, ``use_relp_grad=True``, the default of its
``Circuit.from_dataset``): LN-rule norms, identity rule (``x * sigmoid(x)`` with the sigmoid detached), half rule,
but **no attention rule**: its attention wrapper computes a plain softmax, so gradient flows through queries and
keys too. It is not RelP as METHOD.md defines it: embedding attributions then do not sum to the metric (the
softmax is not homogeneous in its inputs). ``benchmarks/bench_reference.py`` measured that these rules give the
reference's node scores (docs/benchmarks.md)."""

RULE_PRESETS: dict[str, RelPRules] = {"relp": RelPRules(), "transluce": TRANSLUCE_RULES, "none": NO_RULES}
"""Named rule sets: ``relp`` (METHOD.md, the default), ``transluce`` (:data:`TRANSLUCE_RULES`), ``none`` (plain
gradients through the replacement hooks: AtP's maths)."""


def rules_from(
    preset: str = "relp",
    *,
    norm: bool | None = None,
    attention: bool | None = None,
    nonlinearity: bool | None = None,
    gate: GateRule | None = None,
) -> RelPRules:
    """The rules of a named preset (:data:`RULE_PRESETS`), each rule given here (not None) overriding it."""
    if preset not in RULE_PRESETS:
        raise NeurontraceError(f"unknown rule preset {preset!r}; choose one of {', '.join(RULE_PRESETS)}")
    if gate is not None and gate not in GATE_RULES:
        raise NeurontraceError(f"unknown gate rule {gate!r}; choose one of {', '.join(GATE_RULES)}")
    given = dict(norm=norm, attention=attention, nonlinearity=nonlinearity, gate=gate)
    return replace(RULE_PRESETS[preset], **{k: v for k, v in given.items() if v is not None})


class FrozenFactors:
    """The detached factors of one clean pass (attention q/k, norm scales, activation ratios, gate factors).

    Pass it to :func:`replacement_model` twice: first recording (``replaying=False``, a normal forward), then
    replaying, when every rule uses the recorded factors instead of recomputing them. The replaying model is the
    linear function whose derivatives RelP scores and graph edges are, so perturbing an input of it changes an
    output by exactly derivative * perturbation: the ground truth for edge tests.
    """

    def __init__(self) -> None:
        self.store: dict[tuple, list[torch.Tensor]] = {}
        self.cursor: dict[tuple, int] = {}
        self.replaying = False

    def factor(self, key: tuple, value: torch.Tensor) -> torch.Tensor:
        if not self.replaying:
            self.store.setdefault(key, []).append(value.detach())
            return value
        i = self.cursor.get(key, 0)
        self.cursor[key] = i + 1
        return self.store[key][i].to(value.device)  # a no-op unless the replay runs on another device

    def start_pass(self) -> None:
        self.cursor.clear()


def _promote(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16/fp16 models), but float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _swap_gradient(value: torch.Tensor, lin: torch.Tensor) -> torch.Tensor:
    """``value`` in the forward pass, the gradient of ``lin`` in the backward pass."""
    return value.detach() + (lin - lin.detach()).to(value.dtype)


def _norm_eps(module: nn.Module) -> float:
    for attr in ("variance_epsilon", "eps"):
        value = getattr(module, attr, None)
        if isinstance(value, float):
            return value
    return 1e-5  # OLMo's parameter-free LayerNorm hard-codes this


def _apply(value: torch.Tensor, lin: torch.Tensor, frozen: FrozenFactors | None) -> torch.Tensor:
    """The rule's output: the original value with the gradient of ``lin``, or ``lin`` itself when replaying."""
    if frozen is not None and frozen.replaying:
        return lin.to(value.dtype)
    return _swap_gradient(value, lin)


def _norm_hook(module: nn.Module, kind: str, frozen: FrozenFactors | None = None):
    eps = _norm_eps(module)

    def hook(_mod: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        x = args[0]
        xf = _promote(x)
        if kind == "layernorm":
            centred = xf - xf.mean(-1, keepdim=True)
            scale = torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps).detach()
        else:
            centred = xf
            scale = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps).detach()
        if frozen is not None:
            scale = frozen.factor(("norm", id(module)), scale)
        lin = centred * scale
        # this hook runs after accelerate has offloaded the norm's weights again (if it offloads them)
        with loaded_weights(module):
            weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
            if weight is not None:
                w = _promote(weight).to(xf.device)
                lin = lin * (1.0 + w if kind == "rms_offset" else w)
            if bias is not None:  # LayerNorm's additive bias keeps its own (plain) gradient
                lin = lin + _promote(bias).to(xf.device)
        return _apply(out, lin, frozen)

    return hook


def _identity_rule(
    z: torch.Tensor, y: torch.Tensor, frozen: FrozenFactors | None = None, key: tuple = ()
) -> torch.Tensor:
    """``y = f(z)`` elementwise, re-expressed as ``z * (y / z)`` with the ratio detached."""
    zf, yf = _promote(z), _promote(y)
    ratio = torch.where(
        zf == 0, torch.zeros_like(zf), yf / torch.where(zf == 0, torch.ones_like(zf), zf)
    ).detach()
    if frozen is not None:
        ratio = frozen.factor(key, ratio)
    return _apply(y, zf * ratio, frozen)


def _identity_hook(key: tuple, frozen: FrozenFactors | None):
    """Identity rule on an activation module's output."""

    def hook(_mod: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        return _identity_rule(args[0], out, frozen, key)

    return hook


def _frozen_qk(key: tuple, frozen: FrozenFactors | None, v_mask: torch.Tensor | None = None):
    """AH rule: queries and keys are constants (so is the attention pattern); values keep their gradient.

    ``v_mask`` marks the value columns of a fused q/k/v projection.
    """

    def fn(y: torch.Tensor) -> torch.Tensor:
        fixed = y.detach() if frozen is None else frozen.factor(key, y.detach())
        if v_mask is None:
            return fixed
        m = v_mask.to(y.device, y.dtype)
        return fixed * (1 - m) + y * m  # exact: m is 0 or 1

    return fn


class _MLPState:
    """The gate and up factors of the MLP in flight, handed from their hooks to the down projection's."""

    def __init__(self) -> None:
        self.gate: torch.Tensor | None = None
        self.up: torch.Tensor | None = None


class Replacement:
    """Handle of an active replacement model (from :func:`replacement_model`)."""

    def __init__(self, model: NeuronModel, rules: RelPRules, frozen: FrozenFactors | None = None) -> None:
        self.model, self.rules, self.frozen = model, rules, frozen
        self._unembed_out: torch.Tensor | None = None

    def logits(self, output: Any) -> torch.Tensor:
        """The logits of a forward pass, with the identity rule on the final soft-cap where the family has one."""
        logits = output.logits
        cap = self.model.logit_softcap
        if cap is None or not self.rules.nonlinearity or self._unembed_out is None:
            return logits
        # accelerate returns the logits on the input device, which need not be the unembedding's
        return _identity_rule(self._unembed_out.to(logits.device), logits, self.frozen, ("softcap",))


@contextmanager
def replacement_model(
    model: NeuronModel, rules: RelPRules | None = None, frozen: FrozenFactors | None = None
) -> Iterator[Replacement]:
    """Turn ``model`` into its RelP replacement model inside the block (forward values unchanged).

    Hooks installed here must run *before* any capture hook on the same module, so enter this context first.
    With ``frozen`` (see :class:`FrozenFactors`) the rules record their detached factors, or replay them.
    """
    rules = rules or RelPRules()
    a = model.adapter
    handle = Replacement(model, rules, frozen)
    handles: list = []
    if frozen is not None:
        handles.append(model.hf.register_forward_pre_hook(lambda *_: frozen.start_pass()))
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
                    handles.append(m.register_forward_hook(_norm_hook(m, a.norm_kind, frozen)))
        if rules.attention:
            for layer in range(model.n_layers):
                if a.qkv is None:
                    for path in (a.q, a.k):
                        module = model.layer_module(layer, path)
                        handles.append(add_output_hook(module, _frozen_qk(("qk", id(module)), frozen)))
                else:
                    qkv = model.layer_module(layer, a.qkv)
                    mask = a.v_column_mask(
                        model.config, qkv.out_features if hasattr(qkv, "out_features") else qkv.nf
                    )
                    handles.append(add_output_hook(qkv, _frozen_qk(("qkv", id(qkv)), frozen, mask)))
        if rules.nonlinearity:
            acts = [model.layer_module(layer, a.act) for layer in range(model.n_layers)]
            for m in acts:
                if once(m):
                    handles.append(m.register_forward_hook(_identity_hook(("act", id(m)), frozen)))
            if model.logit_softcap is not None:

                def keep_unembed(y: torch.Tensor) -> None:
                    handle._unembed_out = y

                handles.append(add_output_hook(model.unembed, keep_unembed))
        if a.gated and rules.gate != "plain":
            handles += _gate_hooks(model, rules.gate, frozen)
        yield handle
    finally:
        for h in handles:
            h.remove()


def _gate_hooks(model: NeuronModel, gate_rule: GateRule, frozen: FrozenFactors | None = None) -> list:
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
        # in float32 (bf16/fp16 models): the forward value stays ``x``, only the gradient's path is promoted
        g, u = _promote(g).to(x.device), _promote(u).to(x.device)
        g_const, u_const = g.detach(), u.detach()
        if frozen is not None:
            g_const, u_const = frozen.factor(("gate", "g"), g_const), frozen.factor(("gate", "u"), u_const)
        if gate_rule == "detach":  # the no-gate variant: the gate is a constant
            return _apply(x, g_const * u, frozen)
        return _apply(x, 0.5 * (g * u_const) + 0.5 * (g_const * u), frozen)

    for layer in range(model.n_layers):
        act = model.layer_module(layer, a.act)
        if id(act) not in seen:  # act modules may be shared; the hook only records the latest output
            seen.add(id(act))
            # registered with prepend=False after the identity rule hook, so it records the rule's output
            handles.append(act.register_forward_hook(keep_gate))
        handles.append(add_output_hook(model.layer_module(layer, a.up), keep_up))
        handles.append(add_input_hook(model.down_proj(layer), mix))
    return handles

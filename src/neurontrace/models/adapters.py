"""Per-family architecture adapters: where the neuron site, norms, attention and MLP parts live.

We never re-implement a model. An adapter only *names* the Hugging Face modules of one family (module paths
relative to the ``...ForCausalLM`` root and to one decoder layer) and says how a few fused tensors are laid out.
Everything else (capture, interventions, RelP rules) works from these names with hooks.

To support a new family, add one ``ArchAdapter(...)`` to ``ADAPTERS`` at the bottom of this file, and add the
family to the tiny-model list in ``tests/conftest.py`` so the test-suite checks it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from neurontrace.errors import UnsupportedArchitectureError

NormKind = Literal["rms", "rms_offset", "layernorm"]
QKVLayout = Literal["separate", "concat", "neox_heads"]


@dataclass(frozen=True)
class ArchAdapter:
    """Names of one family's modules. Paths are dotted attribute paths.

    Per-layer paths (``attn``, ``mlp``, ``down``...) are relative to one decoder layer; the others are
    relative to the causal-LM root module.
    """

    family: str
    model_types: tuple[str, ...]
    example: str  # a public checkpoint of this family (documentation only)
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    pos_embed: str | None = None  # learned absolute positions (GPT-2)
    final_norm: str = "model.norm"
    unembed: str = "lm_head"
    # attention
    attn: str = "self_attn"
    attn_out: str = "self_attn.o_proj"
    q: str | None = "self_attn.q_proj"
    k: str | None = "self_attn.k_proj"
    v: str | None = "self_attn.v_proj"
    qkv: str | None = None  # fused q/k/v projection
    qkv_layout: QKVLayout = "separate"
    # MLP. The neuron site is the input of ``down``.
    mlp: str = "mlp"
    down: str = "mlp.down_proj"
    act: str = "mlp.act_fn"
    gate: str | None = "mlp.gate_proj"  # None: ungated MLP
    up: str = "mlp.up_proj"  # ungated MLP: the pre-activation projection
    gate_up_fused: bool = False  # ``up`` outputs [gate | up] (Phi-3)
    down_is_conv1d: bool = False  # GPT-2 Conv1D stores weight as [in, out]
    # norms
    norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    attn_norms: tuple[str, ...] = ()  # q/k norms inside attention
    norm_kind: NormKind = "rms"
    logit_softcap_attr: str | None = None  # config attribute holding the final-logit soft-cap
    has_biases: bool = False  # linear layers or norms carry additive biases

    @property
    def gated(self) -> bool:
        return self.gate is not None

    def v_column_mask(self, config, out_features: int) -> torch.Tensor | None:
        """Boolean mask over a fused q/k/v projection's outputs marking the value columns (None if unfused)."""
        if self.qkv is None:
            return None
        mask = torch.zeros(out_features, dtype=torch.bool)
        if self.qkv_layout == "concat":
            n_heads = config.num_attention_heads
            n_kv = getattr(config, "num_key_value_heads", None) or n_heads
            head_dim = out_features // (n_heads + 2 * n_kv)
            mask[(n_heads + n_kv) * head_dim :] = True
        elif self.qkv_layout == "neox_heads":
            n_heads = config.num_attention_heads
            head_dim = out_features // (3 * n_heads)
            mask.view(n_heads, 3, head_dim)[:, 2, :] = True
        else:  # pragma: no cover - adapter definition error
            raise ValueError(f"unknown qkv layout {self.qkv_layout!r}")
        return mask


ADAPTERS: tuple[ArchAdapter, ...] = (
    ArchAdapter(family="Llama", model_types=("llama",), example="HuggingFaceTB/SmolLM2-135M"),
    ArchAdapter(family="Mistral", model_types=("mistral",), example="mistralai/Mistral-7B-v0.1"),
    ArchAdapter(family="Qwen2", model_types=("qwen2",), example="Qwen/Qwen2.5-0.5B", has_biases=True),
    ArchAdapter(
        family="Qwen3",
        model_types=("qwen3",),
        example="Qwen/Qwen3-0.6B",
        attn_norms=("self_attn.q_norm", "self_attn.k_norm"),
    ),
    ArchAdapter(family="Gemma", model_types=("gemma",), example="google/gemma-2b", norm_kind="rms_offset"),
    ArchAdapter(
        family="Gemma 2",
        model_types=("gemma2",),
        example="google/gemma-2-2b",
        norms=(
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        ),
        norm_kind="rms_offset",
        logit_softcap_attr="final_logit_softcapping",
    ),
    ArchAdapter(
        family="Gemma 3 (text)",
        model_types=("gemma3_text", "gemma3"),
        example="google/gemma-3-270m",
        norms=(
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        ),
        attn_norms=("self_attn.q_norm", "self_attn.k_norm"),
        norm_kind="rms_offset",
        logit_softcap_attr="final_logit_softcapping",
    ),
    ArchAdapter(
        family="Phi-3",
        model_types=("phi3",),
        example="microsoft/Phi-3-mini-4k-instruct",
        q=None,
        k=None,
        v=None,
        qkv="self_attn.qkv_proj",
        qkv_layout="concat",
        act="mlp.activation_fn",
        gate="mlp.gate_up_proj",
        up="mlp.gate_up_proj",
        gate_up_fused=True,
    ),
    ArchAdapter(
        family="OLMo",
        model_types=("olmo",),
        example="allenai/OLMo-1B-hf",
        norm_kind="layernorm",
    ),
    ArchAdapter(
        family="OLMo 2",
        model_types=("olmo2",),
        example="allenai/OLMo-2-0425-1B",
        norms=("post_attention_layernorm", "post_feedforward_layernorm"),
        attn_norms=("self_attn.q_norm", "self_attn.k_norm"),
    ),
    ArchAdapter(
        family="GPT-2",
        model_types=("gpt2",),
        example="openai-community/gpt2",
        layers="transformer.h",
        embed="transformer.wte",
        pos_embed="transformer.wpe",
        final_norm="transformer.ln_f",
        attn="attn",
        attn_out="attn.c_proj",
        q=None,
        k=None,
        v=None,
        qkv="attn.c_attn",
        qkv_layout="concat",
        down="mlp.c_proj",
        act="mlp.act",
        gate=None,
        up="mlp.c_fc",
        down_is_conv1d=True,
        norms=("ln_1", "ln_2"),
        norm_kind="layernorm",
        has_biases=True,
    ),
    ArchAdapter(
        family="GPT-NeoX",
        model_types=("gpt_neox",),
        example="EleutherAI/pythia-160m",
        layers="gpt_neox.layers",
        embed="gpt_neox.embed_in",
        final_norm="gpt_neox.final_layer_norm",
        attn="attention",
        attn_out="attention.dense",
        q=None,
        k=None,
        v=None,
        qkv="attention.query_key_value",
        qkv_layout="neox_heads",
        down="mlp.dense_4h_to_h",
        act="mlp.act",
        gate=None,
        up="mlp.dense_h_to_4h",
        norm_kind="layernorm",
        has_biases=True,
    ),
)

SUPPORTED_FAMILIES: tuple[str, ...] = tuple(a.family for a in ADAPTERS)
_BY_MODEL_TYPE = {mt: a for a in ADAPTERS for mt in a.model_types}


def adapter_for(model_type: str) -> ArchAdapter:
    """The adapter for a config's ``model_type``, or a one-line error naming what is supported."""
    try:
        return _BY_MODEL_TYPE[model_type]
    except KeyError:
        families = ", ".join(SUPPORTED_FAMILIES)
        raise UnsupportedArchitectureError(
            f"unsupported architecture {model_type!r}; supported families: {families}. "
            f"An adapter is added in src/neurontrace/models/adapters.py"
        ) from None

"""Shared fixtures: tiny random-initialised models of every supported family (no download), a word-level
tokenizer for them, and the embedded default model (loaded once per session)."""

from __future__ import annotations

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers/huggingface_hub read it

import pytest
import torch
import torch.nn.functional as F
import transformers as tf

WORDS = (
    "the a keys key to cabinet cabinets are is of that on table tables dog dogs runs run near "
    "what capital state texas california austin sacramento plus equals one two three four five six seven"
).split()


def word_tokenizer() -> tf.PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over ``WORDS`` (ids 0..3 are special)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[BOS]": 1, "[EOS]": 2, "[UNK]": 3}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tf.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]"
    )


VOCAB = 4 + len(dict.fromkeys(WORDS))
_DECODER = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    initializer_range=0.2,
)

# family name -> (config class, model class, config kwargs)
TINY_FAMILIES: dict[str, tuple] = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, _DECODER),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, dict(_DECODER, sliding_window=4)),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, _DECODER),
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(_DECODER, head_dim=8)),
    "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM, dict(_DECODER, head_dim=8)),
    "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM, dict(_DECODER, head_dim=8, sliding_window=4)),
    "gemma3": (
        tf.Gemma3TextConfig,
        tf.Gemma3ForCausalLM,
        dict(_DECODER, head_dim=8, sliding_window=4, final_logit_softcapping=30.0),
    ),
    "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, _DECODER),
    "olmo": (tf.OlmoConfig, tf.OlmoForCausalLM, _DECODER),
    "olmo2": (tf.Olmo2Config, tf.Olmo2ForCausalLM, _DECODER),
    "gpt2": (
        tf.GPT2Config,
        tf.GPT2LMHeadModel,
        dict(
            vocab_size=VOCAB,
            n_embd=32,
            n_inner=48,
            n_layer=3,
            n_head=4,
            n_positions=64,
            initializer_range=0.2,
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
    "gpt_neox": (
        tf.GPTNeoXConfig,
        tf.GPTNeoXForCausalLM,
        dict(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=64,
            initializer_range=0.2,
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
}
FAMILIES = list(TINY_FAMILIES)


def make_tiny_hf(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    config_cls, model_cls, kwargs = TINY_FAMILIES[family]
    torch.manual_seed(seed)
    config = config_cls(**{**kwargs, **overrides})
    model = model_cls(config).eval()
    # Random norms/biases (HF initialises them to 1/0), so the maths is exercised in full.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def save_tiny_folder(path, family: str = "llama", seed: int = 0) -> str:
    """A tiny random model and the word tokenizer saved as a local model folder (what the CLI loads)."""
    make_tiny_hf(family, seed=seed).save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return str(path)


def make_tiny(family: str, seed: int = 0, **overrides):
    from neurontrace.models.model import NeuronModel

    return NeuronModel(
        hf=make_tiny_hf(family, seed, **overrides), tokenizer=word_tokenizer(), name=f"tiny-{family}"
    )


@pytest.fixture(params=FAMILIES)
def tiny(request):
    """A tiny random model of each supported family."""
    return make_tiny(request.param)


@pytest.fixture(scope="session")
def default_model():
    """The embedded default model (SmolLM2-135M); converted once, then loaded from the cache."""
    from neurontrace.models.loading import load_model

    return load_model("smollm2-135m", device="cpu")


ACTS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
}


def _act_name(config) -> str:
    for attr in ("hidden_activation", "hidden_act", "activation_function"):
        name = getattr(config, attr, None)
        if name:
            return name
    raise AssertionError("no activation in config")


def _linear(x: torch.Tensor, module: torch.nn.Module, conv1d: bool = False) -> torch.Tensor:
    w = module.weight if conv1d else module.weight.T
    out = x @ w
    return out + module.bias if getattr(module, "bias", None) is not None else out


def hand_neurons(model, layer: int, u: torch.Tensor) -> torch.Tensor:
    """Neuron activations computed by hand from the MLP weights and the MLP input ``u``."""
    a = model.adapter
    act = ACTS[_act_name(model.config)]
    conv = a.down_is_conv1d
    if not a.gated:
        return act(_linear(u, model.layer_module(layer, a.up), conv))
    if a.gate_up_fused:
        gate, up = _linear(u, model.layer_module(layer, a.up)).chunk(2, dim=-1)
        return act(gate) * up
    return act(_linear(u, model.layer_module(layer, a.gate))) * _linear(u, model.layer_module(layer, a.up))

"""``NeuronModel``: a loaded Hugging Face causal LM, its tokenizer and its architecture adapter."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from neurontrace.models.adapters import ArchAdapter, adapter_for
from neurontrace.models.placement import execution_device

if TYPE_CHECKING:  # pragma: no cover
    from neurontrace.tokens import Batch


def get_module(root: nn.Module, path: str) -> nn.Module:
    """Resolve a dotted attribute path (``"model.layers"``) below ``root``."""
    mod: Any = root
    for part in path.split("."):
        mod = getattr(mod, part)
    return mod


def has_module(root: nn.Module, path: str) -> bool:
    try:
        get_module(root, path)
    except AttributeError:
        return False
    return True


@dataclass
class NeuronModel:
    """A causal LM wrapped for neuron-basis work. The Hugging Face module tree is kept as it is.

    Attributes:
        hf: the ``...ForCausalLM`` module (any device placement, including accelerate dispatch).
        tokenizer: its tokenizer, or None for models built from ids only (tiny test models).
        adapter: the family adapter naming the modules.
        name: how the user named the model (spec or alias).
    """

    hf: nn.Module
    tokenizer: Any = None
    adapter: ArchAdapter | None = None
    name: str = "model"
    source: str = ""
    _layers: nn.ModuleList | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.adapter is None:
            self.adapter = adapter_for(self.hf.config.model_type)
        self.hf.eval()
        self._layers = get_module(self.hf, self.adapter.layers)

    # ----------------------------------------------------------------- sizes
    @property
    def config(self) -> Any:
        return self.hf.config

    @property
    def n_layers(self) -> int:
        return len(self._layers)

    @property
    def d_model(self) -> int:
        return self.embed.weight.shape[1]

    @property
    def d_ff(self) -> int:
        return self.w_out(0).shape[0]

    @property
    def vocab_size(self) -> int:
        return self.embed.weight.shape[0]

    @property
    def device(self) -> torch.device:
        """Device of the input embeddings (where input ids must go): their execution device when accelerate has
        dispatched the model (the weights may then be offloaded to the CPU or disk, on the ``meta`` device)."""
        return execution_device(self.embed)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    # --------------------------------------------------------------- modules
    def layer(self, index: int) -> nn.Module:
        return self._layers[index]

    def layer_module(self, index: int, path: str) -> nn.Module:
        """A module of decoder layer ``index`` by its adapter path (e.g. ``adapter.down``)."""
        return get_module(self._layers[index], path)

    def module(self, path: str) -> nn.Module:
        return get_module(self.hf, path)

    @property
    def embed(self) -> nn.Module:
        return self.module(self.adapter.embed)

    @property
    def unembed(self) -> nn.Module:
        return self.module(self.adapter.unembed)

    @property
    def final_norm(self) -> nn.Module:
        return self.module(self.adapter.final_norm)

    def down_proj(self, layer: int) -> nn.Module:
        """The MLP down projection of ``layer``; the neuron site is its input."""
        return self.layer_module(layer, self.adapter.down)

    def w_out(self, layer: int) -> torch.Tensor:
        """Output weights of ``layer``'s neurons as ``[d_ff, d_model]``: row i is what neuron i writes.

        On a model whose layer accelerate offloads, read them inside ``loaded_weights(model.down_proj(layer))``
        (:mod:`neurontrace.models.placement`); outside it they are on the ``meta`` device (shape only).
        """
        w = self.down_proj(layer).weight
        return w if self.adapter.down_is_conv1d else w.T

    @property
    def logit_softcap(self) -> float | None:
        attr = self.adapter.logit_softcap_attr
        return getattr(self.config, attr, None) if attr else None

    # --------------------------------------------------------------- running
    def forward(self, batch: Batch, **kwargs: Any) -> Any:
        """Run the model on a tokenised batch with its mask and left-padding-aware position ids."""
        batch = batch.to(self.device)
        kwargs.setdefault("use_cache", False)
        return self.hf(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            **kwargs,
        )

    def logits(self, batch: Batch) -> torch.Tensor:
        """Logits ``[batch, seq, vocab]`` (no gradient)."""
        with torch.no_grad():
            return self.forward(batch).logits

    def tokenize(self, prompts: str | list[str], **kwargs: Any) -> Batch:
        from neurontrace.tokens import tokenize

        return tokenize(self, prompts, **kwargs)

    def token_str(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"<{token_id}>"
        return self.tokenizer.decode([int(token_id)])

    def __repr__(self) -> str:
        return (
            f"NeuronModel({self.name!r}, family={self.adapter.family!r}, layers={self.n_layers}, "
            f"d_model={self.d_model}, d_ff={self.d_ff}, device={self.device}, dtype={self.dtype})"
        )

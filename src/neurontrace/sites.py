"""Sites (bases) and activation capture.

A *site* is where a basis lives in each layer:

=============  ==============================================================  =========
site           tensor                                                          width
=============  ==============================================================  =========
``neurons``    input of the MLP down projection (the neuron basis, default)    d_ff
``mlp_out``    output of the MLP module                                        d_model
``attn_out``   output of the attention output projection                       d_model
``resid``      residual stream after the decoder layer                         d_model
``sae:DIR``    a dictionary's latents, then its error term, at the site of     d_sae + d_in
               its SAEs (SAELens folders; :mod:`neurontrace.dictionaries`)
=============  ==============================================================  =========

A dictionary site feeds the network ``decode(z[..., :d_sae]) + z[..., d_sae:]`` with ``z = [encode(x), x -
decode(encode(x))]``: the same output, and every method that reads, patches or differentiates a site works on
latents and error components alike (an error node is the sum over its ``d_in`` components). Its layers are the
layers its SAEs cover (:func:`site_layers`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from neurontrace.errors import NeurontraceError
from neurontrace.hooks import add_input_hook, add_output_hook, hooks_removed_on_exit
from neurontrace.models.model import NeuronModel
from neurontrace.models.placement import stack_on
from neurontrace.tokens import Batch

SITES: tuple[str, ...] = ("neurons", "mlp_out", "attn_out", "resid")


def check_site(site: str) -> str:
    if isinstance(site, str) and site.startswith(DICTIONARY_PREFIX):
        dictionary_of(site)
        return site
    if site not in SITES:
        raise NeurontraceError(f"unknown site {site!r}; choose one of {', '.join(SITES)}, or sae:DIR")
    return site


DICTIONARY_PREFIX = "sae:"


def dictionary_of(site: str):
    """The :class:`~neurontrace.dictionaries.basis.DictionaryBasis` of a ``sae:DIR`` site, else None."""
    if not (isinstance(site, str) and site.startswith(DICTIONARY_PREFIX)):
        return None
    from neurontrace.dictionaries.basis import load_basis

    return load_basis(site[len(DICTIONARY_PREFIX) :])


def site_layers(model: NeuronModel, site: str) -> list[int]:
    """The layers a site exists at: every layer, or those a dictionary's SAEs cover."""
    basis = dictionary_of(site)
    return list(range(model.n_layers)) if basis is None else sorted(basis.saes)


def site_module(model: NeuronModel, site: str, layer: int) -> tuple[nn.Module, bool]:
    """The module whose input (``True``) or output (``False``) holds ``site`` at ``layer``."""
    check_site(site)
    if not 0 <= layer < model.n_layers:
        raise NeurontraceError(f"layer {layer} does not exist; the model has layers 0..{model.n_layers - 1}")
    a = model.adapter
    if site == "neurons":
        return model.layer_module(layer, a.down), True
    if site == "mlp_out":
        return model.layer_module(layer, a.mlp), False
    if site == "attn_out":
        return model.layer_module(layer, a.attn_out), False
    return model.layer(layer), False


def site_width(model: NeuronModel, site: str) -> int:
    basis = dictionary_of(site)
    if basis is not None:
        inner = site_width(model, basis.site)
        if basis.d_in != inner:
            raise NeurontraceError(
                f"the dictionary reads {basis.d_in} values but the model's {basis.site} has {inner}"
            )
        return basis.d_sae + basis.d_in
    return model.d_ff if check_site(site) == "neurons" else model.d_model


def hook_site(model: NeuronModel, site: str, layer: int, fn) -> object:
    """Register ``fn(tensor) -> tensor | None`` at a site; returns the removable handle."""
    basis = dictionary_of(site)
    if basis is not None:
        return _hook_dictionary(model, basis, layer, fn)
    module, is_input = site_module(model, site, layer)
    return add_input_hook(module, fn) if is_input else add_output_hook(module, fn)


def _check_fits(model: NeuronModel, basis) -> None:
    inner = site_width(model, basis.site)
    if basis.d_in != inner:
        raise NeurontraceError(
            f"the dictionary reads {basis.d_in} values but the model's {basis.site} has {inner}"
        )


def _hook_dictionary(model: NeuronModel, basis, layer: int, fn) -> object:
    if layer not in basis.saes:
        raise NeurontraceError(
            f"the dictionary {basis.path} has no SAE for layer {layer}; it covers layers {sorted(basis.saes)}"
        )
    _check_fits(model, basis)
    sae, d_sae = basis.saes[layer], basis.d_sae

    def spliced(x: torch.Tensor) -> torch.Tensor:
        dictionary = sae.to(device=x.device, dtype=x.dtype)
        latents = dictionary.encode(x)
        z = torch.cat([latents, x - dictionary.decode(latents)], dim=-1)
        out = fn(z)
        z = z if out is None else out
        return dictionary.decode(z[..., :d_sae]) + z[..., d_sae:]

    return hook_site(model, basis.site, layer, spliced)


@dataclass
class Activations:
    """Activations captured at sites for one batch, in the batch's padded layout ``[B, T, width]``."""

    batch: Batch
    acts: dict[tuple[str, int], torch.Tensor]
    logits: torch.Tensor | None = None

    def __getitem__(self, key: tuple[str, int]) -> torch.Tensor:
        return self.acts[key]

    def get(self, layer: int, site: str = "neurons") -> torch.Tensor:
        return self.acts[(site, layer)]

    def stack(self, site: str = "neurons") -> torch.Tensor:
        """All captured layers of one site as ``[layers, B, T, width]`` (layers in increasing order)."""
        layers = sorted(layer for s, layer in self.acts if s == site)
        return stack_on([self.acts[(site, layer)] for layer in layers])  # layers may sit on several devices

    def unpadded(self, row: int, layer: int, site: str = "neurons") -> torch.Tensor:
        """One prompt's activations without its padding columns, ``[length, width]``."""
        return self.batch.unpad(self.acts[(site, layer)], row)


def capture(
    model: NeuronModel,
    batch: Batch,
    *,
    sites: Sequence[str] | str = ("neurons",),
    layers: Iterable[int] | None = None,
    keep_logits: bool = True,
) -> Activations:
    """Run ``batch`` once and record activations at the given sites and layers (all layers by default)."""
    sites = [sites] if isinstance(sites, str) else list(sites)
    layers = list(range(model.n_layers)) if layers is None else list(layers)
    store: dict[tuple[str, int], torch.Tensor] = {}

    def recorder(key: tuple[str, int]):
        def fn(x: torch.Tensor) -> None:
            store[key] = x.detach()

        return fn

    with hooks_removed_on_exit() as handles, torch.no_grad():
        for site in sites:
            for layer in layers:
                handles.append(hook_site(model, site, layer, recorder((site, layer))))
        out = model.forward(batch)
    return Activations(batch=batch, acts=store, logits=out.logits if keep_logits else None)

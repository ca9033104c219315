"""Sites (bases) and activation capture.

A *site* is where a basis lives in each layer:

==================  ==============================================================  ===============
site                tensor                                                          width
==================  ==============================================================  ===============
``neurons``         input of the MLP down projection (the neuron basis, default)    d_ff
``mlp_out``         output of the MLP module                                        d_model
``attn_out``        output of the attention output projection                       d_model
``resid``           residual stream after the decoder layer                         d_model
``sae:DIR``         a dictionary's latents, then its error term, at the site of     d_sae + d_in
                    its SAEs (SAELens folders; :mod:`neurontrace.dictionaries`)
``transcoder:DIR``  a transcoder set's latents, then its error term, as the MLP      d_sae + d_model
                    module's output (circuit-tracer's layout;
                    :mod:`neurontrace.dictionaries.transcoder`)
==================  ==============================================================  ===============

A dictionary site feeds the network ``decode(z[..., :d_sae]) + z[..., d_sae:]`` with ``z = [encode(x), x -
decode(encode(x))]``: the same output, and every method that reads, patches or differentiates a site works on
latents and error components alike (an error node is the sum over its ``d_in`` components). Its layers are the
layers its SAEs cover (:func:`site_layers`).

A transcoder site at layer ``L`` reads the MLP module's input ``u`` and its output ``y`` (one forward hook on the
MLP module) and gives the network, as the MLP module's output, ``decode(z[..., :d_sae], u) + z[..., d_sae:]``
with ``z = [encode(u), y - decode(encode(u), u)]``: the error term (one node per layer and position, Marks et al.)
makes the output ``y`` again (bit for bit, in any dtype, when ``fn`` leaves ``z`` as it is: the value is then ``y``'s
and the gradient the splice's). A skip connection ``u @ W_skip`` is computed from the live input, not from ``z``.

``DIR`` may be ``hf:OWNER/REPO[/SUBFOLDER]`` for both kinds: it is downloaded once into the Hugging Face cache
(:func:`neurontrace.dictionaries.hub.resolve_dictionary`).
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
    if isinstance(site, str) and site.startswith((DICTIONARY_PREFIX, TRANSCODER_PREFIX)):
        dictionary_of(site)
        return site
    if site not in SITES:
        raise NeurontraceError(
            f"unknown site {site!r}; choose one of {', '.join(SITES)}, sae:DIR or transcoder:DIR"
        )
    return site


DICTIONARY_PREFIX = "sae:"
TRANSCODER_PREFIX = "transcoder:"


def dictionary_of(site: str):
    """The dictionary of a dictionary site, else None: a
    :class:`~neurontrace.dictionaries.basis.DictionaryBasis` (``sae:DIR``) or a
    :class:`~neurontrace.dictionaries.transcoder.TranscoderSet` (``transcoder:DIR``). Both have ``d_sae``."""
    if not isinstance(site, str):
        return None
    if site.startswith(DICTIONARY_PREFIX):
        from neurontrace.dictionaries.basis import load_basis
        from neurontrace.dictionaries.hub import resolve_dictionary

        spec = site[len(DICTIONARY_PREFIX) :]
        return load_basis(str(resolve_dictionary(spec)) if spec.startswith("hf:") else spec)
    if site.startswith(TRANSCODER_PREFIX):
        from neurontrace.dictionaries.transcoder import cached_transcoders

        return cached_transcoders(site[len(TRANSCODER_PREFIX) :])
    return None


def dictionary_latents(site: str) -> int | None:
    """The number of latents of a dictionary site (its error components follow them), else None."""
    basis = dictionary_of(site)
    return None if basis is None else basis.d_sae


def _is_transcoder(basis) -> bool:
    from neurontrace.dictionaries.transcoder import TranscoderSet

    return isinstance(basis, TranscoderSet)


def site_layers(model: NeuronModel, site: str) -> list[int]:
    """The layers a site exists at: every layer, or those a dictionary's SAEs (or transcoders) cover."""
    basis = dictionary_of(site)
    if basis is None:
        return list(range(model.n_layers))
    return basis.layers if _is_transcoder(basis) else sorted(basis.saes)


def site_module(model: NeuronModel, site: str, layer: int) -> tuple[nn.Module, bool]:
    """The module whose input (``True``) or output (``False``) holds ``site`` at ``layer``."""
    check_site(site)
    if not 0 <= layer < model.n_layers:
        raise NeurontraceError(f"layer {layer} does not exist; the model has layers 0..{model.n_layers - 1}")
    a = model.adapter
    if site == "neurons":
        return model.layer_module(layer, a.down), True
    if site == "mlp_out" or site.startswith(TRANSCODER_PREFIX):  # a transcoder replaces the MLP's output
        return model.layer_module(layer, a.mlp), False
    if site == "attn_out":
        return model.layer_module(layer, a.attn_out), False
    return model.layer(layer), False


def site_width(model: NeuronModel, site: str) -> int:
    basis = dictionary_of(site)
    if basis is not None and _is_transcoder(basis):
        basis.check_fits(model)
        return basis.d_sae + basis.d_out
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
    if basis is not None and _is_transcoder(basis):
        return _hook_transcoder(model, basis, layer, fn)
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


def _hook_transcoder(model: NeuronModel, tset, layer: int, fn) -> object:
    """One forward hook on layer ``layer``'s MLP module: it sees the input ``u`` and the output ``y``, and returns
    ``decode(z_latents, u) + z_error`` with ``z = fn(z)`` (or ``z``), ``z = [encode(u), y - decode(encode(u), u)]``."""
    if not 0 <= layer < model.n_layers:
        raise NeurontraceError(f"layer {layer} does not exist; the model has layers 0..{model.n_layers - 1}")
    tset[layer]  # a one-line error when the set has no transcoder for this layer
    tset.check_fits(model)
    d_sae = tset.d_sae

    def hook(_mod: nn.Module, args: tuple, kwargs: dict, out):
        u = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
        y = out[0] if isinstance(out, tuple) else out
        tc = tset.on(layer, y.device, y.dtype)
        latents = tc.encode(u)
        z = torch.cat([latents, y - tc.decode(latents, u)], dim=-1)
        new = fn(z)
        zz = z if new is None else new
        spliced = tc.decode(zz[..., :d_sae], u) + zz[..., d_sae:]
        if zz is z:  # unchanged: y's own value (bit for bit, also in bf16) with the splice's gradient
            spliced = y.detach() + (spliced - spliced.detach())
        return (spliced, *out[1:]) if isinstance(out, tuple) else spliced

    return model.layer_module(layer, model.adapter.mlp).register_forward_hook(hook, with_kwargs=True)


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

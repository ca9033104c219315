"""Sparse autoencoders in SAELens's on-disk format, and splicing one into a model's forward pass.

A folder holds ``cfg.json`` and ``sae_weights.safetensors`` (``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``,
``W_dec [d_sae, d_in]``, ``b_dec [d_in]``, and ``threshold [d_sae]`` for JumpReLU). Both layouts of ``cfg.json``
are read: SAELens 6 (``architecture`` standard / jumprelu / topk with ``k``, ``metadata.hook_name``) and earlier
releases (``architecture``, ``activation_fn`` relu / topk with ``activation_fn_kwargs.k``, top-level
``hook_name``). What is written is the SAELens 6 layout.

Encoding: ``pre = (x - b_dec if apply_b_dec_to_input else x) @ W_enc + b_enc``; then ReLU (standard), ReLU of the
values above ``threshold`` (JumpReLU), or the ``k`` largest values kept after ReLU (TopK). Decoding:
``f @ W_dec + b_dec``. Splicing replaces the hook point's tensor by ``decode(encode(x)) + error`` with
``error = x - decode(encode(x))``: the model computes the same thing, and the latents and the error term (one
node per layer and position, as in Marks et al.) become quantities that attribution can score.

Hook points are TransformerLens names, mapped to neurontrace's sites (:func:`site_of_hook`):
``blocks.L.hook_resid_post`` (and ``hook_resid_pre`` of L + 1), ``blocks.L.hook_mlp_out``,
``blocks.L.hook_attn_out`` and ``blocks.L.mlp.hook_post`` (the neurons).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from neurontrace.errors import NeurontraceError

ARCHITECTURES = ("standard", "jumprelu", "topk")
_HOOKS = [
    (re.compile(r"^blocks\.(\d+)\.hook_resid_post$"), "resid", 0),
    (
        re.compile(r"^blocks\.(\d+)\.hook_resid_pre$"),
        "resid",
        -1,
    ),  # the input of layer L: the output of L - 1
    (re.compile(r"^blocks\.(\d+)\.hook_mlp_out$"), "mlp_out", 0),
    (re.compile(r"^blocks\.(\d+)\.hook_attn_out$"), "attn_out", 0),
    (re.compile(r"^blocks\.(\d+)\.mlp\.hook_post$"), "neurons", 0),
]


def site_of_hook(hook_name: str) -> tuple[str, int]:
    """The neurontrace site and layer of a TransformerLens hook name (``blocks.5.hook_resid_post`` -> resid, 5)."""
    for pattern, site, shift in _HOOKS:
        match = pattern.match(hook_name)
        if match:
            layer = int(match[1]) + shift
            if layer < 0:
                raise NeurontraceError(
                    f"hook {hook_name!r} is the embeddings' output, which is not a site; use a later layer"
                )
            return site, layer
    known = "blocks.L.hook_resid_post / hook_resid_pre / hook_mlp_out / hook_attn_out / mlp.hook_post"
    raise NeurontraceError(f"hook point {hook_name!r} is not one neurontrace splices into; it knows {known}")


def hook_of_site(site: str, layer: int) -> str:
    names = {
        "resid": "hook_resid_post",
        "mlp_out": "hook_mlp_out",
        "attn_out": "hook_attn_out",
        "neurons": "mlp.hook_post",
    }
    if site not in names:
        raise NeurontraceError(f"no SAELens hook name for site {site!r}")
    return f"blocks.{layer}.{names[site]}"


@dataclass
class SAE:
    """A sparse autoencoder on one site of one layer."""

    W_enc: torch.Tensor  # [d_in, d_sae]
    b_enc: torch.Tensor  # [d_sae]
    W_dec: torch.Tensor  # [d_sae, d_in]
    b_dec: torch.Tensor  # [d_in]
    site: str
    layer: int
    architecture: str = "standard"
    k: int | None = None  # topk
    threshold: torch.Tensor | None = None  # jumprelu, [d_sae]
    apply_b_dec_to_input: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise NeurontraceError(
                f"SAE architecture {self.architecture!r} is not supported; choose one of {', '.join(ARCHITECTURES)}"
            )
        d_in, d_sae = self.W_enc.shape
        shapes = {
            "b_enc": (self.b_enc, (d_sae,)),
            "W_dec": (self.W_dec, (d_sae, d_in)),
            "b_dec": (self.b_dec, (d_in,)),
        }
        if self.threshold is not None:
            shapes["threshold"] = (self.threshold, (d_sae,))
        for name, (tensor, shape) in shapes.items():
            if tuple(tensor.shape) != shape:
                raise NeurontraceError(f"SAE weight {name} has shape {tuple(tensor.shape)}, expected {shape}")
        if self.architecture == "topk" and not (isinstance(self.k, int) and 0 < self.k <= d_sae):
            raise NeurontraceError(f"a TopK SAE needs k between 1 and d_sae ({d_sae}), got {self.k!r}")
        if self.architecture == "jumprelu" and self.threshold is None:
            raise NeurontraceError("a JumpReLU SAE needs its threshold tensor")

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[1])

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> SAE:
        move = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
        return SAE(move(self.W_enc), move(self.b_enc), move(self.W_dec), move(self.b_dec), self.site, self.layer,
                   self.architecture, self.k, move(self.threshold), self.apply_b_dec_to_input, dict(self.metadata))  # fmt: skip

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent activations ``[..., d_sae]`` of ``x [..., d_in]``."""
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        pre = x @ self.W_enc + self.b_enc
        if self.architecture == "jumprelu":
            return torch.relu(pre) * (pre > self.threshold)
        acts = torch.relu(pre)
        if self.architecture == "topk":
            top = acts.topk(self.k, dim=-1)
            acts = torch.zeros_like(acts).scatter(-1, top.indices, top.values)
        return acts

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec


def _read_cfg(cfg: dict[str, Any]) -> tuple[str, int | None, str, bool, dict]:
    """(architecture, k, hook_name, apply_b_dec_to_input, metadata) from either cfg.json layout."""
    meta = dict(cfg.get("metadata") or {})
    hook = meta.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point")  # hook_point: older SAELens
    if not isinstance(hook, str):
        raise NeurontraceError("cfg.json names no hook point (metadata.hook_name or hook_name)")
    arch = cfg.get("architecture", "standard")
    kwargs = cfg.get("activation_fn_kwargs") or {}
    if cfg.get("activation_fn") == "topk" or cfg.get("activation_fn_str") == "topk":
        arch = "topk"
    k = cfg.get("k", kwargs.get("k"))
    if cfg.get("normalize_activations") not in (None, "none"):
        raise NeurontraceError(
            f"cfg.json asks for normalize_activations={cfg['normalize_activations']!r}, which neurontrace does not "
            "apply; fold the scaling into the weights first"
        )
    if cfg.get("rescale_acts_by_decoder_norm"):
        raise NeurontraceError(
            "cfg.json asks for rescale_acts_by_decoder_norm, which neurontrace does not apply; fold the decoder "
            "norms into the weights first"
        )
    # SAELens defaults apply_b_dec_to_input to true when a cfg.json leaves it out (both layouts)
    return arch, k, hook, bool(cfg.get("apply_b_dec_to_input", True)), {**meta, "hook_name": hook}


def load_sae(path: str | os.PathLike) -> SAE:
    """An SAE from a SAELens folder (``cfg.json`` + ``sae_weights.safetensors``); safetensors only, no pickle."""
    from safetensors.torch import load_file

    folder = Path(path)
    cfg_path, weights_path = folder / "cfg.json", folder / "sae_weights.safetensors"
    for needed in (cfg_path, weights_path):
        if not needed.is_file():
            raise NeurontraceError(f"{folder} is not a SAELens folder: {needed.name} is missing")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise NeurontraceError(f"{cfg_path} is not JSON: {exc}") from None
    arch, k, hook, apply_b_dec, meta = _read_cfg(cfg)
    site, layer = site_of_hook(hook)
    weights = load_file(weights_path)
    missing = [n for n in ("W_enc", "b_enc", "W_dec", "b_dec") if n not in weights]
    if missing:
        raise NeurontraceError(f"{weights_path} lacks {', '.join(missing)}")
    sae = SAE(weights["W_enc"].float(), weights["b_enc"].float(), weights["W_dec"].float(), weights["b_dec"].float(),
              site, layer, arch, k, weights.get("threshold"), apply_b_dec, meta)  # fmt: skip
    if (cfg.get("d_in"), cfg.get("d_sae")) not in ((sae.d_in, sae.d_sae), (None, None)):
        raise NeurontraceError(
            f"cfg.json says d_in={cfg.get('d_in')}, d_sae={cfg.get('d_sae')} but the weights are {sae.d_in} x {sae.d_sae}"
        )
    return sae


def save_sae(sae: SAE, path: str | os.PathLike) -> Path:
    """Write ``sae`` as a SAELens 6 folder (``cfg.json``, ``sae_weights.safetensors``), each file atomically."""
    from safetensors.torch import save

    from neurontrace.io import write_bytes_atomic, write_text_atomic

    folder = Path(path)
    tensors = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    if sae.threshold is not None:
        tensors["threshold"] = sae.threshold
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}
    cfg: dict[str, Any] = {
        "architecture": sae.architecture,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": sae.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
        # without a sae_lens_version of 6 or later SAELens reads the file as its older layout and drops metadata
        "metadata": {
            "sae_lens_version": "6.0.0",
            **sae.metadata,
            "hook_name": hook_of_site(sae.site, sae.layer),
        },
    }
    if sae.architecture == "topk":
        cfg["k"] = sae.k
    write_bytes_atomic(folder / "sae_weights.safetensors", save(tensors))
    write_text_atomic(folder / "cfg.json", json.dumps(cfg, indent=2))
    return folder


@dataclass
class Splice:
    """What a spliced forward saw at the dictionary's site: latents ``[B, T, d_sae]`` and errors ``[B, T, d_in]``."""

    latents: list[torch.Tensor] = field(default_factory=list)
    errors: list[torch.Tensor] = field(default_factory=list)


@contextmanager
def splice(model: Any, sae: SAE) -> Iterator[Splice]:
    """Run ``model`` with ``sae`` spliced in at its site: ``x -> decode(encode(x)) + error`` (same outputs).

    The latents and errors of every forward inside the block are recorded in the yielded :class:`Splice`.
    """
    from neurontrace.sites import hook_site, site_width

    if not 0 <= sae.layer < model.n_layers:
        raise NeurontraceError(
            f"the SAE is for layer {sae.layer}; the model has layers 0..{model.n_layers - 1}"
        )
    width = site_width(model, sae.site)
    if sae.d_in != width:
        raise NeurontraceError(f"the SAE reads {sae.d_in} values but the model's {sae.site} site has {width}")
    record = Splice()

    def fn(x: torch.Tensor) -> torch.Tensor:
        dictionary = sae.to(device=x.device, dtype=x.dtype)
        latents = dictionary.encode(x)
        reconstruction = dictionary.decode(latents)
        error = x - reconstruction
        record.latents.append(latents)
        record.errors.append(error)
        return reconstruction + error

    handle = hook_site(model, sae.site, sae.layer, fn)
    try:
        yield record
    finally:
        handle.remove()

"""Per-layer transcoders in circuit-tracer's on-disk format, as a basis that replaces each MLP's output.

A transcoder at layer ``L`` reads the MLP's input ``x`` (the normed residual stream the MLP module receives) and
predicts the MLP module's output: ``f = encode(x)``, ``decode(f, x) = f @ W_dec + b_dec (+ x @ W_skip)``.

Encoding: ``pre = x @ W_enc + b_enc``, then ReLU (``relu``); ``pre * (pre > threshold)`` (``jumprelu``, exactly
circuit-tracer's JumpReLU: no ReLU besides the threshold, which is the same for thresholds >= 0); or ReLU and the
``k`` largest values kept (``topk``).

The skip connection (``W_skip [d_in, d_out]``, optional; circuit-tracer's ``compute_skip``) is a linear map from
the transcoder's input to its output, added by :meth:`Transcoder.decode`, which then needs ``x``. In a spliced
forward pass (the ``transcoder:DIR`` site of :mod:`neurontrace.sites`) it is computed from the live MLP input:
like ``b_dec`` it is a part of the output that is no node, and gradients flow through it to earlier layers, as
in circuit-tracer's replacement model. Patching the site's values leaves it at the current input.

On-disk format (circuit-tracer 0.5.0's transcoder set, as its local-cache loader
``circuit_tracer.utils.caching.load_transcoders_from_cache`` and its hub loader read it): a folder with

- ``config.yaml``: ``model_kind: transcoder_set``, ``model_name``, ``feature_input_hook``,
  ``feature_output_hook``; and, written by :func:`save_transcoders` for neurontrace (circuit-tracer ignores them),
  ``activation_function`` (relu / jumprelu / topk) and ``k`` (topk).
- ``layer_{L}.safetensors``, one per layer, in circuit-tracer's orientation: ``W_enc [d_transcoder, d_model]``
  (encoding is ``x @ W_enc.T``), ``W_dec [d_transcoder, d_model]``, ``b_enc [d_transcoder]``, ``b_dec
  [d_model]``, ``activation_function.threshold [d_transcoder]`` for JumpReLU, ``W_skip [d_model, d_model]``
  (applied as ``x @ W_skip.T``) for a skip connection.

Also read: a ``transcoders:`` list in ``config.yaml`` (entry ``i`` is layer ``i``: a path relative to the folder or
an ``hf://OWNER/REPO/PATH`` file), and Gemma Scope 2's tensor names (``w_enc [d_model, d_transcoder]``, ``w_dec``,
``b_enc``, ``b_dec``, ``threshold``, ``affine_skip_connection [d_model, d_model]``), which circuit-tracer
converts with its ``gemma-scope-2`` loader. Only safetensors are read (Gemma Scope 1's ``.npz`` files are refused;
nothing is unpickled). circuit-tracer has no TopK single-layer transcoder: it reads a ``topk`` folder as ReLU,
and it needs every layer from 0 to the last one, where neurontrace takes any set of layers.

Hook names: ``feature_input_hook`` must be ``mlp.hook_in`` (circuit-tracer's hook on the MLP module's input) and
``feature_output_hook`` ``mlp.hook_out`` (its hook on the MLP module's output) or ``hook_mlp_out``
(TransformerLens's MLP output); what :func:`save_transcoders` writes is ``mlp.hook_in`` / ``mlp.hook_out`` (the
names of circuit-tracer's Qwen 3 sets). Refused, because they are other tensors: ``ln2.hook_normalized`` (in
TransformerLens, which circuit-tracer loads with ``fold_ln=False``, the norm's output *before* its weight and
bias, the MLP's input only where that weight is 1: Gemma Scope 1's transcoders read it), ``hook_resid_mid`` (the
residual stream before the MLP's norm, which circuit-tracer's Llama 3.2 1B set is said to read) and anything else.

Gemma 2 and Gemma 3 normalise the MLP module's output again, with ``post_feedforward_layernorm``, before adding
it to the residual stream (OLMo 2 too). The transcoder site replaces the MLP *module's* output, before that norm.
TransformerLens's ``hook_mlp_out`` (and circuit-tracer's nnsight mapping of it) is *after* that norm on Gemma 2
and 3: it is what is added to the residual stream. So a set naming ``hook_mlp_out`` is refused on every family
with a ``post_feedforward_layernorm`` (:meth:`TranscoderSet.check_fits`): it reconstructs the normed output, not
what the MLP module returns. Sets written by :func:`save_transcoders` name ``mlp.hook_out`` and fit every family;
on the families without a post-feedforward norm the two names are the same tensor.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from neurontrace.errors import NeurontraceError

ARCHITECTURES = ("relu", "jumprelu", "topk")
CONFIG_FILE = "config.yaml"
INPUT_HOOK = "mlp.hook_in"
OUTPUT_HOOK = "mlp.hook_out"
OUTPUT_HOOKS = (OUTPUT_HOOK, "hook_mlp_out")
_LAYER_FILE = re.compile(r"^layer_(\d+)\.safetensors$")
_OTHER_HOOKS = {
    "ln2.hook_normalized": "the norm's output before its weight and bias (TransformerLens), not the MLP's input",
    "hook_resid_mid": "the residual stream before the MLP's norm, not the MLP's input (the norm's input)",
    "hook_mlp_in": "the residual stream before the MLP's norm, not the MLP's input",
    "mlp.hook_pre": "the MLP's neuron pre-activations",
    "mlp.hook_post": "the MLP's neuron activations",
}


@dataclass
class Transcoder:
    """A transcoder of one layer's MLP: ``x [..., d_in] -> f [..., d_sae] -> decode(f, x) [..., d_out]``."""

    W_enc: torch.Tensor  # [d_in, d_sae]
    b_enc: torch.Tensor  # [d_sae]
    W_dec: torch.Tensor  # [d_sae, d_out]
    b_dec: torch.Tensor  # [d_out]
    layer: int
    architecture: str = "topk"
    k: int | None = None  # topk only
    threshold: torch.Tensor | None = None  # jumprelu only, [d_sae]
    W_skip: torch.Tensor | None = None  # [d_in, d_out]: decode adds x @ W_skip

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise NeurontraceError(
                f"transcoder architecture {self.architecture!r} is not supported; choose one of {', '.join(ARCHITECTURES)}"
            )
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise NeurontraceError(f"a transcoder's layer must be a whole number >= 0, got {self.layer!r}")
        for name in ("W_enc", "W_dec"):
            tensor = getattr(self, name)
            if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2:
                shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                raise NeurontraceError(f"transcoder weight {name} must be a 2-D tensor, got {shape}")
        d_in, d_sae = self.W_enc.shape
        d_out = self.W_dec.shape[1]
        shapes = {"b_enc": (self.b_enc, (d_sae,)), "W_dec": (self.W_dec, (d_sae, d_out)), "b_dec": (self.b_dec, (d_out,))}  # fmt: skip
        if self.threshold is not None:
            shapes["threshold"] = (self.threshold, (d_sae,))
        if self.W_skip is not None:
            shapes["W_skip"] = (self.W_skip, (d_in, d_out))
        for name, (tensor, shape) in shapes.items():
            if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape:
                got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                raise NeurontraceError(f"transcoder weight {name} has shape {got}, expected {shape}")
        if self.architecture == "topk" and (
            isinstance(self.k, bool) or not (isinstance(self.k, int) and 0 < self.k <= d_sae)
        ):
            raise NeurontraceError(f"a TopK transcoder needs k between 1 and d_sae ({d_sae}), got {self.k!r}")
        if self.architecture == "jumprelu" and self.threshold is None:
            raise NeurontraceError("a JumpReLU transcoder needs its threshold tensor")
        if self.architecture != "jumprelu" and self.threshold is not None:
            raise NeurontraceError(f"a threshold is for JumpReLU transcoders, not {self.architecture}")

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[1])

    @property
    def d_out(self) -> int:
        return int(self.W_dec.shape[1])

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> Transcoder:
        move = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
        return Transcoder(move(self.W_enc), move(self.b_enc), move(self.W_dec), move(self.b_dec), self.layer,
                          self.architecture, self.k, move(self.threshold), move(self.W_skip))  # fmt: skip

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent activations ``[..., d_sae]`` of the MLP input ``x [..., d_in]``."""
        pre = x @ self.W_enc + self.b_enc
        if self.architecture == "jumprelu":
            return pre * (pre > self.threshold)
        acts = torch.relu(pre)
        if self.architecture == "topk":
            top = acts.topk(self.k, dim=-1)
            acts = torch.zeros_like(acts).scatter(-1, top.indices, top.values)
        return acts

    def decode(self, f: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """``f @ W_dec + b_dec``, plus ``x @ W_skip`` with a skip connection (which then needs the input ``x``)."""
        out = f @ self.W_dec + self.b_dec
        if self.W_skip is not None:
            if x is None:
                raise NeurontraceError(
                    "this transcoder has a skip connection (W_skip): decode(f, x) needs its input x"
                )
            out = out + x @ self.W_skip
        return out

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The transcoder's prediction of the MLP output for input ``x``: ``decode(encode(x), x)``."""
        return self.decode(self.encode(x), x)


def check_hooks(input_hook: Any, output_hook: Any) -> None:
    """One-line error unless the hook names are the MLP module's input and output (see the module docstring)."""
    for what, hook, ok in (("input", input_hook, (INPUT_HOOK,)), ("output", output_hook, OUTPUT_HOOKS)):
        if hook in ok:
            continue
        means = (
            _OTHER_HOOKS.get(hook, "not one neurontrace splices a transcoder at")
            if isinstance(hook, str)
            else "not a hook name"
        )
        raise NeurontraceError(
            f"feature_{what}_hook {hook!r} is {means}; a transcoder must read the MLP's input ({INPUT_HOOK}) "
            f"and write its output ({' or '.join(OUTPUT_HOOKS)})"
        )


@dataclass
class TranscoderSet:
    """Transcoders of some layers (layer -> :class:`Transcoder`), with the hook names they were trained on."""

    transcoders: dict[int, Transcoder]
    input_hook: str = INPUT_HOOK
    output_hook: str = OUTPUT_HOOK
    model_name: str | None = None
    path: Path | None = None
    _moved: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.transcoders:
            raise NeurontraceError("a transcoder set needs at least one layer's transcoder")
        for layer, tc in self.transcoders.items():
            if not isinstance(tc, Transcoder):
                raise NeurontraceError(f"layer {layer}: expected a Transcoder, got {type(tc).__name__}")
            if tc.layer != layer:
                raise NeurontraceError(
                    f"the transcoder given for layer {layer} says it is for layer {tc.layer}"
                )
        sizes = {(tc.d_in, tc.d_sae, tc.d_out) for tc in self.transcoders.values()}
        if len(sizes) > 1:
            raise NeurontraceError(
                f"the transcoders differ in size (d_in, d_sae, d_out) {sorted(sizes)}; one set has one size"
            )
        check_hooks(self.input_hook, self.output_hook)

    @property
    def layers(self) -> list[int]:
        return sorted(self.transcoders)

    def _first(self) -> Transcoder:
        return next(iter(self.transcoders.values()))

    @property
    def d_in(self) -> int:
        return self._first().d_in

    @property
    def d_sae(self) -> int:
        return self._first().d_sae

    @property
    def d_out(self) -> int:
        return self._first().d_out

    @property
    def where(self) -> str:
        return str(self.path) if self.path is not None else "the transcoder set"

    def __getitem__(self, layer: int) -> Transcoder:
        if layer not in self.transcoders:
            raise NeurontraceError(
                f"{self.where} has no transcoder for layer {layer}; it covers layers {self.layers}"
            )
        return self.transcoders[layer]

    def on(self, layer: int, device: Any, dtype: torch.dtype) -> Transcoder:
        """Layer ``layer``'s transcoder on ``device`` in ``dtype`` (the last such copy of each layer is kept)."""
        key = (str(device), dtype)
        kept = self._moved.get(layer)
        if kept is None or kept[0] != key:
            kept = (key, self[layer].to(device=device, dtype=dtype))
            self._moved[layer] = kept
        return kept[1]

    def check_fits(self, model: Any) -> None:
        """One-line error unless the set fits ``model``: layers, sizes, and the output hook on its family."""
        if self.layers[-1] >= model.n_layers:
            raise NeurontraceError(
                f"{self.where} has a transcoder for layer {self.layers[-1]}; the model has layers 0..{model.n_layers - 1}"
            )
        d = model.d_model
        if (self.d_in, self.d_out) != (d, d):
            raise NeurontraceError(
                f"the transcoders of {self.where} read {self.d_in} and write {self.d_out} values, but the model's MLP "
                f"reads and writes {d}"
            )
        if self.output_hook == "hook_mlp_out" and "post_feedforward_layernorm" in model.adapter.norms:
            raise NeurontraceError(
                f"{self.where} writes hook_mlp_out, which on {model.adapter.family} is the output of "
                "post_feedforward_layernorm, after the MLP module; the transcoder site replaces the MLP module's "
                f"output ({OUTPUT_HOOK}), so these transcoders do not fit"
            )


# ------------------------------------------------------------------------------------------------- reading
def _read_config(folder: Path) -> dict[str, Any]:
    import yaml

    path = folder / CONFIG_FILE
    if not path.is_file():
        raise NeurontraceError(
            f"{folder} is not a transcoder folder: {CONFIG_FILE} is missing (circuit-tracer's layout: "
            f"{CONFIG_FILE} and layer_N.safetensors)"
        )
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise NeurontraceError(f"{path} is not YAML: {first}") from None
    if not isinstance(config, dict):
        raise NeurontraceError(f"{path} is not a mapping of settings")
    kind = config.get("model_kind")
    if kind == "cross_layer_transcoder":
        raise NeurontraceError(
            f"{folder} holds a cross-layer transcoder; neurontrace reads per-layer transcoder sets"
        )
    if kind != "transcoder_set":
        raise NeurontraceError(
            f"{path} has model_kind {kind!r}; a per-layer transcoder set has transcoder_set"
        )
    for key in ("feature_input_hook", "feature_output_hook"):
        if not isinstance(config.get(key), str):
            raise NeurontraceError(f"{path} names no {key}")
    return config


def _layer_files(folder: Path, config: dict[str, Any]) -> dict[int, Path]:
    listed = config.get("transcoders")
    if listed is None:
        files = {int(m[1]): p for p in folder.iterdir() if (m := _LAYER_FILE.match(p.name)) and p.is_file()}
        if not files:
            raise NeurontraceError(f"{folder} has no layer_N.safetensors files")
        return files
    if not isinstance(listed, list) or not all(isinstance(e, str) for e in listed) or not listed:
        raise NeurontraceError(
            f"{folder / CONFIG_FILE}: transcoders must be a list of file paths, one per layer"
        )
    from neurontrace.dictionaries.hub import download_file

    files = {}
    for layer, entry in enumerate(listed):
        if not entry.endswith(".safetensors"):
            raise NeurontraceError(
                f"layer {layer}'s transcoder {entry} is not a .safetensors file; neurontrace reads safetensors only"
            )
        files[layer] = (
            download_file(entry) if entry.startswith("hf://") else folder / Path(entry).expanduser()
        )
    return files


def _architecture(config: dict[str, Any], has_threshold: bool, where: Path) -> str:
    said = config.get("activation_function")
    if has_threshold:
        if said not in (None, "jumprelu"):
            raise NeurontraceError(
                f"{where} has a threshold but {CONFIG_FILE} says activation_function {said!r}"
            )
        return "jumprelu"
    if said in (None, "relu"):
        return "relu"
    if said == "jumprelu":
        raise NeurontraceError(
            f"{where} lacks activation_function.threshold, which a JumpReLU transcoder needs"
        )
    if said == "topk":
        return "topk"
    raise NeurontraceError(
        f"{CONFIG_FILE} says activation_function {said!r}; neurontrace reads {', '.join(ARCHITECTURES)}"
    )


def _read_layer(path: Path, layer: int, config: dict[str, Any]) -> Transcoder:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise NeurontraceError(f"layer {layer}'s transcoder file {path} is missing")
    try:
        t = load_file(path)
    except (SafetensorError, OSError) as exc:
        raise NeurontraceError(f"{path} is not a readable safetensors file: {exc}") from None
    if "log_thresholds" in t:
        raise NeurontraceError(f"{path} stores log_thresholds, which circuit-tracer does not read either")
    if (
        "w_enc" in t
    ):  # Gemma Scope 2: encoder in neurontrace's orientation, skip as x @ affine_skip_connection
        need, skip = ("w_enc", "w_dec", "b_enc", "b_dec", "threshold"), t.get("affine_skip_connection")
    else:  # circuit-tracer: W_enc [d_transcoder, d_model], W_skip [d_out, d_in]
        need, skip = ("W_enc", "W_dec", "b_enc", "b_dec"), t.get("W_skip")
        skip = None if skip is None else skip.T
    missing = [n for n in need if n not in t]
    if missing:
        raise NeurontraceError(f"{path} lacks the tensors {', '.join(missing)}")
    if "w_enc" in t:
        w_enc, w_dec, threshold = t["w_enc"], t["w_dec"], t["threshold"]
    else:
        w_enc, w_dec, threshold = t["W_enc"].T, t["W_dec"], t.get("activation_function.threshold")
    arch = _architecture(config, threshold is not None, path)
    try:
        return Transcoder(w_enc.contiguous(), t["b_enc"], w_dec, t["b_dec"], layer, arch,
                          config.get("k") if arch == "topk" else None, threshold,
                          None if skip is None else skip.contiguous())  # fmt: skip
    except NeurontraceError as exc:
        raise NeurontraceError(
            f"{path}: {exc} (circuit-tracer's layout: W_enc [d_transcoder, d_model])"
        ) from None


def load_transcoders(path: str | os.PathLike) -> TranscoderSet:
    """A transcoder set from a folder in circuit-tracer's layout (or ``hf:OWNER/REPO[/SUBFOLDER]``).

    Reads safetensors only (never a pickle), tensors in their stored dtype.
    """
    from neurontrace.dictionaries.hub import resolve_dictionary

    folder = _folder(path, resolve_dictionary(path))
    config = _read_config(folder)
    check_hooks(config["feature_input_hook"], config["feature_output_hook"])
    transcoders = {
        layer: _read_layer(p, layer, config) for layer, p in sorted(_layer_files(folder, config).items())
    }
    name = config.get("model_name")
    return TranscoderSet(transcoders, config["feature_input_hook"], config["feature_output_hook"],
                         name if isinstance(name, str) else None, folder)  # fmt: skip


def _folder(spec: Any, local: Path) -> Path:
    folder = local.expanduser()
    if not folder.is_dir():
        raise NeurontraceError(
            f"no such transcoder folder: {os.fspath(spec)}; give a folder in circuit-tracer's layout "
            f"({CONFIG_FILE} and layer_N.safetensors) or hf:OWNER/REPO[/SUBFOLDER]"
        )
    return folder.resolve()


def cached_transcoders(path: str | os.PathLike) -> TranscoderSet:
    """:func:`load_transcoders`, read once per folder and again only when its files change (for sites)."""
    from neurontrace.dictionaries.hub import resolve_dictionary

    folder = _folder(path, resolve_dictionary(path))
    return _cached(folder, _stamp(folder))


def _stamp(folder: Path) -> tuple:
    files = [folder / CONFIG_FILE, *sorted(folder.rglob("*.safetensors"))]
    return tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files if f.is_file())


@lru_cache(maxsize=4)
def _cached(folder: Path, stamp: tuple) -> TranscoderSet:
    return load_transcoders(folder)


# ------------------------------------------------------------------------------------------------- writing
def save_transcoders(
    transcoders: dict[int, Transcoder], folder: str | os.PathLike, *, model_name: str
) -> Path:
    """Write ``transcoders`` (layer -> Transcoder) as a circuit-tracer transcoder set, each file atomically.

    ``layer_{L}.safetensors`` in circuit-tracer's orientation (float32), then ``config.yaml`` (last, so a folder
    with a config is complete). Layer files of other layers left in ``folder`` by an earlier save are removed.
    One folder has one activation function (and one ``k``), as ``config.yaml`` holds it once.
    """
    import yaml
    from safetensors.torch import save

    from neurontrace.io import write_bytes_atomic, write_text_atomic

    if not isinstance(model_name, str) or not model_name:
        raise NeurontraceError("save_transcoders needs the model's name (model_name=...)")
    tset = TranscoderSet(dict(transcoders), model_name=model_name)
    archs = {tc.architecture for tc in tset.transcoders.values()}
    ks = {tc.k for tc in tset.transcoders.values()}
    if len(archs) > 1 or (archs == {"topk"} and len(ks) > 1):
        raise NeurontraceError(
            f"the transcoders mix activation functions {sorted(archs)} or k values; one folder has one of each"
        )
    out = Path(folder).expanduser()
    if out.exists() and not out.is_dir():
        raise NeurontraceError(f"{out} is a file; save_transcoders writes a folder")
    (arch,) = archs
    for layer in tset.layers:
        tc = tset.transcoders[layer]
        tensors = {"W_enc": tc.W_enc.T, "W_dec": tc.W_dec, "b_enc": tc.b_enc, "b_dec": tc.b_dec}
        if tc.threshold is not None:
            tensors["activation_function.threshold"] = tc.threshold
        if tc.W_skip is not None:
            tensors["W_skip"] = tc.W_skip.T
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
        write_bytes_atomic(out / f"layer_{layer}.safetensors", save(tensors))
    for stale in out.iterdir():
        match = _LAYER_FILE.match(stale.name)
        if match and int(match[1]) not in tset.transcoders:
            stale.unlink()
    config: dict[str, Any] = {
        "model_kind": "transcoder_set",
        "model_name": model_name,
        "feature_input_hook": INPUT_HOOK,
        "feature_output_hook": OUTPUT_HOOK,
        "activation_function": arch,
    }
    if arch == "topk":
        config["k"] = ks.pop()
    write_text_atomic(out / CONFIG_FILE, yaml.safe_dump(config, sort_keys=False))
    return out

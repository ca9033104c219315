"""Training TopK sparse autoencoders and transcoders, one per layer for many layers at once, from one stream.

Why not SAELens's trainer (sae-lens 6.54.12, which the tests use to check our output format): its
``LanguageModelSAERunnerConfig`` trains one dictionary per run at one ``hook_name``, so the 30 layers of the
default model would take 30 passes of the model over the corpus. Here every layer trains from the same forwards.

Each forward of the frozen model over a batch of corpus blocks (:mod:`neurontrace.dictionaries.corpus`)
captures, at every chosen layer, the dictionary's input and target: the site's tensor for an SAE (input =
target; sites ``resid``, ``mlp_out``, ``attn_out``, ``neurons``), the MLP module's input and output for a
transcoder. The forward stops after the last chosen layer (no unembedding). Position 0 (the BOS token, an
attention sink with huge outlier activations) is dropped. The tokens of a *round* (``buffer_tokens``) are
shuffled together and cut into minibatches of ``batch_size`` tokens, one Adam step each. The layers' weights
are stacked as ``[n_layers, ...]`` tensors and every operation is batched over the layers.

Architecture (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"): ``f = TopK(ReLU(x W_enc +
b_enc))`` (the ``k`` largest kept), ``x_hat = f W_dec + b_dec``; decoder rows of unit norm (renormalised after
every step, and each row's gradient component along the row removed before it); ``W_enc`` initialised as
``W_dec.T`` (random unit rows; a tenth of that for transcoders, whose input and output spaces differ, so that
their first reconstructions are near ``b_dec`` rather than noise), ``b_dec`` as the first round's mean target
and ``b_enc`` so that the first round's mean input has zero pre-activations. During training, inputs and
targets are divided by a fixed per-layer scale (their RMS over the first round), so that the learning rate
means the same on every site; the scales are folded into the saved weights (latents come out multiplied by the
target's scale, decoder rows stay unit-norm).

Loss: MSE normalised by the target's variance (per layer, from the first round), plus ``aux_coeff`` (1/32)
times the AuxK loss: the ``aux_k`` (``d_in / 2``) largest pre-activations among the *dead* latents (not fired
in the last ``dead_tokens`` training tokens) reconstruct the main reconstruction's error, normalised by that
error's variance; it runs on the first quarter of each (shuffled) minibatch and only on the dead latents'
columns. ``dead_tokens`` defaults to a tenth of the run, within [10 000, 10 M] (10 M is Gao et al.'s window):
a short run's window must be short enough to act within the run, and long enough that a latent of ordinary
density (``k / d_sae``, 1/64 with the defaults) would have fired many times (here: over 150 times).

Optimiser: Adam (betas 0.9, 0.999, eps 6.25e-10, as Gao et al.), learning rate ``lr``, by default Gao et al.'s
scaling law ``2e-4 / sqrt(d_sae / 16384)``, constant, then decayed linearly to zero over the last
``lr_decay`` (20 %) of the tokens. The main reconstruction and every gradient of it are exact float32 and sparse (sums of ``k`` decoder rows, aten's
``embedding_bag`` kernels, no dense ``[tokens, d_sae]`` tensor but the pre-activations); with
``precision="bfloat16"`` (the default where the device multiplies bfloat16 fast) the dense encoder matmul runs
in bfloat16.

Checkpoints: every ``checkpoint_every_s`` seconds (default 60, or ``$NEURONTRACE_CHECKPOINT_SECONDS``) and
when the training tokens are reached, ``OUT/checkpoint.safetensors`` is replaced atomically: weights, Adam
state, dead-latent counters, scales, the shuffling generator's state, and (JSON in the safetensors header) the
settings and the progress (tokens and blocks consumed, seconds). Checkpoints fall between rounds, so a rerun
with the same settings resumes from one and ends with the same weights as an uninterrupted run; other settings
are refused (another ``out``, or ``fresh=True``). A ``sample:N`` corpus keeps its samples in ``OUT`` as well.

Metrics, on held-out blocks (the corpus's first ``held_out`` tokens, never trained on): fraction of variance
explained, mean L0, dead latents (never fired over the held-out tokens and the last ``dead_tokens`` training
tokens), and the next-token loss (mean cross-entropy in nats over the held-out predictions from position 1 on)
with the dictionary's reconstruction in place of the site at one layer at a time, without the error term
(position 0 keeps its own activation: the dictionary never saw it), minus the clean loss.

Output: SAE mode writes one SAELens folder per layer, ``OUT/<hook name>/`` (e.g.
``OUT/blocks.5.hook_mlp_out``), so that ``OUT`` is a basis (``load_basis(OUT)``, ``--site sae:OUT``);
transcoder mode writes a circuit-tracer transcoder set into ``OUT`` (``--site transcoder:OUT``). Both write
``OUT/training.json`` (settings, metrics per layer, tokens, seconds, machine), and the checkpoint is removed
once everything is written.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from neurontrace.dictionaries.corpus import SAMPLE_PREFIX, Corpus, SampleCorpus, open_corpus, special_ids
from neurontrace.errors import NeurontraceError

KINDS = ("sae", "transcoder")
SAE_SITES = ("resid", "mlp_out", "attn_out", "neurons")
CHECKPOINT = "checkpoint.safetensors"
TRAINING_JSON = "training.json"
SAMPLE_CACHE = "corpus-sample.safetensors"
FORMAT = 1  # bump when the checkpoint layout changes

# Defaults sized for the default model (SmolLM2-135M, 30 layers) on 2 CPU cores: see docs in train-sae --help.
DEFAULT_D_SAE = 4096
DEFAULT_K = 32
DEFAULT_TOKENS = 400_000
DEFAULT_SAMPLE_TOKENS = 200_000
DEFAULT_BATCH = 1024
DEFAULT_CONTEXT = 128
DEFAULT_HELD_OUT = 2048
DEFAULT_BUFFER = 16_384
FORWARD_BATCH = 32  # blocks per forward pass
EVAL_BATCH = 8  # blocks per forward pass with logits
AUX_FRACTION = 4  # AuxK runs on the first 1/AUX_FRACTION of each minibatch


def default_corpus() -> str:
    return f"{SAMPLE_PREFIX}{DEFAULT_SAMPLE_TOKENS}"


def fast_bfloat16(device: torch.device | str) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices natively (CUDA with bf16, a CPU with AVX-512 BF16/AMX)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


@dataclass
class TrainConfig:
    """What to train. ``None`` fields take defaults that depend on the model or the other fields."""

    kind: str = "sae"  # "sae" (input = target = the site) or "transcoder" (MLP input -> MLP output)
    site: str = "mlp_out"  # SAE mode: resid, mlp_out, attn_out or neurons
    layers: list[int] | None = None  # default: every layer
    d_sae: int = DEFAULT_D_SAE
    k: int = DEFAULT_K
    tokens: int = DEFAULT_TOKENS  # training tokens (BOS positions not counted)
    lr: float | None = None  # default 2e-4 / sqrt(d_sae / 16384)
    batch_size: int = DEFAULT_BATCH  # tokens per Adam step
    context: int = DEFAULT_CONTEXT  # tokens per block, BOS included
    held_out: int = DEFAULT_HELD_OUT  # tokens for the metrics, from the corpus's first blocks
    seed: int = 0
    buffer_tokens: int = DEFAULT_BUFFER  # tokens shuffled together (a round)
    aux_k: int | None = None  # default: d_out // 2 (at most d_sae)
    aux_coeff: float = 1 / 32
    dead_tokens: int | None = None  # default: tokens // 10 within [10_000, 10_000_000]
    lr_decay: float = 0.2  # fraction of the run at the end over which lr decays linearly to 0
    precision: str | None = None  # "bfloat16"/"float32" dense matmuls; default: bfloat16 where fast

    def settings(self, model: Any, corpus: str) -> dict[str, Any]:
        """Every setting resolved against ``model`` (what a checkpoint must match to resume), or a one-line error."""
        if self.kind not in KINDS:
            raise NeurontraceError(f"unknown dictionary kind {self.kind!r}; choose sae or transcoder")
        if self.kind == "sae" and self.site not in SAE_SITES:
            raise NeurontraceError(
                f"cannot train an SAE on site {self.site!r}; choose one of {', '.join(SAE_SITES)}"
            )
        layers = list(range(model.n_layers)) if self.layers is None else sorted(set(self.layers))
        if not layers:
            raise NeurontraceError("no layers to train; give at least one layer")
        for layer in layers:
            if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < model.n_layers:
                raise NeurontraceError(
                    f"layer {layer} does not exist; the model has layers 0..{model.n_layers - 1}"
                )
        for name in ("d_sae", "k", "tokens", "batch_size", "buffer_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise NeurontraceError(f"{name.replace('_', '-')} must be a whole number >= 1, got {value!r}")
        if self.k > self.d_sae:
            raise NeurontraceError(f"k ({self.k}) cannot exceed the number of latents d_sae ({self.d_sae})")
        if not isinstance(self.context, int) or self.context < 3:
            raise NeurontraceError(f"the context must be at least 3 tokens, got {self.context!r}")
        if not isinstance(self.held_out, int) or self.held_out < 1:
            raise NeurontraceError(f"held-out must be at least 1 token, got {self.held_out!r}")
        lr = self.lr if self.lr is not None else 2e-4 / math.sqrt(self.d_sae / 16384)
        if not (isinstance(lr, (int, float)) and 0 < lr < 1):
            raise NeurontraceError(f"the learning rate must be between 0 and 1, got {lr!r}")
        if not 0 <= self.lr_decay <= 1:
            raise NeurontraceError(f"lr-decay must be between 0 and 1, got {self.lr_decay!r}")
        precision = self.precision or ("bfloat16" if fast_bfloat16(model.device) else "float32")
        if precision not in ("bfloat16", "float32"):
            raise NeurontraceError(f"precision must be bfloat16 or float32, got {precision!r}")
        from neurontrace.sites import site_width

        d_in = site_width(model, self.site) if self.kind == "sae" else model.d_model
        aux_k = self.aux_k if self.aux_k is not None else max(1, min(d_in // 2, self.d_sae))
        dead = (
            self.dead_tokens
            if self.dead_tokens is not None
            else min(max(self.tokens // 10, 10_000), 10_000_000)
        )
        return json.loads(json.dumps({
            "format": FORMAT, "kind": self.kind, "site": self.site if self.kind == "sae" else "mlp",
            "model": str(model.name), "model_shape": [model.n_layers, model.d_model, model.d_ff],
            "model_dtype": str(model.dtype).removeprefix("torch."), "corpus": corpus, "layers": layers,
            "d_in": d_in, "d_sae": self.d_sae, "k": self.k, "tokens": self.tokens, "lr": float(lr),
            "batch_size": self.batch_size, "context": self.context, "held_out": self.held_out, "seed": self.seed,
            "buffer_tokens": self.buffer_tokens, "aux_k": int(aux_k), "aux_coeff": float(self.aux_coeff),
            "dead_tokens": int(dead), "lr_decay": float(self.lr_decay), "precision": precision,
        }))  # fmt: skip


@dataclass
class LayerMetrics:
    variance_explained: float
    l0: float
    dead: int
    dead_fraction: float
    loss_spliced: float  # next-token loss with the reconstruction in place of the site (nats)
    loss_increase: float  # loss_spliced - clean loss


@dataclass
class TrainResult:
    out: Path
    settings: dict[str, Any]
    metrics: dict[int, LayerMetrics]
    clean_loss: float
    tokens: int
    seconds: dict[str, float]
    resumed_from: int = 0  # tokens already trained when this call started (0: a fresh run)
    already_done: bool = False  # the folder held this finished run; nothing was computed
    info: dict[str, Any] = field(default_factory=dict)

    def table(self) -> str:
        """The per-layer metrics as a text table."""
        lines = [f"  {'layer':>5}  {'var expl':>8}  {'L0':>6}  {'dead':>11}  {'loss +':>8}"]
        for layer, m in sorted(self.metrics.items()):
            lines.append(f"  {layer:>5}  {m.variance_explained:>8.3f}  {m.l0:>6.1f}  "
                         f"{m.dead:>5} {m.dead_fraction:>5.1%}  {m.loss_increase:>+8.4f}")  # fmt: skip
        mean = lambda attr: sum(getattr(m, attr) for m in self.metrics.values()) / len(self.metrics)  # noqa: E731
        lines.append(f"  {'mean':>5}  {mean('variance_explained'):>8.3f}  {mean('l0'):>6.1f}  "
                     f"{'':>5} {mean('dead_fraction'):>5.1%}  {mean('loss_increase'):>+8.4f}")  # fmt: skip
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- capture
class _Stop(Exception):
    """Raised by a hook after the last needed layer: the rest of the forward pass is not needed."""


def _output_tensor(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _capture(model: Any, ids: torch.Tensor, layers: list[int], kind: str, site: str, device: torch.device, *,
             logits: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """Inputs and targets ``[L, B, T - 1, d]`` (float32, position 0 dropped) of every layer, and the logits."""
    from neurontrace.hooks import add_input_hook, add_output_hook
    from neurontrace.sites import hook_site

    inputs: dict[int, torch.Tensor] = {}
    targets: dict[int, torch.Tensor] = {}

    def keep(store: dict, layer: int):
        def fn(x: torch.Tensor) -> None:
            store[layer] = x[:, 1:].detach().to(device=device, dtype=torch.float32)

        return fn

    handles = []
    out = None
    try:
        for layer in layers:
            if kind == "sae":
                handles.append(hook_site(model, site, layer, keep(inputs, layer)))
            else:
                mlp = model.layer_module(layer, model.adapter.mlp)
                handles.append(add_input_hook(mlp, keep(inputs, layer)))
                handles.append(add_output_hook(mlp, keep(targets, layer)))
        if not logits:

            def stop(*_: Any) -> None:
                raise _Stop

            handles.append(model.layer(max(layers)).register_forward_hook(stop))
        with torch.no_grad(), contextlib.suppress(_Stop):
            out = model.hf(input_ids=ids.to(model.device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    x = torch.stack([inputs[layer] for layer in layers])
    y = x if kind == "sae" else torch.stack([targets[layer] for layer in layers])
    return x, y, (out.logits if logits else None)


def _round_activations(
    model: Any, blocks: torch.Tensor, s: dict, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets ``[L, blocks * (T - 1), d]`` of a round's blocks, filled one forward batch at a time."""
    L, per_block = len(s["layers"]), blocks.shape[1] - 1
    x = y = None
    at = 0
    for chunk in blocks.split(FORWARD_BATCH):
        cx, cy, _ = _capture(model, chunk, s["layers"], s["kind"], s["site"], device)
        n = chunk.shape[0] * per_block
        if x is None:
            x = torch.empty(L, blocks.shape[0] * per_block, cx.shape[-1], device=device)
            y = x if cy is cx else torch.empty(L, blocks.shape[0] * per_block, cy.shape[-1], device=device)
        x[:, at : at + n] = cx.reshape(L, n, -1)
        if y is not x:
            y[:, at : at + n] = cy.reshape(L, n, -1)
        at += n
        del cx, cy
    return x, y


# ------------------------------------------------------------------------------------------------ the stack
class _Bags:
    """Sums of weighted rows over fixed bags of indices (``embedding_bag``, mode sum) and their two gradients.

    ``sum(weight, w)[b] = sum_j w[b, j] * weight[idx[b, j]]``; ``weight_grad(g, w)[r] = sum over (b, j) with
    idx[b, j] = r of w[b, j] * g[b]`` (a sparse transposed product, no dense ``[bags, rows]`` tensor); and
    ``weights_grad(g, weight)[b, j] = g[b] . weight[idx[b, j]]``. aten's own kernels (those of embedding_bag's
    backward) where they are there, else the same through autograd.
    """

    aten = True

    def __init__(self, idx: torch.Tensor) -> None:
        self.idx, self.k = idx, idx.shape[1]
        self.flat = idx.reshape(-1)
        self.offsets = torch.arange(0, self.flat.numel(), self.k, device=idx.device)
        self.bag_size = self.max_indices = self.offset2bag = None

    def sum(self, weight: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if _Bags.aten:
            try:
                out, self.offset2bag, self.bag_size, self.max_indices = torch.ops.aten._embedding_bag(
                    weight, self.flat, self.offsets, False, 0, False, w.reshape(-1), False, -1
                )
                return out
            except (RuntimeError, TypeError, AttributeError):  # pragma: no cover - another torch
                _Bags.aten = False
        return F.embedding_bag(self.idx, weight, per_sample_weights=w.reshape(-1, self.k), mode="sum")

    def weight_grad(self, g: torch.Tensor, w: torch.Tensor, rows: int) -> torch.Tensor:
        if _Bags.aten and self.offset2bag is not None:
            return torch.ops.aten._embedding_bag_backward(g, self.flat, self.offsets, self.offset2bag, self.bag_size,
                                                          self.max_indices, rows, False, 0, False, w.reshape(-1), -1)  # fmt: skip
        with torch.enable_grad():
            weight = torch.zeros(rows, g.shape[1], device=g.device, requires_grad=True)
            out = F.embedding_bag(
                self.idx, weight, per_sample_weights=w.reshape(-1, self.k).detach(), mode="sum"
            )
            return torch.autograd.grad(out, weight, g)[0]

    def weights_grad(self, g: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if _Bags.aten and self.offset2bag is not None:
            return torch.ops.aten._embedding_bag_per_sample_weights_backward(
                g, weight, self.flat, self.offsets, self.offset2bag, 0, -1
            ).view(-1, self.k)
        with torch.enable_grad():
            w = torch.ones(self.idx.shape, device=g.device, requires_grad=True)
            out = F.embedding_bag(self.idx, weight.detach(), per_sample_weights=w, mode="sum")
            return torch.autograd.grad(out, w, g)[0]


class _Stack:
    """The stacked dictionaries of all layers (normalised units), their Adam state and dead-latent counters."""

    NAMES = ("W_encT", "b_enc", "W_dec", "b_dec")

    def __init__(self, s: dict[str, Any], device: torch.device) -> None:
        L, S = len(s["layers"]), s["d_sae"]
        d_in = d_out = s["d_in"]
        self.s, self.device, self.L, self.S, self.d_in, self.d_out = s, device, L, S, d_in, d_out
        self.compute = torch.bfloat16 if s["precision"] == "bfloat16" else torch.float32
        z = lambda *shape: torch.zeros(*shape, device=device)  # noqa: E731
        self.W_encT, self.b_enc = z(L, S, d_in), z(L, S)  # W_encT[l] is W_enc[l].T, rows per latent
        self.W_dec, self.b_dec = z(L, S, d_out), z(L, d_out)
        self.scale_in, self.scale_out, self.var_out = z(L), z(L), z(L)
        self.since_fired = torch.zeros(L, S, dtype=torch.long, device=device)
        self.params = [self.W_encT, self.b_enc, self.W_dec, self.b_dec]
        for p in self.params:
            p.requires_grad_(True)
        self.optimizer = _adam(self.params, s["lr"])
        self.offsets = (torch.arange(L, device=device) * S).view(L, 1, 1)
        self.last_fvu = float("nan")

    # ---- initialisation from the first round (raw units)
    def initialise(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> None:
        with torch.no_grad():
            self.scale_in.copy_(x.pow(2).sum(-1).mean(-1).div(self.d_in).sqrt().clamp_min(1e-12))
            self.scale_out.copy_(y.pow(2).sum(-1).mean(-1).div(self.d_out).sqrt().clamp_min(1e-12))
            xn, yn = x / self.scale_in[:, None, None], y / self.scale_out[:, None, None]
            mean_y = yn.mean(1)
            self.var_out.copy_((yn - mean_y[:, None]).pow(2).sum(-1).mean(-1).clamp_min(1e-12))
            w = torch.randn(self.L, self.S, self.d_out, generator=generator).to(self.device)
            self.W_dec.copy_(w / w.norm(dim=-1, keepdim=True))
            if self.d_in == self.d_out:
                self.W_encT.copy_(self.W_dec * (0.1 if self.s.get("kind") == "transcoder" else 1.0))
            else:  # pragma: no cover - every kind trained here maps d_model (or d_ff) to itself
                v = torch.randn(self.L, self.S, self.d_in, generator=generator).to(self.device)
                self.W_encT.copy_(v / v.norm(dim=-1, keepdim=True))
            self.b_dec.copy_(mean_y)
            self.b_enc.copy_(-torch.einsum("lsd,ld->ls", self.W_encT, xn.mean(1)))

    # ---- one Adam step on normalised x [L, n, d_in], y [L, n, d_out]
    def step(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> None:
        grads, fvu = self.gradients(x, y)
        with torch.no_grad():
            g_dec, W_dec = grads[2], self.W_dec.detach()
            for layer in range(self.L):  # decoder rows stay unit-norm: drop each row's gradient along the row
                g_dec[layer].addcmul_(
                    (g_dec[layer] * W_dec[layer]).sum(-1, keepdim=True), W_dec[layer], value=-1
                )
            for p, g in zip(self.params, grads, strict=True):
                p.grad = g
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
            self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12))
            for p in self.params:
                p.grad = None
        self.last_fvu = float(fvu.mean())

    def gradients(self, x: torch.Tensor, y: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """Gradients of the loss w.r.t. ``(W_encT, b_enc, W_dec, b_dec)`` and each layer's FVU; updates the
        dead-latent counters."""
        L, n, S, k = self.L, x.shape[1], self.S, self.s["k"]
        W_encT, b_enc, W_dec, b_dec = (p.detach() for p in self.params)
        c = self.compute
        with torch.no_grad():
            pre = torch.baddbmm(b_enc[:, None].to(c), x.to(c), W_encT.to(c).transpose(1, 2))  # [L, n, S]
            vals, idx = pre.topk(k, dim=-1, sorted=False)
            acts = vals.float().relu_()
        bags = _Bags((idx + self.offsets).view(L * n, k))
        dec = W_dec.view(L * S, self.d_out)
        with torch.no_grad():
            err = bags.sum(dec, acts).view(L, n, self.d_out).add_(b_dec[:, None]).sub_(y)
            fvu = err.pow(2).sum(-1).mean(-1) / self.var_out  # [L]
            g_rec = (err * (2.0 / (n * self.var_out))[:, None, None]).view(L * n, self.d_out)
            g_b_dec = g_rec.view(L, n, self.d_out).sum(1)
            g_dec = bags.weight_grad(g_rec, acts, L * S).view(L, S, self.d_out)
            g_pre = bags.weights_grad(g_rec, dec).view(L, n, k).mul_(acts > 0)  # through the ReLU
            g_b_enc = torch.zeros(L, S, device=self.device).scatter_add_(
                1, idx.view(L, -1), g_pre.view(L, -1)
            )
            # W_encT's row s gathers g_pre[n, j] * x[n] over the (n, j) that selected s: the same sparse sum
            g_enc = bags.weight_grad(x.reshape(L * n, self.d_in), g_pre, L * S).view(L, S, self.d_in)
            dead = self.since_fired >= self.s["dead_tokens"]
            if bool(dead.any()):
                self._auxk(pre, dead, err, x, W_dec, g_dec, g_enc, g_b_enc)
            ones = (acts > 0).float().view(L, -1)
            fired = torch.zeros(L, S, device=self.device).scatter_add_(1, idx.view(L, -1), ones) > 0
            self.since_fired.add_(n).masked_fill_(fired, 0)
        return (g_enc, g_b_enc, g_dec, g_b_dec), fvu

    def _auxk(self, pre: torch.Tensor, dead: torch.Tensor, err: torch.Tensor, x: torch.Tensor, W_dec: torch.Tensor,
              g_dec: torch.Tensor, g_enc: torch.Tensor, g_b_enc: torch.Tensor) -> None:  # fmt: skip
        """Add the AuxK loss's gradients: dead latents' top ``aux_k`` pre-activations reconstruct the error.

        Only the dead latents' columns are gathered (``D`` of them, the most dead in any layer), so the cost is
        that of a dictionary of ``D`` latents: small once training has settled.
        """
        L, m = self.L, max(1, math.ceil(x.shape[1] / AUX_FRACTION))
        counts = dead.sum(1)
        D = int(counts.max())
        cols = torch.argsort(dead.to(torch.int8), dim=1, descending=True, stable=True)[
            :, :D
        ]  # dead ones first
        valid = (
            torch.arange(D, device=self.device)[None] < counts[:, None]
        )  # [L, D]: padding of layers with fewer
        sub = (
            pre[:, :m]
            .gather(-1, cols[:, None].expand(L, m, D))
            .float()
            .masked_fill_(~valid[:, None], float("-inf"))
        )
        vals, j = sub.topk(min(self.s["aux_k"], D), dim=-1, sorted=False)
        z = torch.zeros(L, m, D, device=self.device).scatter_(-1, j, vals.relu())  # padding (-inf) gives 0
        rows = cols[..., None].expand(L, D, self.d_out)
        W = W_dec.gather(1, rows)  # [L, D, d_out]
        target = -err[:, :m]  # what the main reconstruction missed
        var = (target - target.mean(1, keepdim=True)).pow(2).sum(-1).mean(-1).clamp_min(1e-12)  # [L]
        g_hat = (torch.bmm(z, W) - target) * (2.0 * self.s["aux_coeff"] / (m * var))[:, None, None]
        g_dec.scatter_add_(1, rows, torch.bmm(z.transpose(1, 2), g_hat))
        g_z = torch.bmm(g_hat, W.transpose(1, 2)).mul_(z > 0)  # [L, m, D]
        g_b_enc.scatter_add_(1, cols, g_z.sum(1))
        g_enc.scatter_add_(
            1, cols[..., None].expand(L, D, self.d_in), torch.bmm(g_z.transpose(1, 2), x[:, :m])
        )

    # ---- state
    def tensors(self) -> dict[str, torch.Tensor]:
        out = {name: p.detach() for name, p in zip(self.NAMES, self.params, strict=True)}
        out.update(scale_in=self.scale_in, scale_out=self.scale_out, var_out=self.var_out,
                   since_fired=self.since_fired)  # fmt: skip
        for name, p in zip(self.NAMES, self.params, strict=True):
            state = self.optimizer.state.get(p)
            if state:
                out[f"adam.{name}.exp_avg"] = state["exp_avg"]
                out[f"adam.{name}.exp_avg_sq"] = state["exp_avg_sq"]
                out[f"adam.{name}.step"] = state["step"].reshape(1)
        return out

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, p in zip(self.NAMES, self.params, strict=True):
                p.copy_(tensors[name])
            for name in ("scale_in", "scale_out", "var_out", "since_fired"):
                getattr(self, name).copy_(tensors[name])
        fused = bool(self.optimizer.param_groups[0].get("fused"))
        for name, p in zip(self.NAMES, self.params, strict=True):
            if f"adam.{name}.step" in tensors:
                step = tensors[f"adam.{name}.step"].reshape(())
                self.optimizer.state[p] = {
                    "step": step.to(p.device) if fused else step.cpu(),
                    "exp_avg": tensors[f"adam.{name}.exp_avg"].to(p.device).clone(),
                    "exp_avg_sq": tensors[f"adam.{name}.exp_avg_sq"].to(p.device).clone(),
                }

    def dictionaries(self) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per layer ``(W_enc [d_in, S], b_enc, W_dec [S, d_out], b_dec)`` in the model's units (scales folded)."""
        out = {}
        with torch.no_grad():
            for i, layer in enumerate(self.s["layers"]):
                c_in, c_out = self.scale_in[i], self.scale_out[i]
                out[layer] = ((self.W_encT[i].T * (c_out / c_in)).cpu().clone(), (self.b_enc[i] * c_out).cpu().clone(),
                              self.W_dec[i].cpu().clone(), (self.b_dec[i] * c_out).cpu().clone())  # fmt: skip
        return out


def _adam(params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    kwargs = dict(lr=lr, betas=(0.9, 0.999), eps=6.25e-10)
    try:
        return torch.optim.Adam(params, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):  # a device without the fused kernel
        return torch.optim.Adam(params, foreach=True, **kwargs)


# ----------------------------------------------------------------------------------------- the folder's state
def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise NeurontraceError(f"{path} is not JSON; remove it or use --fresh") from None
    return data if isinstance(data, dict) else None


def _checkpoint_state(path: Path) -> dict | None:
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {})["neurontrace"])
    except Exception:
        raise NeurontraceError(
            f"the checkpoint {path} is damaged; rerun with --fresh to start over"
        ) from None


def _differences(old: dict, new: dict) -> str:
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    shown = ", ".join(f"{k}: {_short(old.get(k))} there, {_short(new.get(k))} now" for k in keys[:3])
    return shown + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _ours(out: Path) -> list[Path]:
    """What a run writes into ``out`` (SAE folders, transcoder files, checkpoint, sample cache, training.json)."""
    from neurontrace.dictionaries.sae import site_of_hook

    found = []
    for p in out.iterdir() if out.is_dir() else []:
        if p.name in (CHECKPOINT, TRAINING_JSON, SAMPLE_CACHE, "config.yaml") or (
            p.name.startswith("layer_") and p.name.endswith(".safetensors")
        ):
            found.append(p)
        elif p.is_dir() and (p / "cfg.json").is_file():
            try:
                site_of_hook(p.name)
            except NeurontraceError:
                continue
            found.append(p)
    return found


def _prepare(out: Path, settings: dict, fresh: bool) -> tuple[str, dict | None]:
    """("done", training.json) | ("resume", checkpoint state) | ("fresh", None), or a one-line error."""
    if out.exists() and not out.is_dir():
        raise NeurontraceError(f"--out {out} is a file; training writes a folder")
    if fresh:
        for p in _ours(out):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    again = "use another --out, or --fresh to start over"
    done = _read_json(out / TRAINING_JSON)
    if done is not None:
        if done.get("settings") == settings:
            return "done", done
        raise NeurontraceError(f"{out} holds a finished run with other settings ({_differences(done.get('settings') or {}, settings)}); {again}")  # fmt: skip
    state = _checkpoint_state(out / CHECKPOINT)
    if state is not None:
        if state.get("settings") == settings:
            return "resume", state
        raise NeurontraceError(f"{out} holds a checkpoint of a run with other settings ({_differences(state.get('settings') or {}, settings)}); {again}")  # fmt: skip
    if any(p.name != SAMPLE_CACHE for p in _ours(out)):
        raise NeurontraceError(f"{out} already holds dictionaries that this run did not write; {again}")
    out.mkdir(parents=True, exist_ok=True)
    return "fresh", None


_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.bfloat16: "BF16", torch.float16: "F16",
           torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}  # fmt: skip


def _save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], state: dict) -> None:
    """Write a safetensors file (JSON ``state`` in its header) through a temporary file and an atomic rename.

    The file is streamed tensor by tensor (``safetensors.torch.save_file`` builds it in memory first, which takes
    four times as long for a checkpoint of several GB), then flushed to disk before the rename.
    """
    from neurontrace.io import _umask

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    header: dict[str, Any] = {"__metadata__": {"neurontrace": json.dumps(state)}}
    offset = 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        header[name] = {
            "dtype": _DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(len(head).to_bytes(8, "little") + head)
            for t in tensors.values():
                if t.numel():
                    f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------------------------- streams
def _training_blocks(corpus: Corpus, start: int, skip: int) -> Iterator[torch.Tensor]:
    """The corpus's blocks from ``start`` on, from the beginning again at its end; the first ``skip`` passed over."""
    while True:
        got = 0
        for block in corpus.blocks(skip=start + skip):
            got += 1
            yield block
        if got == 0:
            period = sum(1 for _ in corpus.blocks(skip=start))
            if period == 0:
                raise NeurontraceError(
                    f"the corpus {corpus.spec} has no blocks left for training after the held-out ones; give a "
                    "larger corpus or a smaller --held-out"
                )
            skip %= period
        else:
            skip = 0


def _machine(device: torch.device) -> dict[str, Any]:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "device": str(device)}  # fmt: skip
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# ------------------------------------------------------------------------------------------------- training
def train_dictionaries(
    model: Any,
    out: str | os.PathLike,
    config: TrainConfig | None = None,
    *,
    corpus: str | Corpus | None = None,
    fresh: bool = False,
    progress: bool = False,
    checkpoint_every_s: float | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    log: Callable[[str], None] | None = None,
    corpus_cache: str | os.PathLike | None = None,
) -> TrainResult:
    """Train one TopK dictionary per layer (SAE or transcoder, see the module docstring) and write them to ``out``.

    ``corpus``: a :class:`~neurontrace.dictionaries.corpus.Corpus` or a spec for
    :func:`~neurontrace.dictionaries.corpus.open_corpus` (default ``sample:200000``; its samples are cached in
    ``out/corpus-sample.safetensors``; ``corpus_cache``: another run's such file, whose samples are reused when
    drawn from the same model, seed and context, and never written). ``on_round(info)`` is called after every round (tokens, round, whether a checkpoint was written),
    ``log(message)`` with what happens (resuming, passes over the corpus, done already).
    """
    config = config or TrainConfig()
    corpus = corpus if corpus is not None else default_corpus()
    spec = corpus.spec if isinstance(corpus, Corpus) else str(corpus)
    settings = config.settings(model, spec)
    out = Path(out).expanduser()
    say = log or (lambda _msg: None)
    how, previous = _prepare(out, settings, fresh)
    if how == "done":
        say(f"done already: {out} holds this run, finished")
        return _result_from_json(out, previous)
    started = time.monotonic()
    if isinstance(corpus, str):
        corpus = open_corpus(corpus, model, context=settings["context"], seed=settings["seed"],
                             cache=out / SAMPLE_CACHE, reuse=corpus_cache, progress=progress)  # fmt: skip
    if corpus.context != settings["context"]:
        raise NeurontraceError(
            f"the corpus has blocks of {corpus.context} tokens but the context is {settings['context']}"
        )
    device = model.device
    L, T = len(settings["layers"]), settings["context"]
    per_block = T - 1
    held_blocks = math.ceil(settings["held_out"] / per_block)
    generator = torch.Generator().manual_seed(settings["seed"])
    stack = _Stack(settings, device)
    progress_state = {"tokens": 0, "blocks": 0, "rounds": 0, "steps": 0, "seconds": 0.0}
    if how == "resume":
        from safetensors.torch import load_file

        saved = load_file(out / CHECKPOINT)
        stack.load(saved)
        generator.set_state(saved.pop("generator"))
        del saved
        progress_state.update(previous["progress"])
        say(f"resuming {out}: {progress_state['tokens']:,} of {settings['tokens']:,} tokens trained")
    resumed_from = progress_state["tokens"]
    t0 = time.monotonic()
    if isinstance(corpus, SampleCorpus):
        corpus.tokens()  # sample now (with its own progress bar), not inside the first round
    progress_state["sampling"] = progress_state.get("sampling", 0.0) + time.monotonic() - t0
    held = list(_first(corpus.blocks(), held_blocks))
    if len(held) < held_blocks:
        raise NeurontraceError(
            f"the corpus {corpus.spec} holds {len(held)} blocks of {T} tokens, not more than the {held_blocks} held out "
            "for the metrics; give a larger corpus or a smaller --held-out"
        )
    n_blocks = corpus.n_blocks
    if n_blocks is not None and how == "fresh":
        train_blocks = n_blocks - held_blocks
        if train_blocks < 1:
            raise NeurontraceError(f"the corpus {corpus.spec} has no blocks left for training after the {held_blocks} held out; give a larger corpus or a smaller --held-out")  # fmt: skip
        passes = settings["tokens"] / (train_blocks * per_block)
        if passes > 1:
            say(f"the corpus holds {train_blocks * per_block:,} training tokens: {passes:.1f} passes over it")
    every = checkpoint_every_s
    if every is None:
        every = float(os.environ.get("NEURONTRACE_CHECKPOINT_SECONDS", 60.0))
    total = settings["tokens"]
    round_blocks = max(1, settings["buffer_tokens"] // per_block)
    stream = _training_blocks(corpus, held_blocks, progress_state["blocks"])
    bar = None
    if progress and progress_state["tokens"] < total:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=progress_state["tokens"], desc=f"training {L} {settings['kind']}s",
                   unit="tok", unit_scale=True, leave=False)  # fmt: skip
    last_save = time.monotonic()
    train_start = time.monotonic()
    seconds_before = progress_state["seconds"]

    def checkpoint() -> None:
        progress_state["seconds"] = seconds_before + time.monotonic() - train_start
        _save_checkpoint(out / CHECKPOINT, {**stack.tensors(), "generator": generator.get_state()},
                         {"settings": settings, "progress": progress_state})  # fmt: skip

    try:
        while progress_state["tokens"] < total:
            remaining = total - progress_state["tokens"]
            blocks = torch.stack(
                [next(stream) for _ in range(min(round_blocks, math.ceil(remaining / per_block)))]
            )
            x, y = _round_activations(model, blocks, settings, device)
            if progress_state["rounds"] == 0:
                stack.initialise(x, y, generator)
            x.div_(stack.scale_in[:, None, None])
            if y is not x:
                y.div_(stack.scale_out[:, None, None])
            n = x.shape[1]
            order = torch.randperm(n, generator=generator).to(device)
            for part in torch.tensor_split(order, max(1, round(n / settings["batch_size"]))):
                done = progress_state["tokens"]
                decay = settings["lr_decay"] * total
                scale = 1.0 if decay <= 0 else min(1.0, max(total - done, 0) / decay)
                stack.step(x[:, part], y[:, part], settings["lr"] * scale)
                progress_state["tokens"] += part.numel()
                progress_state["steps"] += 1
                if bar is not None:
                    bar.update(part.numel())
                    bar.set_postfix(fvu=f"{stack.last_fvu:.3f}", refresh=False)
            del x, y  # before the next round's buffer is filled
            progress_state["blocks"] += blocks.shape[0]
            progress_state["rounds"] += 1
            saved = False
            if progress_state["tokens"] >= total or time.monotonic() - last_save >= every:
                checkpoint()
                last_save, saved = time.monotonic(), True
            if on_round is not None:
                on_round({**progress_state, "checkpointed": saved, "fvu": stack.last_fvu})
    finally:
        if bar is not None:
            bar.close()
    t_eval = time.monotonic()
    weights = stack.dictionaries()
    dictionaries = _build(settings, weights, model)
    clean, metrics = _evaluate(
        model, torch.stack(held), dictionaries, settings, stack.since_fired, progress_state["tokens"], device
    )
    eval_s = time.monotonic() - t_eval
    seconds = {"sampling": round(progress_state["sampling"], 2), "training": round(progress_state["seconds"], 2),
               "evaluation": round(eval_s, 2), "this_call": round(time.monotonic() - started, 2)}  # fmt: skip
    result = TrainResult(out, settings, metrics, clean, progress_state["tokens"], seconds, resumed_from,
                         info={"steps": progress_state["steps"], "blocks": progress_state["blocks"],
                               "corpus": corpus.describe(), "machine": _machine(device)})  # fmt: skip
    _write(out, result, dictionaries, model)
    (out / CHECKPOINT).unlink(missing_ok=True)
    return result


def _first(blocks: Iterator[torch.Tensor], n: int) -> Iterator[torch.Tensor]:
    for i, block in enumerate(blocks):
        if i >= n:
            return
        yield block


# ------------------------------------------------------------------------------------------------ dictionaries
def _build(settings: dict, weights: dict, model: Any) -> dict[int, Any]:
    if settings["kind"] == "sae":
        from neurontrace.dictionaries.sae import SAE

        return {layer: SAE(*w, site=settings["site"], layer=layer, architecture="topk", k=settings["k"])
                for layer, w in weights.items()}  # fmt: skip
    from neurontrace.dictionaries.transcoder import Transcoder

    return {
        layer: Transcoder(*w, layer=layer, architecture="topk", k=settings["k"])
        for layer, w in weights.items()
    }


def _reconstruct(dictionary: Any, x: torch.Tensor) -> torch.Tensor:
    return dictionary.decode(dictionary.encode(x))


def _splice_hook(model: Any, settings: dict, layer: int, dictionary: Any):
    """Replace the site (SAE) or the MLP output (transcoder) at positions >= 1 by the dictionary's reconstruction."""
    from neurontrace.sites import hook_site

    if settings["kind"] == "sae":

        def fn(x: torch.Tensor) -> torch.Tensor:
            new = x.clone()
            new[:, 1:] = _reconstruct(dictionary, x[:, 1:].float()).to(x.dtype)
            return new

        return hook_site(model, settings["site"], layer, fn)

    def hook(_module: Any, args: tuple, out: Any) -> Any:
        y = _output_tensor(out)
        new = y.clone()
        new[:, 1:] = _reconstruct(dictionary, args[0][:, 1:].float()).to(y.dtype)
        return (new, *out[1:]) if isinstance(out, tuple) else new

    return model.layer_module(layer, model.adapter.mlp).register_forward_hook(hook)


def _loss_sum(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy of the predictions from positions 1 .. T-2 (position 0 is BOS)."""
    return F.cross_entropy(
        logits[:, 1:-1].float().flatten(0, 1), ids[:, 2:].flatten().to(logits.device), reduction="sum"
    )


def _evaluate(model: Any, held: torch.Tensor, dictionaries: dict[int, Any], settings: dict,
              since_fired: torch.Tensor, trained: int, device: torch.device) -> tuple[float, dict[int, LayerMetrics]]:  # fmt: skip
    layers, kind, S = settings["layers"], settings["kind"], settings["d_sae"]
    on = {layer: d.to(device=device) for layer, d in dictionaries.items()}
    sse = {layer: 0.0 for layer in layers}
    sum_y = {layer: torch.zeros(settings["d_in"], dtype=torch.float64, device=device) for layer in layers}
    sum_y2 = dict.fromkeys(layers, 0.0)
    l0 = dict.fromkeys(layers, 0.0)
    fired = {layer: torch.zeros(S, dtype=torch.bool, device=device) for layer in layers}
    spliced = dict.fromkeys(layers, 0.0)
    clean, count, predictions = 0.0, 0, 0
    with torch.no_grad():
        for chunk in held.split(EVAL_BATCH):
            x, y, logits = _capture(model, chunk, layers, kind, settings["site"], device, logits=True)
            clean += float(_loss_sum(logits, chunk))
            predictions += chunk.shape[0] * (chunk.shape[1] - 2)
            del logits
            for i, layer in enumerate(layers):
                xi, yi = x[i].reshape(-1, x.shape[-1]), y[i].reshape(-1, y.shape[-1])
                f = on[layer].encode(xi)
                rec = on[layer].decode(f)
                sse[layer] += float((rec - yi).pow(2).sum())
                sum_y[layer] += yi.double().sum(0)
                sum_y2[layer] += float(yi.double().pow(2).sum())
                l0[layer] += float((f > 0).sum())
                fired[layer] |= (f > 0).any(0)
            count += x.shape[1] * x.shape[2]
            del x, y
            for layer in layers:
                handle = _splice_hook(model, settings, layer, on[layer])
                try:
                    logits = model.hf(input_ids=chunk.to(model.device), use_cache=False).logits
                finally:
                    handle.remove()
                spliced[layer] += float(_loss_sum(logits, chunk))
                del logits
    clean_loss = clean / predictions
    window = min(settings["dead_tokens"], trained)
    metrics = {}
    for i, layer in enumerate(layers):
        sst = sum_y2[layer] - float(sum_y[layer].pow(2).sum()) / count
        dead = int(((since_fired[i] >= window) & ~fired[layer]).sum())
        loss = spliced[layer] / predictions
        metrics[layer] = LayerMetrics(variance_explained=1.0 - sse[layer] / max(sst, 1e-30), l0=l0[layer] / count,
                                      dead=dead, dead_fraction=dead / S, loss_spliced=loss,
                                      loss_increase=loss - clean_loss)  # fmt: skip
    return clean_loss, metrics


# ------------------------------------------------------------------------------------------------- output
def _write(out: Path, result: TrainResult, dictionaries: dict[int, Any], model: Any) -> None:
    from neurontrace import __version__
    from neurontrace.io import write_text_atomic

    s = result.settings
    bos, _ = special_ids(model)
    training = {k: s[k] for k in ("corpus", "d_sae", "k", "tokens", "lr", "batch_size", "seed", "aux_k",
                                  "aux_coeff", "dead_tokens", "lr_decay", "precision")}  # fmt: skip
    if s["kind"] == "sae":
        from neurontrace.dictionaries.sae import hook_of_site, save_sae

        for layer, sae in dictionaries.items():
            sae.metadata = {"model_name": s["model"], "context_size": s["context"], "prepend_bos": bos is not None,
                            "dataset_path": s["corpus"], "trained_with": f"neurontrace {__version__} train-sae",
                            "training": training, "metrics": asdict(result.metrics[layer]),
                            "clean_loss": result.clean_loss}  # fmt: skip
            save_sae(sae, out / hook_of_site(s["site"], layer))
    else:
        from neurontrace.dictionaries.transcoder import save_transcoders

        save_transcoders(dictionaries, out, model_name=s["model"])
    data = {
        "done": True,
        "neurontrace_version": __version__,
        "settings": s,
        "clean_loss": result.clean_loss,
        "metrics": {str(layer): asdict(m) for layer, m in sorted(result.metrics.items())},
        "tokens": result.tokens,
        "seconds": result.seconds,
        **result.info,
    }
    write_text_atomic(out / TRAINING_JSON, json.dumps(data, indent=2))


def _result_from_json(out: Path, data: dict) -> TrainResult:
    metrics = {int(layer): LayerMetrics(**m) for layer, m in data["metrics"].items()}
    info = {k: data[k] for k in ("steps", "blocks", "corpus", "machine") if k in data}
    return TrainResult(out, data["settings"], metrics, data["clean_loss"], data["tokens"], data["seconds"],
                       already_done=True, info=info)  # fmt: skip

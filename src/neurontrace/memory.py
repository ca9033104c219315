"""Memory planning: the expected peak memory of attribution and of graph edges, before a run.

The estimates count the tensors a run keeps alive at its peak, from the model's shape (no weights are loaded):

- **attribution** (one forward with gradients to every neuron site, one backward; RelP, AtP): per token of every
  example and per layer, what autograd saves (the MLP's gate, up, activation, product and RelP gate factor,
  ``5 d_ff``; attention's normed input, q, k, v and output, ``~2 d_model + 2 d_kv``), the neuron sites' gradients
  and scores (``2 d_ff``), in the model's dtype, plus the logits of the answer positions; after the backward has
  freed those, the float32 results (``6 d_ff`` per layer and token). The peak is the larger phase.
- **graph edges** (one forward with cut sites, then one batched backward per chunk of ``k`` targets): the forward
  keeps per token what the targets' backward needs: per layer attention's and the norms' saved tensors
  (``3 d_model + 2 d_kv``), per layer holding neuron nodes (``SOURCE_LAYER_SHARE`` of the layers before the nodes
  are known) its MLP's (``EDGE_FORWARD`` ``d_ff``), in the model's dtype; a chunk's targets lie in one layer (its largest chunk holds
  ``LARGEST_LAYER_SHARE`` of the neuron nodes before they are known), its leaves are the node units only, so one
  target holds ``BACKWARD_TRANSIENT`` ``[T, d_ff]`` float32 buffers whatever the number of source layers (and a
  logit target ``VOCAB_BUFFERS`` vocabulary-sized ones). One chunk's gradients are freed before the next
  chunk's backward. Node selection (one attribution) comes first; its sites and their gradients (model dtype),
  and the float32 activations, scores and magnitudes, stay alive while the edges are computed; a graph also holds
  ``GRAPH_FIXED`` bytes whatever its size, and a target ``TARGET_FIXED``.

The counts were checked, and the measured constants fitted, against peaks of live memory on SmolLM2-135M
(:func:`measured_peak`; ``benchmarks/bench_memory.py``, docs/benchmarks.md; ``tests/test_memory.py``).
``neurontrace estimate`` prints them; attribution and graph runs call :func:`check_fits` and stop early, with
the estimate and what to lower, when a run cannot fit.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from neurontrace.errors import NeurontraceError
from neurontrace.io import JsonResult

VOCAB_BUFFERS = 6  # vocabulary-sized float32 buffers per logit target in the batched backward (measured)
# [T, d_ff] float32 buffers per target that the batched backward of a one-layer chunk holds: the seed of the
# target layer's site, its MLP's backward, each source layer's site gradient in turn (measured: 2.9 to 3.0 on
# SmolLM2-135M at 128 to 1,024 tokens, 1 to 64 targets per chunk), and bytes per target that do not grow with
# the prompt (measured: about 100 KiB at 8 and 32 tokens, 128 targets)
BACKWARD_TRANSIENT = 3.0
TARGET_FIXED = 100 * 2**10
# d_ff-sized tensors per token that the edge forward keeps of a layer holding neuron nodes, for its targets'
# backward (the MLP's saved tensors and the replacement model's factors; measured: 3.8 at 512 tokens); every
# layer keeps attention's and the norms' saved tensors (measured: 3 d_model + 2 d_kv)
EDGE_FORWARD = 4.0
# share of the neuron nodes in the layer with the most (measured: 0.19 to 0.22 on graphs of 200 neuron nodes)
LARGEST_LAYER_SHARE = 0.25
# bytes a graph holds whatever its size: the process's first backward, bookkeeping (measured: 16 to 20 MiB
# over the counted parts at 8 to 1,024 tokens)
GRAPH_FIXED = 16 * 2**20
# the former full-leaf computation (every site tensor a leaf, chunks across layers; ``direct_effects`` with
# ``_full_leaves``): [T, d_ff] buffers per target besides its gradients of every source layer (measured: 3.5)
FULL_LEAF_TRANSIENT = 3.5
MAX_CHUNK = 512


@dataclass(frozen=True)
class Shape:
    """The sizes that memory depends on."""

    n_layers: int
    d_model: int
    d_ff: int
    vocab: int
    d_kv: int
    n_params: int
    itemsize: int  # bytes per element of the model's dtype

    @classmethod
    def of(cls, model: Any) -> Shape:
        """From a loaded :class:`~neurontrace.models.model.NeuronModel`."""
        cfg = model.config
        heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", 1)
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or model.d_model // heads
        n_params = sum(p.numel() for p in model.hf.parameters())
        if getattr(cfg, "tie_word_embeddings", False) and model.unembed.weight is not model.embed.weight:
            n_params -= model.unembed.weight.numel()  # tied in the real model (a meta-built one is not)
        return cls(model.n_layers, model.d_model, model.d_ff, model.vocab_size, kv * head_dim, n_params,
                   torch.empty((), dtype=model.dtype).element_size())  # fmt: skip


RESULTS = "results (float32, after the backward)"
SOURCE_LAYER_SHARE = 2 / 3  # share of layers holding graph nodes when they are not known yet (measured)


def attribution_bytes(
    shape: Shape, *, prompt_len: int, batch_size: int = 1, paired: bool = False, answer_positions: int = 1
) -> dict[str, int]:
    """Working memory of one attribution batch, by part (bytes); the peak is :func:`attribution_peak`."""
    s, L, T, B = shape.itemsize, shape.n_layers, prompt_len, batch_size
    return {
        "saved activations": B * T * L * (5 * shape.d_ff + 2 * shape.d_model + 2 * shape.d_kv) * s,
        "neuron gradients and scores": B * T * L * 2 * shape.d_ff * s,
        "logits": B * answer_positions * 3 * shape.vocab * 4,
        "counterfactual": B * T * L * shape.d_ff * s if paired else 0,  # the patch activations
        RESULTS: B * T * L * 6 * shape.d_ff * 4,
    }


def attribution_peak(parts: dict[str, int]) -> int:
    """The backward's parts are alive together; the float32 results are made after the backward has freed them."""
    return max(sum(v for k, v in parts.items() if k != RESULTS), parts[RESULTS] + parts["counterfactual"])


def auto_batch_size(shape: Shape, *, prompt_len: int, paired: bool = False, device: Any = None,
                    cap: int = 64, share: float = 0.25) -> int:  # fmt: skip
    """The largest attribution batch (at most ``cap``) whose estimated peak fits in ``share`` of the free memory."""
    one = attribution_peak(attribution_bytes(shape, prompt_len=prompt_len, paired=paired))
    budget = int(available_bytes(device) * share)
    return int(max(1, min(cap, budget // max(1, one))))


def edge_bytes_per_target(
    shape: Shape,
    *,
    prompt_len: int,
    source_layers: int | None = None,
    logits: bool = False,
    full_leaves: bool = False,
) -> int:
    """Memory one target of a graph's batched backward needs (bytes).

    A chunk's targets lie in one layer and its leaves are the node units only, so a target holds the backward's
    ``[T, d_ff]``-sized transients (``BACKWARD_TRANSIENT``), whatever the number of source layers; a logit target
    (``logits``) also ``VOCAB_BUFFERS`` vocabulary-sized buffers. ``full_leaves``: the former computation (every
    site tensor a leaf), whose target also held its gradient of every source layer's neurons; without
    ``source_layers``, a measured share of all layers."""
    T = prompt_len
    if full_leaves:
        L = round(shape.n_layers * SOURCE_LAYER_SHARE) if source_layers is None else source_layers
        return int(4 * (T * (L + FULL_LEAF_TRANSIENT) * shape.d_ff + VOCAB_BUFFERS * shape.vocab))
    vocab = VOCAB_BUFFERS * shape.vocab if logits else 0
    return int(4 * (T * BACKWARD_TRANSIENT * shape.d_ff + vocab) + TARGET_FIXED)


def graph_bytes(
    shape: Shape,
    *,
    prompt_len: int,
    nodes: int,
    logits: int = 5,
    chunk: int | None = None,
    largest_layer: int | None = None,
    node_layers: int | None = None,
) -> dict[str, int]:
    """Working memory of a graph, by part (bytes); the peak is :func:`graph_peak`. The parts named ``edges: ...``,
    with the adjacency and the fixed part, are the edge computation's own
    (:func:`neurontrace.graphs.build.direct_effects` run alone); ``largest_layer``: the neuron nodes in the layer
    with the most, ``node_layers``: the layers holding neuron nodes, when known."""
    T, L, s = prompt_len, shape.n_layers, shape.itemsize
    targets = nodes + logits
    cap = chunk or MAX_CHUNK
    in_layer = math.ceil(nodes * LARGEST_LAYER_SHARE) if largest_layer is None else largest_layer
    k, k_logits = min(in_layer, cap), min(logits, cap)
    selection = attribution_bytes(shape, prompt_len=T)
    backward = max(
        k * edge_bytes_per_target(shape, prompt_len=T),
        k_logits * edge_bytes_per_target(shape, prompt_len=T, logits=True),
    )
    kept = T * L * shape.d_ff * (2 * s + 3 * 4)
    if node_layers is None:
        node_layers = min(nodes, round(L * SOURCE_LAYER_SHARE))
    forward = T * (L * (3 * shape.d_model + 2 * shape.d_kv) + node_layers * EDGE_FORWARD * shape.d_ff) * s
    return {
        "node selection (one attribution)": attribution_peak(selection),
        "kept from node selection (sites, grads, scores)": kept,
        "fixed (first backward, bookkeeping)": GRAPH_FIXED,
        "edges: saved forward": int(forward),
        f"edges: batched backward ({max(k, k_logits)} targets at once)": backward,
        "adjacency": (targets + T) ** 2 * 4,
    }


def graph_peak(parts: dict[str, int]) -> int:
    """Node selection comes first and is freed; the edges' parts are alive together."""
    selection = parts["node selection (one attribution)"]
    return max(selection, sum(v for k, v in parts.items() if not k.startswith("node selection")))


def available_bytes(device: torch.device | str | None = None) -> int:
    """Free memory where the run happens: CUDA's free memory, else the host's MemAvailable."""
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: do not refuse


def check_fits(needed: int, *, what: str, lower: str, device: torch.device | str | None = None) -> None:
    """Stop early, with the estimate and what to lower, if ``needed`` bytes will not fit.

    ``NEURONTRACE_NO_MEMORY_CHECK=1`` skips the check (the estimate is an estimate).
    """
    if os.environ.get("NEURONTRACE_NO_MEMORY_CHECK"):
        return
    free = available_bytes(device)
    if needed > free:
        raise NeurontraceError(
            f"{what} needs about {gib(needed)} but only {gib(free)} is free; lower {lower}, or load the model in "
            "bfloat16 (--dtype bfloat16), or set NEURONTRACE_NO_MEMORY_CHECK=1 to try anyway"
        )


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


@dataclass
class MemoryEstimate(JsonResult):
    """What ``neurontrace estimate`` prints: bytes by part, and the peaks."""

    model: str
    dtype: str
    prompt_len: int
    batch_size: int
    nodes: int
    weights: int
    attribution: dict[str, int]
    graph: dict[str, int]
    attribution_peak: int = 0
    graph_peak: int = 0
    available: int = 0
    schema_version: int = field(default=1)


def estimate(model: Any, *, prompt_len: int, nodes: int = 200, batch_size: int = 1, paired: bool = False,
             logits: int = 5, device: Any = None, chunk: int | None = None) -> MemoryEstimate:  # fmt: skip
    """Memory estimate for ``model`` (a loaded NeuronModel, or one built on ``meta``) at ``prompt_len`` tokens;
    ``available`` is the free memory of ``device`` (default: the model's); ``chunk``: targets per batched
    backward of the graph edges (default: all, at most 512)."""
    if prompt_len < 1 or nodes < 0 or batch_size < 1:
        raise NeurontraceError("--prompt-len and --batch-size must be at least 1, --nodes at least 0")
    shape = Shape.of(model)
    attr = attribution_bytes(shape, prompt_len=prompt_len, batch_size=batch_size, paired=paired)
    graph = graph_bytes(shape, prompt_len=prompt_len, nodes=nodes, logits=logits, chunk=chunk)
    return MemoryEstimate(
        model.name, str(model.dtype).replace("torch.", ""), prompt_len, batch_size, nodes,
        shape.n_params * shape.itemsize, attr, graph, attribution_peak(attr), graph_peak(graph),
        available_bytes(device if device is not None else model.device),
    )  # fmt: skip


def measured_peak(fn: Any) -> tuple[Any, int]:
    """Run ``fn()`` and return its result and the peak resident memory it added (bytes; Linux, CPU).

    Makes glibc serve blocks over 64 KiB from mmap, returns freed heap memory to the system and resets the
    kernel's high-water mark
    (``/proc/self/clear_refs``) first, so the peak is this call's own whatever ran before; run it in a fresh
    process after a warm-up forward for numbers that compare with :func:`estimate`.
    """

    def read(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        raise NeurontraceError("peak memory is measured from /proc (Linux only)")

    import gc

    gc.collect()
    try:  # glibc: large blocks straight from mmap and back on free, and freed heap memory handed back, so
        import ctypes  # resident memory follows the live tensors (as the CUDA allocator's statistics do)

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD = 64 KiB
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = read("VmRSS:")
    result = fn()
    return result, read("VmHWM:") - before

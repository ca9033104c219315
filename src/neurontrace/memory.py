"""Memory planning: the expected peak memory of attribution and of graph edges, before a run.

The estimates predict how much a run raises the process's peak resident memory on a CPU (what the operating
system sees: max RSS, over that of the loaded model; on a GPU they are meant for the CUDA allocator's peak, not
measured yet). They count the tensors a run keeps alive at its peak, from the model's shape (no weights are
loaded), with ``s`` bytes per element of the model's dtype and per value (one neuron at one layer and position
of one example):

- **attribution** (one forward with gradients to every neuron site, one backward; RelP, AtP): the forward keeps
  per token and layer ``SAVED_MLP`` ``d_ff``-sized tensors (the neuron site, the identity rule's ratio, the half
  rule's two factors) and attention's and the norms' ``2 d_model + 2 d_kv`` (query and output, key and value),
  ``s`` bytes each, plus the logits of the answer positions; the backward frees them as it goes. Then come the
  results, at least float32: while scores are formed, the sites, their gradients (as given and promoted), the
  stacked activations and their baseline, the differences and the scores (``4s + 12`` bytes per value of every
  example); as a batch is added up, its scores and activations and their masked float32 copies (``12 + s``),
  with the per-position sums of scores and activations (8 bytes per value, whatever the batch). The peak is
  the larger phase; a dataset's batches after the first also hold those sums during their backward.
- **graph edges** (one forward with cut sites, then one batched backward per chunk of ``k`` targets): node
  selection (an attribution whose float32 activations, stacked first, and the sites' gradients are alive during
  its backward) comes first; its activations, scores and their mean (float32) stay alive while the edges are
  computed. The edge forward keeps per token, in the model's dtype, attention's and the norms' tensors in every
  layer and the MLP's (``SAVED_MLP`` ``d_ff``) in each layer holding neuron nodes (``SOURCE_LAYER_SHARE`` of the
  layers before the nodes are known). A chunk's targets lie in one layer (the largest chunk holds
  ``LARGEST_LAYER_SHARE`` of the neuron nodes before they are known) and its leaves are the node units only, so
  one target holds ``BACKWARD_TRANSIENT`` ``[T, d_ff]`` float32 buffers whatever the number of source layers
  (and a logit target ``VOCAB_BUFFERS`` vocabulary-sized ones); one chunk's gradients are freed before the next
  chunk's backward. A graph also holds ``GRAPH_FIXED`` bytes whatever its size, and a target ``TARGET_FIXED``.

For the resident memory to follow the tensors, attribution and graphs fix glibc's mmap threshold while they
run (:class:`pin_allocator`): with glibc's default, freed tensors stay in its heap, fragmented, and the same
run's peak varied by 2x from run to run. Checked against the process's peak on SmolLM2-135M: 0.96-1.05 of it
for attribution at 512 to 2,048 tokens and graphs at 512 and 1,024 (``benchmarks/bench_memory.py``,
docs/benchmarks.md, "Peak memory"; ``tests/test_memory.py``); the constants marked measured come from glibc's
count of live blocks (``mallinfo2``) at the points named. ``neurontrace estimate``
prints them; attribution and graph runs call :func:`check_fits` and stop early, with the estimate and what to
lower, when a run cannot fit.
"""

from __future__ import annotations

import contextlib
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
# d_ff-sized tensors per token and layer that a forward with gradients keeps of an MLP whose neuron site is
# live, for the backward: the site, the identity rule's ratio, the half rule's two factors (measured on
# SmolLM2-135M: 4.05 per layer holding graph nodes, at 32 and 128 tokens); attention and the norms keep
# 2 d_model + 2 d_kv (measured: 1.06 times that); together 5.13 [T, d_ff] float32 tensors per layer in an
# attribution (measured at 64 and 256 tokens; counted: 5.0)
SAVED_MLP = 4
# share of the neuron nodes in the layer with the most (measured: 0.19 to 0.22 on graphs of 200 neuron nodes)
LARGEST_LAYER_SHARE = 0.25
# bytes a graph holds besides its counted parts, whatever its size (measured: 3 to 5 MiB at 32 and 128 tokens)
GRAPH_FIXED = 4 * 2**20
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
RUNNING_SUMS = "running sums (datasets)"  # float32, from the second batch on
SOURCE_LAYER_SHARE = 2 / 3  # share of layers holding graph nodes when they are not known yet (measured)


def _saved_per_token(shape: Shape, *, mlp_layers: int) -> int:
    """Elements per token that a forward with gradients keeps for the backward: attention's and the norms' in
    every layer, the MLP's in ``mlp_layers`` layers (those whose neuron site is live)."""
    return shape.n_layers * (2 * shape.d_model + 2 * shape.d_kv) + mlp_layers * SAVED_MLP * shape.d_ff


def attribution_bytes(
    shape: Shape, *, prompt_len: int, batch_size: int = 1, paired: bool = False, answer_positions: int = 1
) -> dict[str, int]:
    """Working memory of one attribution batch, by part (bytes); the peak is :func:`attribution_peak`."""
    s, L, T, B = shape.itemsize, shape.n_layers, prompt_len, batch_size
    values = T * L * shape.d_ff  # neuron values of one example
    return {
        "saved activations": B * T * _saved_per_token(shape, mlp_layers=L) * s,
        "logits": B * answer_positions * 3 * shape.vocab * 4,
        "counterfactual": B * values * s if paired else 0,  # the patch activations
        RUNNING_SUMS: values * 2 * 4,
        # while scores are formed (4s + 12 per value of every example), or as the batch is added up (12 + s per
        # value of every example, 8 for the per-position sums): see the module's docstring
        RESULTS: values * max(B * (4 * s + 12), B * (12 + s) + 8),
    }


def attribution_peak(parts: dict[str, int]) -> int:
    """The backward's parts are alive together; the results are made after the backward has freed them."""
    backward = sum(v for k, v in parts.items() if k != RESULTS)
    return max(backward, parts[RESULTS] + parts["counterfactual"])


def auto_batch_size(shape: Shape, *, prompt_len: int, paired: bool = False, device: Any = None,
                    cap: int = 64, share: float = 0.25) -> int:  # fmt: skip
    """The largest attribution batch (at most ``cap``) whose estimated peak fits in ``share`` of the free memory."""
    budget = int(available_bytes(device) * share)
    fits = [b for b in range(1, cap + 1)
            if attribution_peak(attribution_bytes(shape, prompt_len=prompt_len, batch_size=b, paired=paired))
            <= budget]  # fmt: skip
    return max(fits, default=1)


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


def selection_bytes(shape: Shape, *, prompt_len: int) -> int:
    """Peak memory of a graph's node selection (bytes): during its backward, the forward's saved activations,
    the float32 activations (stacked before it) and the sites' gradients, and the logits."""
    T, s = prompt_len, shape.itemsize
    values = T * shape.n_layers * shape.d_ff
    return T * _saved_per_token(shape, mlp_layers=shape.n_layers) * s + values * (4 + s) + 3 * shape.vocab * 4


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
    values = T * L * shape.d_ff
    backward = max(
        k * edge_bytes_per_target(shape, prompt_len=T),
        k_logits * edge_bytes_per_target(shape, prompt_len=T, logits=True),
    )
    if node_layers is None:
        node_layers = min(nodes, round(L * SOURCE_LAYER_SHARE))
    forward = T * _saved_per_token(shape, mlp_layers=node_layers) * s
    return {
        "node selection (one attribution)": selection_bytes(shape, prompt_len=T),
        "kept from node selection (acts, scores, mean)": values * 3 * 4,
        "fixed (bookkeeping)": GRAPH_FIXED,
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


# during a run, glibc serves blocks from this size on from mmap, and unmaps them when freed
MMAP_THRESHOLD = 64 * 2**10
# after it: glibc's own largest mmap threshold, and twice it for trimming the heap (as glibc raises them)
RELEASED_THRESHOLDS = (32 * 2**20, 64 * 2**20)
_depth = 0


def _mallopt(settings: dict[int, int]) -> bool:
    if os.environ.get("NEURONTRACE_ALLOCATOR") == "default":
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return all([bool(libc.mallopt(param, value)) for param, value in settings.items()])
    except (OSError, AttributeError):  # not glibc (musl, macOS): its own allocator
        return False


class pin_allocator(contextlib.ContextDecorator):
    """While an attribution or a graph runs, make the C allocator hand freed tensor memory back to the system at
    once, so that the process's resident memory follows its live tensors (what the estimates count).

    glibc raises its mmap threshold each time it frees a large block (up to 32 MiB), after which tensors come
    from its heap, whose freed holes it keeps and fragments: one 512-token attribution of SmolLM2-135M then
    raised the process's peak by 0.9 GiB in some runs and 1.9 GiB in others, 0.63 GiB every time with the
    threshold fixed at ``MMAP_THRESHOLD`` (estimate: 0.62 GiB; docs/benchmarks.md, "Peak memory"). The fixed
    threshold costs a page fault per 4 KiB of each new large tensor (measured on a 2-core VM: 30-45% more time
    for that attribution, none at 1,024 tokens, 30% for a graph of 512 tokens), so the outermost run sets
    ``RELEASED_THRESHOLDS`` when it ends (glibc's own raising cannot be restored; an evaluation sweep after it
    ran as fast as without). ``NEURONTRACE_ALLOCATOR=default`` keeps glibc's own settings (the estimates then
    undercount, by up to 3x). A decorator or a ``with`` block; nested runs pin once.
    """

    def __enter__(self) -> pin_allocator:
        global _depth
        if _depth == 0:
            _mallopt({-3: MMAP_THRESHOLD})  # M_MMAP_THRESHOLD (which also ends glibc's own raising)
        _depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        global _depth
        _depth -= 1
        if _depth == 0:
            _mallopt({-3: RELEASED_THRESHOLDS[0], -1: RELEASED_THRESHOLDS[1]})  # M_MMAP_, M_TRIM_THRESHOLD


def check_fits(needed: int, *, what: str, lower: str, device: torch.device | str | None = None) -> None:
    """Stop early, with the estimate and what to lower, if ``needed`` bytes will not fit (the pre-run check).

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
    """Run ``fn()`` and return its result and how much it raised the process's peak resident memory (bytes;
    Linux, CPU).

    Resets the kernel's high-water mark (``/proc/self/clear_refs``) first, so the peak is this call's own
    whatever ran before; attribution and graphs fix the allocator themselves while they run
    (:class:`pin_allocator`), other code runs with glibc's settings. It does not hand the heap's free pages back
    first (``malloc_trim``): the call would fault them in again, and count them. Run it in a fresh process after loading the model and one forward for numbers that compare with
    :func:`estimate` (the same as the peak over that of the loaded model, ``benchmarks/bench_memory.py``).
    """

    def read(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        raise NeurontraceError("peak memory is measured from /proc (Linux only)")

    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = read("VmRSS:")
    result = fn()
    return result, read("VmHWM:") - before

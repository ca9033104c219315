"""Data-parallel runs with ``torch.distributed``: split the examples over processes, reduce the sums.

Launched by ``torchrun`` (or ``accelerate launch``), which sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``, each process takes a contiguous share of the examples (:func:`shard`), and
the results are combined with tensor collectives so that every process ends with the result one process would
have computed. The process group is created lazily, on the first call of :func:`world` with ``WORLD_SIZE > 1``:
``gloo`` for CPU tensors, plus ``nccl`` for CUDA tensors when CUDA is available. Without ``WORLD_SIZE`` (or with
``WORLD_SIZE=1``) every function here is an identity and no process group is created.

Only the main process (rank 0) writes result files, prints and shows progress bars; the others still compute.
"""

from __future__ import annotations

import atexit
import os
from typing import NamedTuple

import torch

from neurontrace.errors import NeurontraceError


class World(NamedTuple):
    """This process's rank and the number of processes."""

    rank: int
    size: int


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        raise NeurontraceError(
            f"environment variable {name}={os.environ[name]!r} is not an integer"
        ) from None


def launched() -> bool:
    """Whether this process is one of several: ``WORLD_SIZE > 1``, or a process group of more than one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    return _env_int("WORLD_SIZE", 1) > 1


def local_rank() -> int:
    """This process's index on its machine (``LOCAL_RANK``; 0 when not launched distributed)."""
    return _env_int("LOCAL_RANK", 0) if launched() else 0


def backend() -> str:
    """The process-group backend: gloo, with nccl for CUDA tensors when CUDA is available."""
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def world() -> World:
    """Rank and world size; creates the process group from the launcher's environment on first use."""
    import torch.distributed as dist

    if not launched():
        return World(0, 1)
    if not dist.is_available():
        raise NeurontraceError("this torch build has no torch.distributed; run one process")
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank() % torch.cuda.device_count())
        dist.init_process_group(backend=backend())
        atexit.register(_destroy)
    return World(dist.get_rank(), dist.get_world_size())


def _destroy() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def is_main() -> bool:
    """Whether this is the process that writes files and prints (rank 0, or the only process)."""
    import torch.distributed as dist

    if not launched():
        return True
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return _env_int("RANK", 0) == 0  # before the process group exists


def split(n: int, rank: int, size: int) -> range:
    """The ``rank``-th of ``size`` contiguous, nearly equal parts of ``range(n)`` (the first parts one longer)."""
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def shard(n: int) -> range:
    """This process's contiguous share of ``range(n)``: gathering per-example rows in rank order restores the
    original order. Some shares are empty when there are fewer items than processes."""
    rank, size = world()
    return split(n, rank, size)


def barrier() -> None:
    """Wait for every process (no-op in one process)."""
    import torch.distributed as dist

    if world().size > 1:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``tensor`` over every process (a new tensor; the input in one process)."""
    import torch.distributed as dist

    if world().size == 1:
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Every process's rows concatenated in rank order (the row counts may differ, the other sizes must not).

    Each process pads its rows to the largest count for ``all_gather``; the padding is dropped again.
    """
    import torch.distributed as dist

    size = world().size
    if size == 1:
        return tensor
    tensor = tensor.detach().contiguous()
    count = torch.tensor([tensor.shape[0]], dtype=torch.long, device=tensor.device)
    counts = [torch.zeros_like(count) for _ in range(size)]
    dist.all_gather(counts, count)
    rows = [int(c) for c in counts]
    padded = tensor.new_zeros((max(rows), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:r] for part, r in zip(parts, rows, strict=True)])

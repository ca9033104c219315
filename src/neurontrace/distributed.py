"""Data-parallel runs with ``torch.distributed``: split the examples over processes, reduce the sums.

Launched by ``torchrun`` (or ``accelerate launch``), which sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``, each process takes a contiguous share of the examples (:func:`shard`), and
the results are combined with tensor collectives so that every process ends with the result one process would
have computed. The process group is created lazily, on the first call of :func:`world` with ``WORLD_SIZE > 1``:
``gloo`` for CPU tensors, plus ``nccl`` for CUDA tensors when CUDA is available. Without ``WORLD_SIZE`` (or with
``WORLD_SIZE=1``) every function here is an identity and no process group is created.

Only the main process (rank 0) writes result files, prints and shows progress bars; the others still compute.

When one process stops (an error, ``kill -9``, the out-of-memory killer), the others stop too, each with one line
instead of a traceback: a collective that waits for the gone process fails with gloo's "connection closed by
peer", which our collectives turn into :class:`PeerStopped` (the CLI prints it and exits with 3); a process still
computing is sent SIGTERM by the launcher, which :func:`stop_on_sigterm` turns into one line and exit code
:data:`EXIT_TERMINATED`. Either line says whether rerunning the same command resumes from a checkpoint
(:func:`note_resumable`).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
from pathlib import Path
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


EXIT_TERMINATED = 143
"""Exit code of a process stopped by SIGTERM under the launcher (128 + 15, the shell's code for SIGTERM)."""


class PeerStopped(RuntimeError):
    """A collective failed because another process of the run is gone (killed, crashed, or stopped on an error).

    The message is the one line the CLI prints; the collective's own error is the ``__cause__``.
    """


_resumable: set[Path] = set()


def note_resumable(path: str | os.PathLike) -> None:
    """Note a checkpoint file or a results folder from which rerunning the same command resumes.

    The line printed when another process stops says to rerun only if one of them exists by then.
    """
    _resumable.add(Path(path))


def _where() -> str:
    # from the launcher's variables: also right before the process group exists, and safe in a signal handler
    try:
        return f"process {_env_int('RANK', 0)} of {_env_int('WORLD_SIZE', 1)}"
    except NeurontraceError:
        return "this process"


def _resume_hint() -> str:
    if not _resumable:
        return ""
    saved = any(p.is_file() or (p.is_dir() and any(p.iterdir())) for p in _resumable)
    if saved:
        return "; rerun the same command, with the same number of processes, to resume from the checkpoint"
    return "; nothing was checkpointed yet, so rerunning the same command starts over"


def peer_stopped_message() -> str:
    """The line (without ``neurontrace: error:``) of a process whose collective found another process gone."""
    return (
        f"{_where()}: another process of this run stopped (killed or crashed; its error, if it printed one, "
        f"is above), so this one stops too{_resume_hint()}"
    )


def terminated_message() -> str:
    """The line (without ``neurontrace: error:``) of a process that the launcher stopped with SIGTERM."""
    return (
        f"{_where()}: stopped by the launcher (SIGTERM), which stops every process once one of them has stopped "
        f"(killed or crashed; its error, if it printed one, is above) or the run is cancelled{_resume_hint()}"
    )


def stop_on_sigterm() -> None:
    """Under ``torchrun``: on SIGTERM print :func:`terminated_message` as one line and exit with
    :data:`EXIT_TERMINATED`, instead of vanishing silently with the launcher's traceback as the only trace.

    The launcher sends SIGTERM to every other process as soon as one has stopped. Installed only under several
    processes, from the main thread, and only where SIGTERM still has its default action (which would end the
    process anyway, skipping every clean-up just as ``os._exit`` does). Called as a command starts, it also
    forgets the paths an earlier command of this process noted (:func:`note_resumable`).
    """
    _resumable.clear()
    if not launched():
        return
    with contextlib.suppress(ValueError):  # not the main thread: signal handlers can only be set there
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _on_sigterm)


def stopping() -> None:
    """This process is printing its last line and exiting: a SIGTERM from now on adds no second line."""
    if not launched():
        return
    with contextlib.suppress(ValueError):  # not the main thread
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _on_sigterm(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM adds no second line
    for stream in (sys.stdout, sys.stderr):
        # the main thread may have been writing to it: a flush here then raises
        with contextlib.suppress(Exception):
            stream.flush()
    os.write(2, f"neurontrace: error: {terminated_message()}\n".encode())
    os._exit(EXIT_TERMINATED)


def _peer_gone(exc: RuntimeError) -> bool:
    """Whether ``exc``, raised by a collective, means that another process of the run has gone."""
    import torch.distributed as dist

    kinds = tuple(k for k in (getattr(dist, "DistError", None),) if k is not None)
    text = str(exc)
    signs = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")
    return isinstance(exc, kinds) or any(sign in text for sign in signs)


def _collective(run, *args, **kwargs) -> None:
    """Run the ``torch.distributed`` collective ``run``; a peer that has gone raises :class:`PeerStopped`."""
    try:
        run(*args, **kwargs)
    except RuntimeError as exc:
        if _peer_gone(exc):
            raise PeerStopped(peer_stopped_message()) from exc
        raise


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
        _collective(dist.barrier)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``tensor`` over every process (a new tensor; the input in one process)."""
    import torch.distributed as dist

    if world().size == 1:
        return tensor
    out = tensor.detach().clone()
    _collective(dist.all_reduce, out, op=dist.ReduceOp.SUM)
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
    _collective(dist.all_gather, counts, count)
    rows = [int(c) for c in counts]
    padded = tensor.new_zeros((max(rows), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(size)]
    _collective(dist.all_gather, parts, padded)
    return torch.cat([part[:r] for part, r in zip(parts, rows, strict=True)])

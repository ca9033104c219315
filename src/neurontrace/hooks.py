"""Hook plumbing shared by capture, interventions and attribution.

Two things live here: reading/replacing the tensor at a hook point (module input or output, tuple or not), and
:class:`RunState`, which follows the padding and the cache offset of the forward pass in flight so that
prompt-relative positions can be mapped to the columns of the tensors a hook sees (also during generation,
when each step sees one new column).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from neurontrace.errors import InterventionError

TensorFn = Callable[[torch.Tensor], "torch.Tensor | None"]


def add_input_hook(module: nn.Module, fn: TensorFn) -> Any:
    """Call ``fn`` on the module's first positional input; a returned tensor replaces it."""

    def pre_hook(_mod: nn.Module, args: tuple) -> tuple | None:
        new = fn(args[0])
        if new is None:
            return None
        return (new, *args[1:])

    return module.register_forward_pre_hook(pre_hook)


def add_output_hook(module: nn.Module, fn: TensorFn) -> Any:
    """Call ``fn`` on the module's output (the first element if it returns a tuple); a returned tensor replaces it."""

    def hook(_mod: nn.Module, _args: tuple, out: Any) -> Any:
        if isinstance(out, tuple):
            new = fn(out[0])
            return None if new is None else (new, *out[1:])
        return fn(out)

    return module.register_forward_hook(hook)


@contextmanager
def hooks_removed_on_exit() -> Iterator[list]:
    """Collect hook handles; all are removed on exit, also after an exception."""
    handles: list = []
    try:
        yield handles
    finally:
        for h in handles:
            h.remove()


@dataclass
class RunState:
    """Padding and cache offset of the forward pass in flight (set by :func:`track_positions`)."""

    pad: torch.Tensor | None = None  # [B] left-padding columns per row
    total: int = 0  # columns seen so far, this chunk included (attention-mask width)
    chunk: int = 0  # columns in this forward call
    _cache: dict = field(default_factory=dict)

    @property
    def chunk_start(self) -> int:
        return self.total - self.chunk

    def position_mask(self, positions: Sequence[int], device: torch.device) -> torch.Tensor:
        """``[B, chunk]`` boolean mask of the columns holding the prompt-relative ``positions``."""
        key = (tuple(positions), str(device))
        if key in self._cache:
            return self._cache[key]
        pad = self.pad.to(device)
        length = self.total - pad  # [B]
        cols = torch.arange(self.chunk_start, self.total, device=device)
        rel = cols[None, :] - pad[:, None]  # [B, chunk] prompt-relative position
        want = torch.as_tensor(list(positions), device=device, dtype=torch.long)
        eff = torch.where(want[None, :] < 0, length[:, None] + want[None, :], want[None, :])  # [B, P]
        bad = (eff < 0) | (eff >= length[:, None])
        if bad.any():
            row, j = (int(i) for i in bad.nonzero()[0])
            raise InterventionError(
                f"position {positions[j]} is outside prompt {row}, which has {int(length[row])} tokens"
            )
        mask = (rel[:, :, None] == eff[:, None, :]).any(dim=-1)
        self._cache[key] = mask
        return mask


def _cache_offset(kwargs: dict) -> int:
    """Columns already in the key/value cache when a forward call has no attention mask (no padding then).

    transformers has passed this as ``cache_position``, as a cache object under ``past_key_values`` (5.23) or
    ``cache`` (5.24), and always as ``position_ids``; try them in that order.
    """
    cache_position = kwargs.get("cache_position")
    if isinstance(cache_position, torch.Tensor) and cache_position.numel():
        return int(cache_position.flatten()[0])
    for name in ("past_key_values", "cache"):
        cache = kwargs.get(name)
        if hasattr(cache, "get_seq_length"):
            return int(cache.get_seq_length())
    position_ids = kwargs.get("position_ids")
    if isinstance(position_ids, torch.Tensor) and position_ids.numel():
        return int(position_ids.reshape(-1, position_ids.shape[-1])[0, 0])
    return 0


@contextmanager
def track_positions(hf_model: nn.Module) -> Iterator[RunState]:
    """Follow the attention mask of every forward call of ``hf_model`` in a :class:`RunState`.

    Works for plain calls and for ``generate`` (where the mask grows by one column per step). Batches must be
    left-padded, as :class:`neurontrace.tokens.Batch` makes them.
    """
    state = RunState()

    def pre_hook(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        batch, chunk = ids.shape[0], ids.shape[1]
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            state.pad = (mask.cumsum(dim=1) == 0).sum(dim=1)
            state.total = mask.shape[1]
        else:  # no mask (transformers drops an all-ones mask in generate): find the cache offset instead
            start = _cache_offset(kwargs)
            state.pad = torch.zeros(batch, dtype=torch.long, device=ids.device)
            state.total = start + chunk
        state.chunk = chunk
        state._cache.clear()

    handle = hf_model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield state
    finally:
        handle.remove()

"""Interventions on any set of (layer, position, unit) at any site, as a context manager.

>>> edits = [Edit(layer=5, neurons=[123], op="zero"), Edit(layer=12, neurons=[7], positions=[-1], op="scale", value=2)]
>>> with intervene(model, edits):
...     logits = model.logits(batch)

Operations: ``set`` (to a number or tensor), ``scale`` (multiply), ``add``, ``zero``, ``mean`` (set to a given
mean, e.g. a dataset mean) and ``patch`` (take the values of another run, given as that run's captured
activations in the same padded layout). Positions are prompt-relative (see :mod:`neurontrace.tokens`).
Every hook is removed on exit, also after an exception.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch

from neurontrace.errors import InterventionError
from neurontrace.hooks import RunState, hooks_removed_on_exit, track_positions
from neurontrace.models.model import NeuronModel
from neurontrace.sites import check_site, hook_site, site_width

Op = Literal["set", "scale", "add", "zero", "mean", "patch"]
OPS: tuple[str, ...] = ("set", "scale", "add", "zero", "mean", "patch")


@dataclass(frozen=True)
class Edit:
    """One intervention.

    Args:
        layer: decoder layer.
        neurons: unit indices at the site (None: all units).
        positions: prompt-relative positions (None: every position).
        op: one of ``set, scale, add, zero, mean, patch``.
        value: a number; a tensor ``[len(neurons)]`` (or ``[width]`` when ``neurons`` is None); or, for ``patch``
            and per-example values, a tensor ``[B, T, width]`` in the batch's padded layout.
        site: ``neurons`` (default), ``mlp_out``, ``attn_out`` or ``resid``.
    """

    layer: int
    neurons: Sequence[int] | None = None
    positions: Sequence[int] | None = None
    op: Op = "zero"
    value: float | torch.Tensor | None = None
    site: str = "neurons"


def _unit_mask(edit: Edit, width: int, device: torch.device) -> torch.Tensor | None:
    if edit.neurons is None:
        return None
    idx = torch.as_tensor(list(edit.neurons), dtype=torch.long)
    if idx.numel() and (idx.min() < 0 or idx.max() >= width):
        bad = next(int(i) for i in idx if not 0 <= i < width)
        raise InterventionError(f"unit {bad} does not exist at site {edit.site!r}, which has {width} units")
    mask = torch.zeros(width, dtype=torch.bool)
    mask[idx] = True
    return mask.to(device)


def _value_tensor(edit: Edit, width: int) -> torch.Tensor | float:
    """The edit's value as a scalar, a ``[width]`` vector or a ``[B, T, width]`` tensor."""
    if edit.op == "zero":
        return 0.0
    if edit.value is None:
        raise InterventionError(f"edit op {edit.op!r} needs a value")
    value = edit.value
    if not isinstance(value, torch.Tensor):
        if edit.op == "patch":
            raise InterventionError("a patch needs the other run's activations as a [B, T, width] tensor")
        return float(value)
    if value.dim() == 3:
        if value.shape[-1] != width:
            raise InterventionError(f"value has width {value.shape[-1]}, the site has {width} units")
        return value
    if edit.op == "patch":
        raise InterventionError("a patch needs the other run's activations as a [B, T, width] tensor")
    value = value.reshape(-1)
    if edit.neurons is None:
        if value.numel() != width:
            raise InterventionError(f"value has {value.numel()} entries but the site has {width} units")
        return value
    if value.numel() != len(edit.neurons):
        raise InterventionError(f"value has {value.numel()} entries for {len(edit.neurons)} neurons")
    full = torch.zeros(width, dtype=value.dtype)
    full[torch.as_tensor(list(edit.neurons))] = value
    return full


class _Applier:
    """Applies one validated edit to the tensor at its site."""

    def __init__(self, edit: Edit, width: int, state: RunState) -> None:
        if edit.op not in OPS:
            raise InterventionError(f"unknown intervention {edit.op!r}; choose one of {', '.join(OPS)}")
        self.edit, self.state = edit, state
        self.units = _unit_mask(edit, width, torch.device("cpu"))
        self.value = _value_tensor(edit, width)
        self.positions = None if edit.positions is None else list(edit.positions)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        op, value = self.edit.op, self.value
        if isinstance(value, torch.Tensor):
            value = value.to(device=x.device, dtype=x.dtype)
            if value.dim() == 3:
                start = self.state.chunk_start
                if value.shape[0] != x.shape[0] or value.shape[1] < start + x.shape[1]:
                    raise InterventionError(
                        f"value of shape {tuple(value.shape)} does not fit the batch {tuple(x.shape[:2])}"
                    )
                value = value[:, start : start + x.shape[1]]
        if op == "scale":
            new = x * value
        elif op == "add":
            new = x + value
        else:  # set, zero, mean, patch
            new = torch.as_tensor(value, dtype=x.dtype, device=x.device).expand_as(x)
        mask = None
        if self.units is not None:
            mask = self.units.to(x.device)[None, None, :]
        if self.positions is not None:
            pos = self.state.position_mask(self.positions, x.device)[:, :, None]
            mask = pos if mask is None else mask & pos
        if mask is None:
            return new.contiguous()
        return torch.where(mask, new, x)


@contextmanager
def intervene(model: NeuronModel, edits: Sequence[Edit] | Edit) -> Iterator[None]:
    """Apply ``edits`` to every forward pass of ``model`` inside the block; all hooks go on exit."""
    edits = [edits] if isinstance(edits, Edit) else list(edits)
    with track_positions(model.hf) as state, hooks_removed_on_exit() as handles:
        for edit in edits:
            check_site(edit.site)
            if not 0 <= edit.layer < model.n_layers:
                raise InterventionError(
                    f"layer {edit.layer} does not exist; the model has layers 0..{model.n_layers - 1}"
                )
            applier = _Applier(edit, site_width(model, edit.site), state)
            handles.append(hook_site(model, edit.site, edit.layer, applier))
        yield

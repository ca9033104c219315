"""Where the parts of a dispatched model live, and how to read weights that accelerate has offloaded.

A model loaded with a ``device_map`` (``load_model(spec, device_map="auto")``) or dispatched with
:func:`accelerate.dispatch_model` runs each block on its own *execution device*; accelerate's hooks move the
block's inputs there. Blocks offloaded to the CPU or to disk keep their weights on the ``meta`` device outside
their forward call and load them (from accelerate's ``weights_map``) only while it runs. Code that reads weights
directly (the RelP norm rule, ``describe``) therefore opens them with :func:`loaded_weights`, which uses
:func:`accelerate.utils.align_module_device`; code that combines tensors of several layers moves them to one
device first (:func:`common_device`). Nothing here changes a plain (undispatched) model.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from itertools import chain

import torch
from torch import nn


def _hook_device(hook: object) -> torch.device | None:
    """The execution device of an accelerate hook (or of the first hook of a ``SequentialHook`` that has one)."""
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(device)
    for inner in getattr(hook, "hooks", ()):
        device = _hook_device(inner)
        if device is not None:
            return device
    return None


def execution_device(module: nn.Module) -> torch.device:
    """The device ``module`` computes on: its accelerate hook's execution device, else where its weights are."""
    device = _hook_device(getattr(module, "_hf_hook", None))
    if device is not None:
        return device
    for t in chain(module.parameters(), module.buffers()):
        if t.device.type != "meta":
            return t.device
    for sub in module.modules():  # weights offloaded: ask the hooks of the submodules
        device = _hook_device(getattr(sub, "_hf_hook", None))
        if device is not None:
            return device
    return torch.device("cpu")


def is_offloaded(module: nn.Module) -> bool:
    """Whether accelerate keeps this module's own weights off its device (CPU or disk offload)."""
    return any(p.device.type == "meta" for p in module.parameters(recurse=False))


@contextmanager
def loaded_weights(modules: nn.Module | Iterable[nn.Module]) -> Iterator[None]:
    """Inside the block, the weights of ``modules`` (not their submodules) are real tensors on their execution
    devices, also where accelerate offloaded them to the CPU or disk (``align_module_device``). A no-op for
    weights that are already in place."""
    modules = [modules] if isinstance(modules, nn.Module) else list(modules)
    offloaded = [m for m in modules if is_offloaded(m)]
    if not offloaded:
        yield
        return
    from accelerate.utils import align_module_device

    with ExitStack() as stack:
        for m in offloaded:
            stack.enter_context(align_module_device(m))
        yield


def common_device(tensors: Sequence[torch.Tensor]) -> torch.device:
    """The device to combine per-layer tensors on: the first one's (they may sit on several devices)."""
    return tensors[0].device if tensors else torch.device("cpu")


def stack_on(
    tensors: Sequence[torch.Tensor], dim: int = 0, device: torch.device | None = None
) -> torch.Tensor:
    """``torch.stack`` of tensors that may sit on different devices (moved to ``device`` or the first one's)."""
    device = common_device(tensors) if device is None else device
    return torch.stack([t.to(device) for t in tensors], dim=dim)

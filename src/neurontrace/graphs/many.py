"""Attribution graphs of many prompts, split over processes when launched by ``torchrun``.

A graph belongs to one prompt, so nothing is reduced: each process builds (and typically writes) the graphs of
its contiguous share of the prompts (:func:`neurontrace.distributed.shard`); in one process, all of them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from neurontrace import distributed
from neurontrace.errors import NeurontraceError
from neurontrace.graphs.build import AttributionGraph, build_graph
from neurontrace.models.model import NeuronModel


def build_graphs(
    model: NeuronModel, prompts: Sequence[str], **kwargs: Any
) -> Iterator[tuple[int, AttributionGraph]]:
    """Yield ``(index, graph)`` for this process's share of ``prompts``, in order.

    ``kwargs`` go to :func:`neurontrace.graphs.build.build_graph` (``answers``, ``node_threshold``, ...) and apply
    to every prompt. Under ``torchrun`` the processes together yield every index exactly once.
    """
    prompts = list(prompts)
    if not prompts:
        raise NeurontraceError("no prompts given; pass at least one prompt")
    for index in distributed.shard(len(prompts)):
        yield index, build_graph(model, prompts[index], **kwargs)

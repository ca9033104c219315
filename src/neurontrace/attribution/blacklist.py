"""Neuron blacklists: neurons that never become nodes (the reference code's ``apply_blacklist``).

The paper's code zeroes the attribution of a fixed list of neurons at every position before it selects a
circuit's nodes (twelve always-on neurons of Llama-3.1-8B-Instruct, hard-coded; its case studies turn it on).
Here the list is a file, and it is applied once, where scores are made: :func:`neurontrace.attribution.api.attribute`
(so every circuit selected from its result, ``neurontrace evaluate`` included) and the node selection of
:func:`neurontrace.graphs.build.build_graph`. A blacklisted neuron scores 0 everywhere; the other scores are
unchanged.

File format: a JSON list whose entries are ``[layer, neuron]`` pairs or neuron ids (``"L23/N306"``; a sign or
position there is refused: a blacklisted neuron is excluded in both polarities at every position).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from neurontrace.errors import NeurontraceError
from neurontrace.neurons import parse_neuron


@dataclass(frozen=True)
class Blacklist:
    """A set of ``(layer, neuron)`` pairs whose scores are zeroed at every position."""

    neurons: tuple[tuple[int, int], ...]
    source: str = ""  # where it came from (a file name), for messages and the record

    @classmethod
    def of(cls, neurons: Iterable[Sequence[int]], *, source: str = "") -> Blacklist:
        """From ``(layer, neuron)`` pairs (sorted, duplicates dropped)."""
        pairs = set()
        for entry in neurons:
            if len(entry) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in entry):
                raise NeurontraceError(
                    f"blacklist entry {list(entry)!r} is not a [layer, neuron] pair of whole numbers"
                )
            pairs.add((int(entry[0]), int(entry[1])))
        return cls(tuple(sorted(pairs)), source)

    def check(self, model: Any) -> Blacklist:
        """Itself, if every neuron exists in ``model`` (anything with ``n_layers`` and ``d_ff``)."""
        for layer, neuron in self.neurons:
            if not 0 <= layer < model.n_layers or not 0 <= neuron < model.d_ff:
                where = f" (in {self.source})" if self.source else ""
                raise NeurontraceError(
                    f"blacklisted neuron L{layer}/N{neuron}{where} does not exist; the model has layers "
                    f"0..{model.n_layers - 1} and neurons 0..{model.d_ff - 1}"
                )
        return self

    def keep_mask(self, layers: Sequence[int], width: int) -> torch.Tensor:
        """``[len(layers), width]``: 0.0 for a blacklisted neuron, 1.0 elsewhere (layers not listed are kept)."""
        keep = torch.ones(len(layers), width)
        row = {layer: i for i, layer in enumerate(layers)}
        for layer, neuron in self.neurons:
            if layer in row and neuron < width:
                keep[row[layer], neuron] = 0.0
        return keep

    def apply(self, scores: torch.Tensor, *, layers: Sequence[int], layer_dim: int = 0) -> torch.Tensor:
        """``scores`` (layers at ``layer_dim``, units last) with every blacklisted neuron's scores set to 0."""
        if not self.neurons:
            return scores
        dim = layer_dim % scores.dim()
        shape = [1] * scores.dim()
        shape[dim], shape[-1] = len(layers), scores.shape[-1]
        keep = self.keep_mask(layers, scores.shape[-1]).view(shape).to(scores.device, scores.dtype)
        return scores * keep

    def to_list(self) -> list[list[int]]:
        return [[layer, neuron] for layer, neuron in self.neurons]


def load_blacklist(path: str | os.PathLike) -> Blacklist:
    """Read a blacklist file (a JSON list of ``[layer, neuron]`` pairs or ``"L<layer>/N<index>"`` ids)."""
    file = Path(path)
    if not file.is_file():
        raise NeurontraceError(f"no such blacklist file: {path}; give a JSON list of [layer, neuron] pairs")
    try:
        data = json.loads(file.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise NeurontraceError(
            f"the blacklist {path} is not JSON ({exc}); write a list of [layer, neuron] pairs such as [[5, 123]]"
        ) from None
    if not isinstance(data, list):
        raise NeurontraceError(
            f"the blacklist {path} must be a JSON list of [layer, neuron] pairs, e.g. [[5, 123], [7, 9]]"
        )
    pairs = []
    for entry in data:
        if isinstance(entry, str):
            neuron = parse_neuron(entry)
            if neuron.sign is not None or neuron.position is not None:
                raise NeurontraceError(
                    f"blacklist entry {entry!r} in {path} has a sign or position; a blacklisted neuron is "
                    "excluded in both polarities at every position: write L<layer>/N<index>"
                )
            pairs.append((neuron.layer, neuron.index))
        elif isinstance(entry, list):
            pairs.append(tuple(entry))
        else:
            raise NeurontraceError(
                f"blacklist entry {entry!r} in {path} is neither a [layer, neuron] pair nor an id like L5/N123"
            )
    return Blacklist.of(pairs, source=str(path))


def as_blacklist(value: Blacklist | str | os.PathLike | Iterable[Sequence[int]] | None) -> Blacklist | None:
    """A :class:`Blacklist` from a blacklist, a file path, or ``(layer, neuron)`` pairs (None stays None)."""
    if value is None or isinstance(value, Blacklist):
        return value
    if isinstance(value, (str, os.PathLike)):
        return load_blacklist(value)
    return Blacklist.of(value)


def blacklist_for(
    value: Blacklist | str | os.PathLike | Iterable[Sequence[int]] | None, *, model: Any, site: str
) -> Blacklist | None:
    """:func:`as_blacklist`, checked against ``model`` and ``site`` (a blacklist names neurons)."""
    blacklist = as_blacklist(value)
    if blacklist is None:
        return None
    if site != "neurons":
        raise NeurontraceError(
            f"a blacklist names neurons; it applies to the neurons site only, not {site!r}"
        )
    return blacklist.check(model)

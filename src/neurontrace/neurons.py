"""Neuron identifiers: ``L{layer}/N{index}{+|-}`` with an optional ``@position``.

The sign is the neuron's polarity (gated activations can be negative): ``L23/N8079-`` is neuron 8079 of layer
23 when it fires negatively. ``@-1`` pins a position (prompt-relative; negative counts from the end).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from neurontrace.errors import NeurontraceError

_PATTERN = re.compile(
    r"^\s*L(?P<layer>\d+)\s*/\s*N(?P<index>\d+)(?P<sign>[+-])?(?:@(?P<pos>-?\d+))?\s*$", re.I
)


@dataclass(frozen=True, order=True)
class NeuronId:
    layer: int
    index: int
    sign: str | None = None  # "+", "-" or None (either polarity)
    position: int | None = None

    def __str__(self) -> str:
        text = f"L{self.layer}/N{self.index}{self.sign or ''}"
        return text if self.position is None else f"{text}@{self.position}"

    @staticmethod
    def polarity(value: float) -> str:
        return "-" if value < 0 else "+"


def parse_neuron(text: str) -> NeuronId:
    """Parse ``"L5/N123"``, ``"L5/N123+"`` or ``"L12/N345@-1"``."""
    match = _PATTERN.match(text)
    if match is None:
        raise NeurontraceError(
            f"cannot read neuron {text!r}; write it as L<layer>/N<index>, e.g. L5/N123, L5/N123- or L5/N123@-1"
        )
    pos = match["pos"]
    return NeuronId(
        int(match["layer"]), int(match["index"]), match["sign"], None if pos is None else int(pos)
    )


def parse_neurons(text: str) -> list[NeuronId]:
    """Parse a comma-separated list of neuron ids."""
    parts = [p for p in text.split(",") if p.strip()]
    if not parts:
        raise NeurontraceError("no neurons given; write them as L<layer>/N<index>, comma-separated")
    return [parse_neuron(p) for p in parts]


def check_neuron(model, neuron: NeuronId) -> NeuronId:
    """``neuron`` if it exists in ``model`` (anything with ``n_layers`` and ``d_ff``), else a clear error."""
    if not isinstance(neuron, NeuronId):
        raise NeurontraceError(
            f"{neuron!r} is not a NeuronId; parse text with neurontrace.neurons.parse_neuron"
        )
    if not 0 <= neuron.layer < model.n_layers or not 0 <= neuron.index < model.d_ff:
        raise NeurontraceError(
            f"neuron {neuron} does not exist; the model has layers 0..{model.n_layers - 1} "
            f"and neurons 0..{model.d_ff - 1}"
        )
    return neuron

"""User-facing errors: one line that says what was wrong and what to do.

The CLI prints ``neurontrace: error: <message>`` and exits with code 2 for any of these, with no traceback.
Library users can catch :class:`NeurontraceError` (a ``ValueError``) as a whole.
"""

from __future__ import annotations


class NeurontraceError(ValueError):
    """Base class of every error caused by the user's input rather than by a bug."""


class ModelLoadError(NeurontraceError):
    """The model spec could not be resolved or loaded (missing file, corrupt file, unknown hub id)."""


class UnsupportedArchitectureError(NeurontraceError):
    """The model's architecture has no adapter."""


class TokenizationError(NeurontraceError):
    """A prompt or answer does not tokenise as required (empty, not one token, unequal pair lengths)."""


class InterventionError(NeurontraceError):
    """An intervention names a layer, neuron, position or value that does not fit the model or batch."""


class DatasetError(NeurontraceError):
    """A dataset file or pair list is unusable (missing file, bad line, missing field, no pairs)."""


def check_finite(values, what: str) -> None:
    """Stop with a one-line error when ``values`` (a tensor) hold NaN or infinity, instead of printing them."""
    import torch

    if not torch.isfinite(values).all():
        raise NeurontraceError(
            f"the model's {what} are NaN or infinite: its weights or the inputs are broken (check the model file; "
            "with --dtype float16/bfloat16, try float32)"
        )

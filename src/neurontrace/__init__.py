"""neurontrace: circuit tracing in the neuron basis of Hugging Face causal language models.

The public API is re-exported here; heavy imports (torch, transformers) happen only when a name is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "neurontrace.models.loading",
    "NeuronModel": "neurontrace.models.model",
    "ArchAdapter": "neurontrace.models.adapters",
    "SUPPORTED_FAMILIES": "neurontrace.models.adapters",
    "Batch": "neurontrace.tokens",
    "tokenize": "neurontrace.tokens",
    "tokenize_pairs": "neurontrace.tokens",
    "single_token_id": "neurontrace.tokens",
    "capture": "neurontrace.sites",
    "Activations": "neurontrace.sites",
    "SITES": "neurontrace.sites",
    "Edit": "neurontrace.interventions",
    "intervene": "neurontrace.interventions",
    "NeuronId": "neurontrace.neurons",
    "parse_neuron": "neurontrace.neurons",
    "NeurontraceError": "neurontrace.errors",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:  # pragma: no cover
    from neurontrace.errors import NeurontraceError
    from neurontrace.interventions import Edit, intervene
    from neurontrace.models.adapters import SUPPORTED_FAMILIES, ArchAdapter
    from neurontrace.models.loading import load_model
    from neurontrace.models.model import NeuronModel
    from neurontrace.neurons import NeuronId, parse_neuron
    from neurontrace.sites import SITES, Activations, capture
    from neurontrace.tokens import Batch, single_token_id, tokenize, tokenize_pairs


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'neurontrace' has no attribute {name!r}")

"""Loading models and naming their parts: ``loading`` (specs, GGUF cache), ``adapters`` (per family), ``model``."""

from neurontrace.models.adapters import ADAPTERS, SUPPORTED_FAMILIES, ArchAdapter, adapter_for
from neurontrace.models.loading import ALIASES, DEFAULT_MODEL, load_model, neurontrace_home
from neurontrace.models.model import NeuronModel

__all__ = [
    "ADAPTERS",
    "ALIASES",
    "DEFAULT_MODEL",
    "SUPPORTED_FAMILIES",
    "ArchAdapter",
    "NeuronModel",
    "adapter_for",
    "load_model",
    "neurontrace_home",
]

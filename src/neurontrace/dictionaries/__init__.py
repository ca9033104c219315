"""Dictionaries (sparse autoencoders, transcoders) as bases beside the model's own neurons (issue 14, in progress).

:mod:`neurontrace.dictionaries.sae` reads and writes SAELens's on-disk format and splices a dictionary into the
forward pass as ``x = decode(encode(x)) + error``, which leaves the model's output unchanged.
:mod:`neurontrace.dictionaries.transcoder` reads and writes circuit-tracer's per-layer transcoder sets, which the
``transcoder:DIR`` site splices in as the MLP's output the same way. :mod:`neurontrace.dictionaries.hub` fetches
either from the Hugging Face Hub (``hf:OWNER/REPO[/SUBFOLDER]``).
"""

from __future__ import annotations

from neurontrace.dictionaries.hub import resolve_dictionary
from neurontrace.dictionaries.sae import SAE, load_sae, save_sae, site_of_hook, splice
from neurontrace.dictionaries.transcoder import Transcoder, TranscoderSet, load_transcoders, save_transcoders

__all__ = [
    "SAE",
    "Transcoder",
    "TranscoderSet",
    "load_sae",
    "load_transcoders",
    "resolve_dictionary",
    "save_sae",
    "save_transcoders",
    "site_of_hook",
    "splice",
]

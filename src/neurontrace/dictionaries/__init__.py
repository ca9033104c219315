"""Dictionaries (sparse autoencoders, transcoders) as bases beside the model's own neurons (issue 14, in progress).

:mod:`neurontrace.dictionaries.sae` reads and writes SAELens's on-disk format and splices a dictionary into the
forward pass as ``x = decode(encode(x)) + error``, which leaves the model's output unchanged.
"""

from __future__ import annotations

from neurontrace.dictionaries.sae import SAE, load_sae, save_sae, site_of_hook, splice

__all__ = ["SAE", "load_sae", "save_sae", "site_of_hook", "splice"]

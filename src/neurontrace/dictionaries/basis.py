"""A dictionary basis: SAEs of one site at one or more layers, loaded once per folder.

``DIR`` is one SAELens folder (``cfg.json`` + ``sae_weights.safetensors``: one layer) or a folder of them (one
subfolder a layer, as SAELens releases are laid out, e.g. ``blocks.5.hook_resid_post/``). Every SAE must be on
the same site and have the same number of latents.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from neurontrace.dictionaries.sae import SAE, load_sae
from neurontrace.errors import NeurontraceError


@dataclass(frozen=True)
class DictionaryBasis:
    path: Path
    site: str
    saes: dict[int, SAE]

    @property
    def d_sae(self) -> int:
        return next(iter(self.saes.values())).d_sae

    @property
    def d_in(self) -> int:
        return next(iter(self.saes.values())).d_in


def load_basis(path: str) -> DictionaryBasis:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise NeurontraceError(
            f"no such dictionary folder: {path}; give a SAELens folder or a folder of them"
        )
    return _load(folder.resolve(), _stamp(folder.resolve()))


def _stamp(folder: Path) -> tuple:
    """What changes when the folder's SAEs change (so a rewritten dictionary is read again)."""
    files = sorted(folder.rglob("sae_weights.safetensors"))
    return tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files)


@lru_cache(maxsize=8)
def _load(folder: Path, stamp: tuple) -> DictionaryBasis:
    members = (
        [folder]
        if (folder / "cfg.json").is_file()
        else sorted(p for p in folder.iterdir() if (p / "cfg.json").is_file())
    )
    if not members:
        raise NeurontraceError(f"{folder} holds no SAE (no cfg.json in it or in its subfolders)")
    saes: dict[int, SAE] = {}
    for member in members:
        sae = load_sae(member)
        if sae.layer in saes:
            raise NeurontraceError(f"{folder} has two SAEs for layer {sae.layer}; keep one")
        saes[sae.layer] = sae
    sites = {s.site for s in saes.values()}
    sizes = {(s.d_in, s.d_sae) for s in saes.values()}
    if len(sites) > 1 or len(sizes) > 1:
        raise NeurontraceError(
            f"the SAEs of {folder} differ in site {sorted(sites)} or size {sorted(sizes)}; one basis is one site and size"
        )
    return DictionaryBasis(folder, sites.pop(), saes)

"""``neurontrace models``: supported architecture families and model aliases."""

from __future__ import annotations

from neurontrace.models.adapters import ADAPTERS
from neurontrace.models.loading import ALIASES


def run_models(_args: object = None) -> None:
    print("Supported architecture families (config model_type -> neuron site):")
    for a in ADAPTERS:
        kind = "gated" if a.gated else "ungated"
        print(
            f"  {a.family:<16} {', '.join(a.model_types):<22} {kind:<8} input of {a.down}   e.g. {a.example}"
        )
    print("\nModel aliases (no download needed):")
    for name, (description, _) in ALIASES.items():
        print(f"  {name:<14} {description}")

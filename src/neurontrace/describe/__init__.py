"""Neuron descriptions, per polarity (METHOD.md section 8): what a neuron writes (:mod:`.writes`: the tokens
its output weights promote and suppress) and where it fires (:mod:`.contexts`: its top-activating contexts
over a corpus). :func:`describe` combines both."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from neurontrace.describe.contexts import Context, ContextsDescription, top_contexts
from neurontrace.describe.writes import TokenEffect, WritesDescription, describe_writes, logit_effects
from neurontrace.errors import NeurontraceError
from neurontrace.io import JsonResult
from neurontrace.models.model import NeuronModel
from neurontrace.neurons import NeuronId

SCHEMA_VERSION = 1

__all__ = [
    "Context",
    "ContextsDescription",
    "NeuronDescription",
    "PolarityDescription",
    "TokenEffect",
    "WritesDescription",
    "describe",
    "describe_all",
    "describe_writes",
    "graph_node_describer",
    "logit_effects",
    "top_contexts",
]


@dataclass
class PolarityDescription:
    """A neuron firing with one sign: what it writes, and (with a corpus) where it fires."""

    polarity: str
    writes: WritesDescription
    contexts: ContextsDescription | None = None


@dataclass
class NeuronDescription(JsonResult):
    """Both parts for one neuron: one polarity if its id has a sign (``L5/N3-``), both otherwise."""

    model: str
    neuron: str
    layer: int
    index: int
    polarities: list[PolarityDescription]
    schema_version: int = field(default=SCHEMA_VERSION)

    def format(self) -> str:
        """A text rendering; tokens are shown with repr so that spaces and markup are visible."""
        lines = [f"{self.neuron} (layer {self.layer}, neuron {self.index})"]
        for p in self.polarities:
            word = "positively" if p.polarity == "+" else "negatively"
            w = p.writes
            lines.append(f"  {w.neuron}: when it fires {word}, it writes (logit effect per unit):")
            lines.append("    promotes:   " + "  ".join(f"{t.token!r} {t.value:+.3f}" for t in w.promoted))
            lines.append("    suppresses: " + "  ".join(f"{t.token!r} {t.value:+.3f}" for t in w.suppressed))
            c = p.contexts
            if c is None:
                continue
            lines.append(f"    fires most {word} on ({c.corpus}, {c.n_tokens} tokens):")
            if not c.contexts:
                lines.append(f"      (never fires {word} in this corpus)")
            for rank, ctx in enumerate(c.contexts, 1):
                lines.append(f"      {rank:>2}. {ctx.activation:+9.3f}  {ctx.render()}")
        return "\n".join(lines)


def describe_all(
    model: NeuronModel,
    neurons: Sequence[NeuronId],
    *,
    corpus: str | Path | Sequence[str] | None = None,
    k: int = 10,
    window: int = 64,
    max_tokens: int = 20_000,
    batch_size: int = 8,
    progress: bool = True,
    cache_dir: str | Path | None = None,
) -> list[NeuronDescription]:
    """Describe several neurons with one corpus scan (see :func:`describe`)."""
    neurons = list(neurons)
    if not neurons:
        raise NeurontraceError("no neurons given; name them as L<layer>/N<index>, e.g. L5/N123+")
    contexts = {}
    if corpus is not None:
        contexts = top_contexts(
            model,
            neurons,
            corpus=corpus,
            k=k,
            window=window,
            max_tokens=max_tokens,
            batch_size=batch_size,
            progress=progress,
            cache_dir=cache_dir,
        )
    out = []
    for n in neurons:
        parts = []
        for sign in [n.sign] if n.sign else ["+", "-"]:
            signed = NeuronId(n.layer, n.index, sign)
            parts.append(PolarityDescription(sign, describe_writes(model, signed, k=k), contexts.get(signed)))
        name = str(NeuronId(n.layer, n.index, n.sign))
        out.append(NeuronDescription(model.name, name, n.layer, n.index, parts))
    return out


def describe(
    model: NeuronModel,
    neuron: NeuronId,
    *,
    corpus: str | Path | Sequence[str] | None = None,
    k: int = 10,
    **scan: object,
) -> NeuronDescription:
    """What ``neuron`` writes and, with a ``corpus`` (``"model"``, a .txt file or folder, ``"hf:NAME"`` or a list
    of texts), where it fires; per polarity. ``scan`` options go to :func:`top_contexts` (``window``,
    ``max_tokens``, ``batch_size``, ``progress``, ``cache_dir``)."""
    return describe_all(model, [neuron], corpus=corpus, k=k, **scan)[0]


def graph_node_describer(
    model: NeuronModel,
    nodes: Sequence | None = None,
    *,
    k: int = 5,
    corpus: str | Path | Sequence[str] | None = None,
    max_tokens: int = 20_000,
    progress: bool = False,
):
    """``describe(node)`` for graph export: the tokens a neuron node promotes and suppresses (for the polarity it
    fires with) and, with a ``corpus``, its top-activating contexts there (scanned once for all ``nodes``)."""
    contexts: dict[NeuronId, ContextsDescription] = {}
    if corpus is not None and nodes:
        wanted = sorted({NeuronId(n.layer, n.index, NeuronId.polarity(n.activation)) for n in nodes},
                        key=lambda n: (n.layer, n.index, n.sign))  # fmt: skip
        contexts = top_contexts(model, wanted, corpus=corpus, k=k, max_tokens=max_tokens, progress=progress)

    def describe_node(node) -> dict:
        neuron = NeuronId(node.layer, node.index, NeuronId.polarity(node.activation))
        d = describe_writes(model, neuron, k=k)
        out = {  # circuit-tracer's names: its node panel lists them as top / bottom outputs
            "top_logit_effects": [t.token for t in d.promoted],
            "bottom_logit_effects": [t.token for t in d.suppressed],
        }
        if neuron in contexts:
            out["top_contexts"] = [
                {"activation": c.activation, "before": c.before, "token": c.token, "after": c.after}
                for c in contexts[neuron].contexts
            ]
        return out

    return describe_node

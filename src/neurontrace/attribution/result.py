"""``AttributionResult``: node scores ``[layer, position, unit]`` per example and aggregated, saved as safetensors.

Sign convention (METHOD.md section 3): for clean/counterfactual pairs a score estimates the metric change when
the node is patched to its counterfactual value, ``m(do a = a') - m(clean)``; for single prompts it estimates
the node's contribution relative to the baseline, ``m(clean) - m(do a = baseline)``.

File format (schema version 1): one ``.safetensors`` file. Tensors: ``scores_sum`` ``[N, L, d]`` (per example,
summed over positions); optional ``scores`` ``[N, L, T, d]`` (per example, per position; only when every
example has the same token length ``T``); ``mean_scores`` ``[L, T, d]``; ``acts_mean`` ``[L, T, d]`` (mean clean
activation); ``acts_sum_mean`` ``[L, d]``; ``metric_clean`` / ``metric_patch`` ``[N]``. The header metadata key
``neurontrace`` holds a JSON object with ``schema_version``, ``model``, ``method``, ``metric``, ``site``,
``baseline``, ``rules``, ``layers``, ``tokens`` (the token strings of each example) and ``prompts``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from neurontrace.errors import NeurontraceError
from neurontrace.io import write_bytes_atomic
from neurontrace.neurons import NeuronId

SCHEMA_VERSION = 1


@dataclass
class NodeScore:
    """One node of a result: a unit at a layer and (unless summed over positions) a position."""

    layer: int
    neuron: int
    position: int | None
    score: float
    activation: float
    token: str | None = None

    @property
    def id(self) -> str:
        return str(NeuronId(self.layer, self.neuron, NeuronId.polarity(self.activation)))

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.id, **self.__dict__}


@dataclass
class AttributionResult:
    """Scores of every unit at every layer and position, for one prompt or a dataset."""

    scores_sum: torch.Tensor  # [N, L, d]
    acts_sum_mean: torch.Tensor  # [L, d]
    metric_clean: torch.Tensor  # [N]
    meta: dict[str, Any]
    scores: torch.Tensor | None = None  # [N, L, T, d]
    mean_scores: torch.Tensor | None = None  # [L, T, d]
    acts_mean: torch.Tensor | None = None  # [L, T, d]
    metric_patch: torch.Tensor | None = None  # [N]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    # ---------------------------------------------------------------- views
    @property
    def n_examples(self) -> int:
        return self.scores_sum.shape[0]

    @property
    def layers(self) -> list[int]:
        return list(self.meta["layers"])

    @property
    def method(self) -> str:
        return self.meta["method"]

    @property
    def position_free(self) -> torch.Tensor:
        """Mean over examples of the position-summed scores, ``[L, d]``."""
        return self.scores_sum.mean(0)

    def top(self, k: int = 20, *, per_position: bool | None = None) -> list[NodeScore]:
        """The ``k`` nodes of largest |score|: per position when positions align, else summed over positions."""
        if per_position is None:
            per_position = self.mean_scores is not None
        tokens = (self.meta.get("tokens") or [None])[0]
        if per_position:
            if self.mean_scores is None:
                raise NeurontraceError("per-position scores need examples of one token length")
            flat = self.mean_scores.flatten()
            idx = flat.abs().topk(min(k, flat.numel())).indices
            _, t, d = self.mean_scores.shape
            out = []
            for i in idx.tolist():
                li, pos, unit = i // (t * d), (i // d) % t, i % d
                act = float(self.acts_mean[li, pos, unit]) if self.acts_mean is not None else 0.0
                token = tokens[pos] if tokens and pos < len(tokens) else None
                out.append(NodeScore(self.layers[li], unit, pos, float(flat[i]), act, token))
            return out
        flat = self.position_free.flatten()
        idx = flat.abs().topk(min(k, flat.numel())).indices
        d = self.position_free.shape[1]
        return [
            NodeScore(
                self.layers[i // d], i % d, None, float(flat[i]), float(self.acts_sum_mean[i // d, i % d])
            )
            for i in idx.tolist()
        ]

    def to_pandas(self, *, per_position: bool | None = None):
        """A DataFrame with one row per node (layer, neuron[, position], score, activation, polarity)."""
        import pandas as pd

        if per_position is None:
            per_position = self.mean_scores is not None
        if per_position and self.mean_scores is not None:
            L, T, d = self.mean_scores.shape
            grid = torch.stack(
                torch.meshgrid(torch.arange(L), torch.arange(T), torch.arange(d), indexing="ij"), -1
            )
            grid = grid.reshape(-1, 3)
            acts = self.acts_mean.flatten() if self.acts_mean is not None else torch.zeros(L * T * d)
            frame = pd.DataFrame(
                {
                    "layer": torch.as_tensor(self.layers)[grid[:, 0]].numpy(),
                    "position": grid[:, 1].numpy(),
                    "neuron": grid[:, 2].numpy(),
                    "score": self.mean_scores.flatten().numpy(),
                    "activation": acts.numpy(),
                }
            )
            tokens = (self.meta.get("tokens") or [None])[0]
            if tokens:
                frame["token"] = [tokens[p] for p in frame["position"]]
        else:
            L, d = self.position_free.shape
            frame = pd.DataFrame(
                {
                    "layer": torch.as_tensor(self.layers).repeat_interleave(d).numpy(),
                    "neuron": torch.arange(d).repeat(L).numpy(),
                    "score": self.position_free.flatten().numpy(),
                    "activation": self.acts_sum_mean.flatten().numpy(),
                }
            )
        frame["polarity"] = ["-" if a < 0 else "+" for a in frame["activation"]]
        return frame

    # ------------------------------------------------------------- save/load
    def tensors(self) -> dict[str, torch.Tensor]:
        named = {
            "scores_sum": self.scores_sum,
            "acts_sum_mean": self.acts_sum_mean,
            "metric_clean": self.metric_clean,
            "scores": self.scores,
            "mean_scores": self.mean_scores,
            "acts_mean": self.acts_mean,
            "metric_patch": self.metric_patch,
            **{f"extra.{k}": v for k, v in self.extra.items()},
        }
        return {k: v.detach().float().contiguous().cpu() for k, v in named.items() if v is not None}

    def to_json(self) -> str:
        """Metadata and the top nodes as JSON (the tensors are in the safetensors file)."""
        return json.dumps({**self.meta, "top": [n.to_dict() for n in self.top(50)]}, indent=2)

    def save(self, path: str | Path) -> Path:
        """Write one safetensors file atomically (tensors + JSON metadata with the schema version)."""
        from safetensors.torch import save

        meta = {**self.meta, "schema_version": SCHEMA_VERSION}
        data = save(self.tensors(), metadata={"neurontrace": json.dumps(meta)})
        return write_bytes_atomic(path, data)

    @classmethod
    def load(cls, path: str | Path) -> AttributionResult:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise NeurontraceError(f"no such attribution result file: {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        except Exception as exc:
            raise NeurontraceError(f"{path} is not a readable safetensors file: {exc}") from None
        if "neurontrace" not in header:
            raise NeurontraceError(f"{path} is not a neurontrace attribution result (no metadata)")
        meta = json.loads(header["neurontrace"])
        if meta.get("schema_version") != SCHEMA_VERSION:
            raise NeurontraceError(
                f"{path} has schema version {meta.get('schema_version')}, this neurontrace reads {SCHEMA_VERSION}"
            )
        extra = {k.removeprefix("extra."): v for k, v in tensors.items() if k.startswith("extra.")}
        return cls(
            scores_sum=tensors["scores_sum"],
            acts_sum_mean=tensors["acts_sum_mean"],
            metric_clean=tensors["metric_clean"],
            meta=meta,
            scores=tensors.get("scores"),
            mean_scores=tensors.get("mean_scores"),
            acts_mean=tensors.get("acts_mean"),
            metric_patch=tensors.get("metric_patch"),
            extra=extra,
        )

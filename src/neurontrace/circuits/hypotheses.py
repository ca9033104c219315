"""Hypothesis scoring: which neurons' attribution separates classes of prompts (METHOD.md section 8).

Given an attribution result over a dataset of prompts and one class label per prompt (e.g. the sum mod 10 of
"What is {x} + {y}?"), each neuron's position-summed attribution ``scores_sum[n, layer, neuron]`` is a feature
of prompt ``n``. For every class ``c`` (one-vs-rest) the AUROC of that feature for "prompt is in class c" is
the probability that a random in-class prompt scores higher than a random out-of-class one (ties count
half). It is the Mann-Whitney U statistic over ``n_in * n_out``, computed from average ranks for every
neuron at once (in chunks of neurons, so ``N x L x d`` never needs more than a few copies of one chunk).

A neuron is *selective* for ``c`` when its AUROC is ``>= high`` (attribution higher in class) or ``<= low``
(lower in class: anti-selective). For each selective (neuron, class) we also report the mean attribution
inside and outside the class as a share of the metric: ``in_class_share = mean(scores of in-class prompts) /
mean(|metric_clean| of in-class prompts)`` and likewise out of class (a ratio of means, which stays finite
when one prompt's metric is near zero).

A neuron absent from a prompt counts as 0: the scores are used as they are, and a per-prompt selection
``mask`` (e.g. the nodes of each prompt's circuit, see :func:`per_prompt_top_k`) zeroes everything else.
"""

from __future__ import annotations

import json
import numbers
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from neurontrace.attribution.result import AttributionResult
from neurontrace.errors import NeurontraceError
from neurontrace.io import JsonResult
from neurontrace.neurons import NeuronId

SCHEMA_VERSION = 1
CHUNK_ELEMENTS = 1_000_000  # examples x neurons ranked at once (~100 MB of working tensors)


# ------------------------------------------------------------------------------------------------ AUROC
def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks of ``x`` ``[N, M]`` along dim 0, tied values sharing their average rank (float64)."""
    n = x.shape[0]
    values, order = x.sort(dim=0, stable=True)
    pos = torch.arange(n, dtype=torch.long, device=x.device)[:, None].expand_as(values)
    first = torch.ones_like(values, dtype=torch.bool)
    first[1:] = values[1:] != values[:-1]  # a new value starts here
    last = torch.ones_like(values, dtype=torch.bool)
    last[:-1] = first[1:]  # the last element of its run of equal values
    start = torch.cummax(torch.where(first, pos, torch.zeros_like(pos)), dim=0).values
    big = torch.full_like(pos, n - 1)
    end = torch.cummin(torch.where(last, pos, big).flip(0), dim=0).values.flip(0)
    ranks = torch.empty_like(values, dtype=torch.float64)
    ranks.scatter_(0, order, (start + end).double() / 2 + 1)
    return ranks


def auroc(
    scores: torch.Tensor, positives: torch.Tensor, *, chunk_elements: int = CHUNK_ELEMENTS
) -> torch.Tensor:
    """AUROC of every column of ``scores`` ``[N, M]`` for each row of ``positives`` ``[C, N]`` (bool): ``[C, M]``.

    Mann-Whitney: ``AUROC = (R_pos - n_pos (n_pos + 1) / 2) / (n_pos n_neg)`` with ``R_pos`` the sum of the
    positives' average ranks; 0.5 for a constant column. Columns are ranked in chunks of
    ``chunk_elements // N`` to bound memory.
    """
    if scores.dim() != 2 or positives.dim() != 2 or positives.shape[1] != scores.shape[0]:
        raise NeurontraceError(
            f"auroc needs scores [N, M] and positives [C, N]; got {tuple(scores.shape)} and {tuple(positives.shape)}"
        )
    n_pos = positives.sum(1).double()
    n_neg = positives.shape[1] - n_pos
    if bool(((n_pos == 0) | (n_neg == 0)).any()):
        raise NeurontraceError("every class needs at least one prompt in it and one outside it")
    onehot = positives.double()
    offset, pairs = (n_pos * (n_pos + 1) / 2)[:, None], (n_pos * n_neg)[:, None]
    n, m = scores.shape
    step = max(1, chunk_elements // max(1, n))
    out = torch.empty(positives.shape[0], m, dtype=torch.float64)
    for start in range(0, m, step):
        rank_sum = onehot @ average_ranks(scores[:, start : start + step])  # [C, chunk]
        out[:, start : start + step] = (rank_sum - offset) / pairs
    return out


# ------------------------------------------------------------------------------------------- results
@dataclass
class SelectiveNeuron:
    """One neuron selective (``auroc >= high``) or anti-selective (``auroc <= low``) for one class."""

    node: str  # "L5/N123+" (polarity of its mean position-summed activation)
    layer: int
    neuron: int
    class_label: Any
    auroc: float
    direction: str  # "selective" or "anti-selective"
    in_class_mean: float  # mean position-summed attribution over the class's prompts
    out_class_mean: float  # ... over the other prompts
    in_class_share: float | None  # in_class_mean / mean |metric_clean| of the class's prompts
    out_class_share: float | None  # out_class_mean / mean |metric_clean| of the other prompts
    n_in: int
    n_out: int


@dataclass
class HypothesisScores(JsonResult):
    """Per-class one-vs-rest AUROC of every neuron's attribution and the selective neurons, strongest first.

    ``auroc`` is ``[C, L, d]`` (NaN for neurons outside a ``[L, d]`` mask); ``classes[c]`` is the label of row
    ``c``. The JSON (``to_json``/``save``) holds everything but the AUROC tensor.
    """

    classes: list[Any]
    class_sizes: list[int]
    layers: list[int]
    auroc: torch.Tensor  # [C, L, d]
    neurons: list[SelectiveNeuron]
    high: float
    low: float
    meta: dict[str, Any] = field(default_factory=dict)
    schema_version: int = field(default=SCHEMA_VERSION)

    def selective(self, class_label: Hashable | None = None) -> list[SelectiveNeuron]:
        """The selective and anti-selective neurons (of one class, or all), strongest first."""
        if class_label is None:
            return list(self.neurons)
        key = _json_label(class_label)  # labels are stored JSON-safe (a tuple label as its text)
        if key not in self.classes:
            raise NeurontraceError(
                f"no class {class_label!r}; the classes are {', '.join(map(repr, self.classes))}"
            )
        return [s for s in self.neurons if s.class_label == key]

    def table(self, k: int = 20, *, class_label: Hashable | None = None):
        """A pandas DataFrame of the ``k`` strongest selective neurons (one row per neuron and class)."""
        import pandas as pd

        rows = [asdict(s) for s in self.selective(class_label)[:k]]
        columns = list(SelectiveNeuron.__dataclass_fields__)
        return pd.DataFrame(rows, columns=columns)

    def to_json(self) -> str:
        data = {
            "schema_version": self.schema_version,
            "classes": self.classes,
            "class_sizes": self.class_sizes,
            "layers": self.layers,
            "auroc_shape": list(self.auroc.shape),
            "high": self.high,
            "low": self.low,
            "meta": self.meta,
            "n_selective": Counter(str(s.class_label) for s in self.neurons),
            "neurons": [asdict(s) for s in self.neurons],
        }
        return json.dumps(data, indent=2)


def _json_label(label: Any) -> Any:
    """A JSON-safe version of a class label (numbers and strings as they are, other labels as text)."""
    if isinstance(label, bool | str) or label is None:
        return label
    if isinstance(label, numbers.Integral):
        return int(label)
    if isinstance(label, numbers.Real):
        return float(label)
    return str(label)


def _ordered_classes(labels: Sequence[Hashable]) -> list[Hashable]:
    unique = list(dict.fromkeys(labels))
    try:
        return sorted(unique)
    except TypeError:  # labels of mixed types keep their order of first appearance
        return unique


def per_prompt_top_k(result: AttributionResult, k: int) -> torch.Tensor:
    """A ``[N, L, d]`` selection mask: each prompt's ``k`` neurons of largest |position-summed score|."""
    if k < 1:
        raise NeurontraceError("k must be at least 1")
    flat = result.scores_sum.flatten(1)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask.scatter_(1, flat.abs().topk(min(k, flat.shape[1]), dim=1).indices, True)
    return mask.view_as(result.scores_sum)


def score_hypotheses(
    result: AttributionResult,
    labels: Sequence[Hashable],
    *,
    high: float = 0.9,
    low: float = 0.1,
    min_class_size: int = 2,
    mask: torch.Tensor | None = None,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> HypothesisScores:
    """Per-class AUROC of each neuron's position-summed attribution, and the (anti-)selective neurons.

    ``labels[n]`` is the class of prompt ``n`` (any hashable: ints, strings, tuples). ``mask`` is either a
    per-prompt selection ``[N, L, d]`` (scores outside it count as 0) or a set of neurons ``[L, d]`` (only
    those are scored; the others get AUROC NaN and are never selective).
    """
    if not 0.0 <= low < high <= 1.0:
        raise NeurontraceError(f"need 0 <= low < high <= 1; got low={low}, high={high}")
    if isinstance(labels, torch.Tensor):
        labels = labels.tolist()
    labels = list(labels)
    scores = result.scores_sum.detach().float().cpu()
    n_examples, n_layers, width = scores.shape
    if len(labels) != n_examples:
        raise NeurontraceError(
            f"{len(labels)} labels for {n_examples} prompts; give one class label per prompt"
        )
    classes = _ordered_classes(labels)
    if len(classes) < 2:
        raise NeurontraceError(f"need at least 2 classes to compare; all prompts are in class {classes[0]!r}")
    sizes = Counter(labels)
    small = [c for c in classes if sizes[c] < min_class_size]
    if small:
        raise NeurontraceError(
            f"class {small[0]!r} has {sizes[small[0]]} prompt(s), fewer than min_class_size={min_class_size}; "
            "add prompts or merge classes"
        )
    if not torch.isfinite(scores).all():
        raise NeurontraceError("the attribution scores contain NaN or infinite values")

    scored = torch.ones(n_layers, width, dtype=torch.bool)
    if mask is not None:
        mask = mask.to(torch.bool).cpu()
        if mask.shape == scores.shape:
            scores = torch.where(mask, scores, torch.zeros_like(scores))
        elif mask.shape == (n_layers, width):
            scored = mask
        else:
            raise NeurontraceError(
                f"the mask must be [N, L, d] = {list(scores.shape)} or [L, d] = {[n_layers, width]}; "
                f"got {list(mask.shape)}"
            )
    positives = torch.tensor([[label == c for label in labels] for c in classes])  # [C, N]
    flat = scores.flatten(1)  # [N, L*d]
    columns = scored.flatten().nonzero().flatten()
    values = torch.full((len(classes), n_layers * width), float("nan"), dtype=torch.float64)
    if columns.numel() == flat.shape[1]:
        values = auroc(flat, positives, chunk_elements=chunk_elements)  # no copy of the scores
    elif columns.numel():
        values[:, columns] = auroc(flat[:, columns], positives, chunk_elements=chunk_elements)
    table = values.view(len(classes), n_layers, width)

    metric = result.metric_clean.detach().double().abs().cpu()
    layers = result.layers
    acts = result.acts_sum_mean.detach().float().cpu()
    neurons: list[SelectiveNeuron] = []
    for c, label in enumerate(classes):
        hits = ((table[c] >= high) | (table[c] <= low)).nonzero().tolist()
        if not hits:
            continue
        inside = positives[c]
        li = torch.tensor([h[0] for h in hits])
        ui = torch.tensor([h[1] for h in hits])
        picked = scores[:, li, ui].double()  # [N, hits]
        in_mean, out_mean = picked[inside].mean(0), picked[~inside].mean(0)
        m_in, m_out = float(metric[inside].mean()), float(metric[~inside].mean())
        for j, (layer_i, unit) in enumerate(hits):
            value = float(table[c, layer_i, unit])
            neurons.append(
                SelectiveNeuron(
                    node=str(NeuronId(layers[layer_i], unit, NeuronId.polarity(float(acts[layer_i, unit])))),
                    layer=layers[layer_i],
                    neuron=unit,
                    class_label=_json_label(label),
                    auroc=value,
                    direction="selective" if value >= high else "anti-selective",
                    in_class_mean=float(in_mean[j]),
                    out_class_mean=float(out_mean[j]),
                    in_class_share=float(in_mean[j]) / m_in if m_in > 0 else None,
                    out_class_share=float(out_mean[j]) / m_out if m_out > 0 else None,
                    n_in=int(inside.sum()),
                    n_out=int((~inside).sum()),
                )
            )
    neurons.sort(key=lambda s: (-abs(s.auroc - 0.5), -abs(s.in_class_mean - s.out_class_mean)))
    meta = {
        key: result.meta.get(key)
        for key in ("model", "method", "metric", "site", "baseline")
        if key in result.meta
    }
    meta.update(n_examples=n_examples, masked=mask is not None)
    return HypothesisScores(
        classes=[_json_label(c) for c in classes],
        class_sizes=[sizes[c] for c in classes],
        layers=layers,
        auroc=table,
        neurons=neurons,
        high=high,
        low=low,
        meta=meta,
    )


# ------------------------------------------------------------------------------------------ attribution
def attribute_prompts(
    model,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    method: str = "relp",
    metric: str = "logprob",
    **kwargs: Any,
) -> AttributionResult:
    """Attribute each prompt's own answer (unpaired prompts, zero or mean baseline), batched.

    A thin wrapper of :func:`neurontrace.attribution.api.attribute` (``prompts=``), so ``scores_sum[n]`` is what
    ``attribute(model, prompt=prompts[n], answer=answers[n], metric=metric)`` gives. ``kwargs`` pass through (``batch_size``, ``baseline``,
    ``progress``, ``checkpoint``...).
    """
    from neurontrace.attribution.api import attribute

    return attribute(model, prompts=prompts, answers=answers, method=method, metric=metric, **kwargs)

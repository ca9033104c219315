"""Case study: addition. Which neurons are selective for the sum's last digit, its parity, its tens digit?

Prompts ``What is {x} + {y}? {x} + {y} =`` over a grid of operands (the model echoes the expression before
answering, so the prompt includes the echo); the metric is the teacher-forced log-probability of the answer
``" {x+y}"``. Each neuron's RelP attribution, summed over positions, is scored per class with AUROC
(:func:`neurontrace.circuits.score_hypotheses`): selective at AUROC >= 0.9 or <= 0.1 (METHOD.md section 8).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from neurontrace.casestudies.common import teacher_forced_correct
from neurontrace.circuits.hypotheses import attribute_prompts, score_hypotheses
from neurontrace.errors import NeurontraceError
from neurontrace.io import JsonResult, write_text_atomic
from neurontrace.models.model import NeuronModel

LABELINGS = {
    "sum mod 10": lambda x, y: (x + y) % 10,
    "sum mod 2": lambda x, y: (x + y) % 2,
    "tens digit": lambda x, y: (x + y) // 10,
}


def prompt_for(x: int, y: int) -> str:
    return f"What is {x} + {y}? {x} + {y} ="


@dataclass
class AdditionReport(JsonResult):
    model: str
    operands: list[int]
    n_prompts: int
    accuracy: float  # teacher-forced exact match of every answer token
    method: str
    selective: dict[str, dict[str, int]] = field(default_factory=dict)  # labeling -> class -> count
    top: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    schema_version: int = 1


def run_addition(
    model: NeuronModel,
    *,
    operands: range | list[int],
    out: str | Path,
    method: str = "relp",
    batch_size: int = 16,
    high: float = 0.9,
    low: float = 0.1,
    heatmaps: int = 3,
    min_class_size: int = 5,
    progress: bool = True,
) -> AdditionReport:
    """Attribute the answer over the operand grid, score the three labelings, write the report folder.

    Classes with fewer than ``min_class_size`` prompts on the grid (e.g. a sum's tens digit reached by one corner)
    are left out of that labeling: an AUROC from one or two positives is mostly chance.
    """
    operands = list(operands)
    if len(operands) < 4:
        raise NeurontraceError("give at least 4 operand values so that every class has examples")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    grid = [(x, y) for x in operands for y in operands]
    prompts = [prompt_for(x, y) for x, y in grid]
    answers = [f" {x + y}" for x, y in grid]
    times: dict[str, float] = {}
    start = time.perf_counter()
    correct = teacher_forced_correct(model, prompts, answers)
    times["accuracy"] = time.perf_counter() - start
    start = time.perf_counter()
    result = attribute_prompts(
        model, prompts, answers, method=method, batch_size=batch_size, progress=progress
    )
    times["attribution"] = time.perf_counter() - start
    result.save(out / "attribution.safetensors")
    report = AdditionReport(
        model.name, operands, len(grid), float(correct.float().mean()), method, seconds=times
    )
    start = time.perf_counter()
    lines = [
        f"# Addition on {model.name}",
        "",
        f"Prompts `{prompt_for(operands[0], operands[1])}` for x, y in {operands[0]}..{operands[-1]} ({len(grid)} prompts); metric: "
        f"teacher-forced log-probability of the answer (e.g. `' {operands[0] + operands[1]}'`); method: {method}; attribution summed over "
        "positions. Selective: AUROC >= "
        f"{high} (in class higher) or <= {low} (lower). Teacher-forced accuracy: {report.accuracy:.1%}.",
        "",
    ]
    for name, rule in LABELINGS.items():
        labels = [rule(x, y) for x, y in grid]
        counts_all = Counter(labels)
        keep = [i for i, label in enumerate(labels) if counts_all[label] >= min_class_size]
        if len({labels[i] for i in keep}) < 2:
            lines += [
                f"## {name}",
                "",
                "skipped: fewer than two classes with enough prompts on this grid.",
                "",
            ]
            continue
        subset = replace(result, scores_sum=result.scores_sum[keep], metric_clean=result.metric_clean[keep])
        scores = score_hypotheses(
            subset, [labels[i] for i in keep], high=high, low=low, min_class_size=min_class_size
        )
        scores.save(out / f"auroc-{name.replace(' ', '-')}.json")
        chosen = scores.selective()
        counts: dict[str, int] = {}
        for s in chosen:
            counts[str(s.class_label)] = counts.get(str(s.class_label), 0) + 1
        report.selective[name] = counts
        report.top[name] = [s.__dict__ for s in chosen[:10]]
        lines += [
            f"## {name}",
            "",
            f"{len(chosen)} selective (neuron, class) pairs; per class: {json.dumps(counts)}.",
            "",
        ]
        if chosen:
            lines += ["| neuron | class | AUROC | in-class mean (share of metric) | out-of-class mean (share) |",
                      "|---|---|---|---|---|"]  # fmt: skip
            for s in chosen[:10]:
                share = lambda v: "n/a" if v is None else f"{v:+.3f}"  # noqa: E731
                lines.append(
                    f"| {s.node} | {s.class_label} | {s.auroc:.3f} | {s.in_class_mean:+.4f} ({share(s.in_class_share)}) |"
                    f" {s.out_class_mean:+.4f} ({share(s.out_class_share)}) |"
                )
            lines.append("")
            for i, s in enumerate(chosen[:heatmaps]):
                png = out / f"heatmap-{name.replace(' ', '-')}-{i + 1}.png"
                _heatmap(result.scores_sum[:, result.layers.index(s.layer), s.neuron], operands, png,
                         title=f"{s.node}: {name} = {s.class_label} (AUROC {s.auroc:.2f})")  # fmt: skip
                lines.append(f"![{s.node}]({png.name})")
            lines.append("")
    times["scoring"] = time.perf_counter() - start
    lines += [f"Times: {json.dumps({k: round(v, 1) for k, v in times.items()})} s.", ""]
    write_text_atomic(out / "report.md", "\n".join(lines))
    report.save(out / "report.json")
    return report


def _heatmap(values: torch.Tensor, operands: list[int], path: Path, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(operands)
    grid = values.reshape(n, n).float().numpy()
    fig, ax = plt.subplots(figsize=(5, 4.3), constrained_layout=True)
    image = ax.imshow(grid, cmap="RdBu_r", vmin=-abs(grid).max(), vmax=abs(grid).max(), origin="lower")
    ax.set_xlabel("y")
    ax.set_ylabel("x")
    ticks = list(range(0, n, max(1, n // 10)))
    ax.set_xticks(ticks, [operands[t] for t in ticks])
    ax.set_yticks(ticks, [operands[t] for t in ticks])
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="attribution (summed over positions)")
    fig.savefig(path, dpi=100)
    plt.close(fig)

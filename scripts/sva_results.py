"""Merge the SVA evaluation runs (`make results`) into docs/results/: one plot and table per set, and the summary
rows for docs/results.md (printed)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from neurontrace.evaluation.faithfulness import Curve
from neurontrace.evaluation.report import summary_rows, write_report

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["sva-simple", "sva-nounpp", "sva-within-rc"]


def load(task: str) -> list[Curve]:
    curves = []
    for part in ("main", "ig"):
        path = ROOT / "results" / f"{task}-{part}" / "curves.json"
        if path.is_file():
            curves += [Curve.from_dict(c) for c in json.loads(path.read_text())]
    return curves


def main() -> None:
    fmt = lambda v, spec: "never" if v is None else format(v, spec)  # noqa: E731
    print("| set | method | basis | nodes for faithfulness ≥ 0.8 | completeness there | random nodes, same size |"
          " nodes for ≥ 0.9 | sweep time (s) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for task in TASKS:
        curves = load(task)
        if not curves:
            print(f"no curves for {task}", file=sys.stderr)
            continue
        configs = {}
        for part in ("main", "ig"):
            cfg = ROOT / "results" / f"{task}-{part}" / "config.json"
            if cfg.is_file():
                configs[part] = json.loads(cfg.read_text())
        notes = [
            f"Run settings: {json.dumps(configs.get('main', {}))}",
            f"IG run settings: {json.dumps(configs.get('ig', {}))}",
        ]
        write_report(curves, ROOT / "docs" / "results" / task, title=f"{task} on smollm2-135m", notes=notes)
        for c, row in zip(curves, summary_rows(curves), strict=True):
            print(f"| {task} | {row['method']} | {row['basis']} | {fmt(row['nodes@0.8'], 'd')} | "
                  f"{fmt(row['completeness@0.8'], '.3f')} | {fmt(row['random@0.8'], '.3f')} | "
                  f"{fmt(row['nodes@0.9'], 'd')} | {c.meta.get('sweep_seconds', 0):.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()

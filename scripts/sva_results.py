"""Merge the SVA evaluation runs of `make results` (results/<model>/<task>/) into docs/results/<model>/<task>/
(one plot and report per set) and print the markdown tables of docs/results.md: exact sizes with 95% intervals,
and the AtP/RelP size ratio with a paired bootstrap interval (same seeds, same resampled test examples)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

from neurontrace.evaluation import intervals
from neurontrace.evaluation.faithfulness import Curve
from neurontrace.evaluation.report import fmt_size, fmt_value, reversal_notes, summarise, write_report

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["smollm2-135m", "gemma3-270m"]
TASKS = ["sva-simple", "sva-nounpp", "sva-within-rc", "sva-pp-mixed"]
LEVELS = (0.8, 0.9)


def load(model: str, task: str) -> tuple[list[Curve], dict]:
    folder = ROOT / "results" / model / task
    path = folder / "curves.json"
    if not path.is_file():
        return [], {}
    curves = [Curve.from_dict(c) for c in json.loads(path.read_text())]
    return curves, json.loads((folder / "config.json").read_text())


def size_ratio(curves: list[Curve], level: float, num: str, den: str) -> tuple[float, list[float]] | None:
    """Mean over seeds of size(num) / size(den) at ``level``, and the pooled interval of the paired bootstrap
    ratio (both methods are measured on the same test examples of a seed, and the replicates share weights)."""
    by = {(c.method, c.seed): c for c in curves}
    points, reps = [], []
    for (method, seed), c in by.items():
        if method != den or (num, seed) not in by:
            continue
        a, b = by[(num, seed)], c
        la, lb = a.level(level), b.level(level)
        if la is None or lb is None or la.n_nodes is None or lb.n_nodes is None:
            return None
        points.append(la.n_nodes / lb.n_nodes)
        reps.append(a.size_replicates(level) / b.size_replicates(level))
    if not points:
        return None
    return sum(points) / len(points), intervals.percentile_interval(torch.cat(reps))


def by_case(curves: list[Curve], method: str = "relp", level: float = 0.8) -> list[str]:
    """Per test-pair case, over seeds: F(M), F(∅) and F(C^c) (mean logit difference) at the exact size for
    ``level``, and the share of pairs whose logit difference is below 0 (the counterfactual verb preferred)
    with the circuit ablated."""
    acc: dict[str, dict[str, list[float]]] = {}
    for c in curves:
        lv = c.level(level)
        cases = c.meta.get("test_cases")
        if c.method != method or lv is None or lv.n_nodes is None or not cases or None in cases:
            continue
        comp = c.samples["complement"][str(lv.n_nodes)]
        for i, case in enumerate(cases):
            a = acc.setdefault(case, {"model": [], "empty": [], "complement": []})
            a["model"].append(c.samples["model"][i])
            a["empty"].append(c.samples["empty"][i])
            a["complement"].append(comp[i])
    rows = []
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    for case, a in sorted(acc.items()):
        flipped = sum(x < 0 for x in a["complement"]) / len(a["complement"])
        f_m, f_e, f_cc = mean(a["model"]), mean(a["empty"]), mean(a["complement"])
        rows.append(
            f"{case} | {len(a['model'])} | {f_m:.2f} | {f_e:.2f} | {f_cc:.2f} | {(f_cc - f_e) / (f_m - f_e):.2f} | "
            f"{flipped:.0%}"
        )
    return rows


def verdict(ci: list[float]) -> str:
    if ci[0] > 1:
        return "RelP smaller"
    if ci[1] < 1:
        return "AtP smaller"
    return "no clear difference"


def main() -> None:
    rows = []
    ratios = []
    notes = []
    cases: list[str] = []
    for model in MODELS:
        for task in TASKS:
            curves, config = load(model, task)
            if not curves:
                print(f"no curves for {model} / {task}", file=sys.stderr)
                continue
            pairs = config.get("extra", {}).get("pairs", {})
            run_notes = [
                f"Run settings: {json.dumps({k: v for k, v in config.items() if k != 'extra'})}",
                f"Pairs: {json.dumps(pairs)}",
            ]
            write_report(
                curves, ROOT / "docs" / "results" / model / task, title=f"{task} on {model}", notes=run_notes
            )
            for s in summarise(curves):
                n = len(s.seeds)
                lv8, lv9 = s.level(0.8), s.level(0.9)
                per_seed = ", ".join("never" if x is None else str(x) for x in (lv8.per_seed if lv8 else []))
                rows.append(
                    f"| {model} | {task} | {s.method} | {config['nodes']} | {fmt_size(lv8, n)} | "
                    f"{'–' if lv8 is None or lv8.grid_n_nodes is None else f'{lv8.grid_n_nodes:.0f}'} | {per_seed} | "
                    f"{fmt_value(lv8 and lv8.completeness, lv8 and lv8.completeness_ci)} | "
                    f"{fmt_value(lv8 and lv8.random_faithfulness, lv8 and lv8.random_ci)} | {fmt_size(lv9, n)} | "
                    f"{fmt_value(s.f_model, s.f_model_ci)} | {fmt_value(s.f_empty, s.f_empty_ci)} |"
                )
            for level in LEVELS:
                r = size_ratio(curves, level, "atp", "relp")
                if r is None:
                    ratios.append(f"| {model} | {task} | {level:g} | – | – | (a method never reaches it) |")
                else:
                    point, ci = r
                    hi = "∞" if math.isinf(ci[1]) else f"{ci[1]:.2f}"
                    ratios.append(
                        f"| {model} | {task} | {level:g} | {point:.2f} | [{ci[0]:.2f}, {hi}] | {verdict(ci)} |"
                    )
            notes += [f"- {model} / {task}: {n[2:]}" for n in reversal_notes(curves)]
            cases += [f"| {model} | {task} | {row} |" for row in by_case(curves)]
    print("| model | set | method | nodes | nodes for F ≥ 0.8 [95% CI] | grid said | per seed | completeness there |"
          " random nodes, same size | nodes for F ≥ 0.9 [95% CI] | F(M) | F(∅) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print("\n| model | set | level | AtP size / RelP size | 95% CI (paired bootstrap) | reading |")
    print("|---|---|---|---|---|---|")
    print("\n".join(ratios))
    if notes:
        print("\nCompleteness well below 0:\n")
        print("\n".join(notes))
    print("\nRelP circuit at faithfulness 0.8 ablated (the complement kept), per test-pair case (subject_noun2"
          " number), over seeds: mean logit difference clean - counterfactual verb\n")  # fmt: skip
    print("| model | set | case | test pairs | F(M) | F(∅) | F(C^c) | completeness of the case |"
          " pairs preferring the counterfactual verb |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(cases))


if __name__ == "__main__":
    main()

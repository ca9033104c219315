"""Summaries over seeds, plots and the markdown report of an evaluation run.

A curve is one (method, basis, seed). :func:`summarise` joins the seeds of each (method, basis): a point value
is the mean over seeds, its 95% interval the percentile interval of the bootstrap replicates of every seed
pooled (:mod:`.intervals`), so it holds both the test-example and the split-to-split variation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from neurontrace.evaluation import intervals
from neurontrace.evaluation.faithfulness import LEVELS, Curve
from neurontrace.io import write_text_atomic

REVERSAL = -0.1
"""Completeness below this is called a reversal in the report (see :func:`reversal_notes`)."""


@dataclass
class LevelSummary:
    """The exact circuit size for a faithfulness level over seeds, and what the circuit does there."""

    level: float
    n_nodes: float | None  # mean over the seeds that reach the level (None: none does)
    n_nodes_ci: list[float]
    seeds_reached: int
    exact: bool  # every seed's size was scanned exactly (not a bisection upper bound)
    grid_n_nodes: float | None  # what the grid alone says (mean over seeds)
    per_seed: list[int | None]
    faithfulness: float | None = None
    completeness: float | None = None
    completeness_ci: list[float] = field(default_factory=list)
    random_faithfulness: float | None = None
    random_ci: list[float] = field(default_factory=list)
    f_complement: float | None = (
        None  # raw F(C^c): below F(∅) when ablating the circuit reverses the behaviour
    )


@dataclass
class CurveSummary:
    method: str
    basis: str
    seeds: list[int]
    n_total: int
    f_model: float
    f_model_ci: list[float]
    f_empty: float
    f_empty_ci: list[float]
    levels: list[LevelSummary]

    def level(self, level: float) -> LevelSummary | None:
        return next((lv for lv in self.levels if abs(lv.level - level) < 1e-12), None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def _pooled(samples: list[torch.Tensor]) -> list[float]:
    return intervals.percentile_interval(torch.cat(samples)) if samples else []


def summarise(curves: Sequence[Curve]) -> list[CurveSummary]:
    """One summary per (method, basis), in the order the curves come, over every seed present."""
    groups: dict[tuple[str, str], list[Curve]] = {}
    for c in curves:
        groups.setdefault((c.method, c.basis), []).append(c)
    out = []
    for (method, basis), group in groups.items():
        f_model = [c.replicate_base()[1] for c in group]
        f_empty = [c.replicate_base()[2] for c in group]
        levels = []
        for level in sorted({lv.level for c in group for lv in c.levels}):
            per = [c.level(level) for c in group]
            reached = [
                (c, lv) for c, lv in zip(group, per, strict=True) if lv is not None and lv.n_nodes is not None
            ]
            completeness = [c.replicates(c.samples["complement"][str(lv.n_nodes)]) for c, lv in reached]
            randoms = [
                c.replicates(c.samples["random"][str(lv.n_nodes)])
                for c, lv in reached
                if str(lv.n_nodes) in c.samples.get("random", {})
            ]
            f_cc = [
                sum(c.samples["complement"][str(lv.n_nodes)]) / len(c.samples["model"]) for c, lv in reached
            ]
            levels.append(
                LevelSummary(
                    level=level,
                    n_nodes=_mean([lv.n_nodes for _, lv in reached]),
                    n_nodes_ci=_pooled([c.size_replicates(level) for c in group]),
                    seeds_reached=len(reached),
                    exact=all(lv.exact for _, lv in reached),
                    grid_n_nodes=_mean([lv.grid_n_nodes for _, lv in reached]),
                    per_seed=[None if lv is None else lv.n_nodes for lv in per],
                    faithfulness=_mean([lv.faithfulness for _, lv in reached]),
                    completeness=_mean([lv.completeness for _, lv in reached]),
                    completeness_ci=_pooled(completeness),
                    random_faithfulness=_mean([lv.random_faithfulness for _, lv in reached]),
                    random_ci=_pooled(randoms),
                    f_complement=_mean(f_cc),
                )
            )
        out.append(
            CurveSummary(
                method=method,
                basis=basis,
                seeds=[c.seed for c in group],
                n_total=group[0].n_total,
                f_model=_mean([c.f_model for c in group]),
                f_model_ci=_pooled(f_model),
                f_empty=_mean([c.f_empty for c in group]),
                f_empty_ci=_pooled(f_empty),
                levels=levels,
            )
        )
    return out


# ------------------------------------------------------------------ text


def fmt_size(lv: LevelSummary | None, n_seeds: int) -> str:
    """``52 [41, 60]``; ``≤ 300 [..]`` for an upper bound; ``never`` when no seed reaches the level."""
    if lv is None or lv.n_nodes is None:
        return "never"
    lo, hi = lv.n_nodes_ci or [math.nan, math.nan]
    ci = f"[{lo:.0f}, {'never' if math.isinf(hi) else f'{hi:.0f}'}]"
    text = f"{'' if lv.exact else '≤ '}{lv.n_nodes:.0f} {ci}"
    if lv.seeds_reached < n_seeds:
        text += f" ({lv.seeds_reached}/{n_seeds} seeds)"
    return text


def fmt_value(value: float | None, ci: Sequence[float] | None) -> str:
    if value is None:
        return "–"
    if not ci:
        return f"{value:.3f}"
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def summary_table(curves: Sequence[Curve], levels: Sequence[float] = LEVELS) -> str:
    """Markdown table: exact nodes to reach each faithfulness level (95% interval), the grid's value,
    completeness and the random control there, F(M) and F(∅)."""
    summaries = summarise(curves)
    head = ["method", "basis", "seeds"]
    for level in levels:
        head += [f"nodes for F ≥ {level:g}", "grid said", "completeness there", "random nodes, same size"]
    head += ["F(M)", "F(∅)", "total nodes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summaries:
        row = [s.method, s.basis, str(len(s.seeds))]
        for level in levels:
            lv = s.level(level)
            grid = "–" if lv is None or lv.grid_n_nodes is None else f"{lv.grid_n_nodes:.0f}"
            row += [
                fmt_size(lv, len(s.seeds)),
                grid,
                fmt_value(lv and lv.completeness, lv and lv.completeness_ci),
                fmt_value(lv and lv.random_faithfulness, lv and lv.random_ci),
            ]
        row += [fmt_value(s.f_model, s.f_model_ci), fmt_value(s.f_empty, s.f_empty_ci), str(s.n_total)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def reversal_notes(curves: Sequence[Curve], level: float = LEVELS[0]) -> list[str]:
    """A sentence for each (method, basis) whose completeness at ``level`` is below :data:`REVERSAL`: ablating
    only the circuit moves the metric past the fully ablated model (for a logit difference below 0: the model
    then prefers the counterfactual answer, e.g. follows an attractor noun)."""
    notes = []
    for s in summarise(curves):
        lv = s.level(level)
        if lv is None or lv.completeness is None or lv.completeness >= REVERSAL:
            continue
        prefers = (
            " (below 0: the model then prefers the counterfactual answer)" if lv.f_complement < 0 else ""
        )
        notes.append(
            f"- {s.method} / {s.basis}: completeness {lv.completeness:.2f} at {lv.n_nodes:.0f} nodes is a "
            f"reversal, not a small residue: with only the circuit ablated the metric is {lv.f_complement:.2f}, "
            f"beyond the fully ablated model's {s.f_empty:.2f}{prefers}; near 0 would mean the rest of the model "
            "cannot do the task."
        )
    return notes


# ------------------------------------------------------------------ plot

METHOD_COLORS = {
    "relp": "tab:blue",
    "atp": "tab:orange",
    "ig": "tab:green",
    "ig-inputs": "tab:olive",
    "exact": "tab:red",
    "delta": "tab:brown",
    "random": "tab:gray",
}
BASIS_STYLES = {"neurons": "-", "mlp_out": "--", "resid": ":", "attn_out": "-."}
DICTIONARY_STYLES = {
    "sae": (0, (5, 1, 1, 1)),
    "transcoder": (0, (1, 1)),
}  # basis labels sae-NAME, transcoder-NAME


def _band(
    curves: Sequence[Curve], xs: torch.Tensor, kind: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean over seeds of a curve quantity at sizes ``xs`` (interpolated in log size), and its pooled
    bootstrap 95% band."""
    import numpy as np

    means, reps = [], []
    for c in curves:
        pts = [p for p in c.points if p.n_nodes > 0]
        px = np.log([p.n_nodes for p in pts])
        key = "circuit" if kind == "faithfulness" else "complement"
        point = [p.faithfulness if kind == "faithfulness" else p.completeness for p in pts]
        means.append(np.interp(np.log(xs.numpy()), px, point))
        r = torch.stack([c.replicates(c.samples[key][str(p.n_nodes)]) for p in pts], dim=1).numpy()  # [R, P]
        reps.append(np.stack([np.interp(np.log(xs.numpy()), px, row) for row in r]))
    pooled = np.concatenate(reps)
    lo, hi = np.percentile(pooled, 2.5, axis=0), np.percentile(pooled, 97.5, axis=0)
    return torch.tensor(np.mean(means, axis=0)), torch.tensor(lo), torch.tensor(hi)


def plot_curves(curves: Sequence[Curve], path: str | Path, *, title: str = "") -> Path:
    """Faithfulness and completeness against the number of nodes (log axis): one colour per method, one line
    style per basis, mean over seeds with a pooled bootstrap 95% band; the random-nodes control of each basis
    in gray; exact sizes at the levels marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_f, ax_c) = plt.subplots(1, 2, figsize=(14, 6.2), constrained_layout=True)
    groups: dict[tuple[str, str], list[Curve]] = {}
    for c in curves:
        groups.setdefault((c.method, c.basis), []).append(c)
    randoms_drawn = set()
    summaries = {(s.method, s.basis): s for s in summarise(curves)}
    for (method, basis), group in groups.items():
        sizes = sorted({p.n_nodes for c in group for p in c.points if p.n_nodes > 0})
        if not sizes:
            continue
        lo_x = max(min(p.n_nodes for p in c.points if p.n_nodes > 0) for c in group)
        hi_x = min(max(p.n_nodes for p in c.points) for c in group)
        xs = torch.tensor([x for x in sizes if lo_x <= x <= hi_x] or sizes[:1], dtype=torch.float64)
        color = METHOD_COLORS.get(method, "tab:purple")
        ls = BASIS_STYLES.get(basis, DICTIONARY_STYLES.get(basis.split("-")[0], "-"))
        label = f"{method} / {basis}"
        for ax, kind in ((ax_f, "faithfulness"), (ax_c, "completeness")):
            mean, lo, hi = _band(group, xs, kind)
            ax.plot(xs, mean, color=color, ls=ls, lw=1.6, label=label)
            ax.fill_between(xs, lo, hi, color=color, alpha=0.15, lw=0)
        for lv in summaries[(method, basis)].levels:
            if lv.n_nodes is not None:
                ax_f.plot([lv.n_nodes], [lv.level], marker="x", color=color, ms=7, mew=1.8)
        if basis not in randoms_drawn and all(c.samples.get("random") for c in group):
            randoms_drawn.add(basis)
            c = group[0]
            rp = [p for p in c.points if p.random_faithfulness is not None and p.n_nodes > 0]
            ax_f.plot(
                [p.n_nodes for p in rp],
                [p.random_faithfulness for p in rp],
                ls=ls,
                color="gray",
                lw=1,
                alpha=0.7,
                label=f"random nodes of the same size / {basis}",
            )
    for ax, name in ((ax_f, "faithfulness (1 is good)"), (ax_c, "completeness (0 is good)")):
        ax.set_xscale("log")
        ax.set_xlabel("nodes in circuit")
        ax.set_ylabel(name)
        ax.axhline(1.0, color="black", lw=0.5)
        ax.axhline(0.0, color="black", lw=0.5)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
    for level in LEVELS:
        ax_f.axhline(level, color="gray", lw=0.7, ls=":")
        ax_f.annotate(
            f"{level:g}", xy=(0, level), xycoords=("axes fraction", "data"), xytext=(2, 2),
            textcoords="offset points", fontsize=8, color="dimgray",
        )  # fmt: skip
    ax_f.set_title(
        "faithfulness; x = exact size at 0.8 / 0.9 (mean over seeds); bands: 95% bootstrap", fontsize=9
    )
    ax_c.set_title("completeness (below 0: ablating the circuit reverses the behaviour)", fontsize=9)
    if title:
        fig.suptitle(f"{title}   (colour: method; line style: basis)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def write_report(curves: Sequence[Curve], out: str | Path, *, title: str, notes: Sequence[str] = ()) -> Path:
    """``faithfulness.png`` and ``report.md`` in ``out``; returns the report's path."""
    out = Path(out)
    plot_curves(curves, out / "faithfulness.png", title=title)
    body = [f"# {title}", "", *notes, "", summary_table(curves), ""]
    reversals = reversal_notes(curves)
    if reversals:
        body += ["Completeness well below 0:", "", *reversals, ""]
    body += [
        "![faithfulness and completeness](faithfulness.png)",
        "",
        "Faithfulness = (F(C) − F(∅)) / (F(M) − F(∅)); completeness = (F(C^c) − F(∅)) / (F(M) − F(∅)); F(X) is the "
        "mean logit difference on the test split with every node outside X ablated. 'nodes for F ≥ L' is the "
        "exact smallest circuit of the method's ranking (nodes by decreasing |score|) whose faithfulness reaches "
        "L, searched in the bracket the threshold grid gives (bisection, then every size of the bracket upwards; "
        "'≤' marks a bisection crossing where the bracket was too wide to scan); 'grid said' is the first grid "
        "point reaching L. Values are means over seeds; [brackets] are 95% intervals: percentiles of bootstrap "
        "replicates over test examples, pooled over seeds (other train/test splits and random draws). 'random "
        "nodes' is the faithfulness of a random node set of the same size. Curves with every per-example "
        "value: curves.json.",
    ]
    return write_text_atomic(out / "report.md", "\n".join(body) + "\n")

"""Plots and the markdown summary of an evaluation run."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from neurontrace.evaluation.faithfulness import Curve
from neurontrace.io import write_text_atomic

LEVELS = (0.8, 0.9)


def plot_curves(curves: Sequence[Curve], path: str | Path, *, title: str = "") -> Path:
    """Faithfulness and completeness against the number of nodes (log axis), one line per method/basis; the
    random-nodes control of each basis dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_f, ax_c) = plt.subplots(1, 2, figsize=(13, 4.8), constrained_layout=True)
    basis_colors = {
        "neurons": "tab:blue",
        "mlp_out": "tab:orange",
        "resid": "tab:green",
        "attn_out": "tab:purple",
    }
    method_styles = {
        "relp": "-",
        "atp": "--",
        "ig": (0, (4, 1, 1, 1)),
        "ig-inputs": (0, (4, 1, 1, 1)),
        "exact": "-",
        "random": "-.",
    }
    randoms_drawn = set()
    for curve in curves:
        pts = [p for p in curve.points if p.n_nodes > 0]
        xs = [p.n_nodes for p in pts]
        label = f"{curve.method} / {curve.basis}"
        color = basis_colors.get(curve.basis, "tab:red")
        style = dict(ls=method_styles.get(curve.method, "-"), marker="o", ms=2.5, color=color, label=label)
        if curve.method == "random":
            style.update(alpha=0.5)
        ax_f.plot(xs, [p.faithfulness for p in pts], **style)
        ax_c.plot(xs, [p.completeness for p in pts], **style)
        if curve.basis not in randoms_drawn and any(p.random_faithfulness is not None for p in pts):
            randoms_drawn.add(curve.basis)
            rp = [p for p in pts if p.random_faithfulness is not None]
            ax_f.plot(
                [p.n_nodes for p in rp],
                [p.random_faithfulness for p in rp],
                ls=(0, (1, 3)),
                color=color,
                alpha=0.6,
                label=f"random nodes of the same size / {curve.basis}",
            )
    for ax, name in ((ax_f, "faithfulness (1 is good)"), (ax_c, "completeness (0 is good)")):
        ax.set_xscale("log")
        ax.set_xlabel("nodes in circuit")
        ax.set_ylabel(name)
        ax.axhline(1.0, color="black", lw=0.5)
        ax.axhline(0.0, color="black", lw=0.5)
        ax.grid(alpha=0.3)
    for level in LEVELS:
        ax_f.axhline(level, color="gray", lw=0.5, ls=":")
    ax_f.legend(fontsize=8, loc="best")
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def summary_rows(curves: Sequence[Curve]) -> list[dict]:
    rows = []
    for c in curves:
        row = {
            "method": c.method,
            "basis": c.basis,
            "f_model": c.f_model,
            "f_empty": c.f_empty,
            "total": c.n_total,
        }
        for level in LEVELS:
            p = c.nodes_to_reach(level)
            row[f"nodes@{level}"] = None if p is None else p.n_nodes
            row[f"completeness@{level}"] = None if p is None else p.completeness
            row[f"random@{level}"] = None if p is None else p.random_faithfulness
        rows.append(row)
    return rows


def summary_table(curves: Sequence[Curve]) -> str:
    """Markdown table: nodes needed to reach faithfulness 0.8 and 0.9, and completeness there."""
    fmt = lambda v, spec: "never" if v is None else format(v, spec)  # noqa: E731
    lines = [
        "| method | basis | F(M) | F(∅) | nodes for faithfulness ≥ 0.8 | completeness there | random nodes "
        "(same size) | nodes for ≥ 0.9 | completeness there | total nodes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary_rows(curves):
        lines.append(
            f"| {r['method']} | {r['basis']} | {r['f_model']:.3f} | {r['f_empty']:.3f} | {fmt(r['nodes@0.8'], 'd')} | "
            f"{fmt(r['completeness@0.8'], '.3f')} | {fmt(r['random@0.8'], '.3f')} | {fmt(r['nodes@0.9'], 'd')} | "
            f"{fmt(r['completeness@0.9'], '.3f')} | {r['total']} |"
        )
    return "\n".join(lines)


def write_report(curves: Sequence[Curve], out: str | Path, *, title: str, notes: Sequence[str] = ()) -> Path:
    """``faithfulness.png`` and ``report.md`` in ``out``; returns the report's path."""
    out = Path(out)
    plot_curves(curves, out / "faithfulness.png", title=title)
    body = [
        f"# {title}",
        "",
        *notes,
        "",
        summary_table(curves),
        "",
        "![faithfulness and completeness](faithfulness.png)",
        "",
    ]
    body += [
        "Faithfulness = (F(C) − F(∅)) / (F(M) − F(∅)); completeness = (F(C^c) − F(∅)) / (F(M) − F(∅)); F(X) is the "
        "mean logit difference on the test split with every node outside X ablated. 'random nodes' is the "
        "faithfulness of a random node set of the same size. Curves: curves.json."
    ]
    return write_text_atomic(out / "report.md", "\n".join(body) + "\n")

"""Rule presets against exact activation patching (issue 17): is RelP (``--rules relp``, softmax detached)
or the paper's code's rules (``--rules transluce``: gradient through the softmax) clearly closer to patching?

Per Marks et al. SVA test set in ``../shared/data/sva/`` (read from there): ``NT_BENCH_EXAMPLES`` pairs (default
32, shuffled with seed 0 after :func:`neurontrace.tasks.filter_pairs`), every neuron scored position-summed by
the presets ``relp``, ``transluce`` and ``none`` (plain gradient x activation) and by AtP (for reference: the
same maths as ``none``). Node set per set: the union of each preset's top ``NT_BENCH_TOP`` (100) plus
``NT_BENCH_RANDOM`` (200) random other neurons (seed 0), the same for every method; their exact patching effects
come from :func:`bench_attribution.exact_effects` (each neuron at every position set to its counterfactual
value, mean change of the logit difference). Reported per set and pooled (all sets' nodes as one sample):
Pearson and Spearman with patching, each with a 95% bootstrap interval (nodes resampled, 1,000 replicates,
seeded; pooled replicates resample each set's nodes within that set), and the paired interval of the
differences relp - transluce and relp - none (one set of resamples for all methods), so a preset is clearly
closer where its difference's interval excludes 0. Conservation is not measured here (docs/attribution.md).

``NT_BENCH_SETS`` (comma-separated, e.g. ``simple,nounpp``) picks the sets; default every one of simple,
nounpp, rc, within_rc that exists there. Exact patching dominates the cost: one forward row per node and pair,
so it grows with pairs x nodes x tokens. Smoke run (``OMP_NUM_THREADS=1 NT_BENCH_EXAMPLES=4
NT_BENCH_SETS=simple,nounpp``, shared 2-core CPU machine, 2026-12-01): 327 and 348 nodes, exact patching 5.8 s and
11.9 s, each method's scores 0.4 s, 24 s in all. Estimate for the full run (32 pairs, simple, nounpp and within_rc,
the last as long in tokens as nounpp): exact patching 8 x (5.8 + 11.9 + 11.9) s, about 4 minutes, and about
5 minutes in all on one thread.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path

import torch
from bench_attribution import exact_effects
from common import save

from neurontrace.attribution.api import attribute
from neurontrace.attribution.replacement import RULE_PRESETS
from neurontrace.evaluation import intervals
from neurontrace.models.loading import load_model
from neurontrace.tasks import Pair, filter_pairs, load_pairs

SVA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sva"
SETS = ("simple", "nounpp", "rc", "within_rc")
N_EXAMPLES = int(os.environ.get("NT_BENCH_EXAMPLES", "32"))
N_TOP = int(os.environ.get("NT_BENCH_TOP", "100"))
N_RANDOM = int(os.environ.get("NT_BENCH_RANDOM", "200"))
PRESETS = ("relp", "transluce", "none")
METHODS: dict[str, dict] = {name: dict(method="relp", rules=RULE_PRESETS[name]) for name in PRESETS}
METHODS["atp"] = dict(method="atp")  # for reference: the same maths as "none"
DIFFERENCES = (("relp", "transluce"), ("relp", "none"))


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def chosen_sets() -> list[str]:
    """The SVA sets to run: ``NT_BENCH_SETS`` or every one of :data:`SETS` whose test file exists."""
    given = os.environ.get("NT_BENCH_SETS")
    if not given:
        found = [name for name in SETS if (SVA / f"{name}_test.jsonl").is_file()]
        if not found:
            raise SystemExit(f"no SVA test sets in {SVA}; this benchmark needs ../shared/data/sva/")
        return found
    names = [n.strip() for n in given.split(",") if n.strip()]
    missing = [n for n in names if not (SVA / f"{n}_test.jsonl").is_file()]
    if missing:
        raise SystemExit(f"NT_BENCH_SETS names {', '.join(missing)}, with no *_test.jsonl in {SVA}")
    return names


def set_pairs(model, name: str, n: int) -> list[Pair]:
    """``n`` pairs of one SVA test set: filtered for the tokenizer, shuffled with seed 0 (as bench_attribution)."""
    pairs = filter_pairs(load_pairs(SVA / f"{name}_test.jsonl"), model.tokenizer)
    random.Random(0).shuffle(pairs)
    return pairs[:n]


def node_set(scores: dict[str, torch.Tensor], *, n_top: int, n_random: int, seed: int = 0) -> list[int]:
    """Flat neuron indices: the union of each preset's top ``n_top`` by |score|, plus ``n_random`` others."""
    top = sorted({i for name in PRESETS for i in scores[name].flatten().abs().topk(n_top).indices.tolist()})
    rest = torch.tensor(sorted(set(range(scores["relp"].numel())) - set(top)))
    rand = rest[torch.randperm(len(rest), generator=torch.Generator().manual_seed(seed))[:n_random]]
    return top + rand.tolist()


def measure_set(model, name: str) -> dict:
    """Scores of every method and exact patching effects on one set's node set."""
    pairs = set_pairs(model, name, N_EXAMPLES)
    scores, seconds = {}, {}
    for method, kw in METHODS.items():
        start = time.perf_counter()
        scores[method] = attribute(model, pairs=pairs, batch_size=8, **kw).position_free
        seconds[method] = time.perf_counter() - start
    nodes = node_set(scores, n_top=N_TOP, n_random=N_RANDOM)
    log(f"{name}: {len(pairs)} pairs, {len(nodes)} neurons to patch")
    start = time.perf_counter()
    exact = exact_effects(model, pairs, nodes, progress=True)
    seconds["exact patching"] = time.perf_counter() - start
    log(f"{name}: exact patching took {seconds['exact patching']:.0f} s")
    return {
        "n_pairs": len(pairs),
        "nodes": nodes,
        "exact": [exact[i] for i in nodes],
        "scores": {method: s.flatten()[nodes].tolist() for method, s in scores.items()},
        "seconds": seconds,
    }


def agreement(weights: torch.Tensor, scores: dict[str, list[float]], exact: list[float]) -> dict:
    """Pearson and Spearman of each method with ``exact`` and their 95% intervals over the resamples in
    ``weights``, and the paired intervals of the :data:`DIFFERENCES` (same resamples for both methods)."""
    truth = torch.tensor(exact, dtype=torch.float64)
    ones = torch.ones(1, truth.numel(), dtype=torch.float64)
    reps, out = {}, {"methods": {}, "differences": {}}
    for method, values in scores.items():
        est = torch.tensor(values, dtype=torch.float64)
        row = {}
        for stat, fn in (("pearson", intervals.weighted_pearson), ("spearman", intervals.weighted_spearman)):
            reps[method, stat] = fn(weights, est, truth)
            row[stat] = float(fn(ones, est, truth)[0])
            row[f"{stat}_ci"] = intervals.percentile_interval(reps[method, stat])
        out["methods"][method] = row
    for a, b in DIFFERENCES:
        for stat in ("pearson", "spearman"):
            point = out["methods"][a][stat] - out["methods"][b][stat]
            ci = intervals.percentile_interval(reps[a, stat] - reps[b, stat])
            out["differences"][f"{stat}({a}) - {stat}({b})"] = {"value": point, "ci": ci}
    return out


def _fmt(value: float, ci: list[float]) -> str:
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def _rows(label: str, result: dict) -> list[tuple[str, str]]:
    rows = []
    for method, r in result["methods"].items():
        rows.append(
            (
                f"{label}: {method} Pearson / Spearman vs exact",
                f"{_fmt(r['pearson'], r['pearson_ci'])} / {_fmt(r['spearman'], r['spearman_ci'])}",
            )
        )
    for name, d in result["differences"].items():
        clear = "excludes 0" if d["ci"][0] > 0 or d["ci"][1] < 0 else "includes 0"
        rows.append((f"{label}: {name}", f"{_fmt(d['value'], d['ci'])} ({clear})"))
    return rows


def main() -> dict:
    start = time.perf_counter()
    model = load_model("smollm2-135m", device="cpu")
    names = chosen_sets()
    measured = {}
    for name in names:
        measured[name] = measure_set(model, name)
    sizes = [len(measured[name]["nodes"]) for name in names]
    weights = intervals.stratified_weights(sizes, replicates=intervals.REPLICATES, seed=0)
    per_set, offset = {}, 0
    for name, size in zip(names, sizes, strict=True):
        m = measured[name]
        per_set[name] = agreement(weights[:, offset : offset + size], m["scores"], m["exact"])
        offset += size
    pooled = agreement(
        weights,
        {method: [v for name in names for v in measured[name]["scores"][method]] for method in METHODS},
        [v for name in names for v in measured[name]["exact"]],
    )
    total_s = time.perf_counter() - start
    settings = {
        "n_examples": N_EXAMPLES,
        "n_top": N_TOP,
        "n_random": N_RANDOM,
        "replicates": intervals.REPLICATES,
    }
    save(
        "rules",
        {
            "settings": settings,
            "sets": measured,
            "per_set": per_set,
            "pooled": pooled,
            "total_seconds": total_s,
        },
    )
    rows = [
        (
            f"{N_EXAMPLES} pairs per set (before filtering), node set: each preset's top {N_TOP} + {N_RANDOM} "
            "random; values: estimate [95% bootstrap interval over nodes]",
            "",
        )
    ]
    for name in names:
        m = measured[name]
        label = f"{name} ({m['n_pairs']} pairs, {len(m['nodes'])} neurons)"
        rows += _rows(label, per_set[name])
        rows.append((f"{name}: exact patching time", f"{m['seconds']['exact patching']:.1f} s"))
    rows += _rows(f"pooled ({', '.join(names)}; {sum(sizes)} neurons)", pooled)
    rows.append(("total time", f"{total_s:.0f} s"))
    return {"title": "Rule presets against exact patching (SmolLM2-135M, float32, CPU)", "rows": rows,
            "raw": json.dumps({"per_set": per_set, "pooled": pooled})}  # fmt: skip


if __name__ == "__main__":
    for name, value in main()["rows"]:
        print(f"{name}: {value}")

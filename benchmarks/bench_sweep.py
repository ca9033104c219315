"""An evaluation sweep as it ran before issue 15 (one circuit per forward pass, every pass in full) against the
default sweep (several circuits per pass and the pass shortcuts of ``evaluation/shortcuts.py``), in one process:
times, their ratio, and how far the curves differ.

RelP neuron scores from 32 SVA nounpp train pairs, mean ablation, 32 test pairs (one test batch), the default
thresholds and levels with the random control, on the default model. Four ways are timed (full passes one at a
time, full passes batched, shortcuts one at a time, shortcuts batched = the default), then the first and the last
once more, alternating, so a change of machine speed during the run shows as a spread; the speed-up is the
ratio of the faster run of each. Each sweep gets a fresh evaluation set (the shortcuts' caches are part of its
time). On a shared machine the CPU time of the process is the steadier measure; on a GPU, the wall time.
"""

from __future__ import annotations

import json
import sys

from common import run_python, save

RUN = """
import json, time, torch
from neurontrace.models.loading import load_model
from neurontrace.attribution.api import attribute
from neurontrace.evaluation.faithfulness import prepare_eval, sweep
from neurontrace.tasks import generate_sva
model = load_model("smollm2-135m")
pairs = generate_sva("nounpp", n=64, seed=0, tokenizer=model.tokenizer)
train, test = pairs[:32], pairs[32:64]
scores = attribute(model, pairs=train, method="relp", batch_size=8).mean_scores
prepare_eval(model, test, ablation="mean", batch_size=32).metric_values(None)  # warm-up
MODES = {"full-one": (1, False), "full-batched": (None, False), "shortcuts-one": (1, True),
         "default": (None, True)}
out = {"device": str(model.device), "threads": torch.get_num_threads(), "n_test": len(test), "runs": []}
curves = {}
for name in ["full-one", "default", "full-batched", "shortcuts-one", "full-one", "default"]:
    width, shortcuts = MODES[name]
    evalset = prepare_eval(model, test, ablation="mean", batch_size=32, shortcuts=shortcuts)
    start, cpu = time.perf_counter(), time.process_time()
    curve = sweep(evalset, scores, method="relp", max_circuits=width)
    out["runs"].append({"mode": name, "seconds": time.perf_counter() - start,
                        "cpu_seconds": time.process_time() - cpu, "forwards": evalset.forwards,
                        "passes": evalset.passes, "circuits_per_pass": evalset.circuits_per_pass(),
                        "prefix": evalset.prefix})
    curves.setdefault(name, curve)
def numbers(x):  # every number of a curve's JSON, in order
    if isinstance(x, dict):
        return [v for k in sorted(x) for v in numbers(x[k])]
    if isinstance(x, list):
        return [v for item in x for v in numbers(item)]
    return [float(x)] if isinstance(x, (int, float)) and not isinstance(x, bool) else []
ref = curves["full-one"]
out["agreement"] = {}
for name, curve in curves.items():
    a, b = numbers(json.loads(ref.to_json())), numbers(json.loads(curve.to_json()))
    out["agreement"][name] = {
        "identical": ref.to_json() == curve.to_json(),
        "max_abs_diff": max((abs(x - y) for x, y in zip(a, b)), default=0.0) if len(a) == len(b) else None,
        "same_sizes": [[lv.level, lv.n_nodes, lv.exact] for lv in ref.levels]
        == [[lv.level, lv.n_nodes, lv.exact] for lv in curve.levels],
        "same_points": [p.n_nodes for p in ref.points] == [p.n_nodes for p in curve.points]}
out["points"] = len(ref.points)
out["levels"] = [[lv.level, lv.n_nodes, lv.exact] for lv in ref.levels]
print(json.dumps(out))
"""

LABELS = {
    "full-one": "one circuit per pass, full passes (before issue 15)",
    "full-batched": "several circuits per pass, full passes",
    "shortcuts-one": "one circuit per pass, shortcuts",
    "default": "several circuits per pass, shortcuts (the default)",
}


def main() -> dict:
    r = run_python(RUN, env={"HF_HUB_OFFLINE": "1"})
    save("sweep", {"results": r})
    runs: dict[str, list[dict]] = {}
    for run in r["runs"]:
        runs.setdefault(run["mode"], []).append(run)
    best = {m: min(x["seconds"] for x in rs) for m, rs in runs.items()}
    best_cpu = {m: min(x["cpu_seconds"] for x in rs) for m, rs in runs.items()}
    prefix = runs["default"][0]["prefix"]
    setting = (
        f"RelP neurons, mean ablation, {r['n_test']} nounpp test pairs, {r['points']} points + random control, "
        f"exact sizes at {', '.join(f'{lv[0]:g}' for lv in r['levels'])}; {r['device']}, {r['threads']} thread(s); "
        f"shared prefix {prefix} token(s)"
    )
    rows = [("setting", setting)]
    for mode, label in LABELS.items():
        rs = runs[mode]
        agree = r["agreement"][mode]
        times = " and ".join(f"{x['seconds']:.1f} s (CPU {x['cpu_seconds']:.1f} s)" for x in rs)
        diff = (
            "bit for bit"
            if agree["identical"]
            else f"largest difference {agree['max_abs_diff']:.1e}"
            if agree["max_abs_diff"] is not None
            else "curves of different shape"
        )
        sizes = "same exact sizes" if agree["same_sizes"] and agree["same_points"] else "OTHER SIZES"
        rows.append(
            (
                label,
                f"{times}; {rs[0]['passes']} passes, {rs[0]['forwards']} circuit-forwards, up to "
                f"{rs[0]['circuits_per_pass'] if mode in ('full-batched', 'default') else 1} per pass; "
                f"{best['full-one'] / best[mode]:.2f}x; {diff}, {sizes}",
            )
        )
    pairwise = [
        one["seconds"] / new["seconds"] for one, new in zip(runs["full-one"], runs["default"], strict=True)
    ]
    rows.append(
        (
            "speed-up of the default sweep (fastest of two runs each: wall; CPU; each pair of runs)",
            f"{best['full-one'] / best['default']:.2f}x; {best_cpu['full-one'] / best_cpu['default']:.2f}x; "
            + ", ".join(f"{x:.2f}x" for x in pairwise),
        )
    )
    return {"title": "Evaluation sweep: batched circuits and pass shortcuts (SmolLM2-135M)", "rows": rows,
            "raw": json.dumps(r)}  # fmt: skip


if __name__ == "__main__":
    sys.path.insert(0, ".")
    for name, value in main()["rows"]:
        print(f"{name}: {value}")

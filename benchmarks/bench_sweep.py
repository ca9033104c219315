"""An evaluation sweep with one circuit per forward pass against the batched sweep (several circuits per pass),
in one process: times, their ratio, and that the two curves are identical.

RelP neuron scores from 32 SVA nounpp train pairs, mean ablation, 32 test pairs (one test batch), the default
thresholds and levels with the random control, on the default model. The process runs after loading the model
and one warm-up forward; set ``OMP_NUM_THREADS=1`` for ratios that do not depend on what else runs (on a shared
machine the CPU time of the process is the steadier measure; on a GPU, the wall time).
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
evalset = prepare_eval(model, test, ablation="mean", batch_size=32)
evalset.metric_values(None)  # warm-up
out = {"device": str(model.device), "threads": torch.get_num_threads(), "n_test": len(test),
       "circuits_per_pass": evalset.circuits_per_pass()}
curves = {}
for name, width in (("one", 1), ("batched", None)):
    forwards, passes = evalset.forwards, evalset.passes
    start, cpu = time.perf_counter(), time.process_time()
    curve = sweep(evalset, scores, method="relp", max_circuits=width)
    out[name] = {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu,
                 "forwards": evalset.forwards - forwards, "passes": evalset.passes - passes}
    curves[name] = curve
one, batched = curves["one"], curves["batched"]
out["identical"] = one.to_json() == batched.to_json()
def numbers(x):  # every number of a curve's JSON, in order
    if isinstance(x, dict):
        return [v for k in sorted(x) for v in numbers(x[k])]
    if isinstance(x, list):
        return [v for item in x for v in numbers(item)]
    return [float(x)] if isinstance(x, (int, float)) and not isinstance(x, bool) else []
a, b = numbers(json.loads(one.to_json())), numbers(json.loads(batched.to_json()))
out["max_abs_diff"] = max((abs(x - y) for x, y in zip(a, b)), default=0.0) if len(a) == len(b) else None
out["same_sizes"] = [[lv.level, lv.n_nodes, lv.exact] for lv in one.levels] == [
    [lv.level, lv.n_nodes, lv.exact] for lv in batched.levels]
out["same_points"] = [p.n_nodes for p in one.points] == [p.n_nodes for p in batched.points]
out["points"] = len(one.points)
out["levels"] = [[lv.level, lv.n_nodes, lv.exact] for lv in one.levels]
print(json.dumps(out))
"""


def main() -> dict:
    r = run_python(RUN, env={"HF_HUB_OFFLINE": "1"})
    save("sweep", {"results": r})
    one, batched = r["one"], r["batched"]
    ratio = one["seconds"] / batched["seconds"]
    cpu_ratio = one["cpu_seconds"] / batched["cpu_seconds"]
    setting = (
        f"RelP neurons, mean ablation, {r['n_test']} nounpp test pairs, {r['points']} points + random control, "
        f"exact sizes at {', '.join(f'{lv[0]:g}' for lv in r['levels'])}; {r['device']}, {r['threads']} thread(s)"
    )
    rows = [
        ("setting", setting),
        (
            "one circuit per forward pass",
            f"{one['seconds']:.1f} s, CPU {one['cpu_seconds']:.1f} s ({one['passes']} passes, "
            f"{one['forwards']} circuit-forwards)",
        ),
        (
            f"batched (up to {r['circuits_per_pass']} circuits per pass)",
            f"{batched['seconds']:.1f} s, CPU {batched['cpu_seconds']:.1f} s ({batched['passes']} passes, "
            f"{batched['forwards']} circuit-forwards)",
        ),
        ("speed-up (wall time; CPU time of the process)", f"{ratio:.2f}x; {cpu_ratio:.2f}x"),
        ("curves identical (JSON, bit for bit)", "yes" if r["identical"] else "NO"),
        (
            "largest difference of any curve number; same exact sizes; same grid sizes",
            f"{r['max_abs_diff']:.1e}; {'yes' if r['same_sizes'] else 'NO'}; {'yes' if r['same_points'] else 'NO'}"
            if r.get("max_abs_diff") is not None
            else "curves of different shape",
        ),
    ]
    return {"title": "Evaluation sweep: several circuits per forward pass (SmolLM2-135M)", "rows": rows,
            "raw": json.dumps(r)}  # fmt: skip


if __name__ == "__main__":
    sys.path.insert(0, ".")
    for name, value in main()["rows"]:
        print(f"{name}: {value}")

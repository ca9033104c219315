"""Peak memory, measured against `neurontrace estimate`, and the time and peak memory of an evaluation sweep.

Every measurement runs in a fresh process, after loading the model and one warm-up forward; the peak is the
resident-memory high-water mark the run added (`neurontrace.memory.measured_peak`, Linux).
"""

from __future__ import annotations

import json
import sys

from common import run_python, save

RUN = """
import json, time, torch
from neurontrace.models.loading import load_model
from neurontrace.memory import estimate, measured_peak
from neurontrace.tasks import generate_sva
what, T, nodes, chunk = {what!r}, {T}, {nodes}, {chunk}
if what == "load":
    start = time.perf_counter()
    model, peak = measured_peak(lambda: load_model("smollm2-135m", device="cpu"))
    print(json.dumps({{"seconds": time.perf_counter() - start, "peak": peak}}))
    raise SystemExit
model = load_model("smollm2-135m", device="cpu")
ids = model.tokenizer.encode(" the keys to the old cabinet near the door" * 600)[:max(T, 8)]
prompt = model.tokenizer.decode(ids)
with torch.no_grad():
    model.forward(model.tokenize(prompt))  # warm-up
out = {{}}
start = time.perf_counter()
if what == "attribution":
    from neurontrace.attribution.api import attribute
    _, peak = measured_peak(lambda: attribute(model, prompt=prompt, answer=" are"))
    out["estimate"] = estimate(model, prompt_len=T).attribution_peak
elif what == "graph":
    from neurontrace.graphs.build import build_graph
    graph, peak = measured_peak(
        lambda: build_graph(model, prompt, answers=[" are"], max_nodes=nodes, chunk_size=chunk or None)
    )
    out["estimate"] = estimate(model, prompt_len=T, nodes=nodes, logits=1, chunk=chunk or None).graph_peak
    out["edges"] = graph.n_edges
    out["chunk"] = chunk
else:
    from neurontrace.attribution.api import attribute
    from neurontrace.evaluation.faithfulness import prepare_eval, sweep
    pairs = generate_sva("nounpp", n=64, seed=0, tokenizer=model.tokenizer)
    train, test = pairs[:32], pairs[32:64]
    scores = attribute(model, pairs=train, method="relp", batch_size=8).mean_scores
    start = time.perf_counter()
    def run():
        evalset = prepare_eval(model, test, ablation="mean", batch_size=32)
        return sweep(evalset, scores, method="relp", thresholds=None, random_control=True)
    curve, peak = measured_peak(run)
    out["points"] = len(curve.points)
    out["n_test"] = len(test)
out["seconds"] = time.perf_counter() - start
out["peak"] = peak
print(json.dumps(out))
"""

CASES = [  # (what, prompt tokens, neuron nodes, targets per batched backward: 0 = sized from free memory)
    ("load", 0, 0, 0),
    ("attribution", 64, 0, 0),
    ("attribution", 256, 0, 0),
    ("attribution", 1024, 0, 0),
    ("attribution", 4096, 0, 0),
    ("graph", 16, 200, 0),
    ("graph", 32, 200, 0),
    ("graph", 1024, 31, 8),  # long prompts: a few nodes in chunks of 8 targets (the edges take minutes)
    ("graph", 4096, 15, 8),
    ("sweep", 0, 0, 0),
]


def main() -> dict:
    results = {}
    for what, T, nodes, chunk in CASES:
        results[f"{what}-{T}-{nodes}"] = run_python(RUN.format(what=what, T=T, nodes=nodes, chunk=chunk))
    save("memory", {"results": results})
    mb = lambda b: f"{b / 2**20:.0f} MiB"  # noqa: E731
    rows = []
    for key, r in results.items():
        what, T, nodes = key.split("-")
        if what == "load":
            rows.append(
                (
                    "model load (cached conversion)",
                    f"{r['seconds']:.1f} s, peak +{mb(r['peak'])}",
                )
            )
            continue
        if what == "sweep":
            rows.append((
                f"evaluation sweep (RelP neurons, mean ablation, {r['n_test']} nounpp test pairs, {r['points']} "
                "points + random control)", f"{r['seconds']:.1f} s, peak +{mb(r['peak'])}",
            ))  # fmt: skip
            continue
        label = (
            f"{what}, {T} tokens"
            + (f", {nodes} neuron nodes ({r['edges']} edges)" if what == "graph" else "")
            + (f", {r['chunk']} targets per backward" if r.get("chunk") else "")
        )
        ratio = r["estimate"] / r["peak"]
        rows.append(
            (
                label,
                f"peak +{mb(r['peak'])}; estimate {mb(r['estimate'])} ({ratio:.2f}x); {r['seconds']:.1f} s",
            )
        )
    return {"title": "Peak memory against `neurontrace estimate` (SmolLM2-135M, float32, CPU)", "rows": rows,
            "raw": json.dumps(results)}  # fmt: skip


if __name__ == "__main__":
    sys.path.insert(0, ".")
    for name, value in main()["rows"]:
        print(f"{name}: {value}")

"""Peak process memory against `neurontrace estimate`, and the time and peak memory of an evaluation sweep.

Every measurement runs in a fresh process. The measured rise is what the operating system sees: the process's
max resident set (``ru_maxrss``) after the run, minus the same after loading the model and one tiny forward,
that is the peak over that of a plain model load. The estimate is `neurontrace.memory.estimate` (what
`neurontrace estimate --prompt-len T --nodes K` prints, no weights read). Attribution and graph runs fix glibc's
mmap threshold in their pre-run check (`neurontrace.memory.pin_allocator`); the `allocator: default` rows run
the same attribution with `NEURONTRACE_ALLOCATOR=default` (glibc's own setting) to show why, and what it costs.
"""

from __future__ import annotations

import json
import sys

from common import run_python, save

RUN = """
import json, resource, time, torch
from neurontrace.models.loading import load_model
from neurontrace.memory import estimate, measured_peak
from neurontrace.tasks import generate_sva
what, T, nodes = {what!r}, {T}, {nodes}
def maxrss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
if what == "load":
    start = time.perf_counter()
    model, peak = measured_peak(lambda: load_model("smollm2-135m", device="cpu"))
    print(json.dumps({{"seconds": time.perf_counter() - start, "peak": peak}}))
    raise SystemExit
model = load_model("smollm2-135m", device="cpu")
ids = model.tokenizer.encode(" the keys to the old cabinet near the door" * 600)[:max(T, 8)]
prompt = model.tokenizer.decode(ids)
assert what == "sweep" or len(model.tokenizer.encode(prompt)) == T
with torch.no_grad():
    model.forward(model.tokenize("The keys to the cabinet"))  # a plain load and one tiny forward
base = maxrss()
out = {{"base": base}}
cpu = time.process_time()
start = time.perf_counter()
if what == "attribution":
    from neurontrace.attribution.api import attribute
    attribute(model, prompt=prompt, answer=" are")
    out["estimate"] = estimate(model, prompt_len=T).attribution_peak
elif what == "graph":
    from neurontrace.graphs.build import build_graph
    graph = build_graph(model, prompt, answers=[" are"], max_nodes=nodes)
    out["estimate"] = estimate(model, prompt_len=T, nodes=nodes, logits=1).graph_peak
    out["edges"] = graph.n_edges
    out["nodes"] = sum(n.kind == "neuron" for n in graph.nodes)
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
    out["peak"] = peak
out["seconds"] = time.perf_counter() - start
out["cpu_seconds"] = time.process_time() - cpu
out.setdefault("peak", maxrss() - base)
print(json.dumps(out))
"""

CASES = [  # (what, prompt tokens, neuron nodes, environment); the graphs' chunks are sized from free memory
    ("load", 0, 0, {}),
    ("attribution", 512, 0, {}),
    ("attribution", 1024, 0, {}),
    ("attribution", 2048, 0, {}),
    ("graph", 512, 100, {}),
    ("graph", 1024, 50, {}),
    ("attribution", 512, 0, {"NEURONTRACE_ALLOCATOR": "default"}),
    ("attribution", 512, 0, {"NEURONTRACE_ALLOCATOR": "default"}),
    ("attribution", 512, 0, {"NEURONTRACE_ALLOCATOR": "default"}),
    ("attribution", 1024, 0, {"NEURONTRACE_ALLOCATOR": "default"}),
    ("graph", 512, 20, {}),
    ("graph", 512, 20, {"NEURONTRACE_ALLOCATOR": "default"}),
    ("sweep", 0, 0, {}),
]


def mib(b: float) -> str:
    return f"{b / 2**20:,.0f} MiB"


def label(what: str, T: int, r: dict, env: dict) -> str:
    name = {"attribution": "RelP attribution", "graph": "graph"}[what] + f", {T:,} tokens"
    if what == "graph":
        name += f", {r['nodes']} neuron nodes ({r['edges']:,} edges)"
    return name + (", allocator: default" if env else "")


def main() -> dict:
    results = []
    for what, T, nodes, env in CASES:
        r = run_python(RUN.format(what=what, T=T, nodes=nodes), env=env)
        results.append({"what": what, "T": T, "nodes": nodes, "env": env, **r})
    save("memory", {"results": results})
    rows, table = [], []
    for r in results:
        what, T, env = r["what"], r["T"], r["env"]
        if what == "load":
            rows.append(("model load (cached conversion)", f"{r['seconds']:.1f} s, peak +{mib(r['peak'])}"))
            continue
        if what == "sweep":
            rows.append((
                f"evaluation sweep (RelP neurons, mean ablation, {r['n_test']} nounpp test pairs, {r['points']} "
                "points + random control)", f"{r['seconds']:.1f} s, peak +{mib(r['peak'])}",
            ))  # fmt: skip
            continue
        ratio = r["estimate"] / r["peak"]
        name = label(what, T, r, env)
        rows.append((name, f"rise {mib(r['peak'])}; estimate {mib(r['estimate'])} ({ratio:.2f}x); "
                           f"{r['seconds']:.1f} s ({r['cpu_seconds']:.1f} s CPU)"))  # fmt: skip
        table.append((name, mib(r["peak"]), mib(r["estimate"]), f"{ratio:.2f}",
                      f"{r['seconds']:.1f} s ({r['cpu_seconds']:.1f} s CPU)"))  # fmt: skip
    return {"title": "Peak process memory against `neurontrace estimate` (SmolLM2-135M, float32, CPU)", "rows": rows,
            "table": table, "raw": json.dumps(results)}  # fmt: skip


if __name__ == "__main__":
    sys.path.insert(0, ".")
    from common import machine

    section = main()
    print(f"Machine: {machine()}\n")
    print("| run | measured rise (max RSS over the loaded model's) | estimate | estimate ÷ measured | time |")
    print("|---|---|---|---|---|")
    for row in section["table"]:
        print("| " + " | ".join(row) + " |")
    print()
    for name, value in section["rows"]:
        if not any(name == row[0] for row in section["table"]):
            print(f"{name}: {value}")

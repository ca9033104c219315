"""Attribution-graph edges on the default model: the node-leaf computation (`direct_effects`: only the node units
are leaves, chunks of targets in one layer) against the former full-leaf one (every site tensor a leaf,
`_full_leaves=True`) and a straightforward one-forward-per-layer-pair computation of the same edges (time, peak
memory, agreement), with the memory estimate next to the measured peak.

Each variant runs in a fresh process so that its peak resident memory (`neurontrace.memory.measured_peak`: glibc
pinned to mmap for large blocks, high-water mark reset before the edges) is its own.
"""

from __future__ import annotations

import json
import os
import sys

from common import run_python, save

PROMPT = "The keys to the cabinet"
GRAPHS = {  # name: build_graph arguments besides the prompt and the answers
    "default": {},
    "1000 nodes": {"max_nodes": 1000, "node_threshold": 0.0},
}
BUILD = """
import json, time
from neurontrace.models.loading import load_model
from neurontrace.graphs.build import build_graph
from neurontrace.graphs.export import save_graph
model = load_model("smollm2-135m", device="cpu")
start = time.perf_counter()
graph = build_graph(model, {prompt!r}, answers=[" are", " is"], **{kwargs!r})
save_graph(graph, {graph_path!r})
print(json.dumps({{"seconds": time.perf_counter() - start}}))
"""
CODE = """
import collections, json, time, torch
from neurontrace.models.loading import load_model
from neurontrace.graphs.build import _chunk_size, direct_effects
from neurontrace.graphs.reference import direct_effects_per_layer_pair
from neurontrace.graphs.export import load_graph
from neurontrace.attribution.replacement import RelPRules
from neurontrace.memory import Shape, graph_bytes, measured_peak

model = load_model("smollm2-135m", device="cpu")
nodes = load_graph({graph_path!r}).nodes
batch = model.tokenize({prompt!r})
with torch.no_grad():
    model.forward(batch)  # warm-up, so every variant starts from the same allocator state
variant = {variant!r}
if variant == "node-leaf":
    run = lambda: direct_effects(model, batch, nodes, rules=RelPRules())
elif variant == "full-leaf":
    run = lambda: direct_effects(model, batch, nodes, rules=RelPRules(), _full_leaves=True)
else:
    run = lambda: direct_effects_per_layer_pair(model, batch, nodes)
start, cpu = time.perf_counter(), time.process_time()
A, peak = measured_peak(run)
seconds, cpu_s = time.perf_counter() - start, time.process_time() - cpu
torch.save(A, {path!r})
per_layer = collections.Counter(n.layer for n in nodes if n.kind == "neuron")
neurons, logits = sum(per_layer.values()), sum(n.kind == "logit" for n in nodes)
chunk = _chunk_size(model, batch.width, len(per_layer), None)
parts = graph_bytes(Shape.of(model), prompt_len=batch.width, nodes=neurons, logits=logits, chunk=chunk,
                    largest_layer=max(per_layer.values()), node_layers=len(per_layer))
estimate = sum(v for k, v in parts.items() if k.startswith(("edges", "adjacency", "fixed")))
print(json.dumps({{"seconds": seconds, "cpu_s": cpu_s, "peak_mib": peak / 2**20, "nodes": len(nodes), "neurons": neurons,
                  "largest_layer": max(per_layer.values()), "tokens": batch.width, "edges": int((A != 0).sum()),
                  "estimate_mib": estimate / 2**20}}))
"""


def main() -> dict:
    import tempfile

    import torch

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, kwargs in GRAPHS.items():
            graph_path = f"{tmp}/{name.replace(' ', '-')}.neurontrace.json"
            run_python(BUILD.format(prompt=PROMPT, kwargs=kwargs, graph_path=graph_path))
            variants = ("node-leaf", "full-leaf") + (("per-layer-pair",) if name == "default" else ())
            runs, matrices = {}, {}
            for variant in variants:
                path = f"{tmp}/{variant}.pt"
                code = CODE.format(prompt=PROMPT, variant=variant, path=path, graph_path=graph_path)
                runs[variant] = run_python(code)
                matrices[variant] = torch.load(path)
            new = matrices["node-leaf"]
            r = {
                "runs": runs,
                "max_abs_weight": float(new.abs().max()),
                "max_abs_difference": {
                    v: float((new - m).abs().max()) for v, m in matrices.items() if m is not new
                },
            }
            results[name] = r
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    save(
        "graph",
        {
            "threads": threads,
            "prompt": PROMPT,
            "graphs": {k: dict(v) for k, v in GRAPHS.items()},
            "results": results,
        },
    )

    def cost(r: dict) -> str:
        return f"{r['seconds']:.1f} s ({r['cpu_s']:.1f} s CPU), peak +{r['peak_mib']:.0f} MiB"

    rows = []
    for name, r in results.items():
        new, old = r["runs"]["node-leaf"], r["runs"]["full-leaf"]
        ratio = new["estimate_mib"] / new["peak_mib"]
        rows += [
            (f"graph of {PROMPT!r} ({name}): {new['tokens']} tokens, {new['neurons']} neuron nodes (at most "
             f"{new['largest_layer']} in a layer), {new['nodes']} nodes, {new['edges']} edges", ""),
            ("edges, node leaves, chunks in one layer (`direct_effects`)",
             f"{cost(new)}; estimate {new['estimate_mib']:.0f} MiB ({ratio:.2f}x the measured peak)"),
            ("edges, every site tensor a leaf (the former `direct_effects`)", cost(old)),
            ("former / node leaves", f"peak memory {old['peak_mib'] / new['peak_mib']:.1f}x, time "
             f"{old['seconds'] / new['seconds']:.1f}x (CPU time {old['cpu_s'] / new['cpu_s']:.1f}x)"),
        ]  # fmt: skip
        if "per-layer-pair" in r["runs"]:
            ref = r["runs"]["per-layer-pair"]
            rows += [
                ("edges, one forward per layer pair (`graphs/reference.py`)", cost(ref)),
                ("one forward per layer pair / node leaves", f"time {ref['seconds'] / new['seconds']:.1f}x "
                 f"(CPU time {ref['cpu_s'] / new['cpu_s']:.1f}x)"),
            ]  # fmt: skip
        diffs = ", ".join(f"{v} {d:.2e}" for v, d in r["max_abs_difference"].items())
        rows.append(
            (
                "max |difference| to the node-leaf edges",
                f"{diffs} (largest |weight| {r['max_abs_weight']:.2f})",
            )
        )
    return {
        "title": f"Attribution-graph edges (SmolLM2-135M, float32, CPU, OMP_NUM_THREADS={threads})",
        "rows": rows,
        "raw": json.dumps(results),
    }


if __name__ == "__main__":
    sys.path.insert(0, ".")
    for name, value in main()["rows"]:
        print(f"{name}: {value}")

"""Attribution-graph edges on the default model: the one-forward batched-VJP computation against a
straightforward one-forward-per-layer-pair computation of the same edges (time, peak memory, agreement).

Each variant runs in a fresh process so that its peak resident memory (VmHWM, reset before the edges) is its own.
"""

from __future__ import annotations

import json
import sys

from common import run_python, save

PROMPT = "The keys to the cabinet"
BUILD = """
import json, time
from neurontrace.models.loading import load_model
from neurontrace.graphs.build import build_graph
from neurontrace.graphs.export import save_graph
model = load_model("smollm2-135m", device="cpu")
start = time.perf_counter()
graph = build_graph(model, {prompt!r}, answers=[" are", " is"])
save_graph(graph, {graph_path!r})
print(json.dumps({{"seconds": time.perf_counter() - start}}))
"""
CODE = """
import json, time, torch
from neurontrace.models.loading import load_model
from neurontrace.graphs.build import build_graph, direct_effects
from neurontrace.graphs.reference import direct_effects_per_layer_pair
from neurontrace.attribution.replacement import RelPRules

def rss_peak_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

from neurontrace.graphs.export import load_graph
model = load_model("smollm2-135m", device="cpu")
nodes = load_graph({graph_path!r}).nodes
batch = model.tokenize({prompt!r})
with torch.no_grad():
    model.forward(batch)  # warm-up, so both variants start from the same allocator state
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak-RSS counter
before = rss_peak_mb()
start = time.perf_counter()
if {variant!r} == "efficient":
    A = direct_effects(model, batch, nodes, rules=RelPRules())
else:
    A = direct_effects_per_layer_pair(model, batch, nodes)
seconds = time.perf_counter() - start
torch.save(A, {path!r})
print(json.dumps({{"seconds": seconds, "peak_mb": rss_peak_mb() - before, "nodes": len(nodes),
                  "neurons": sum(n.kind == "neuron" for n in nodes), "edges": int((A != 0).sum())}}))
"""


def main() -> dict:
    import tempfile

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        graph_path = f"{tmp}/graph.neurontrace.json"
        run_python(BUILD.format(prompt=PROMPT, graph_path=graph_path))
        results = {}
        for variant in ("efficient", "per-layer-pair"):
            path = f"{tmp}/{variant}.pt"
            code = CODE.format(prompt=PROMPT, variant=variant, path=path, graph_path=graph_path)
            results[variant] = run_python(code)
            results[variant]["matrix"] = torch.load(path)
        diff = float((results["efficient"]["matrix"] - results["per-layer-pair"]["matrix"]).abs().max())
        scale = float(results["per-layer-pair"]["matrix"].abs().max())
    for r in results.values():
        r.pop("matrix")
    eff, ref = results["efficient"], results["per-layer-pair"]
    save("graph", {"prompt": PROMPT, "results": results, "max_abs_difference": diff, "max_abs_weight": scale})
    rows = [
        (
            f"graph of {PROMPT!r}: {eff['neurons']} neuron nodes, {eff['nodes']} nodes, {eff['edges']} edges",
            "",
        ),
        ("edges, one forward + batched VJPs", f"{eff['seconds']:.1f} s, peak +{eff['peak_mb']:.0f} MB"),
        ("edges, one forward per layer pair", f"{ref['seconds']:.1f} s, peak +{ref['peak_mb']:.0f} MB"),
        ("speed-up (time ratio)", f"{ref['seconds'] / eff['seconds']:.1f}x"),
        ("edges per second (efficient)", f"{eff['edges'] / eff['seconds']:.0f}"),
        ("max |difference| of the two edge matrices", f"{diff:.2e} (largest |weight| {scale:.2f})"),
    ]
    return {
        "title": "Attribution-graph edges (SmolLM2-135M, float32, CPU)",
        "rows": rows,
        "raw": json.dumps(results),
    }


if __name__ == "__main__":
    sys.path.insert(0, ".")
    for name, value in main()["rows"]:
        print(f"{name}: {value}")

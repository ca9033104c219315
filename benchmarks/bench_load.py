"""Default-model load: GGUF conversion (cold, empty cache) vs the cached safetensors copy; forward time."""

from __future__ import annotations

import tempfile

from common import run_python, save, timeit

LOAD = """
import json, time
t0 = time.perf_counter()
from neurontrace.models.loading import load_model
t1 = time.perf_counter()
m = load_model("smollm2-135m", device="cpu")
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1}))
"""


def main() -> dict:
    with tempfile.TemporaryDirectory() as home:
        cold = run_python(LOAD, env={"NEURONTRACE_HOME": home, "TRANSFORMERS_VERBOSITY": "error"})
        cached = [
            run_python(LOAD, env={"NEURONTRACE_HOME": home, "TRANSFORMERS_VERBOSITY": "error"})
            for _ in range(3)
        ]
    best = min(cached, key=lambda r: r["load_s"])

    import torch

    from neurontrace.models.loading import load_model

    model = load_model("smollm2-135m", device="cpu")
    prompts = [
        "The keys to the cabinet",
        "The author that the guards like",
        "The pilots near the tables",
        "The doctor behind the cars",
    ] * 2
    batch = model.tokenize(prompts)

    def forward():
        with torch.no_grad():
            model.forward(batch)

    fwd = timeit(forward, repeat=10)
    result = {
        "cold_load_s": cold["load_s"],
        "cached_load_s": best["load_s"],
        "cached_import_s": best["import_s"],
        "cached_process_s": best["process_s"],
        "forward_batch": {"batch": batch.size, "tokens": batch.width, **fwd},
    }
    save("load", result)
    rows = [
        ("default model, cold load (GGUF -> safetensors conversion)", f"{cold['load_s']:.2f} s"),
        ("default model, cached load (`load_model` call)", f"{best['load_s']:.2f} s"),
        ("  same, whole fresh process incl. imports", f"{best['process_s']:.2f} s"),
        ("  ratio cold / cached", f"{cold['load_s'] / best['load_s']:.1f}x"),
        (
            f"forward, batch {batch.size} x {batch.width} tokens (median of 10)",
            f"{fwd['median_s'] * 1000:.1f} ms",
        ),
    ]
    return {"title": "Model load and forward (SmolLM2-135M, float32, CPU)", "rows": rows}


if __name__ == "__main__":
    for name, value in main()["rows"]:
        print(f"{name}: {value}")

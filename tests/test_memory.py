"""Memory planning: estimates against measured peaks, and early stops when a run cannot fit."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import make_tiny

from neurontrace import memory
from neurontrace.errors import NeurontraceError
from neurontrace.models.model import NeuronModel

MEASURE = """
import json, sys, torch
from neurontrace.models.loading import load_model
from neurontrace.memory import estimate, measured_peak
what, T, nodes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
model = load_model("smollm2-135m", device="cpu")
ids = model.tokenizer.encode(" the keys to the old cabinet near the door" * 600)[:T]
prompt = model.tokenizer.decode(ids)
assert len(model.tokenizer.encode(prompt)) == T
with torch.no_grad():
    model.forward(model.tokenize(prompt))  # warm-up: the allocator's first growth is not the run's
if what == "attribution":
    from neurontrace.attribution.api import attribute
    _, peak = measured_peak(lambda: attribute(model, prompt=prompt, answer=" are"))
    expected = estimate(model, prompt_len=T).attribution_peak
else:
    from neurontrace.graphs.build import build_graph
    graph, peak = measured_peak(lambda: build_graph(model, prompt, answers=[" are"], max_nodes=nodes))
    expected = estimate(model, prompt_len=T, nodes=nodes, logits=1).graph_peak
print(json.dumps({"peak": peak, "estimate": expected}))
"""


def run_measurement(what: str, prompt_len: int, nodes: int = 0) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    out = subprocess.run([sys.executable, "-c", MEASURE, what, str(prompt_len), str(nodes)], env=env,
                         capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.default_model
@pytest.mark.parametrize(
    ("what", "prompt_len", "nodes"),
    [
        ("attribution", 64, 0),
        ("attribution", 256, 0),
        ("attribution", 1024, 0),
        ("graph", 16, 200),
        ("graph", 32, 200),
    ],
)
def test_estimate_is_within_30_percent_of_the_measured_peak(what, prompt_len, nodes):
    r = run_measurement(what, prompt_len, nodes)
    assert r["peak"] > 0
    assert abs(r["estimate"] - r["peak"]) <= 0.3 * r["peak"], r


def test_estimate_scales_with_length_batch_and_dtype():
    model: NeuronModel = make_tiny("llama")
    one = memory.estimate(model, prompt_len=10)
    two = memory.estimate(model, prompt_len=20)
    assert two.attribution["saved activations"] == 2 * one.attribution["saved activations"]
    assert one.attribution_peak < two.attribution_peak < 2 * one.attribution_peak  # the logits do not grow
    assert memory.estimate(model, prompt_len=10, batch_size=3).attribution_peak == 3 * one.attribution_peak
    bf16 = memory.attribution_bytes(
        memory.Shape(**{**memory.Shape.of(model).__dict__, "itemsize": 2}), prompt_len=10
    )
    assert bf16["saved activations"] * 2 == one.attribution["saved activations"]  # model dtype halves them
    assert bf16[memory.RESULTS] == one.attribution[memory.RESULTS]  # results stay float32
    assert (
        memory.estimate(model, prompt_len=10, nodes=50).graph_peak
        > memory.estimate(model, prompt_len=10, nodes=10).graph_peak
    )
    assert one.weights == sum(p.numel() for p in model.hf.parameters()) * 4
    with pytest.raises(NeurontraceError, match="at least 1"):
        memory.estimate(model, prompt_len=0)


def test_runs_that_cannot_fit_stop_early_with_the_estimate(monkeypatch):
    tiny_model = make_tiny("llama")
    from neurontrace.attribution.api import attribute
    from neurontrace.graphs.build import build_graph

    monkeypatch.setattr(memory, "available_bytes", lambda device=None: 1000)
    with pytest.raises(NeurontraceError, match=r"needs about .* but only .* is free; lower"):
        attribute(tiny_model, prompt="a b c d", answer=" e")
    with pytest.raises(NeurontraceError, match="node selection needs about"):
        build_graph(tiny_model, "a b c d", answers=[" e"])
    monkeypatch.setenv("NEURONTRACE_NO_MEMORY_CHECK", "1")
    attribute(tiny_model, prompt="a b c d", answer=" e")  # the user may override the estimate


def test_graph_chunks_follow_the_memory_budget(monkeypatch):
    tiny_model = make_tiny("llama")
    from neurontrace.graphs.build import _chunk_size

    per_target = memory.edge_bytes_per_target(memory.Shape.of(tiny_model), prompt_len=8, source_layers=2)
    monkeypatch.setenv("NEURONTRACE_EDGE_MEMORY", str(3 * per_target))
    assert _chunk_size(tiny_model, 8, 2, None) == 3
    assert _chunk_size(tiny_model, 8, 2, 7) == 7


@pytest.mark.default_model
def test_estimate_command_reads_no_weights(capsys):
    from neurontrace.cli import main

    assert main(["estimate", "--prompt-len", "32", "--nodes", "100"]) == 0
    out = capsys.readouterr().out
    assert "attribution (batch 1)" in out and "graph (100 neuron nodes)" in out and "fits" in out


def test_auto_batch_size_fills_a_quarter_of_the_free_memory(monkeypatch):
    from neurontrace.attribution.api import attribute

    model = make_tiny("llama")
    shape = memory.Shape.of(model)
    one = memory.attribution_peak(memory.attribution_bytes(shape, prompt_len=4))
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: 4 * 3 * one + 3)
    assert memory.auto_batch_size(shape, prompt_len=4) == 3
    prompts, answers = ["a b c d", "b c d a", "c d a b", "d a b c", "a a b b"], [" e"] * 5
    fixed = attribute(model, prompts=prompts, answers=answers, batch_size=2)
    auto = attribute(model, prompts=prompts, answers=answers, batch_size="auto")
    assert torch.allclose(fixed.scores_sum, auto.scores_sum, atol=1e-6)
    with pytest.raises(NeurontraceError, match="whole number"):
        attribute(model, prompts=prompts, answers=answers, batch_size="big")

"""Integrated gradients on activations with prefix caching (issue 15): the old path, which runs the whole model
at every step, against the cached one, which runs the layers below the interpolated site once per batch and
each step from that layer on. Default model (SmolLM2-135M, CPU, float32), 16 midpoint steps, one batch of 8
subject-verb-agreement pairs (neurons). Both paths (and, to show what the prefix alone gains, the cached one with
the unembedding fed transformers' strided slice) run in this one process, alternately; the times are the
medians of ``NT_BENCH_REPEAT`` runs (default 1), in wall-clock and in CPU time (this process's). Run with
``OMP_NUM_THREADS=1`` on a shared machine: the CPU-time ratio is then the stable one."""

from __future__ import annotations

import functools
import os
import random
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from common import save

from neurontrace.attribution import engine
from neurontrace.attribution.engine import BatchAttributor
from neurontrace.attribution.metrics import make_metric
from neurontrace.models.loading import load_model
from neurontrace.tasks import filter_pairs, generate_sva, load_pairs
from neurontrace.tokens import single_token_id, tokenize_pairs

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "sva" / "nounpp_test.jsonl"
N_PAIRS, STEPS = 8, 16
REPEAT = int(os.environ.get("NT_BENCH_REPEAT", "1"))


def sva_pairs(model, n: int):
    """The pairs bench_attribution times: Marks et al.'s nounpp test set if present, else the generator's."""
    if SHARED.is_file():
        pairs = filter_pairs(load_pairs(SHARED), model.tokenizer)
        random.Random(0).shuffle(pairs)
        return pairs[:n], "../shared/data/sva/nounpp_test.jsonl (Marks et al.)"
    return generate_sva("nounpp", n=n, seed=0, tokenizer=model.tokenizer), "neurontrace generator, seed 0"


# The cached path with the unembedding fed the strided slice of kept positions that transformers gives it
# (logits bit-identical to the model's, but one matrix-vector product per row): what prefix caching alone gains.
STRIDED = "cached, strided unembedding input"


@contextmanager
def _strided_unembedding(on: bool):
    if not on:
        yield
        return
    real = engine.run_from
    engine.run_from = functools.partial(real, as_model=True)
    try:
        yield
    finally:
        engine.run_from = real


def _layer_calls(model, fn) -> int:
    """How many times ``fn`` calls a decoder layer."""
    count = [0]
    handles = [
        model.layer(i).register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
        for i in range(model.n_layers)
    ]
    try:
        fn()
    finally:
        for h in handles:
            h.remove()
    return count[0]


def main() -> dict:
    model = load_model("smollm2-135m", device="cpu")
    pairs, source = sva_pairs(model, N_PAIRS)
    clean, patch = tokenize_pairs(model, [p.clean_prefix for p in pairs], [p.patch_prefix for p in pairs])
    metric = make_metric(
        "logit-diff",
        answer=[single_token_id(model, p.clean_answer) for p in pairs],
        contrast=[single_token_id(model, p.patch_answer) for p in pairs],
    )
    attributors = {
        "old (whole model every step)": BatchAttributor(model, method="ig", steps=STEPS, ig_prefix=False),
        "cached (prefix once per batch)": BatchAttributor(model, method="ig", steps=STEPS, ig_prefix=True),
        STRIDED: BatchAttributor(model, method="ig", steps=STEPS, ig_prefix=True),
    }
    one = clean.select([0]), patch.select([0]), metric.select([0])
    for prefix in (False, True):  # warm-up of both paths: one pair, one step
        BatchAttributor(model, method="ig", steps=1, ig_prefix=prefix)(one[0], one[2], patch=one[1])
    times: dict[str, list[float]] = {name: [] for name in attributors}
    cpu: dict[str, list[float]] = {name: [] for name in attributors}
    scores, calls, paths = {}, {}, {}
    for _ in range(REPEAT):
        for name, attributor in attributors.items():
            out = [None]
            with _strided_unembedding(name == STRIDED):
                start, start_cpu = time.perf_counter(), time.process_time()
                calls[name] = _layer_calls(
                    model, lambda a=attributor, o=out: o.__setitem__(0, a(clean, metric, patch=patch))
                )
                times[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
            scores[name], paths[name] = out[0].scores, attributor.ig_path
    old, new, _ = attributors
    t_old, t_new = statistics.median(times[old]), statistics.median(times[new])
    c_old, c_new = statistics.median(cpu[old]), statistics.median(cpu[new])
    t_str, c_str = statistics.median(times[STRIDED]), statistics.median(cpu[STRIDED])
    diff = float((scores[old] - scores[new]).abs().max())
    diff_str = float((scores[old] - scores[STRIDED]).abs().max())
    scale = float(scores[old].abs().max())
    raw = {
        "model": "smollm2-135m",
        "source": source,
        "batch": f"{clean.size} pairs x {clean.width} tokens",
        "steps": STEPS,
        "ig_rule": "midpoint",
        "site": "neurons",
        "threads": torch.get_num_threads(),
        "repeat": REPEAT,
        "seconds": times,
        "cpu_seconds": cpu,
        "median_s": {old: t_old, new: t_new},
        "median_cpu_s": {old: c_old, new: c_new},
        "ratio": t_old / t_new,
        "cpu_ratio": c_old / c_new,
        "max_abs_diff": diff,
        "max_abs_diff_strided": diff_str,
        "ratio_strided": t_old / t_str,
        "cpu_ratio_strided": c_old / c_str,
        "max_abs_score": scale,
        "decoder_layer_calls": calls,
        "paths": paths,
    }
    save("ig_prefix", raw)
    rows = [
        (
            "batch",
            f"{raw['batch']} (nounpp, {source}), {STEPS} midpoint steps, neurons, {raw['threads']} thread(s)",
        ),
        (
            f"old path: whole model at every step (median of {REPEAT}; wall / CPU)",
            f"{t_old:.1f} s / {c_old:.1f} s",
        ),
        (
            f"cached path: layers below the site once per batch (median of {REPEAT}; wall / CPU)",
            f"{t_new:.1f} s / {c_new:.1f} s",
        ),
        ("speed-up (old / cached; wall / CPU time)", f"{t_old / t_new:.2f}x / {c_old / c_new:.2f}x"),
        ("max abs score difference (largest score)", f"{diff:.2e} ({scale:.2e})"),
        (
            "cached, unembedding fed transformers' strided slice (wall / CPU; speed-up; max abs difference)",
            f"{t_str:.1f} s / {c_str:.1f} s; {t_old / t_str:.2f}x / {c_old / c_str:.2f}x; {diff_str:.2e}",
        ),
        ("decoder-layer calls: old / cached", f"{calls[old]} / {calls[new]}"),
    ]
    return {"title": "Integrated gradients on activations: prefix caching (SmolLM2-135M, CPU)", "rows": rows}


if __name__ == "__main__":
    for name, value in main()["rows"]:
        print(f"{name}: {value}")

"""Node attribution on the default model: cost relative to a plain forward+backward, and agreement with exact
activation patching on the SVA nounpp set (position-summed neurons: 200 top-scored plus 200 random)."""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path

import torch
from common import save, timeit

from neurontrace.attribution.api import attribute
from neurontrace.attribution.engine import BatchAttributor, frozen_parameters, patch_effects, run_sites
from neurontrace.attribution.metrics import make_metric
from neurontrace.attribution.replacement import RelPRules
from neurontrace.models.loading import load_model
from neurontrace.tasks import Pair, filter_pairs, generate_sva, load_pairs
from neurontrace.tokens import single_token_id, tokenize_pairs

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "sva" / "nounpp_test.jsonl"
N_EXAMPLES = int(os.environ.get("NT_BENCH_EXAMPLES", "32"))
N_TOP, N_RANDOM = 200, 200


def nounpp_pairs(model, n: int) -> tuple[list[Pair], str]:
    if SHARED.is_file():
        pairs = filter_pairs(load_pairs(SHARED), model.tokenizer)
        random.Random(0).shuffle(pairs)
        return pairs[:n], "../shared/data/sva/nounpp_test.jsonl (Marks et al.)"
    return generate_sva("nounpp", n=n, seed=0, tokenizer=model.tokenizer), "neurontrace generator, seed 0"


def _metric(model, pairs):
    return make_metric(
        "logit-diff",
        answer=[single_token_id(model, p.clean_answer) for p in pairs],
        contrast=[single_token_id(model, p.patch_answer) for p in pairs],
    )


def timing(model, pairs) -> dict:
    batch_pairs = pairs[:8]
    clean, patch = tokenize_pairs(
        model, [p.clean_prefix for p in batch_pairs], [p.patch_prefix for p in batch_pairs]
    )
    metric = _metric(model, batch_pairs)
    layers = list(range(model.n_layers))

    def plain_with_param_grads():
        for p in model.hf.parameters():
            p.requires_grad_(True)
        model.hf.zero_grad(set_to_none=True)
        out = model.forward(clean, logits_to_keep=1)
        metric(out.logits).sum().backward()
        model.hf.zero_grad(set_to_none=True)

    def plain_to_activations():
        with frozen_parameters(model):
            run = run_sites(model, clean, metric, site="neurons", layers=layers)
            torch.autograd.grad(run.metric.sum(), [run.acts[layer] for layer in layers])

    def method(name):
        attributor = BatchAttributor(model, method=name)
        return lambda: attributor(clean, metric, patch=patch)

    results = {
        "plain forward+backward (parameter gradients)": timeit(plain_with_param_grads, repeat=7),
        "plain forward+backward (to activations only)": timeit(plain_to_activations, repeat=7),
        "relp": timeit(method("relp"), repeat=7),
        "atp": timeit(method("atp"), repeat=7),
    }
    for p in model.hf.parameters():
        p.requires_grad_(False)
    return {"batch": f"{clean.size} pairs x {clean.width} tokens", "times": results}


def _pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    return float((x * y).sum() / (x.norm() * y.norm()))


def _spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    rank = lambda t: t.argsort().argsort().double()  # noqa: E731
    return _pearson(rank(x), rank(y))


def exact_effects(model, pairs: list[Pair], needed: list[int], *, progress: bool = False) -> dict[int, float]:
    """Exact patching of position-summed neurons: for each flat index ``layer * d + unit`` in ``needed``, the
    mean over ``pairs`` of the change in logit difference when that neuron takes its counterfactual value at
    every position (one forward per neuron and batch of pairs). ``progress`` prints to stderr every 64 neurons."""
    clean, patch = tokenize_pairs(model, [p.clean_prefix for p in pairs], [p.patch_prefix for p in pairs])
    metric = _metric(model, pairs)
    layers = list(range(model.n_layers))
    exact = {}
    for b0 in range(0, clean.size, 32):
        rows = list(range(b0, min(b0 + 32, clean.size)))
        c, p, m = clean.select(rows), patch.select(rows), metric.select(rows)
        with torch.no_grad():
            base = run_sites(model, c, m, site="neurons", layers=layers, grad=False).metric
            other = run_sites(model, p, m, site="neurons", layers=layers, grad=False)
        values = torch.stack([other.acts[layer] for layer in layers], dim=1)
        d = values.shape[-1]
        start = time.perf_counter()
        for n0 in range(0, len(needed), 64):
            part = needed[n0 : n0 + 64]
            effects = patch_effects(
                model, c, m, site="neurons", layers=layers, node_sets=[[(i // d, None, i % d)] for i in part],
                values=values, max_rows=64,
            )  # fmt: skip
            for i, row in zip(part, effects, strict=True):
                exact[i] = exact.get(i, 0.0) + float((row - base).sum())
            if progress:
                done = n0 + len(part)
                print(
                    f"  exact patching: pairs {b0}-{rows[-1]}, {done}/{len(needed)} neurons, "
                    f"{time.perf_counter() - start:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )
    return {i: v / clean.size for i, v in exact.items()}


def faithfulness(model, pairs) -> dict:
    methods = {
        "relp": dict(method="relp"),
        "relp (no-gate variant)": dict(method="relp", rules=RelPRules(gate="detach")),
        "relp without the norm rule": dict(method="relp", rules=RelPRules(norm=False)),
        "relp without the attention rule": dict(method="relp", rules=RelPRules(attention=False)),
        "relp without the identity rule": dict(method="relp", rules=RelPRules(nonlinearity=False)),
        "relp without the half rule": dict(method="relp", rules=RelPRules(gate="plain")),
        "atp": dict(method="atp"),
        "ig (activations, 16 steps)": dict(method="ig", steps=16, max_rows=128),
        "ig-inputs (16 steps)": dict(method="ig-inputs", steps=16, max_rows=128),
    }
    scores, seconds = {}, {}
    for name, kw in methods.items():
        start = time.perf_counter()
        result = attribute(model, pairs=pairs, batch_size=8, **kw)
        seconds[name] = time.perf_counter() - start
        scores[name] = result.position_free  # [L, d]: mean over examples of position-summed scores
    L, d = scores["relp"].shape
    rng = torch.Generator().manual_seed(0)
    top = scores["relp"].flatten().abs().topk(N_TOP).indices
    rest = torch.tensor(sorted(set(range(L * d)) - set(top.tolist())))
    rand = rest[torch.randperm(len(rest), generator=rng)[:N_RANDOM]]
    own_tops = {name: s.flatten().abs().topk(N_TOP).indices for name, s in scores.items()}
    needed = sorted(
        set(top.tolist()) | set(rand.tolist()) | {i for t in own_tops.values() for i in t.tolist()}
    )

    start = time.perf_counter()
    exact = exact_effects(model, pairs, needed)
    seconds["exact patching (these neurons)"] = time.perf_counter() - start

    def corr(name: str, idx: torch.Tensor) -> dict:
        est = scores[name].flatten()[idx]
        truth = torch.tensor([exact[i] for i in idx.tolist()])
        return {"pearson": _pearson(est, truth), "spearman": _spearman(est, truth)}

    common = torch.cat([top, rand])
    table = {
        name: {
            "common_set": corr(name, common),
            "own_top_plus_random": corr(name, torch.cat([own_tops[name], rand])),
            "seconds": seconds[name],
        }
        for name in methods
    }
    return {
        "n_examples": len(pairs),
        "table": table,
        "exact_seconds": seconds["exact patching (these neurons)"],
    }


def main() -> dict:
    model = load_model("smollm2-135m", device="cpu")
    pairs, source = nounpp_pairs(model, N_EXAMPLES)
    t = timing(model, pairs)
    f = faithfulness(model, pairs)
    save("attribution", {"timing": t, "faithfulness": f, "source": source})
    times = t["times"]
    base_params = times["plain forward+backward (parameter gradients)"]["median_s"]
    base_acts = times["plain forward+backward (to activations only)"]["median_s"]
    rows = [(f"timing batch: {t['batch']} (nounpp); medians of 7", "")]
    for name, value in times.items():
        ms = value["median_s"] * 1000
        rows.append(
            (
                f"{name}",
                f"{ms:.0f} ms ({value['median_s'] / base_params:.2f}x / {value['median_s'] / base_acts:.2f}x)",
            )
        )
    rows.append((f"faithfulness: {f['n_examples']} nounpp pairs from {source}", ""))
    for name, row in f["table"].items():
        c, o = row["common_set"], row["own_top_plus_random"]
        rows.append(
            (
                f"{name}: Pearson / Spearman vs exact",
                f"{c['pearson']:.3f} / {c['spearman']:.3f} (own top-200: {o['pearson']:.3f} / {o['spearman']:.3f}); "
                f"{row['seconds']:.1f} s",
            )
        )
    rows.append(("exact patching of those neurons", f"{f['exact_seconds']:.1f} s"))
    return {"title": "Node attribution (SmolLM2-135M, float32, CPU)", "rows": rows, "raw": json.dumps(f)}


if __name__ == "__main__":
    for name, value in main()["rows"]:
        print(f"{name}: {value}")

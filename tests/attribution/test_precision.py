"""Reduced precision: bf16/fp16 models run their forward in low precision while scores, metrics and the RelP
factors are kept in float32, and the results track the float32 model's."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny, make_tiny_hf, word_tokenizer

from neurontrace.attribution.api import attribute
from neurontrace.attribution.engine import BatchAttributor, frozen_parameters, run_sites
from neurontrace.attribution.metrics import make_metric
from neurontrace.attribution.replacement import RelPRules
from neurontrace.evaluation.faithfulness import prepare_eval
from neurontrace.graphs.build import build_graph
from neurontrace.models.loading import load_model
from neurontrace.tokens import single_token_id

PROMPT = "the keys to the cabinet near the table"
LOW = [torch.bfloat16, torch.float16]  # fp16 runs on the CPU too (slowly, which a tiny model does not mind)


def _low(family: str, dtype: torch.dtype):
    model = make_tiny(family)
    model.hf.to(dtype)
    return model


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1])


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_low_precision_scores_track_float32(family, dtype):
    ref, low = make_tiny(family), _low(family, dtype)
    for method, extra in [("relp", {}), ("atp", {}), ("ig", {"steps": 8})]:
        kwargs = dict(prompt=PROMPT, answer=" are", contrast=" is", method=method, **extra)
        want, got = attribute(ref, **kwargs), attribute(low, **kwargs)
        for t in (got.scores, got.scores_sum, got.mean_scores, got.metric_clean, got.acts_mean):
            assert t.dtype == torch.float32
        top = want.scores.flatten().abs().topk(50).indices
        assert _pearson(got.scores.flatten()[top], want.scores.flatten()[top]) > 0.99, method
        assert float(got.metric_clean[0]) == pytest.approx(float(want.metric_clean[0]), rel=0.05, abs=0.02)
    assert low.dtype == dtype and next(low.hf.parameters()).dtype == dtype  # the forward stays low precision


def test_bfloat16_scores_are_float32_products_of_the_bf16_activations_and_gradients():
    """``a * dm/da`` is formed in float32 from the model's bf16 tensors: not rounded back to bf16."""
    model = _low("llama", torch.bfloat16)
    batch = model.tokenize(PROMPT)
    metric = make_metric(
        "logit-diff", answer=[single_token_id(model, " are")], contrast=[single_token_id(model, " is")]
    )
    layers = list(range(model.n_layers))
    out = BatchAttributor(model, method="relp")(batch, metric)
    with frozen_parameters(model):
        run = run_sites(model, batch, metric, site="neurons", layers=layers, rules=RelPRules())
        grads = torch.autograd.grad(run.metric.sum(), [run.acts[layer] for layer in layers])
    assert run.acts[0].dtype == torch.bfloat16 and run.metric.dtype == torch.float32
    expected = torch.stack([run.acts[i].detach().float() * grads[i].float() for i in layers], dim=1)
    assert out.scores.dtype == torch.float32
    # exact: the very forward and backward the attributor runs (same kernels, same shapes), then one product
    torch.testing.assert_close(out.scores, expected, rtol=0, atol=0)
    assert (out.scores - out.scores.bfloat16().float()).abs().max() > 0  # finer than bf16 could hold
    for method in ("atp", "ig", "ig-inputs", "exact", "delta", "random"):
        result = BatchAttributor(model, method=method, steps=2)(batch, metric)
        assert result.scores.dtype == torch.float32, method


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_graph_builds_in_bfloat16(family):
    ref, low = make_tiny(family), _low(family, torch.bfloat16)
    want = build_graph(ref, PROMPT, answers=[" are", " is"], node_threshold=0.01)
    got = build_graph(low, PROMPT, answers=[" are", " is"], node_threshold=0.01)
    assert got.adjacency.dtype == torch.float32
    index = {n.key: i for i, n in enumerate(want.nodes)}
    shared = [(index[n.key], j) for j, n in enumerate(got.nodes) if n.key in index]
    assert len(shared) > 0.9 * len(want.nodes)
    rows_w, rows_g = (torch.tensor(r) for r in zip(*shared, strict=True))
    a_w = want.adjacency[rows_w][:, rows_w].flatten()
    a_g = got.adjacency[rows_g][:, rows_g].flatten()
    assert (a_w != 0).sum() > 100
    assert _pearson(a_g, a_w) > 0.99


def test_bfloat16_load_attribution_and_ablation(tmp_path):
    make_tiny_hf("llama").save_pretrained(tmp_path)
    word_tokenizer().save_pretrained(tmp_path)
    ref = load_model(str(tmp_path), device="cpu")
    low = load_model(str(tmp_path), device="cpu", dtype="bfloat16")
    assert low.dtype == torch.bfloat16
    pairs = [
        dict(clean_prefix="the keys to the cabinet", patch_prefix="the key to the cabinet",
             clean_answer=" are", patch_answer=" is"),
        dict(clean_prefix="the dogs near the table", patch_prefix="the dog near the table",
             clean_answer=" are", patch_answer=" is"),
    ]  # fmt: skip
    want, got = attribute(ref, pairs=pairs), attribute(low, pairs=pairs)
    assert got.mean_scores.dtype == torch.float32
    assert _pearson(got.mean_scores.flatten(), want.mean_scores.flatten()) > 0.99
    keep = want.mean_scores.abs() >= want.mean_scores.abs().quantile(0.9)
    ev_ref, ev_low = prepare_eval(ref, pairs), prepare_eval(low, pairs)
    assert ev_low.mean.dtype == torch.float32
    for mask in (keep, ~keep, None):
        # bf16 logits (|logit| < 3 here) carry errors of about 0.01-0.03 after three layers
        assert ev_low.metric_with(mask) == pytest.approx(ev_ref.metric_with(mask), abs=0.06)

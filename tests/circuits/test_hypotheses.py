"""Hypothesis scoring: rank-based AUROC against brute force, planted selective neurons, errors, a tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny

from neurontrace.attribution.api import attribute
from neurontrace.attribution.result import AttributionResult
from neurontrace.circuits.hypotheses import (
    attribute_prompts,
    auroc,
    average_ranks,
    per_prompt_top_k,
    score_hypotheses,
)
from neurontrace.errors import NeurontraceError


def brute_auroc(scores: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """P(in-class score > out-of-class score) + 0.5 P(tie), over every (in, out) pair."""
    out = torch.empty(positives.shape[0], scores.shape[1], dtype=torch.float64)
    for c, pos in enumerate(positives):
        a, b = scores[pos].double(), scores[~pos].double()  # [n_in, M], [n_out, M]
        diff = a[:, None, :] - b[None, :, :]
        out[c] = ((diff > 0).double() + 0.5 * (diff == 0).double()).mean((0, 1))
    return out


def fake_result(scores_sum: torch.Tensor, metric: torch.Tensor | None = None) -> AttributionResult:
    n, L, d = scores_sum.shape
    return AttributionResult(
        scores_sum=scores_sum,
        acts_sum_mean=torch.ones(L, d),
        metric_clean=torch.ones(n) if metric is None else metric,
        meta={"layers": list(range(L)), "model": "fake", "method": "relp", "metric": "logprob"},
    )


def test_average_ranks_with_ties():
    x = torch.tensor([[3.0, 1.0], [1.0, 1.0], [3.0, 2.0], [2.0, 1.0]])
    expected = torch.tensor([[3.5, 2.0], [1.0, 2.0], [3.5, 4.0], [2.0, 2.0]], dtype=torch.float64)
    torch.testing.assert_close(average_ranks(x), expected)


def test_auroc_matches_brute_force_with_ties():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (37, 53), generator=g).float()  # many ties
    scores[:, 0] = 0.0  # a constant column: 0.5
    labels = torch.randint(0, 3, (37,), generator=g)
    positives = torch.stack([labels == c for c in range(3)])
    expected = brute_auroc(scores, positives)
    torch.testing.assert_close(auroc(scores, positives), expected)
    torch.testing.assert_close(auroc(scores, positives, chunk_elements=37 * 4), expected)  # chunks of 4
    assert torch.allclose(expected[:, 0], torch.tensor(0.5, dtype=torch.float64))


def test_planted_selective_and_anti_selective_neurons():
    g = torch.Generator().manual_seed(1)
    labels = [i % 4 for i in range(80)]  # classes 0..3, 20 prompts each
    scores = torch.randn(80, 3, 50, generator=g)
    in2 = torch.tensor([label == 2 for label in labels])
    scores[:, 1, 7] = torch.where(in2, 5.0 + torch.rand(80, generator=g), torch.rand(80, generator=g))
    scores[:, 2, 3] = torch.where(in2, -1.0 - torch.rand(80, generator=g), torch.rand(80, generator=g))
    metric = torch.where(in2, -2.0, -4.0)  # log-probs: |metric| is 2 in class 2, 4 elsewhere
    result = fake_result(scores, metric)
    hs = score_hypotheses(result, labels)
    assert hs.classes == [0, 1, 2, 3] and hs.class_sizes == [20] * 4
    assert hs.auroc.shape == (4, 3, 50)
    c2 = hs.classes.index(2)
    assert hs.auroc[c2, 1, 7] == 1.0 and hs.auroc[c2, 2, 3] == 0.0
    noise = hs.auroc[:, 0]  # layer 0 is pure noise
    assert abs(float(noise.mean()) - 0.5) < 0.03 and float((noise - 0.5).abs().max()) < 0.4
    top = hs.selective(2)
    assert {(s.layer, s.neuron) for s in top[:2]} == {(1, 7), (2, 3)}  # the strongest come first
    planted = next(s for s in top if (s.layer, s.neuron) == (1, 7))
    assert planted.direction == "selective" and planted.node == "L1/N7+"
    assert planted.n_in == 20 and planted.n_out == 60
    assert planted.in_class_mean == pytest.approx(float(scores[in2, 1, 7].mean()))
    assert planted.in_class_share == pytest.approx(planted.in_class_mean / 2.0)
    assert planted.out_class_share == pytest.approx(planted.out_class_mean / 4.0)
    anti = next(s for s in top if (s.layer, s.neuron) == (2, 3))
    assert anti.direction == "anti-selective" and anti.auroc == 0.0
    assert all(s.class_label == 2 for s in hs.selective() if (s.layer, s.neuron) in ((1, 7), (2, 3)))
    frame = hs.table(5)
    assert len(frame) == min(5, len(hs.selective())) and {"node", "auroc", "in_class_share"} <= set(frame)
    data = json.loads(hs.to_json())
    assert data["schema_version"] == 1 and data["classes"] == [0, 1, 2, 3]
    assert data["neurons"][0]["auroc"] in (0.0, 1.0)


def test_masks():
    g = torch.Generator().manual_seed(2)
    labels = ["a"] * 6 + ["b"] * 6
    scores = torch.randn(12, 2, 4, generator=g)
    scores[:6, 0, 0] += 10.0
    result = fake_result(scores)
    only = torch.zeros(2, 4, dtype=torch.bool)
    only[0, 0] = True
    hs = score_hypotheses(result, labels, mask=only)
    assert torch.isnan(hs.auroc[:, 1]).all() and hs.auroc[0, 0, 0] == 1.0
    assert {(s.layer, s.neuron) for s in hs.selective()} == {(0, 0)}
    sparse = per_prompt_top_k(result, 1)  # each prompt keeps one neuron; the others count as 0
    assert sparse.shape == scores.shape and int(sparse.sum()) == 12
    masked = score_hypotheses(result, labels, mask=sparse)
    expected = auroc(torch.where(sparse, scores, 0.0).flatten(1), torch.tensor([[x == "a" for x in labels]]))
    torch.testing.assert_close(masked.auroc[0].flatten(), expected[0])


def test_any_hashable_labels():
    scores = torch.zeros(6, 1, 2)
    scores[:3, 0, 1] = 1.0
    labels = [("tens", 1)] * 3 + [("tens", 2)] * 3
    hs = score_hypotheses(fake_result(scores), labels)
    assert hs.classes == ["('tens', 1)", "('tens', 2)"]  # JSON-safe text
    assert [s.auroc for s in hs.selective(("tens", 1))] == [1.0]
    assert json.loads(hs.to_json())["n_selective"] == {"('tens', 1)": 1, "('tens', 2)": 1}
    with pytest.raises(NeurontraceError, match="no class"):
        hs.selective("nope")


@pytest.mark.parametrize(
    ("labels", "kwargs"),
    [
        ([0, 1, 0], {}),  # length mismatch
        ([0, 0, 0, 0], {}),  # one class
        ([0, 0, 0, 1], {}),  # class 1 below min_class_size
        ([0, 0, 1, 1], {"high": 0.2, "low": 0.5}),
        ([0, 0, 1, 1], {"mask": torch.ones(3, 3, dtype=torch.bool)}),
    ],
)
def test_bad_inputs(labels, kwargs):
    with pytest.raises(NeurontraceError):
        score_hypotheses(fake_result(torch.randn(4, 2, 3)), labels, **kwargs)


def test_tiny_model_end_to_end():
    model = make_tiny("llama")
    words = ["one", "two", "three", "four"]
    prompts, answers, labels = [], [], []
    for x in range(4):
        for y in range(3):
            prompts.append(f"{words[x]} plus {words[y]} equals")
            answers.append(" " + words[(x + y) % 4])
            labels.append((x + y) % 2)
    result = attribute_prompts(model, prompts, answers, method="relp", batch_size=5)
    assert result.scores_sum.shape == (12, model.n_layers, model.d_ff)
    alone = attribute(model, prompt=prompts[7], answer=answers[7], metric="logprob", method="relp")
    torch.testing.assert_close(result.scores_sum[7], alone.scores_sum[0], rtol=1e-4, atol=1e-5)
    assert float(result.metric_clean[7]) == pytest.approx(float(alone.metric_clean[0]), rel=1e-5)
    hs = score_hypotheses(result, labels, high=0.8, low=0.2)
    assert hs.classes == [0, 1] and hs.class_sizes == [6, 6]
    assert ((hs.auroc >= 0) & (hs.auroc <= 1)).all()
    torch.testing.assert_close(hs.auroc[0], 1 - hs.auroc[1])  # two classes: one-vs-rest mirrors
    flat = hs.auroc.flatten(1)
    n_extreme = int(((flat >= 0.8) | (flat <= 0.2)).sum())
    assert len(hs.selective()) == n_extreme
    for s in hs.selective()[:5]:
        inside = torch.tensor(labels) == s.class_label
        assert s.in_class_share == pytest.approx(
            float(result.scores_sum[inside, s.layer, s.neuron].double().mean())
            / float(result.metric_clean[inside].double().abs().mean()),
            rel=1e-6,
        )
    with pytest.raises(NeurontraceError):
        attribute_prompts(model, prompts, answers[:-1])

"""`attribute` over datasets: batching, aggregation, bases, resume after interruption, files, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny

from neurontrace.attribution import api
from neurontrace.attribution.api import attribute
from neurontrace.attribution.result import AttributionResult
from neurontrace.errors import NeurontraceError, TokenizationError
from neurontrace.tasks import Pair, save_pairs

PAIRS = [
    Pair("the keys to the cabinet", "the key to the cabinet", " are", " is"),
    Pair("the dogs near the table", "the dog near the table", " run", " runs"),
    Pair("the key to the cabinets", "the keys to the cabinets", " is", " are"),
    Pair("a dog", "a dogs", " runs", " run"),  # another length: per-position aggregates disappear
]


@pytest.fixture(scope="module")
def model():
    return make_tiny("llama")


@pytest.mark.parametrize("method", ["relp", "ig", "exact"])
def test_batches_equal_one_example_at_a_time(model, method):
    together = attribute(model, pairs=PAIRS, method=method, batch_size=4, steps=8)
    for i, pair in enumerate(PAIRS):
        alone = attribute(model, pairs=[pair], method=method, steps=8)
        torch.testing.assert_close(together.scores_sum[i], alone.scores_sum[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(together.metric_clean[i], alone.metric_clean[0], rtol=1e-5, atol=1e-5)
    assert together.mean_scores is None and together.scores is None  # lengths differ
    assert together.meta["paired"] and together.meta["n_examples"] == 4


def test_one_length_sets_get_per_position_means(model):
    result = attribute(model, pairs=PAIRS[:3], method="atp", batch_size=2)
    assert result.scores.shape == (3, model.n_layers, 5, model.d_ff)
    torch.testing.assert_close(result.mean_scores, result.scores.mean(0))
    torch.testing.assert_close(result.scores_sum, result.scores.sum(2))
    top = result.top(5)
    assert top[0].position is not None and top[0].token == result.meta["tokens"][0][top[0].position]
    assert abs(top[0].score) >= abs(top[-1].score)
    frame = result.to_pandas()
    assert len(frame) == model.n_layers * 5 * model.d_ff and set(frame.polarity) <= {"+", "-"}


@pytest.mark.parametrize("site", ["mlp_out", "attn_out", "resid"])
def test_other_bases(model, site):
    result = attribute(model, pairs=PAIRS[:2], method="relp", site=site)
    assert result.scores.shape[-1] == model.d_model and result.meta["site"] == site


def test_save_and_load_round_trip(model, tmp_path):
    result = attribute(model, pairs=PAIRS[:3], method="ig-inputs", steps=4)
    path = result.save(tmp_path / "out" / "attr.safetensors")
    loaded = AttributionResult.load(path)
    for name, tensor in result.tensors().items():
        torch.testing.assert_close(loaded.tensors()[name], tensor)
    assert loaded.meta["method"] == "ig-inputs" and loaded.meta["schema_version"] == 1
    assert [n.id for n in loaded.top(5)] == [n.id for n in result.top(5)]
    assert json.loads(result.to_json())["top"][0]["node"].startswith("L")


def test_dataset_file_and_resume_after_interruption(model, tmp_path, monkeypatch):
    data = tmp_path / "pairs.jsonl"
    save_pairs(data, PAIRS[:3] * 2)
    full = attribute(model, dataset=data, method="relp", batch_size=2)
    checkpoint = tmp_path / "run.ckpt"
    calls = {"n": 0}
    real_call = api.BatchAttributor.__call__

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # the run dies after two of three batches
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(api.BatchAttributor, "__call__", failing)
    with pytest.raises(KeyboardInterrupt):
        attribute(
            model, dataset=data, method="relp", batch_size=2, checkpoint=checkpoint, checkpoint_every_s=0
        )
    assert checkpoint.is_file()
    monkeypatch.setattr(api.BatchAttributor, "__call__", real_call)
    counted = {"n": 0}

    def counting(self, *args, **kwargs):
        counted["n"] += 1
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(api.BatchAttributor, "__call__", counting)
    resumed = attribute(model, dataset=data, method="relp", batch_size=2, checkpoint=checkpoint)
    assert counted["n"] == 1  # only the missing batch was computed
    torch.testing.assert_close(resumed.scores_sum, full.scores_sum)
    torch.testing.assert_close(resumed.mean_scores, full.mean_scores)
    assert resumed.meta["tokens"] == full.meta["tokens"] and not checkpoint.exists()


def test_checkpoint_of_another_run_is_ignored(model, tmp_path, capsys):
    """A complete checkpoint of an AtP run (kept: ``keep_checkpoint=True``) in the path of a RelP run of the
    same pairs: its fingerprint differs, so the RelP run starts over instead of returning the AtP scores."""
    checkpoint = tmp_path / "run.ckpt"
    first = attribute(model, pairs=PAIRS[:2], method="atp", checkpoint=checkpoint, checkpoint_every_s=0,
                      batch_size=1, keep_checkpoint=True)  # fmt: skip
    assert checkpoint.is_file()  # the second run meets it
    direct = attribute(model, pairs=PAIRS[:2], method="relp")
    assert not torch.allclose(first.scores_sum, direct.scores_sum, rtol=1e-2)  # taking it over would show
    capsys.readouterr()
    other = attribute(model, pairs=PAIRS[:2], method="relp", checkpoint=checkpoint, batch_size=1)
    assert "belongs to another run" in capsys.readouterr().err
    torch.testing.assert_close(other.scores_sum, direct.scores_sum)
    assert other.meta["method"] == "relp" and not checkpoint.exists()


def test_teacher_forced_multi_token_answer(model):
    result = attribute(model, prompt="the keys to the", answer=" cabinet are", metric="logprob", method="atp")
    tok = model.tokenizer
    ids = tok.encode("the keys to the") + tok.encode(" cabinet are", add_special_tokens=False)
    logits = model.logits(model.tokenize("the keys to the cabinet"))[0].log_softmax(-1)
    expected = logits[-2, ids[-2]] + logits[-1, ids[-1]]
    assert float(result.metric_clean[0]) == pytest.approx(float(expected), rel=1e-5)
    assert result.scores.shape[2] == 5  # prompt plus the first answer token


def test_mean_baseline_and_topk_metric(model):
    mean = attribute(model, prompt="the keys to the cabinet", answer=" are", method="atp", baseline="mean")
    zero = attribute(model, prompt="the keys to the cabinet", answer=" are", method="atp")
    assert not torch.allclose(mean.scores, zero.scores)
    topk = attribute(model, prompt="the keys to the cabinet", method="relp", metric="topk", topk=3)
    logits = model.logits(model.tokenize("the keys to the cabinet"))[0, -1]
    assert float(topk.metric_clean[0]) == pytest.approx(float(logits.topk(3).values.sum()), rel=1e-5)


def test_custom_metric(model):
    result = attribute(model, prompt="the keys", method="relp", metric_fn=lambda logits: logits[:, -1, 5] * 2)
    assert float(result.metric_clean[0]) == pytest.approx(
        2 * float(model.logits(model.tokenize("the keys"))[0, -1, 5])
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(pairs=[]), NeurontraceError, "dataset is empty"),
        (dict(prompt="the keys", counterfactual="the key is", answer=" are", contrast=" is"), TokenizationError,
         "unequal token lengths"),
        (dict(prompt="the keys", answer=" are near", method="atp"), TokenizationError, "must be one token"),
        (dict(prompt="the keys", answer=" are", method="magic"), NeurontraceError, "unknown method"),
        (dict(prompt="the keys", answer=" are", metric="logit-diff"), NeurontraceError, "needs a contrast"),
        (dict(prompt="the keys", metric_fn=lambda logits: logits[:, -1, 0] * float("nan")), NeurontraceError,
         "the metric is nan"),
        (dict(prompt="the keys", answer=" are", site="heads"), NeurontraceError, "unknown site"),
        (dict(prompt="the keys", answer=" are", layers=[7]), NeurontraceError, "layer 7 does not exist"),
    ],
)  # fmt: skip
def test_bad_input(model, kwargs, error, message):
    with pytest.raises(error, match=message):
        attribute(model, **kwargs)


def test_missing_dataset_file(model, tmp_path):
    with pytest.raises(NeurontraceError, match="no such dataset file"):
        attribute(model, dataset=tmp_path / "nope.jsonl")

"""The evaluation runner: a results folder with curves, plot and report; an interrupted run resumes."""

from __future__ import annotations

import json

import pytest
from conftest import make_tiny

from neurontrace.errors import NeurontraceError
from neurontrace.evaluation.report import write_report
from neurontrace.evaluation.runner import EvaluationRun, run_evaluation
from neurontrace.tasks import Pair

TRAIN = [
    Pair(f"the {a} near the {o}", f"the {b} near the {o}", f" {x}", f" {y}")
    for a, b, x, y in (
        ("dog", "dogs", "is", "are"),
        ("keys", "key", "are", "is"),
        ("table", "tables", "is", "are"),
    )
    for o in ("cabinet", "dog", "table")
]
TEST = TRAIN[::2]


def _run(methods=("relp", "atp"), bases=("neurons", "resid")) -> EvaluationRun:
    return EvaluationRun(
        model="tiny", data="test", methods=list(methods), bases=list(bases), n_train=len(TRAIN), n_test=len(TEST),
        points=6, batch_size=4,
    )  # fmt: skip


def test_results_folder(tmp_path):
    model = make_tiny("llama", seed=2)
    curves = run_evaluation(
        model, _run(), train=TRAIN, test=TEST, out=tmp_path, progress=False, log=lambda m: None
    )
    assert [(c.method, c.basis) for c in curves] == [
        ("relp", "neurons"), ("atp", "neurons"), ("relp", "resid"), ("atp", "resid")
    ]  # fmt: skip
    report = write_report(curves, tmp_path, title="tiny")
    text = report.read_text()
    assert "| relp | neurons |" in text and (tmp_path / "faithfulness.png").stat().st_size > 10_000
    data = json.loads((tmp_path / "curves.json").read_text())
    assert len(data) == 4 and all(c["points"] for c in data)


def test_interrupted_run_resumes(tmp_path, monkeypatch):
    import neurontrace.evaluation.runner as runner

    model = make_tiny("llama", seed=2)
    real_sweep, real_attribute = runner.sweep, runner.attribute
    calls = {"sweep": 0, "attribute": 0}

    def dying_sweep(*args, **kwargs):
        calls["sweep"] += 1
        if calls["sweep"] == 2:
            raise KeyboardInterrupt  # dies while sweeping the second curve (atp / neurons)
        return real_sweep(*args, **kwargs)

    monkeypatch.setattr(runner, "sweep", dying_sweep)
    with pytest.raises(KeyboardInterrupt):
        run_evaluation(
            model, _run(), train=TRAIN, test=TEST, out=tmp_path, progress=False, log=lambda m: None
        )
    assert (tmp_path / "curves" / "relp-neurons-seed0.json").is_file()
    assert (
        tmp_path / "attributions" / "atp-neurons-seed0.safetensors"
    ).is_file()  # attributed before the crash

    def counting_attribute(*args, **kwargs):
        calls["attribute"] += 1
        return real_attribute(*args, **kwargs)

    monkeypatch.setattr(runner, "sweep", real_sweep)
    monkeypatch.setattr(runner, "attribute", counting_attribute)
    with pytest.raises(NeurontraceError, match="different run"):
        run_evaluation(
            model, _run(bases=("neurons",)), train=TRAIN, test=TEST, out=tmp_path, log=lambda m: None
        )
    logs: list[str] = []
    curves = run_evaluation(
        model, _run(), train=TRAIN, test=TEST, out=tmp_path, progress=False, log=logs.append
    )
    assert logs[0] == "  relp-neurons-seed0: done already (resumed)" and len(curves) == 4
    assert calls["attribute"] == 2  # only the two resid attributions; atp / neurons came from its saved file

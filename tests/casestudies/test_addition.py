"""The addition case study runs end to end and writes its report folder (tiny model; the real run is in the docs)."""

from __future__ import annotations

import json

from conftest import make_tiny

from neurontrace.casestudies.addition import LABELINGS, run_addition, teacher_forced_correct
from neurontrace.cli import main


def test_report_folder(tmp_path):
    model = make_tiny("llama")
    report = run_addition(
        model, operands=range(10, 18), out=tmp_path, batch_size=16, progress=False, heatmaps=1
    )
    assert report.n_prompts == 64 and 0.0 <= report.accuracy <= 1.0
    assert set(report.selective) == set(LABELINGS)
    text = (tmp_path / "report.md").read_text()
    assert "## sum mod 10" in text and "Teacher-forced accuracy" in text
    assert json.loads((tmp_path / "report.json").read_text())["schema_version"] == 1
    assert (tmp_path / "attribution.safetensors").is_file()
    assert len(list(tmp_path.glob("auroc-*.json"))) == 3


def test_teacher_forced_correct_matches_argmax():
    model = make_tiny("llama")
    prompts, answers = ["the keys to the"], [" cabinet are"]
    ids = model.tokenizer.encode(prompts[0]) + model.tokenizer.encode(answers[0], add_special_tokens=False)
    pred = model.logits(model.tokenize("the keys to the cabinet are"))[0].argmax(-1)
    expected = pred[-3:-1].tolist() == ids[-2:]
    assert bool(teacher_forced_correct(model, prompts, answers)[0]) == expected


def test_bad_operand_range(capsys):
    assert main(["case", "addition", "--operands", "1-2"]) == 2
    assert "at least 4 values" in capsys.readouterr().err

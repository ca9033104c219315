"""`neurontrace evaluate` from the command line: every pair counted, mixed lengths kept, exact sizes with
intervals printed and written, and --fresh never deleting a folder it did not write."""

from __future__ import annotations

import argparse
import json

import pytest
from conftest import make_tiny_hf, word_tokenizer

from neurontrace.cli import main
from neurontrace.commands.evaluate import load_data
from neurontrace.tasks import Pair, generate_sva, save_pairs

# Prompts of 4 and 5 tokens, plus pairs the filter must drop (a two-token answer; unequal clean/patch lengths).
SUBJECTS = [("dog", "dogs"), ("key", "keys"), ("table", "tables"), ("cabinet", "cabinets")]
MIXED = [
    Pair(f"the {sg} near the {o}", f"the {pl} near the {o}", " is", " are")
    for sg, pl in SUBJECTS
    for o in ("table", "dog")
] + [
    Pair(f"{pl} near the {o}", f"{sg} near the {o}", " are", " is")
    for sg, pl in SUBJECTS
    for o in ("key", "cabinet")
]
BAD = [Pair("the dog near the table", "the dogs near the table", " is runs", " are"),
       Pair("the dog near the table", "dogs near the table", " is", " are")]  # fmt: skip


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval-model")
    make_tiny_hf("llama", seed=2).save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return str(path)


def test_mixed_lengths_keep_every_usable_pair_and_report_exact_sizes(folder, tmp_path, capsys):
    data = tmp_path / "mixed.jsonl"
    save_pairs(data, MIXED + BAD)
    out = tmp_path / "run"
    argv = [
        "evaluate",
        "--model",
        folder,
        "--dataset",
        str(data),
        "--methods",
        "relp,atp",
        "--bases",
        "neurons",
    ]
    argv += ["--points", "8", "--seeds", "2", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr()
    assert f"kept {len(MIXED)} of {len(MIXED) + 2} pairs" in printed.err
    assert "1 (an answer is not one token)" in printed.err
    assert "1 (clean and counterfactual prefixes differ in token length)" in printed.err
    config = json.loads((out / "config.json").read_text())
    assert config["nodes"] == "summed" and config["seeds"] == 2
    kept = config["extra"]["pairs"]["dataset"]
    assert (
        kept["kept"] == len(MIXED) and kept["total"] == len(MIXED) + 2 and kept["lengths"] == {"4": 8, "5": 8}
    )
    report = (out / "report.md").read_text()
    assert "nodes for F ≥ 0.8" in report and "grid said" in report and "kept 16 of 18 pairs" in report
    assert "| relp | neurons | 2 |" in printed.out
    curves = json.loads((out / "curves.json").read_text())
    assert {(c["method"], c["seed"]) for c in curves} == {("relp", 0), ("relp", 1), ("atp", 0), ("atp", 1)}
    for c in curves:
        assert c["meta"]["n_train"] + c["meta"]["n_test"] == len(MIXED)
        assert [lv["level"] for lv in c["levels"]] == [0.8, 0.9]
        for p in c["points"]:
            lo, hi = p["faithfulness_ci"]
            assert lo - 1e-9 <= p["faithfulness"] <= hi + 1e-9
    # per-position nodes cannot hold several lengths: the length cut is counted and the way out named
    out2 = tmp_path / "run2"
    argv2 = [*argv[:-1], str(out2), "--nodes", "per-position", "--seeds", "1"]
    assert main(argv2) == 0
    err = capsys.readouterr().err
    assert "kept 8 of 18 pairs" in err and "8 (another token length than the most common one)" in err
    assert "use --nodes summed to keep every length" in err


def test_fresh_never_deletes_a_folder_evaluate_did_not_write(folder, tmp_path, capsys):
    data = tmp_path / "mixed.jsonl"
    save_pairs(data, MIXED)
    user = tmp_path / "thesis"
    user.mkdir()
    (user / "thesis.txt").write_text("x")
    base = ["evaluate", "--model", folder, "--dataset", str(data), "--methods", "relp", "--bases", "neurons"]
    base += ["--points", "4", "--levels", "0.5"]
    assert (
        main([*base, "--fresh", "--out", str(user), "--methods", "relpp"]) == 2
    )  # bad argument: nothing touched
    assert main([*base, "--fresh", "--out", str(user)]) == 2
    assert (user / "thesis.txt").read_text() == "x"
    assert "nothing was deleted" in capsys.readouterr().err
    run = tmp_path / "run"
    assert main([*base, "--out", str(run)]) == 0
    (run / "curves" / "stale.json").write_text("{}")
    assert main([*base, "--fresh", "--out", str(run)]) == 0  # an evaluation folder is replaced
    assert not (run / "curves" / "stale.json").exists()


def _one_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("neurontrace: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _files(root) -> dict:
    return {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _no_model_load(monkeypatch):
    import neurontrace.commands.evaluate as evaluate

    monkeypatch.setattr(evaluate, "model_from_args", lambda args: pytest.fail("the model was loaded"))


def test_fresh_refuses_a_model_folder_before_the_model_loads_and_deletes_nothing(
    folder, tmp_path, monkeypatch, capsys
):
    import shutil

    from neurontrace.models.loading import load_model

    data = tmp_path / "mixed.jsonl"
    save_pairs(data, MIXED)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for name in ("config.json", "model.safetensors"):  # a Hugging Face model folder: its own config.json
        shutil.copy(f"{folder}/{name}", model_dir / name)
    before = _files(model_dir)
    _no_model_load(monkeypatch)
    base = ["evaluate", "--model", folder, "--dataset", str(data), "--methods", "relp", "--bases", "neurons"]
    for extra in (["--fresh"], []):  # replacing it, or resuming into it: refused alike
        assert main([*base, *extra, "--out", str(model_dir)]) == 2, extra
        line = _one_error(capsys.readouterr().err)
        assert "not an evaluation's" in line and str(model_dir) in line and "nothing was" in line, line
        assert _files(model_dir) == before and sorted(p.name for p in model_dir.iterdir()) == sorted(
            ["config.json", "model.safetensors"]
        )
    monkeypatch.undo()
    shutil.copy(f"{folder}/tokenizer.json", model_dir / "tokenizer.json")
    shutil.copy(f"{folder}/tokenizer_config.json", model_dir / "tokenizer_config.json")
    assert load_model(str(model_dir)).n_layers == 3  # the weights are still there and load


def _finished_run(folder: str, tmp_path) -> tuple:
    """A small evaluation, run to its end: its folder and the command line that made it."""
    data = tmp_path / "mixed.jsonl"
    save_pairs(data, MIXED)
    run = tmp_path / "run"
    argv = ["evaluate", "--model", folder, "--dataset", str(data), "--methods", "relp", "--bases", "neurons",
            "--points", "4", "--levels", "0.5", "--out", str(run)]  # fmt: skip
    assert main(argv) == 0
    return run, argv


def test_fresh_deletes_only_what_an_evaluation_wrote_also_in_an_older_folder(folder, tmp_path, capsys):
    from neurontrace.commands.evaluate import MARKER

    run, argv = _finished_run(folder, tmp_path)
    assert (run / MARKER).is_file() and (run / "config.json").is_file()
    (run / MARKER).unlink()  # a folder of a version that wrote no marker: known by its config.json
    (run / "notes.md").write_text("mine")
    (run / "curves" / "stale.json").write_text("{}")
    capsys.readouterr()
    assert main([*argv, "--fresh"]) == 0
    err = capsys.readouterr().err
    assert "kept notes.md" in err
    assert (run / "notes.md").read_text() == "mine" and not (run / "curves" / "stale.json").exists()
    assert (run / MARKER).is_file() and (run / "report.md").is_file()


def test_a_damaged_curve_is_computed_again_and_a_damaged_config_is_one_line(
    folder, tmp_path, monkeypatch, capsys
):
    run, argv = _finished_run(folder, tmp_path)
    curve = run / "curves" / "relp-neurons-seed0.json"
    whole = json.loads(curve.read_text())
    curve.write_bytes(curve.read_bytes()[:200])  # cut short, as a full disk or a copy could leave it
    capsys.readouterr()
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert f"{curve} is damaged" in err and "computing that curve again" in err and "Traceback" not in err
    again = json.loads(curve.read_text())
    # the same saved attribution and test pairs, swept again: equal up to float32 rounding of the means
    # (relative 1e-5 covers a different summation grouping of ~16 values, each rounded at 6e-8)
    assert [p["n_nodes"] for p in again["points"]] == [p["n_nodes"] for p in whole["points"]]
    for p, q in zip(again["points"], whole["points"], strict=True):
        assert p["faithfulness"] == pytest.approx(q["faithfulness"], rel=1e-5, abs=1e-7)
    config = run / "config.json"
    config.write_text('{"model": ')  # a damaged config.json: the run cannot know its settings
    before = _files(run)
    _no_model_load(monkeypatch)
    assert main(argv) == 2
    line = _one_error(capsys.readouterr().err)
    assert f"{config} is damaged" in line and "--fresh" in line
    assert _files(run) == before
    monkeypatch.undo()
    assert main([*argv, "--fresh"]) == 0  # the marker says the folder is an evaluation's: --fresh starts over
    assert json.loads(config.read_text())["methods"] == ["relp"]


def test_out_and_inputs_are_checked_before_the_model_loads_and_nothing_is_made(
    folder, tmp_path, monkeypatch, capsys
):
    data = tmp_path / "mixed.jsonl"
    save_pairs(data, MIXED)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(MIXED[0].to_dict()) + "\n{not json\n")
    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    new = tmp_path / "new" / "out"
    missing = str(tmp_path / "none.json")
    _no_model_load(monkeypatch)
    base = ["evaluate", "--model", folder, "--methods", "relp", "--bases", "neurons"]
    cases = [
        (["--dataset", str(data), "--out", str(a_file)], "is a file"),
        (["--dataset", str(data), "--out", str(a_file / "sub")], "is a file"),
        (["--dataset", str(bad), "--out", str(new)], f"{bad}:2:"),
        (["--dataset", str(data), "--test-dataset", str(bad), "--out", str(new)], f"{bad}:2:"),
        (["--task", "sva-bogus", "--out", str(new)], "unknown task"),
        (["--dataset", str(data), "--methods", "relpp", "--out", str(new)], "unknown method"),
        (["--dataset", str(data), "--blacklist", missing, "--out", str(new)], "none.json"),
    ]
    for extra, match in cases:
        assert main([*base, *extra]) == 2, extra
        assert match in _one_error(capsys.readouterr().err), extra
    assert a_file.read_text() == "mine" and not (tmp_path / "new").exists()


def test_pairs_with_template_slots_are_evaluated_slot_by_slot(folder, tmp_path, capsys):
    slotted = [
        Pair(
            f"the {sg} {prep} the {o}",
            f"the {pl} {prep} the {o}",
            " is",
            " are",
            slots=("the", sg, prep, "the", o),
        )
        for sg, pl in SUBJECTS
        for prep in ("near", "near to")
        for o in ("table", "dog")
    ]
    data = tmp_path / "slotted.jsonl"
    save_pairs(data, slotted)
    out = tmp_path / "run"
    argv = ["evaluate", "--model", folder, "--dataset", str(data), "--methods", "relp", "--bases", "neurons"]
    assert main([*argv, "--points", "6", "--out", str(out)]) == 0
    assert "nodes: slots" in capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert config["nodes"] == "slots" and config["extra"]["pairs"]["dataset"]["kept"] == len(slotted)
    curve = json.loads((out / "curves.json").read_text())[0]
    assert curve["n_total"] == 3 * 6 * 48  # layers x (special + 5 slots) x neurons
    assert (out / "attributions" / "relp-neurons-seed0.slots.safetensors").is_file()


@pytest.mark.default_model
def test_a_400_pair_mixed_length_agreement_file_is_used_in_full(default_model, tmp_path):
    """The issue's case: agreement pairs with one-, two- and three-word prepositions ("next to", "in front
    of"), about half of them of another token length than the most common one; the default keeps >= 95%."""
    pairs = generate_sva("pp_mixed", n=400, seed=0, tokenizer=default_model.tokenizer)
    path = tmp_path / "pp400.jsonl"
    save_pairs(path, [Pair(p.clean_prefix, p.patch_prefix, p.clean_answer, p.patch_answer) for p in pairs])
    args = argparse.Namespace(
        task=None,
        dataset=str(path),
        test_dataset=None,
        n_train=None,
        n_test=None,
        seed=0,
        seeds=1,
        nodes="auto",
    )
    data = load_data(args, default_model.tokenizer)
    report = data.kept["dataset"]
    assert report["total"] == 400 and len(report["lengths"]) >= 3
    assert max(report["lengths"].values()) < 0.7 * 400  # a one-length cut would drop over 30%
    train, test = data.splits[0]
    assert data.nodes == "summed" and len(train) + len(test) >= 0.95 * 400
    # the same pairs with the generator's template slots: aligned slot by slot, every pair kept
    save_pairs(path, pairs)
    data = load_data(args, default_model.tokenizer)
    assert data.nodes == "slots" and sum(map(len, data.splits[0])) == 400

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

"""Nothing destroyed, nothing faked (issue 16): each fault reproduced, then what is kept and what is said.

Faults: a save that hits a full disk (a writer raising ENOSPC), a checkpoint with flipped bytes or an edited
count, a model folder missing a weight, a damaged cached conversion, a graph set interrupted half-way, a slug
that climbs out of --out, the file modes of outputs, and inputs whose scores would be all zero or whose options
would be ignored. `--fresh` on a user's folder is tested in tests/evaluation/test_cli_evaluate.py.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import make_tiny, make_tiny_hf, save_tiny_folder, word_tokenizer

from neurontrace.attribution import api
from neurontrace.attribution.api import attribute
from neurontrace.attribution.result import AttributionResult
from neurontrace.cli import EXIT_ENVIRONMENT, EXIT_USAGE, main
from neurontrace.errors import ModelLoadError, NeurontraceError
from neurontrace.io import write_text_atomic
from neurontrace.tasks.pairs import Pair, save_pairs

PAIRS = [
    Pair("the keys to the cabinet", "the key to the cabinet", " are", " is"),
    Pair("the dogs near the table", "the dog near the table", " run", " runs"),
    Pair("the key to the cabinets", "the keys to the cabinets", " is", " are"),
] * 2


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("model")
    return save_tiny_folder(path, seed=0)


@pytest.fixture(scope="module")
def model():
    return make_tiny("llama")


def one_line(err: str) -> str:
    """The one error line of stderr (progress output may precede it), with no traceback anywhere."""
    lines = [part for line in err.splitlines() for part in [line[line.find("neurontrace: error: ") :]]
             if "neurontrace: error: " in line]  # fmt: skip
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "out.safetensors")


# ------------------------------------------------------------------ 2. a failed save keeps the finished run
def test_a_failed_save_keeps_the_run_and_the_rerun_saves_it_without_compute(
    folder, tmp_path, monkeypatch, capsys
):
    data = tmp_path / "pairs.jsonl"
    save_pairs(data, PAIRS)
    out = tmp_path / "res.safetensors"
    argv = ["attribute", "--model", folder, "--dataset", str(data), "--out", str(out), "--batch-size", "2"]
    monkeypatch.setattr(AttributionResult, "save", no_space)
    assert main(argv) == EXIT_ENVIRONMENT
    line = one_line(capsys.readouterr().err)
    assert "No space left on device" in line and "res.safetensors.partial" in line and "rerun" in line
    partial = tmp_path / "res.safetensors.partial"
    assert partial.is_file() and not out.exists()
    monkeypatch.undo()
    calls = {"n": 0}
    real = api.BatchAttributor.__call__

    def counting(self, *args, **kwargs):
        calls["n"] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(api.BatchAttributor, "__call__", counting)
    assert main(argv) == 0
    assert (
        calls["n"] == 0 and out.is_file() and not partial.exists()
    )  # saved from the checkpoint, then removed
    direct = attribute(make_tiny_from(folder), dataset=data, batch_size=2)
    torch.testing.assert_close(AttributionResult.load(out).scores_sum, direct.scores_sum)


def make_tiny_from(folder: str):
    from neurontrace.models.loading import load_model

    return load_model(folder)


@pytest.mark.parametrize("kind", ["folder", "file-as-parent"])
def test_an_unwritable_out_stops_before_any_compute(folder, tmp_path, monkeypatch, capsys, kind):
    data = tmp_path / "pairs.jsonl"
    save_pairs(data, PAIRS)
    (tmp_path / "afile").write_text("x")
    out = tmp_path if kind == "folder" else tmp_path / "afile" / "res.safetensors"
    monkeypatch.setattr(api, "attribute", lambda *a, **k: pytest.fail("computed"))
    assert main(["attribute", "--model", folder, "--dataset", str(data), "--out", str(out)]) == EXIT_USAGE
    assert "folder" in one_line(capsys.readouterr().err)
    assert (tmp_path / "afile").read_text() == "x"


# ------------------------------------------------------------------ 3. missing weights, damaged cache
@pytest.mark.parametrize("change", ["remove", "add"])
def test_a_checkpoint_with_a_missing_or_unexpected_weight_is_an_error_naming_it(tmp_path, change, capsys):
    from safetensors.torch import load_file, save_file

    save_tiny_folder(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    if change == "remove":
        del weights[name]
    else:
        weights["model.layers.1.mlp.extra.weight"] = torch.zeros(2, 2)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert main(["inspect", "--model", str(tmp_path), "--prompt", "the keys"]) == EXIT_USAGE
    line = one_line(capsys.readouterr().err)
    assert (name if change == "remove" else "model.layers.1.mlp.extra.weight") in line
    assert ("1 missing" if change == "remove" else "1 unexpected") in line


@pytest.mark.default_model
def test_a_damaged_cached_conversion_is_rebuilt_and_said(tmp_path, monkeypatch, capsys):
    from neurontrace.models.loading import load_model

    monkeypatch.setenv("NEURONTRACE_HOME", str(tmp_path))
    model = load_model("smollm2-135m")
    batch = model.tokenize("The keys to the cabinet")
    want = model.logits(batch)[0, -1]
    (cache,) = (tmp_path / "models").iterdir()
    weights = cache / "model.safetensors"
    with open(weights, "r+b") as f:  # flip bytes well inside the tensor data
        f.seek(weights.stat().st_size // 2)
        f.write(b"\xff" * 4096)
    del model
    capsys.readouterr()
    again = load_model("smollm2-135m")
    assert "is damaged (model.safetensors does not match its checksum); rebuilding" in capsys.readouterr().err
    got = again.logits(again.tokenize("The keys to the cabinet"))[0, -1]
    # exact: the rebuilt weights are the same bytes, run through the same kernels on the same shapes
    assert torch.isfinite(got).all() and torch.equal(got, want)


# ------------------------------------------------------------------ 4. checkpoints are verified
def _interrupted(model, data, checkpoint, monkeypatch, **kw):
    """Run until the third batch, which dies: a checkpoint of two batches is left."""
    real = api.BatchAttributor.__call__
    calls = {"n": 0}

    def dying(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(api.BatchAttributor, "__call__", dying)
    with pytest.raises(KeyboardInterrupt):
        attribute(model, dataset=data, batch_size=1, checkpoint=checkpoint, checkpoint_every_s=0, **kw)
    monkeypatch.setattr(api.BatchAttributor, "__call__", real)
    assert checkpoint.is_file()


def _flip_tensor_bytes(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(raw[:8], "little")
    for i in range(header + 16, header + 48):  # inside the first tensor's data
        raw[i] ^= 0x5A
    path.write_bytes(bytes(raw))


def _edit_done(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    meta = json.loads(header["__metadata__"]["neurontrace-checkpoint"])
    meta["done"] += 1
    header["__metadata__"]["neurontrace-checkpoint"] = json.dumps(meta)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :])


@pytest.mark.parametrize("damage", [_flip_tensor_bytes, _edit_done], ids=["flipped-bytes", "edited-count"])
def test_a_damaged_checkpoint_is_detected_said_and_the_run_restarts(
    model, tmp_path, monkeypatch, capsys, damage
):
    data = tmp_path / "pairs.jsonl"
    save_pairs(data, PAIRS)
    full = attribute(model, dataset=data, batch_size=1)
    checkpoint = tmp_path / "run.partial"
    _interrupted(model, data, checkpoint, monkeypatch)
    damage(checkpoint)
    capsys.readouterr()
    resumed = attribute(model, dataset=data, batch_size=1, checkpoint=checkpoint)
    err = capsys.readouterr().err
    assert f"checkpoint {checkpoint}" in err and "starting the run over" in err
    assert resumed.n_examples == len(PAIRS)
    torch.testing.assert_close(resumed.scores_sum, full.scores_sum)
    torch.testing.assert_close(resumed.metric_clean, full.metric_clean)


def test_the_random_control_resumes_identically(model, tmp_path, monkeypatch):
    data = tmp_path / "pairs.jsonl"
    save_pairs(data, PAIRS)
    full = attribute(model, dataset=data, batch_size=1, method="random", seed=5)
    checkpoint = tmp_path / "run.partial"
    _interrupted(model, data, checkpoint, monkeypatch, method="random", seed=5)
    resumed = attribute(model, dataset=data, batch_size=1, method="random", seed=5, checkpoint=checkpoint)
    # exact: seeded random draws, each example's sum computed alone in one batch of one (same kernels, shapes)
    assert torch.equal(resumed.scores_sum, full.scores_sum)


# ------------------------------------------------------------------ 6, 7, 8. graph sets, file modes, slugs
def test_a_graph_set_interrupted_by_a_full_disk_leaves_the_old_set_whole(
    folder, tmp_path, monkeypatch, capsys
):
    import neurontrace.io as io

    argv = ["graph", "--model", folder, "--prompt", "the keys to the cabinet", "--out", str(tmp_path)]
    assert main(argv) == 0
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert {"graph.json", "graph.html", "graph.neurontrace.json"} <= {str(p) for p in before}
    real, calls = io._write_temporary, {"n": 0}

    def third_fails(path, data):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, data)

    monkeypatch.setattr(io, "_write_temporary", third_fails)
    capsys.readouterr()
    assert main([*argv, "--max-logits", "2"]) == EXIT_ENVIRONMENT
    line = one_line(capsys.readouterr().err)
    assert "No space left on device" in line and "intact" in line
    after = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before  # every old part byte-identical, no temporary file left


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077])
def test_outputs_get_the_usual_mode_for_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        path = write_text_atomic(tmp_path / f"out-{mask:o}.json", "{}")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


@pytest.mark.parametrize("slug", ["../../x", "a/b", "..", "/tmp/x"])
def test_a_slug_must_be_a_plain_file_name(folder, tmp_path, capsys, slug):
    out = tmp_path / "out"
    argv = ["graph", "--model", folder, "--prompt", "the keys", "--out", str(out), "--slug", slug]
    assert main(argv) == EXIT_USAGE
    assert "plain file name" in one_line(capsys.readouterr().err)
    assert not out.exists() and not (tmp_path / "x").exists()


# ------------------------------------------------------------------ smaller: errors that say where and why
def test_dataset_errors_give_the_files_line_number(folder, tmp_path, capsys):
    good = [json.dumps(p.to_dict()) for p in PAIRS[:3]]
    lines = good * 100  # 300 lines: the bad one is far past the first 256-pair chunk
    cases = {
        "unequal": json.dumps(Pair("the keys to the cabinet", "the key cabinet", " are", " is").to_dict()),
        "multi-token answer": json.dumps(
            Pair("the keys to the", "the key to the", " cabinet are", " is").to_dict()
        ),
    }
    for what, bad in cases.items():
        path = tmp_path / f"{what}.jsonl"
        path.write_text("\n".join([*lines[:299], bad]) + "\n")
        assert main(["attribute", "--model", folder, "--dataset", str(path)]) == EXIT_USAGE, what
        assert f"{path}:300:" in one_line(capsys.readouterr().err), what
    path = tmp_path / "latin1.jsonl"
    path.write_bytes("\n".join(lines[:4]).encode() + b'\n{"clean_prefix": "caf\xe9"}\n')
    assert main(["attribute", "--model", folder, "--dataset", str(path)]) == EXIT_USAGE
    assert f"{path}:5: not UTF-8" in one_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--answer", " are", "--contrast", " are"], "logit difference is 0"),
        (["--answer", ""], "answer is empty"),
        (["--answer", " are", "--contrast", " is", "--metric", "logprob"], "not used by the logprob metric"),
        (
            ["--answer", " are", "--contrast", " is", "--counterfactual", "the keys to the cabinet"],
            "prompt itself",
        ),
    ],
)
def test_inputs_whose_scores_would_be_zero_or_options_ignored_are_errors(folder, capsys, extra, match):
    argv = ["attribute", "--model", folder, "--prompt", "the keys to the cabinet", *extra]
    assert main(argv) == EXIT_USAGE
    assert match in one_line(capsys.readouterr().err)


def test_identical_pairs_in_a_dataset_are_errors_with_their_line(folder, tmp_path, capsys):
    path = tmp_path / "pairs.jsonl"
    same = Pair("the keys to the cabinet", "the keys to the cabinet", " are", " is")
    save_pairs(path, [PAIRS[0], PAIRS[1], same])
    assert main(["attribute", "--model", folder, "--dataset", str(path)]) == EXIT_USAGE
    assert f"{path}:3: the counterfactual prompt is the prompt itself" in one_line(capsys.readouterr().err)


@pytest.fixture(scope="module")
def nan_folder(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("nan-model")
    hf = make_tiny_hf("llama")
    with torch.no_grad():
        hf.model.norm.weight[0] = float("nan")
    hf.save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return str(path)


@pytest.mark.parametrize(
    "argv",
    [
        ["inspect", "--prompt", "the keys"],
        ["steer", "--prompt", "the keys", "--neurons", "L1/N3", "--mode", "scale", "--value", "0"],
        ["steer", "--prompt", "the keys", "--neurons", "L1/N3", "--sweep", "0,1"],
        ["describe", "L1/N3+"],
    ],
    ids=["inspect", "steer", "steer-sweep", "describe"],
)
def test_nan_outputs_are_an_error_not_printed(nan_folder, capsys, argv):
    assert main([argv[0], "--model", nan_folder, *argv[1:]]) == EXIT_USAGE
    assert "NaN or infinite" in one_line(capsys.readouterr().err)


def test_library_users_get_the_same_errors(model):
    with pytest.raises(NeurontraceError, match="logit difference is 0"):
        attribute(model, prompt="the keys", answer=" are", contrast=" are")
    with pytest.raises(ModelLoadError):
        raise ModelLoadError("x")


# ------------------------------------------------------------------ prompts files: one line, one prompt
def test_a_prompts_file_that_is_not_utf8_names_its_line_and_byte(folder, tmp_path, capsys):
    path = tmp_path / "prompts.txt"
    path.write_bytes(b"the keys\nthe caf\xe9 dog\n")
    out = tmp_path / "out"
    assert main(["graph", "--model", folder, "--prompts", str(path), "--out", str(out)]) == EXIT_USAGE
    assert f"{path}:2: not UTF-8 text (byte 0xe9 at column 8)" in one_line(capsys.readouterr().err)
    assert not out.exists()


def test_a_prompt_holding_a_line_separator_stays_one_prompt(folder, tmp_path):
    # str.splitlines would cut each of these lines in two (U+2028, U+2029, a form feed, U+0085)
    prompts = [
        "the keys\u2028to the cabinet",
        "the dog\u2029near the table",
        "the key\x0cis",
        "a dog\x85runs",
    ]
    path = tmp_path / "prompts.txt"
    path.write_bytes(("\r\n".join(prompts) + "\r\n\n").encode("utf-8"))  # Windows line ends, a blank line
    out = tmp_path / "out"
    argv = ["graph", "--model", folder, "--prompts", str(path), "--out", str(out), "--max-logits", "1"]
    assert main(argv) == 0
    assert [e["prompt"] for e in json.loads((out / "index.json").read_text())] == prompts
    for i, prompt in enumerate(prompts):
        assert json.loads((out / f"graph-{i:03d}.json").read_text())["metadata"]["prompt"] == prompt
    assert not (out / f"graph-{len(prompts):03d}.json").exists()


def test_jsonl_inputs_split_on_newline_only(model, tmp_path):
    from neurontrace.commands.hypotheses import read_labelled
    from neurontrace.dictionaries.corpus import TextCorpus

    rows = [{"prompt": "the keys\u2028to", "answer": " are", "label": "plural", "text": "the keys\u2028are"},
            {"prompt": "the key", "answer": " is", "label": "singular", "text": "the key\u2029is"}]  # fmt: skip
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    want = (["the keys\u2028to", "the key"], [" are", " is"], ["plural", "singular"])
    assert read_labelled(path, "label") == want
    assert list(TextCorpus(model, path, 8).documents()) == ["the keys\u2028are", "the key\u2029is"]


# ------------------------------------------------------------------ cheap checks first, nothing made
def test_input_mistakes_stop_before_the_model_loads_and_make_nothing(folder, tmp_path, monkeypatch, capsys):
    import neurontrace.commands._common as common

    monkeypatch.setattr(common, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    good = tmp_path / "pairs.jsonl"
    save_pairs(good, PAIRS)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(PAIRS[0].to_dict()) + '\n{"clean_prefix": "the keys"\n')
    new = tmp_path / "new"
    cases = [
        (["attribute", "--dataset", str(bad), "--out", str(new / "a.safetensors")], f"{bad}:2:"),
        (["graph", "--dataset", str(bad), "--out", str(new / "g")], f"{bad}:2:"),
        (["attribute", "--prompt", "the keys", "--answer", " are", "--contrast", " is", "--center-logits",
          "--out", str(new / "b.safetensors")], "centred logits do not change the logit-diff metric"),
        (["attribute", "--dataset", str(good), "--center-logits", "--out", str(new / "c.safetensors")],
         "centred logits do not change the logit-diff metric"),
        (["attribute", "--prompt", "the keys", "--answer", " are", "--site", "sae:hf:../.."], "not a hub repo id"),
        (["graph", "--prompt", "the keys", "--site", "sae:hf:../..", "--out", str(new / "g")], "not a hub repo id"),
    ]  # fmt: skip
    for argv, match in cases:
        assert main([argv[0], "--model", folder, *argv[1:]]) == EXIT_USAGE, argv
        assert match in one_line(capsys.readouterr().err), argv
    assert not new.exists()  # no empty --out folder either


def _refusing_mkstemp(*args, **kwargs):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.path.join(kwargs.get("dir") or ".", ".x.tmp"))


@pytest.mark.parametrize("command", ["attribute", "graph", "estimate"])
def test_a_read_only_output_is_exit_3_naming_the_users_path(folder, tmp_path, monkeypatch, capsys, command):
    import tempfile

    data = tmp_path / "pairs.jsonl"
    save_pairs(data, PAIRS)
    out = tmp_path / "ro" / ("e.json" if command == "estimate" else "res.safetensors")
    argv = {
        "attribute": ["attribute", "--model", folder, "--dataset", str(data), "--out", str(out)],
        "graph": ["graph", "--model", folder, "--prompt", "the keys", "--out", str(out.parent)],
        "estimate": ["estimate", "--model", folder, "--prompt-len", "8", "--json", str(out)],
    }[command]
    monkeypatch.setattr(api, "attribute", lambda *a, **k: pytest.fail("computed"))
    monkeypatch.setattr(tempfile, "mkstemp", _refusing_mkstemp)  # no new file, as on a read-only disk
    assert main(argv) == EXIT_ENVIRONMENT
    line = one_line(capsys.readouterr().err)
    assert "Read-only file system" in line and str(out.parent) in line and ".tmp" not in line, line
    assert not out.parent.exists()


def test_a_refused_write_names_the_target_not_the_temporary_file(tmp_path, monkeypatch):
    import tempfile

    target = tmp_path / "estimate.json"  # what `estimate --json` and every JSON result write through
    monkeypatch.setattr(tempfile, "mkstemp", _refusing_mkstemp)
    with pytest.raises(OSError) as err:
        write_text_atomic(target, "{}")
    assert err.value.errno == errno.EROFS and err.value.filename == str(target)
    assert not target.exists()

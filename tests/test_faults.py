"""Environment faults against the CLI (issue 13): devices that are not here, full and read-only disks, paths of
the wrong kind, kill -9 and Ctrl-C in the middle of a run, and two processes writing one output.

Each case: the documented exit code (README: 2 a user mistake, 3 the machine refused, 130 interrupted), one
`neurontrace: error:` line, no traceback, and files written before byte-identical. Full and read-only disks
are real tmpfs mounts where this process may mount (root), else the case is skipped; the monkeypatched ENOSPC
writers of tests/test_data_safety.py cover the same paths everywhere.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_folder

from neurontrace.cli import EXIT_ENVIRONMENT, EXIT_USAGE, main
from neurontrace.tasks.pairs import Pair, save_pairs

PAIRS = [
    Pair(f"the {s} {p} the {o}", f"the {t} {p} the {o}", a, b)
    for s, t, a, b in (("keys", "key", " are", " is"), ("key", "keys", " is", " are"),
                       ("dogs", "dog", " run", " runs"), ("dog", "dogs", " runs", " run"))
    for p in ("to", "near", "on")
    for o in ("cabinet", "table", "cabinets", "tables")
]  # fmt: skip


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("model")
    return save_tiny_folder(path, seed=2)


def error_line(err: str) -> str:
    lines = [
        line[line.find("neurontrace: error: ") :]
        for line in err.splitlines()
        if "neurontrace: error: " in line
    ]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def snapshot(root: Path) -> dict:
    return {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# ------------------------------------------------------------------ devices
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1", "mps", "bogus"])
@pytest.mark.parametrize("command", [["inspect", "--prompt", "the keys"], ["estimate", "--prompt-len", "8"]])
def test_a_device_that_is_not_here_is_one_line_naming_the_devices(folder, capsys, device, command):
    assert main([*command, "--model", folder, "--device", device]) == EXIT_USAGE
    line = error_line(capsys.readouterr().err)
    assert "devices here: cpu" in line and "--device" in line


# ------------------------------------------------------------------ full and read-only disks (tmpfs)
@pytest.fixture
def tmpfs(tmp_path):
    """A 2 MB tmpfs, unmounted afterwards (skipped where mounting is not allowed)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(
            "mounting a tmpfs needs root; tests/test_data_safety.py covers ENOSPC by a monkeypatched writer"
        )
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path, leave: int = 4096) -> None:
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    (disk / "filler").write_bytes(b"\0" * max(0, free - leave))


def test_a_full_disk_is_one_line_and_earlier_files_stay(folder, tmpfs, capsys):
    out = tmpfs / "tasks"
    assert main(["tasks", "--task", "sva-simple", "--out", str(out)]) == 0
    before = snapshot(out)
    _fill(tmpfs)
    capsys.readouterr()
    assert main(["tasks", "--task", "sva-nounpp", "--n", "2000", "--out", str(out)]) == EXIT_ENVIRONMENT
    line = error_line(capsys.readouterr().err)
    assert "No space left on device" in line and "intact" in line
    assert snapshot(out) == before  # no half-written file, no temporary file left
    capsys.readouterr()
    est = tmpfs / "estimate.json"
    (tmpfs / "filler").unlink()
    _fill(tmpfs, leave=0)
    assert main(["estimate", "--model", folder, "--prompt-len", "8", "--json", str(est)]) == EXIT_ENVIRONMENT
    assert "No space left" in error_line(capsys.readouterr().err) and not est.exists()


def test_a_read_only_folder_is_one_line(folder, tmpfs, tmp_path, capsys):
    (tmpfs / "old.json").write_text("{}")
    data = tmp_path / "pairs.jsonl"
    save_pairs(data, PAIRS[:4])
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    for argv, named in (
        (["estimate", "--model", folder, "--prompt-len", "8", "--json", str(tmpfs / "e.json")], "e.json"),
        (["tasks", "--task", "sva-simple", "--out", str(tmpfs)], ""),
        (["tasks", "--task", "sva-simple", "--out", str(tmpfs / "new" / "folder")], ""),
        (["attribute", "--model", folder, "--dataset", str(data), "--out", str(tmpfs / "a.safetensors")],
         "a.safetensors"),
        (["graph", "--model", folder, "--prompt", "the keys", "--out", str(tmpfs / "graphs")], "graphs"),
        (["evaluate", "--model", folder, "--dataset", str(data), "--out", str(tmpfs / "eval")], "eval"),
        (["train-sae", "--model", folder, "--out", str(tmpfs / "sae")], "sae"),
        (["case", "addition", "--model", folder, "--out", str(tmpfs / "case")], "case"),
        (["inspect", "--model", folder, "--prompt", "the keys", "--json", str(tmpfs / "i.json")], "i.json"),
    ):  # fmt: skip
        assert main(argv) == EXIT_ENVIRONMENT, argv
        line = error_line(capsys.readouterr().err)
        assert "Read-only file system" in line and named in line and ".tmp" not in line, line
    assert snapshot(tmpfs) == {Path("old.json"): b"{}"}


# ------------------------------------------------------------------ paths of the wrong kind
def test_paths_of_the_wrong_kind_are_user_errors(folder, tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    a_dir = tmp_path / "a-dir"
    a_dir.mkdir()
    cases = [
        ["tasks", "--task", "sva-simple", "--out", str(a_file)],  # an existing file as the output folder
        ["tasks", "--task", "sva-simple", "--out", str(a_file / "sub")],  # a file's sub-path
        [
            "estimate",
            "--model",
            folder,
            "--prompt-len",
            "8",
            "--json",
            str(a_dir),
        ],  # a folder where a file goes
        ["graph", "--model", folder, "--prompt", "the keys", "--out", str(a_file)],
    ]
    for argv in cases:
        assert main(argv) == EXIT_USAGE, argv
        line = error_line(capsys.readouterr().err)
        assert "choose another --out" in line or "folder" in line, line
    assert a_file.read_text() == "mine" and list(a_dir.iterdir()) == []


# ------------------------------------------------------------------ kill -9, Ctrl-C, two writers
# Every command of a resume test runs on one thread: the thread count changes how a CPU kernel groups its sums
# (the tiny model's metric moves by up to 1.2e-6 between one thread and two), so an interrupted part computed on
# one thread and the rest on the test process's default would agree with an uninterrupted run only to rounding.
# With one thread everywhere, every example goes through the same kernels on the same shapes in each run, and a
# resumed run continues the checkpoint's running sums (saved after whole batches) with the same batches in the
# same order, so its result is the uninterrupted one bit for bit, on any CPU.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _cli(args: list[str], **kwargs) -> subprocess.Popen:
    env = {**ENV, "NEURONTRACE_CHECKPOINT_SECONDS": "0"}
    # a user's shell starts the command with SIGINT at its default; a child inherits an *ignored* SIGINT from its
    # parent (something in the test process may have set one), so reset it before exec
    return subprocess.Popen([sys.executable, "-m", "neurontrace.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kwargs)  # fmt: skip


def _run(args: list[str]) -> subprocess.CompletedProcess:
    """A whole command, to its end, with the interrupted run's thread count."""
    command = [sys.executable, "-m", "neurontrace.cli", *args]
    return subprocess.run(command, env=ENV, capture_output=True, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, "no checkpoint appeared"
        time.sleep(0.05)


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path)


@pytest.mark.parametrize("how", ["kill -9", "Ctrl-C"])
def test_an_interrupted_dataset_run_resumes_to_the_same_result(folder, tmp_path, how):
    data = tmp_path / "pairs.jsonl"
    save_pairs(data, PAIRS * 12)  # 576 pairs, one a batch: long enough to interrupt (192 could end first)
    want = tmp_path / "uninterrupted.safetensors"
    args = ["attribute", "--model", folder, "--dataset", str(data), "--batch-size", "1"]
    assert _run([*args, "--out", str(want)]).returncode == 0
    out = tmp_path / "run.safetensors"
    proc = _cli([*args, "--out", str(out)])
    _wait_for(out.with_name(out.name + ".partial"), proc)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL if how == "kill -9" else signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    if how == "Ctrl-C":
        assert proc.returncode == 130 and "neurontrace: interrupted" in err and "Traceback" not in err, err
    else:
        assert proc.returncode == -signal.SIGKILL
    partial = out.with_name(out.name + ".partial")
    assert partial.is_file() and not out.exists()
    done = _run([*args, "--out", str(out)])
    assert done.returncode == 0, done.stderr
    got, expected = _tensors(out), _tensors(want)
    assert got.keys() == expected.keys()
    for name in expected:  # bit for bit: one thread in every run (see ENV)
        assert torch.equal(got[name], expected[name]), name
    assert not partial.exists()


def test_a_killed_evaluation_resumes_to_the_same_curves(folder, tmp_path):
    data = tmp_path / "pairs.jsonl"
    save_pairs(data, PAIRS)
    args = ["evaluate", "--model", folder, "--dataset", str(data), "--methods", "relp,atp", "--bases", "neurons",
            "--points", "6", "--seeds", "2"]  # fmt: skip
    want = tmp_path / "whole"
    assert _run([*args, "--out", str(want)]).returncode == 0
    out = tmp_path / "killed"
    proc = _cli([*args, "--out", str(out)])
    _wait_for(out / "curves" / "relp-neurons-seed0.json", proc, timeout=120)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert not (out / "curves.json").exists()
    done = _run([*args, "--out", str(out)])
    assert done.returncode == 0, done.stderr

    def curves(root: Path) -> list:
        items = json.loads((root / "curves.json").read_text())
        for c in items:  # everything but how long each part took
            c["meta"] = {k: v for k, v in c.get("meta", {}).items() if not k.endswith("seconds")}
        return items

    assert curves(out) == curves(want)  # bit for bit: one thread in every run (see ENV)


def test_two_processes_writing_one_output_never_mix(tmp_path):
    versions = {}
    for seed in ("1", "2"):  # each run's complete output, alone
        alone = tmp_path / f"alone-{seed}"
        assert (
            main(["tasks", "--task", "sva-nounpp", "--n", "3000", "--seed", seed, "--out", str(alone)]) == 0
        )
        versions[seed] = (alone / "nounpp_train.jsonl").read_bytes()
    assert versions["1"] != versions["2"]
    out = tmp_path / "shared"
    for _ in range(3):  # the same file written by two processes at once
        runs = [_cli(["tasks", "--task", "sva-nounpp", "--n", "3000", "--seed", seed, "--out", str(out)])
                for seed in ("1", "2")]  # fmt: skip
        assert [p.wait(timeout=120) for p in runs] == [0, 0]
        assert (out / "nounpp_train.jsonl").read_bytes() in versions.values()  # one run's file, whole
        assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no temporary file left

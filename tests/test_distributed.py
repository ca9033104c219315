"""Data-parallel runs: two processes under ``torchrun`` (gloo, CPU) give the result of one process.

The two-process runs are launched as subprocesses (``python -m torch.distributed.run``) on a tiny model saved to
a folder and on the default model; the one-process reference runs in this process with the same settings.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import distributed_worker as worker
import pytest
import torch
from conftest import make_tiny_hf, word_tokenizer

from neurontrace import distributed
from neurontrace.attribution.result import AttributionResult
from neurontrace.models.loading import load_model
from neurontrace.tasks import Pair, save_pairs

WORKER = Path(__file__).resolve().parent / "distributed_worker.py"
KILL_ONE = WORKER.with_name("distributed_kill_one.py")
ATOL = 1e-5
U = 2.0**-24  # float32 unit roundoff
NOUNS = [("dog", "dogs"), ("key", "keys"), ("table", "tables"), ("cabinet", "cabinets")]
TINY_PAIRS = [
    Pair(f"the {sg} near the {o}", f"the {pl} near the {o}", " is", " are")
    for sg, pl in NOUNS
    for o in ("table", "dog")
] + [
    Pair(f"the {pl} near the {o}", f"the {sg} near the {o}", " are", " is")
    for sg, pl in NOUNS
    for o in ("key",)
]


def torchrun(
    *args: str, nproc: int = 2, timeout: float = 240, ok: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run ``args`` (a script or ``-m module`` and its arguments) in ``nproc`` processes; must succeed if ``ok``.

    Options of torchrun itself may come first in ``args``; ``env`` adds environment variables."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
           **(env or {})}  # fmt: skip
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0 or not ok, f"torchrun failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_hf("llama", seed=3).save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return str(path)


def close(a: torch.Tensor | None, b: torch.Tensor | None, name: str) -> None:
    assert (a is None) == (b is None), f"{name}: present in one result only"
    if a is not None:
        assert a.shape == b.shape, f"{name}: shapes {tuple(a.shape)} and {tuple(b.shape)}"
        diff = float((a - b).abs().max()) if a.numel() else 0.0
        scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
        assert diff <= ATOL * scale, f"{name}: largest difference {diff:.2e} > {ATOL} x {scale:.3g}"


def same_result(got: AttributionResult, ref: AttributionResult) -> None:
    assert got.n_examples == ref.n_examples
    for name in ("scores_sum", "mean_scores", "metric_clean", "metric_patch", "acts_mean", "acts_sum_mean"):
        close(getattr(got, name), getattr(ref, name), name)
    close(got.scores, ref.scores, "scores")
    assert got.meta["tokens"] == ref.meta["tokens"] and got.meta["prompts"] == ref.meta["prompts"]


@contextlib.contextmanager
def one_thread():
    """One intra-op thread in this process, as in the torchrun processes (``OMP_NUM_THREADS=1``), so that both
    run the same kernels, with the same splits of their reductions, on the same shapes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def rounding_bound(values: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The largest difference float32 rounding allows between ``a`` and ``b``, two means over the first dimension
    of the same float32 ``values`` ``[N, ...]`` summed in different orders.

    Any order of summing N floats (batch after batch in one process; per process, then over the processes) errs
    by at most gamma_{N-1} * sum|x_i|, gamma_k = k u / (1 - k u) (Higham, Accuracy and Stability of Numerical
    Algorithms, section 4.2), so two orders differ by twice that; the division by N rounds each mean once more,
    by at most u / (1 - u) of it.
    """
    n = values.shape[0]
    gamma = (n - 1) * U / (1 - (n - 1) * U)
    return 2 * gamma * values.abs().sum(0) / n + U / (1 - U) * (a.abs() + b.abs())


def same_to_rounding(got: AttributionResult, ref: AttributionResult, acts: torch.Tensor) -> dict[str, float]:
    """``got`` (two processes) holds ``ref``'s (one process) per-example values exactly and its means to float32
    rounding; ``acts`` ``[N, L, T, d]`` are the examples' activations (for the bound on ``acts_mean``).

    Exactly: with shares that start at a batch boundary, every example is computed in the same batch by the same
    kernels on the same shapes, and the per-example rows are only gathered. Only the order in which the
    per-position sums add the examples differs (see :func:`rounding_bound`). Returns the largest absolute and
    relative (to the largest |mean|) differences of the means.
    """
    assert got.n_examples == ref.n_examples and got.meta["tokens"] == ref.meta["tokens"]
    for name in ("scores_sum", "scores", "metric_clean", "metric_patch", "acts_sum_mean"):
        a, b = getattr(got, name), getattr(ref, name)
        assert a is not None and torch.equal(a, b), name
    measured = {}
    for name, values in (("mean_scores", ref.scores), ("acts_mean", acts)):
        a, b = getattr(got, name), getattr(ref, name)
        diff, bound = (a - b).abs(), rounding_bound(values, a, b)
        worst = int((diff - bound).flatten().argmax())
        assert bool((diff <= bound).all()), (
            f"{name}: difference {float(diff.flatten()[worst]):.3e} > bound {float(bound.flatten()[worst]):.3e}"
        )
        measured[name] = float(diff.max())
        measured[f"{name} relative"] = float(diff.max() / b.abs().max())
    return measured


def example_acts(model, pairs: list[Pair]) -> torch.Tensor:
    """Each pair's clean activations ``[N, L, T, d]`` (one pair a run: its ``acts_mean``).

    Computed in batches of one, they may differ from those of a batched run in the last bits, which changes the
    sums of their magnitudes in :func:`rounding_bound` by a relative ~1e-7: far below what the bound can afford.
    """
    from neurontrace.attribution.api import attribute

    with one_thread():
        return torch.stack([attribute(model, pairs=[p], method="relp").acts_mean for p in pairs])


def same_curves(got: dict, ref: dict) -> None:
    assert got.keys() == ref.keys()
    for ablation, curve in ref.items():
        other = got[ablation]
        assert (
            abs(other["f_model"] - curve["f_model"]) <= ATOL
            and abs(other["f_empty"] - curve["f_empty"]) <= ATOL
        )
        assert [p["n_nodes"] for p in other["points"]] == [p["n_nodes"] for p in curve["points"]]
        for p, q in zip(other["points"], curve["points"], strict=True):
            for key in ("faithfulness", "completeness", "random_faithfulness"):
                assert abs(p[key] - q[key]) <= ATOL, (
                    f"{ablation} {key} at {q['n_nodes']} nodes: {p[key]} vs {q[key]}"
                )


def compare_with_one_process(
    model, spec: str, train: list[Pair], test: list[Pair], tmp_path, layers=None
) -> None:
    """Run the worker in two processes and check each one's results against this process's."""
    save_pairs(tmp_path / "train.jsonl", train)
    save_pairs(tmp_path / "test.jsonl", test)
    result, unpaired, curves = worker.run(model, train, test, None, layers)
    torch.save(result.mean_scores, tmp_path / "scores.pt")  # the two processes sweep the very same scores
    args = [str(WORKER), spec, str(tmp_path / "train.jsonl"), str(tmp_path / "test.jsonl")]
    args += [str(tmp_path / "scores.pt"), str(tmp_path)] + ([",".join(map(str, layers))] if layers else [])
    torchrun(*args)
    for rank in (0, 1):
        same_result(AttributionResult.load(tmp_path / f"rank{rank}.safetensors"), result)
        got = AttributionResult.load(tmp_path / f"rank{rank}-mean.safetensors")
        assert unpaired.mean_scores is None and got.mean_scores is None  # two token lengths
        for name in ("scores_sum", "acts_sum_mean", "metric_clean"):
            close(getattr(got, name), getattr(unpaired, name), f"mean baseline {name}")
        assert got.meta["tokens"] == unpaired.meta["tokens"]
        same_curves(json.loads((tmp_path / f"rank{rank}-curves.json").read_text()), curves)
    # every process holds the same result, bit for bit
    a, b = (AttributionResult.load(tmp_path / f"rank{r}.safetensors") for r in (0, 1))
    assert torch.equal(a.scores_sum, b.scores_sum) and torch.equal(a.mean_scores, b.mean_scores)
    assert (tmp_path / "rank0-curves.json").read_text() == (tmp_path / "rank1-curves.json").read_text()


# ------------------------------------------------------------------------------------------ one process
def test_one_process_is_untouched(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    t = torch.arange(6.0).reshape(3, 2)
    assert distributed.world() == (0, 1) and distributed.is_main() and distributed.shard(5) == range(5)
    assert distributed.gather_rows(t) is t and distributed.all_reduce_sum(t) is t
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.world() == (0, 1) and not torch.distributed.is_initialized()


@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_split_is_a_contiguous_partition_in_order(size):
    for n in range(12):
        parts = [distributed.split(n, rank, size) for rank in range(size)]
        assert [i for part in parts for i in part] == list(range(n))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_build_graphs_yields_this_process_share(monkeypatch):
    from conftest import make_tiny

    from neurontrace.graphs.many import build_graphs

    model = make_tiny("llama")
    prompts = ["the keys near the", "the dog near the table", "the key to the"]
    assert [i for i, _ in build_graphs(model, prompts, max_nodes=5)] == [0, 1, 2]
    monkeypatch.setattr(distributed, "world", lambda: distributed.World(1, 2))  # the second of two processes
    got = list(build_graphs(model, prompts, max_nodes=5))
    assert [i for i, _ in got] == [2] and got[0][1].prompt == prompts[2]


# ------------------------------------------------------------------------------------------ two processes
def test_two_processes_tiny_model(tiny_folder, tmp_path):
    model = load_model(tiny_folder, device="cpu")
    compare_with_one_process(model, tiny_folder, TINY_PAIRS, TINY_PAIRS[::2], tmp_path)


@pytest.mark.default_model
def test_two_processes_default_model(default_model, tmp_path):
    from neurontrace.tasks import generate_sva

    pairs = generate_sva("nounpp", n=16, seed=1, tokenizer=default_model.tokenizer)
    compare_with_one_process(
        default_model, "smollm2-135m", pairs[:8], pairs[8:], tmp_path, layers=list(range(18, 30))
    )


def test_cli_attribute_writes_one_result_with_the_means_of_one_process(tiny_folder, tmp_path):
    """Two processes write one result, printed once, that holds one process's per-example values exactly and
    its means to float32 rounding (:func:`same_to_rounding`; 24 examples, shares of 12 in batches of 3)."""
    from neurontrace.cli import main

    pairs = TINY_PAIRS * 2
    save_pairs(tmp_path / "train.jsonl", pairs)
    common = [
        "--model",
        tiny_folder,
        "--device",
        "cpu",
        "--dataset",
        str(tmp_path / "train.jsonl"),
        "--batch-size",
        "3",
    ]
    with one_thread():
        assert main(["attribute", *common, "--out", str(tmp_path / "one.safetensors")]) == 0
    (tmp_path / "two").mkdir()
    proc = torchrun(
        "-m", "neurontrace.cli", "attribute", *common, "--out", str(tmp_path / "two" / "result.safetensors")
    )
    assert [p.name for p in (tmp_path / "two").iterdir()] == ["result.safetensors"]  # no checkpoints left
    assert (
        proc.stdout.count("wrote ") == 1 and proc.stdout.count("Top neurons") == 1
    )  # printed by rank 0 only
    two, one = (AttributionResult.load(tmp_path / f) for f in ("two/result.safetensors", "one.safetensors"))
    same_result(two, one)
    measured = same_to_rounding(two, one, example_acts(load_model(tiny_folder, device="cpu"), pairs))
    print(f"two processes vs one, largest differences of the means: {measured}")


RUN_COMMANDS = """
import json, sys
from neurontrace.cli import main
for argv in json.loads(sys.argv[1]):
    if main(argv) != 0:
        sys.exit(1)
"""


def test_cli_evaluate_and_graphs(tiny_folder, tmp_path):
    from neurontrace.cli import main

    save_pairs(tmp_path / "train.jsonl", TINY_PAIRS)
    save_pairs(tmp_path / "test.jsonl", TINY_PAIRS[1::2])
    (tmp_path / "prompts.txt").write_text("the keys near the\nthe dog near the table\n\nthe key to the\n")
    model = ["--model", tiny_folder, "--device", "cpu"]
    evaluate = ["evaluate", *model, "--dataset", str(tmp_path / "train.jsonl"), "--test-dataset"]
    evaluate += [str(tmp_path / "test.jsonl"), "--methods", "relp,random", "--bases", "neurons,resid"]
    evaluate += ["--points", "4", "--batch-size", "2"]
    graph = ["graph", *model, "--prompts", str(tmp_path / "prompts.txt"), "--max-nodes", "20"]
    assert main([*evaluate, "--out", str(tmp_path / "one")]) == 0
    (tmp_path / "run.py").write_text(RUN_COMMANDS)
    argvs = [[*evaluate, "--out", str(tmp_path / "two")], [*graph, "--out", str(tmp_path / "graphs")]]
    proc = torchrun(str(tmp_path / "run.py"), json.dumps(argvs))
    assert proc.stdout.count("Report:") == 1 and proc.stdout.count("3 graphs; index:") == 1
    one, two = (json.loads((tmp_path / d / "curves.json").read_text()) for d in ("one", "two"))
    same_curves(
        {f"{c['method']}-{c['basis']}": c for c in two}, {f"{c['method']}-{c['basis']}": c for c in one}
    )
    index = json.loads((tmp_path / "graphs" / "index.json").read_text())
    assert [g["prompt"] for g in index] == ["the keys near the", "the dog near the table", "the key to the"]
    for g in index:  # each process wrote its share of the graphs
        for kind in ("json", "full", "html"):
            assert (tmp_path / "graphs" / g[kind]).is_file()
        assert json.loads((tmp_path / "graphs" / g["full"]).read_text())["prompt"] == g["prompt"]


def test_a_user_error_on_one_process_stops_every_process_within_seconds(tiny_folder, tmp_path):
    """Process 1's graph file is blocked by a folder, a user error only it meets: it stops before any compute and
    torchrun stops the other, long before gloo's 30-minute timeout; one line each, no traceback of ours."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the keys to the cabinet\nthe dogs near the table\n")
    out = tmp_path / "out"
    (out / "g-001.json").mkdir(parents=True)
    start = time.monotonic()
    proc = torchrun("-m", "neurontrace.cli", "graph", "--model", tiny_folder, "--prompts", str(prompts),
                    "--slug", "g", "--out", str(out), timeout=120, ok=False)  # fmt: skip
    assert proc.returncode != 0 and time.monotonic() - start < 60
    err = proc.stderr
    assert err.count("neurontrace: error: ") == 2, err[-3000:]  # process 1's error and process 0's line
    assert f"{out / 'g-001.json'} is a folder" in err
    assert re.search(r"neurontrace: error: process 0 of 2: (another process of this run stopped|stopped by the "
                     r"launcher \(SIGTERM\))", err), err[-3000:]  # fmt: skip
    assert "[rank0]: Traceback" not in err and "[rank1]: Traceback" not in err  # torchrun's own report aside


def test_a_process_waiting_for_one_that_failed_stops_with_one_line():
    """Process 0 waits at a barrier for process 1, which met a user error: both stop within seconds."""
    start = time.monotonic()
    proc = torchrun(str(Path(__file__).with_name("distributed_fail_one.py")), timeout=120, ok=False)
    assert proc.returncode != 0 and time.monotonic() - start < 60
    err = proc.stderr
    assert "neurontrace: error: a user error that only process 1 meets" in err
    # its collective meets the closed connection, or (if the launcher is quicker) the launcher's SIGTERM stops it
    assert re.search(r"neurontrace: error: process 0 of 2: (another process of this run stopped|stopped by the "
                     r"launcher \(SIGTERM\))", err), err[-3000:]  # fmt: skip
    assert err.count("neurontrace: error: ") == 2
    assert "[rank0]: Traceback" not in err and "[rank1]: Traceback" not in err


@pytest.mark.parametrize("where", ["collective", "loop"])
def test_a_process_killed_with_sigkill_leaves_one_line_on_the_other(tiny_folder, tmp_path, where):
    """Process 1 of a dataset attribution is killed with SIGKILL at its second batch (distributed_kill_one.py).
    Process 0 prints one line of ours and exits with the documented code, whether its collective meets the dead
    peer first (3) or the launcher's SIGTERM comes first (143). The one traceback left is torchrun's own report
    (ChildFailedError, in the launcher process); none comes from our processes. Rerunning the same command, as
    the line says, resumes from the checkpoints to the result of one process."""
    from neurontrace.cli import main

    save_pairs(tmp_path / "train.jsonl", TINY_PAIRS)
    out = tmp_path / "out" / "result.safetensors"
    out.parent.mkdir()
    args = ["attribute", "--model", tiny_folder, "--device", "cpu", "--dataset", str(tmp_path / "train.jsonl"),
            "--batch-size", "2", "--out", str(out)]  # fmt: skip
    # torchrun polls its processes every 0.1 s by default; every 5 s lets process 0 reach its collective first
    monitor = {"collective": "5", "loop": "0.1"}[where]
    start = time.monotonic()
    proc = torchrun(f"--monitor-interval={monitor}", str(KILL_ONE), where, str(tmp_path / "dying"), *args,
                    ok=False, timeout=120, env={"NEURONTRACE_CHECKPOINT_SECONDS": "0"})  # fmt: skip
    assert time.monotonic() - start < 60  # not the launcher's 30 s wait before it SIGKILLs a process
    err = proc.stderr
    assert proc.returncode != 0 and err.count("neurontrace: error: ") == 1, err[-3000:]
    line = err.split("neurontrace: error: ")[1].splitlines()[0]
    reason = {"collective": "another process of this run stopped (killed or crashed",
              "loop": "stopped by the launcher (SIGTERM)"}[where]  # fmt: skip
    assert line.startswith(f"process 0 of 2: {reason}"), line
    assert line.endswith(
        "; rerun the same command, with the same number of processes, to resume from the checkpoint"
    )
    # the launcher's report: process 1 died of SIGKILL, process 0 exited with our code (not killed by a signal)
    assert re.search(r"exitcode\s*: -9 \(pid: \d+\)\s*\(SIGKILL\)", err), err[-3000:]
    code = {"collective": 3, "loop": 143}[where]
    assert re.search(rf"exitcode\s*: {code} \(pid: \d+\)\s*\n", err), err[-3000:]
    # one traceback, the launcher's, after our line: every frame is torch's or runpy's, none of our processes'
    # (an uncaught exception in a process would print "[rank0]: Traceback ...")
    assert (
        err.count("Traceback (most recent call last)") == 1 and "[rank0]" not in err and "[rank1]" not in err
    )
    launcher = err[err.index("Traceback (most recent call last)") :].split("ChildFailedError:")[0]
    assert err.index("neurontrace: error: ") < err.index("Traceback (most recent call last)")
    frames = re.findall(r'File "([^"]+)"', launcher)
    assert frames and all(f == "<frozen runpy>" or "/torch/" in f.replace("\\", "/") for f in frames), frames
    names = sorted(p.name for p in out.parent.iterdir())
    assert names == [f"{out.name}.partial.rank{r}-of-2" for r in (0, 1)], names
    if where == "loop":  # the advice holds: the same command resumes, to one process's result
        torchrun("-m", "neurontrace.cli", *args)
        assert [p.name for p in out.parent.iterdir()] == [out.name]
        with one_thread():
            assert main([*args[:-1], str(tmp_path / "one.safetensors")]) == 0
        model = load_model(tiny_folder, device="cpu")
        two, one = (AttributionResult.load(p) for p in (out, tmp_path / "one.safetensors"))
        same_to_rounding(two, one, example_acts(model, TINY_PAIRS))

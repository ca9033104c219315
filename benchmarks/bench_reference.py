"""neurontrace against the paper's own code (TransluceAI/circuits), side by side at equal output.

Command: ``.venv/bin/python benchmarks/bench_reference.py`` (the full configuration: 8 SVA pairs, graphs of two
prompts; 10.5 minutes on 2 CPU cores shared with other jobs, nearly all of it the reference), ``--quick`` for
the minimal one (1 pair, one 5-token graph; 4.3 minutes); the first run also installs the reference (1.5 min), ``--reference DIR`` to export from a local clone of
TransluceAI/circuits instead of the default locations, ``--threads N`` (default 1: ``OMP_NUM_THREADS`` of every
worker, both tools alike), ``--setup-only``. Not part of ``make bench`` (benchmarks/run.py does not list it).
Results: ``benchmarks/results/bench_reference.json`` (``bench_reference_quick.json`` for ``--quick``) and a
markdown table on stdout. When the reference cannot be set up or run, the script prints one line saying why
and exits with status 2.

Setup (done by the script, idempotent; everything under the git-ignored ``benchmarks/.reference/``):

1. **Export** the reference at its pinned commit (:data:`REFERENCE_COMMIT`) with ``git archive`` from the first
   of: ``--reference DIR``, ``$NEURONTRACE_REFERENCE``, ``benchmarks/.reference/checkout``, the bare mirror
   ``/work/.mirror/TransluceAI+circuits/repo``; only the files that node attribution and graphs import
   (``circuits/core``, ``lib/util``, ``lib/env_util``, ``lib/log_util``, plus the README, pyproject and uv.lock
   for the record) into ``benchmarks/.reference/src``, with an empty ``.env`` (its ``env_util`` wants the file;
   the README's ``cp .env.template .env`` step, without placeholder keys). Then ``patch -p1`` applies
   ``benchmarks/reference_patch.diff``: the causal-mask registration for its "shapley" attention (without it
   the replacement model runs with no causal mask, METHOD.md section 9) and two Python 3.11 syntax/typing
   fixes. Nothing in it changes the maths; device "cpu" is an argument (``ADAGConfig(device="cpu")``).
2. **Venv** ``benchmarks/.reference/venv`` from the interpreter running this script (Python 3.11: the
   reference's pyproject asks for 3.12 and heavy extras, vllm, wandb, jupyter...; the modules used here run
   on 3.11 with the patch, and this project's machines hold torch 2.13.0's CPU-only wheel for 3.11 in pip's
   find-links, where any other torch download is PyPI's multi-GB CUDA build). One pinned pip command
   (:data:`PINS`, torch pinned in it, the rest the versions of its uv.lock, except transformers: 4.53.3, whose
   decoder layers still return a tuple, which its ``collect_acts`` indexes with ``output[0]``; from 4.54 they
   return a tensor, and with the lock's 4.57.3 a graph fails with a shape error), then ``nnsight==0.3.7`` with ``--no-deps`` (its declared diffusers/torchvision/sentencepiece/protobuf are
   never imported on this path, and torchvision would pull a torch of its own).
3. **Weights**: ``benchmarks/.reference/model`` links neurontrace's cached conversion of the default model
   (``load_model("smollm2-135m")``'s float32 safetensors and tokenizer.json, so both tools use the identical
   weights) and translates its transformers-5 ``config.json``/``tokenizer_config.json`` to the 4.x keys
   (``rope_theta`` at the top, ``torch_dtype``, ``PreTrainedTokenizerFast``). The run checks the two
   forwards agree (logits, and the reference's unpatched mask for contrast).

The run, each job in its own fresh process (model loaded, one warm-up forward, then the job is timed and its
peak resident memory taken as the rise of VmHWM, glibc serving blocks over 64 KiB from mmap in both tools):

- **Node attribution**: RelP, zero baseline, logit difference ``logit(clean answer) - logit(patch answer)`` on
  the clean prompts of SVA nounpp pairs (neurontrace's generator, seed 0). neurontrace: one ``attribute`` call
  with the logit difference as a metric function. Reference:
  ``get_all_pairs_cl_ja_effects_with_attributions(..., use_relp_grad=True, ablation_mode="zero",
  return_only_important_neurons=True)``; it scores a sum of focus logits, so it runs once per answer and the
  two score tensors are subtracted (exact: the scores are linear in the metric). Its "paired" SVA pipeline is
  nnsight integrated gradients, not RelP.
- **Graphs**: one target logit per prompt (the answer), nodes with ``|a dm/da| >= 0.005 m``, no node cap, raw
  direct-effect edges. neurontrace: ``build_graph(max_nodes=None)``. Reference: the same call with
  ``use_stop_grad_on_mlps=True, percentage_threshold=0.005`` (direct effects, as its ENAP evaluation); its edge weights are divided by
  the target's activation (plus 1e-6 of the mean magnitude), and are multiplied back here to raw.
- neurontrace runs twice: with its default rules, and with the attention rule off. The reference's
  attention path does not detach the softmax (METHOD.md section 9; its off-by-default ``use_shapley_qk``
  swaps in a Shapley rule for it, which does not detach it either), so "attention rule off" is the rules set
  with the same maths as the reference; its norm (LN), identity (SiLU) and half rules match neurontrace's.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORK = HERE / ".reference"
SRC, VENV, MODEL = WORK / "src", WORK / "venv", WORK / "model"
PATCH = HERE / "reference_patch.diff"

REFERENCE_REPO = "TransluceAI/circuits"
REFERENCE_COMMIT = "16239068d02eeb3fef0d37d57a1cedae9ed62e6a"  # "Initial commit", the public release
EXPORT_PATHS = [
    "circuits/__init__.py",
    "circuits/core",
    "lib/util/util",
    "lib/env_util/env_util",
    "lib/log_util/log_util",
    ".env.template",
    "README.md",
    "pyproject.toml",
    "uv.lock",
]
MIRROR = Path("/work/.mirror/TransluceAI+circuits/repo")
PINS = [
    "torch==2.13.0",
    "transformers==4.53.3",
    "tokenizers==0.21.4",
    "huggingface-hub==0.36.0",
    "safetensors==0.7.0",
    "accelerate==1.12.0",
    "pydantic==2.12.5",
    "typing-extensions==4.15.0",
    "opt-einsum==3.4.0",
    "tqdm==4.67.1",
    "numpy==1.26.4",
    "python-dotenv==1.2.1",
    "datasets==4.4.1",
    "pandas==2.3.3",
    "pyarrow==22.0.0",
    "einops==0.8.1",
    "pyyaml==6.0.3",
    "pillow==11.3.0",
    "requests==2.32.5",
    "python-socketio[client]==5.15.0",
    "python-engineio==4.12.3",
]
NO_DEPS = ["nnsight==0.3.7"]

TASK, SEED = "nounpp", 0
FULL = {
    "pairs": 8,
    "graphs": [("The keys to the cabinet", " are"), ("The keys that the man left near the cabinet", " are")],
}
QUICK = {"pairs": 1, "graphs": [("The keys to the cabinet", " are")]}
NODE_THRESHOLD = 0.005
# variant -> a preset of neurontrace's RULE_PRESETS ("transluce" is TRANSLUCE_RULES: the attention rule off)
RULES = {"default": "relp", "attention-off": "transluce"}


class ReferenceUnavailable(RuntimeError):
    """The reference could not be set up or run; the message is one line saying why."""


def _say(msg: str) -> None:
    print(f"[bench_reference] {msg}", file=sys.stderr, flush=True)


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip() and "WARNING" not in ln]
    return lines[-1] if lines else "(no output)"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _size_mb(path: Path) -> float:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            p = Path(root) / f
            if not p.is_symlink():
                total += p.stat().st_size
    return total / 2**20


# ---------------------------------------------------------------------------------------------------- setup
def _source(reference: str | None) -> Path:
    candidates = [reference, os.environ.get("NEURONTRACE_REFERENCE"), WORK / "checkout", MIRROR]
    for c in candidates:
        if c is None:
            continue
        path = Path(c).expanduser()
        if reference is not None and c == reference and not path.exists():
            raise ReferenceUnavailable(f"--reference {reference}: no such folder")
        if path.exists():
            return path
    raise ReferenceUnavailable(
        f"no checkout of {REFERENCE_REPO} found: clone it and pass --reference DIR "
        f"(or set NEURONTRACE_REFERENCE, or clone it to {WORK / 'checkout'})"
    )


def export_reference(reference: str | None) -> dict:
    """Export the pinned commit into ``.reference/src`` and apply the patch (skipped when already done)."""
    stamp = SRC / ".bench-export.json"
    want = {"commit": REFERENCE_COMMIT, "patch_sha256": _sha256(PATCH)}
    if stamp.is_file():
        done = json.loads(stamp.read_text())
        if {k: done.get(k) for k in want} == want:
            return done
    source = _source(reference)
    check = subprocess.run(
        ["git", "-C", str(source), "cat-file", "-e", f"{REFERENCE_COMMIT}^{{commit}}"], capture_output=True
    )
    if check.returncode != 0:
        raise ReferenceUnavailable(
            f"{source} is not a git clone of {REFERENCE_REPO} holding commit {REFERENCE_COMMIT[:12]}"
        )
    _say(f"exporting {REFERENCE_REPO} @ {REFERENCE_COMMIT[:12]} from {source}")
    if SRC.exists():
        shutil.rmtree(SRC)
    SRC.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(source), "archive", REFERENCE_COMMIT, "--", *EXPORT_PATHS], capture_output=True
    )
    if archive.returncode != 0:
        raise ReferenceUnavailable(f"git archive failed in {source}: {_last_line(archive.stderr.decode())}")
    untar = subprocess.run(["tar", "-x", "-C", str(SRC)], input=archive.stdout, capture_output=True)
    missing = [p for p in EXPORT_PATHS if not (SRC / p).exists()]
    if untar.returncode != 0 or missing:
        raise ReferenceUnavailable(f"the export from {source} lacks {', '.join(missing) or 'files'}")
    if shutil.which("patch") is None:
        raise ReferenceUnavailable("GNU patch is not installed (apt-get install patch); it applies the patch")
    applied = subprocess.run(
        ["patch", "-p1", "-N", "-s", "-d", str(SRC), "-i", str(PATCH)], capture_output=True, text=True
    )
    if applied.returncode != 0:
        raise ReferenceUnavailable(
            f"{PATCH.name} does not apply: {_last_line(applied.stdout + applied.stderr)}"
        )
    (SRC / ".env").write_text("# env_util needs this file; no keys are used by the benchmark\n")
    done = {**want, "source": str(source), "exported": time.strftime("%Y-%m-%d %H:%M:%S")}
    stamp.write_text(json.dumps(done, indent=2))
    return done


def _venv_python() -> Path:
    return VENV / "bin" / "python"


def install_venv(python: str | None = None) -> dict:
    """Create ``.reference/venv`` and install :data:`PINS` (skipped when the same pins are installed)."""
    base = python or getattr(sys, "_base_executable", None) or sys.executable
    stamp = VENV / ".bench-install.json"
    want = {"pins": PINS, "no_deps": NO_DEPS, "python": base}
    if stamp.is_file() and _venv_python().exists():
        done = json.loads(stamp.read_text())
        if {k: done.get(k) for k in want} == want:
            return done
    if VENV.exists():
        shutil.rmtree(VENV)
    _say(f"creating {VENV} with {base} and installing {len(PINS) + len(NO_DEPS)} pinned packages (minutes)")
    start = time.perf_counter()
    made = subprocess.run([base, "-m", "venv", str(VENV)], capture_output=True, text=True)
    if made.returncode != 0:
        raise ReferenceUnavailable(f"could not create a venv with {base}: {_last_line(made.stderr)}")
    pip = [str(_venv_python()), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    for args in (PINS, ["--no-deps", *NO_DEPS]):
        res = subprocess.run([*pip, *args], capture_output=True, text=True)
        if res.returncode != 0:
            raise ReferenceUnavailable(
                f"pip could not install the reference's packages: {_last_line(res.stderr)}"
            )
    seconds = time.perf_counter() - start
    freeze = subprocess.run(
        [str(_venv_python()), "-m", "pip", "freeze", "--disable-pip-version-check"],
        capture_output=True,
        text=True,
    ).stdout.split()
    version = subprocess.run([str(_venv_python()), "-V"], capture_output=True, text=True).stdout.strip()
    done = {
        **want,
        "python_version": version,
        "install_seconds": round(seconds, 1),
        "size_mb": round(_size_mb(VENV)),
        "freeze": freeze,
    }
    stamp.write_text(json.dumps(done, indent=2))
    return done


def prepare_weights() -> dict:
    """Point ``.reference/model`` at neurontrace's cached conversion of the default model (4.x config keys)."""
    from neurontrace.models.loading import convert_gguf, resolve_spec

    resolved = resolve_spec("smollm2-135m")
    folder = Path(convert_gguf(Path(resolved.location), progress=True))
    config = json.loads((folder / "config.json").read_text())
    rope = config.pop("rope_parameters", None)
    if rope is not None:
        if rope.get("rope_type", "default") != "default":
            raise ReferenceUnavailable(
                f"the cached model's rope {rope} has no transformers-4 equivalent here"
            )
        config["rope_theta"], config["rope_scaling"] = rope["rope_theta"], None
    if "dtype" in config:
        config["torch_dtype"] = config.pop("dtype")
    tok = json.loads((folder / "tokenizer_config.json").read_text())
    tok4 = {
        k: tok[k]
        for k in ("bos_token", "eos_token", "pad_token", "unk_token", "model_max_length")
        if k in tok
    }
    tok4.update(tokenizer_class="PreTrainedTokenizerFast", clean_up_tokenization_spaces=False)
    MODEL.mkdir(parents=True, exist_ok=True)
    for name in ("model.safetensors", "tokenizer.json"):
        link = MODEL / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(folder / name)
    (MODEL / "config.json").write_text(json.dumps(config, indent=2))
    (MODEL / "tokenizer_config.json").write_text(json.dumps(tok4, indent=2))
    return {
        "folder": str(folder),
        "weights_sha256": json.loads((folder / "neurontrace-source.json").read_text())
        .get("files", {})
        .get("model.safetensors"),
    }


def setup(reference: str | None = None, python: str | None = None) -> dict:
    if not PATCH.is_file():
        raise ReferenceUnavailable(f"{PATCH} is missing")
    export = export_reference(reference)
    venv = install_venv(python)
    weights = prepare_weights()
    check = subprocess.run(
        [str(_venv_python()), "-c", "import circuits.core.jvp, util.subject"],
        capture_output=True,
        text=True,
        env=_ref_env(1),
        cwd=SRC,
    )
    if check.returncode != 0:
        raise ReferenceUnavailable(f"the reference does not import: {_last_line(check.stderr)}")
    return {
        "export": export,
        "venv": {k: v for k, v in venv.items() if k != "freeze"},
        "freeze": venv.get("freeze"),
        "weights": weights,
    }


# ------------------------------------------------------------------------------------------------ workers
MEASURE = """
import ctypes, gc, json, sys, time
def _status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
def measured(fn):
    gc.collect()
    try:  # glibc: blocks over 64 KiB from mmap, freed heap handed back: RSS follows the live tensors
        libc = ctypes.CDLL("libc.so.6"); libc.mallopt(-3, 1 << 16); libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status("VmRSS:")
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start, _status("VmHWM:") - before
SPEC = json.load(open(sys.argv[1]))
"""

NT_ATTR = """
import torch
START = time.perf_counter()
from neurontrace.models.loading import load_model
from neurontrace.attribution.api import attribute
from neurontrace.attribution.replacement import RULE_PRESETS
from neurontrace.tokens import encode, single_token_id
model = load_model("smollm2-135m", device="cpu")
load_s = time.perf_counter() - START
prompts = SPEC["prompts"]
ids = [encode(model, p) for p in prompts]
answer = torch.tensor([single_token_id(model, a) for a in SPEC["answers"]])
contrast = torch.tensor([single_token_id(model, a) for a in SPEC["contrasts"]])
with torch.no_grad():  # warm-up, and the logits for the forward check
    logits = model.forward(model.tokenize(prompts)).logits[:, -1].float()

def logit_diff(lg):
    last, rows = lg[:, -1].float(), torch.arange(lg.shape[0])
    return last[rows, answer] - last[rows, contrast]

result, seconds, peak = measured(lambda: attribute(
    model, prompts=prompts, answers=SPEC["answers"], metric_fn=logit_diff, rules=RULE_PRESETS[SPEC["rules"]],
    batch_size=len(prompts), keep_per_example=True))
torch.save({"scores": result.tensors()["scores"], "logits": logits, "ids": ids,
            "metric": result.tensors()["metric_clean"]}, SPEC["out"])
print(json.dumps({"seconds": seconds, "peak_mb": peak, "load_s": load_s}))
"""

NT_GRAPH = """
import torch
START = time.perf_counter()
from neurontrace.models.loading import load_model
from neurontrace.graphs.build import build_graph
from neurontrace.attribution.replacement import RULE_PRESETS
model = load_model("smollm2-135m", device="cpu")
load_s = time.perf_counter() - START
with torch.no_grad():
    model.forward(model.tokenize(SPEC["prompt"]))  # warm-up
graph, seconds, peak = measured(lambda: build_graph(
    model, SPEC["prompt"], answers=[SPEC["answer"]], node_threshold=SPEC["node_threshold"], max_nodes=None,
    rules=RULE_PRESETS[SPEC["rules"]]))
nodes = [(n.kind, n.layer, n.position, n.index, n.activation, n.attribution) for n in graph.nodes]
torch.save({"nodes": nodes, "adjacency": graph.adjacency, "ids": graph.token_ids,
            "metric": graph.meta["metric_value"]}, SPEC["out"])
print(json.dumps({"seconds": seconds, "peak_mb": peak, "load_s": load_s}))
"""

REF_LOAD = """
import torch
START = time.perf_counter()
from util.subject import Subject, Llama3Config
from util.chat_input import IdsInput
from circuits.core.jvp import ADAGConfig, get_all_pairs_cl_ja_effects_with_attributions
subject = Subject(Llama3Config(hf_model_id=SPEC["model"], is_chat_model=False, has_default_sys_prompt=False),
                  nnsight_lm_kwargs={"dispatch": True})
hf, tok = subject.model._model, subject.tokenizer
load_s = time.perf_counter() - START

def one_token(text):
    got = tok(text, add_special_tokens=False)["input_ids"]
    assert len(got) == 1, f"{text!r} is not one token"
    return got[0]
"""

REF_ATTR = """
prompts = SPEC["prompts"]
ids = [tok(p)["input_ids"] for p in prompts]
T = len(ids[0])
assert all(len(i) == T for i in ids), "the prompts must have one token length"
with torch.no_grad():
    hf(torch.tensor(ids))  # warm-up

def run():
    scores = []
    for answers in (SPEC["answers"], SPEC["contrasts"]):  # the API scores a sum of logits: one call per answer
        config = ADAGConfig(device="cpu", use_relp_grad=True, ablation_mode="zero", return_only_important_neurons=True,
                            node_attribution_threshold=None, topk_neurons=100, batch_aggregation="any")
        mlp, _embed, _acts, _embed_acts = get_all_pairs_cl_ja_effects_with_attributions(
            subject, [IdsInput(input_ids=list(i)) for i in ids], config=config, src_tokens=list(range(T)),
            tgt_tokens=[T - 1], attention_masks=[[1] * T for _ in ids], focus_logits=[[one_token(a)] for a in answers])
        scores.append(mlp[..., 0])  # [L, B, T, d_ff]
    return (scores[0] - scores[1]).permute(1, 0, 2, 3).contiguous()  # [B, L, T, d_ff]

scores, seconds, peak = measured(run)
impl = hf.config._attn_implementation
with torch.no_grad():  # its attention ("shapley" after a run) with the patch's mask, then without it
    patched = hf(torch.tensor(ids)).logits[:, -1].float()
    unpatched = None
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS as MASKS
    if impl in MASKS._global_mapping and impl not in ("eager", "sdpa"):
        fn = MASKS._global_mapping.pop(impl)
        unpatched = hf(torch.tensor(ids)).logits[:, -1].float()
        MASKS._global_mapping[impl] = fn
torch.save({"scores": scores, "logits": patched, "logits_unpatched": unpatched, "ids": ids}, SPEC["out"])
print(json.dumps({"seconds": seconds, "peak_mb": peak, "load_s": load_s, "attn_implementation": impl}))
"""

REF_GRAPH = """
ids = tok(SPEC["prompt"])["input_ids"]
T, answer = len(ids), one_token(SPEC["answer"])
with torch.no_grad():
    hf(torch.tensor([ids]))  # warm-up

def run():
    config = ADAGConfig(device="cpu", use_relp_grad=True, use_stop_grad_on_mlps=True,
                        percentage_threshold=SPEC["node_threshold"], node_attribution_threshold=None, topk_neurons=None,
                        batch_aggregation="any", ablation_mode="zero", edge_threshold=None, skip_attr_contrib=False,
                        return_nodes_only=False)
    return get_all_pairs_cl_ja_effects_with_attributions(
        subject, [IdsInput(input_ids=list(ids))], config=config, src_tokens=list(range(T)), tgt_tokens=[T - 1],
        attention_masks=[[1] * T], focus_logits=[[answer]])

(nodes, edges), seconds, peak = measured(run)
L = subject.L
act = {(n.layer, n.token, n.neuron): float(n.activation.flatten()[0]) for n in nodes}
layer_eps = {}  # its neuron-to-neuron weights divide by (a_t + 1e-6 * mean |a| of the target layer's nodes)
for (layer, _t, _n), a in act.items():
    if 0 <= layer < L:
        layer_eps.setdefault(layer, []).append(abs(a))
layer_eps = {k: 1e-6 * sum(v) / len(v) for k, v in layer_eps.items()}
rows = []
for e in edges:
    s, t, w = tuple(map(int, e.src)), tuple(map(int, e.tgt)), float(e.weight.flatten()[0])
    a = act[t]
    eps = 1e-6 * abs(a) if (t[0] == L or s[0] == -1) else layer_eps[t[0]]
    rows.append((s, t, w, w * (a + eps)))
torch.save({"nodes": [(n.layer, n.token, n.neuron, act[(n.layer, n.token, n.neuron)],
                       float(n.final_attribution.flatten()[0])) for n in nodes],
            "edges": rows, "ids": ids}, SPEC["out"])
print(json.dumps({"seconds": seconds, "peak_mb": peak, "load_s": load_s}))
"""


def _thread_env(threads: int) -> dict:
    n = str(threads)
    return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n}


def _ref_env(threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    paths = [SRC, SRC / "lib" / "util", SRC / "lib" / "env_util", SRC / "lib" / "log_util"]
    env.update(
        _thread_env(threads),
        PYTHONPATH=os.pathsep.join(map(str, paths)),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        TRANSFORMERS_VERBOSITY="error",
    )
    return env


def _job(name: str, python: str, code: str, spec: dict, env: dict, tmp: Path, cwd: Path) -> dict:
    """Run one job in a fresh interpreter; its last stdout line is a JSON object."""
    _say(f"{name} ...")
    spec_path = tmp / f"{name.replace('/', '-')}.json"
    spec_path.write_text(json.dumps(spec))
    start = time.perf_counter()
    proc = subprocess.run(
        [python, "-c", MEASURE + code, str(spec_path)], capture_output=True, text=True, env=env, cwd=cwd
    )
    if proc.returncode != 0:
        raise ReferenceUnavailable(f"{name} failed: {_last_line(proc.stderr)}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - start
    _say(f"{name}: {result['seconds']:.1f} s, peak +{result['peak_mb']:.0f} MB")
    return result


# ----------------------------------------------------------------------------------------------- compare
def _pearson(x, y) -> float:
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    return float((x * y).sum() / (x.norm() * y.norm()))


def _ranks(x):
    import torch

    r = torch.empty_like(x, dtype=torch.float64)
    r[x.argsort()] = torch.arange(x.numel(), dtype=torch.float64)
    return r


def compare_scores(ours, ref) -> dict:
    a, b = ours.flatten().double(), ref.flatten().double()
    return {
        "pearson": _pearson(a, b),
        "spearman": _pearson(_ranks(a), _ranks(b)),
        "max_abs_diff": float((a - b).abs().max()),
        "max_abs_score": float(b.abs().max()),
        "sum_ours": float(a.sum()),
        "sum_reference": float(b.sum()),
    }


def compare_graphs(ours: dict, ref: dict) -> dict:
    import torch

    index = {(layer, pos, idx): i for i, (_k, layer, pos, idx, _a, _s) in enumerate(ours["nodes"])}
    kinds = {(layer, pos, idx): k for (k, layer, pos, idx, _a, _s) in ours["nodes"]}
    score_ours = {(layer, pos, idx): s for (_k, layer, pos, idx, _a, s) in ours["nodes"]}
    n_layers = max(layer for (_k, layer, *_r) in ours["nodes"])
    ref_nodes = {(layer, tok, n): (a, s) for layer, tok, n, a, s in ref["nodes"]}
    neurons_o = {k for k, kind in kinds.items() if kind == "neuron"}
    neurons_r = {k for k in ref_nodes if 0 <= k[0] < n_layers}
    shared_n = neurons_o & neurons_r
    union = set(index) | set(ref_nodes)
    adjacency = ours["adjacency"]
    x, y = [], []
    for s, t, _w, raw in ref["edges"]:
        if s in index and t in index:
            x.append(float(adjacency[index[t], index[s]]))
            y.append(raw)
    x, y = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    node_diff = max((abs(score_ours[k] - ref_nodes[k][1]) for k in shared_n), default=float("nan"))
    return {
        "neurons": len(neurons_o),
        "neurons_reference": len(neurons_r),
        "neuron_jaccard": len(shared_n) / max(1, len(neurons_o | neurons_r)),
        "node_jaccard": len(set(index) & set(ref_nodes)) / max(1, len(union)),
        "nodes": len(index),
        "nodes_reference": len(ref_nodes),
        "edges": int((adjacency != 0).sum()),
        "edges_reference": int(sum(1 for e in ref["edges"] if e[3] != 0)),
        "shared_edges": len(x),
        "edge_max_abs_diff": float((x - y).abs().max()) if len(x) else float("nan"),
        "edge_max_abs_weight": float(y.abs().max()) if len(y) else float("nan"),
        "edge_pearson": _pearson(x, y) if len(x) > 1 else float("nan"),
        "node_score_max_abs_diff": node_diff,
    }


# -------------------------------------------------------------------------------------------------- main
def main(
    quick: bool = False, reference: str | None = None, threads: int = 1, python: str | None = None
) -> dict:
    """Set up the reference, run both tools and compare; returns the benchmark section (title, rows, raw)."""
    import torch
    from transformers import AutoTokenizer

    sys.path.insert(0, str(HERE))
    from common import save

    from neurontrace.tasks import generate_sva

    wall = time.perf_counter()
    info = setup(reference, python)
    conf = QUICK if quick else FULL
    tokenizer = AutoTokenizer.from_pretrained(info["weights"]["folder"])
    pairs = generate_sva(TASK, n=8, seed=SEED, tokenizer=tokenizer)[: conf["pairs"]]
    attr_spec = {
        "prompts": [p.clean_prefix for p in pairs],
        "answers": [p.clean_answer for p in pairs],
        "contrasts": [p.patch_answer for p in pairs],
        "model": str(MODEL),
    }
    nt_env = {**os.environ, **_thread_env(threads), "TRANSFORMERS_VERBOSITY": "error"}
    ref_env, ref_py, nt_py = _ref_env(threads), str(_venv_python()), sys.executable
    jobs: dict = {}
    comparisons: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench_reference-") as tmpdir:
        tmp = Path(tmpdir)
        out = {}
        for variant, rules in RULES.items():
            name = f"attribution/neurontrace-{variant}"
            out[name] = tmp / f"attr-nt-{variant}.pt"
            spec = {**attr_spec, "rules": rules, "out": str(out[name])}
            jobs[name] = _job(name, nt_py, NT_ATTR, spec, nt_env, tmp, REPO)
        name = "attribution/reference"
        out[name] = tmp / "attr-ref.pt"
        jobs[name] = _job(
            name, ref_py, REF_LOAD + REF_ATTR, {**attr_spec, "out": str(out[name])}, ref_env, tmp, SRC
        )
        ref = torch.load(out[name])
        for variant in RULES:
            ours = torch.load(out[f"attribution/neurontrace-{variant}"])
            if ours["ids"] != ref["ids"]:
                raise ReferenceUnavailable("the two tokenizers gave different token ids for the SVA prompts")
            comparisons[f"attribution/{variant}"] = compare_scores(ours["scores"], ref["scores"])
            tokens = int(ours["scores"].shape[2])
        nt_logits = torch.load(out["attribution/neurontrace-default"])["logits"]
        forward = {
            "max_abs_logit": float(nt_logits.abs().max()),
            "patched_max_abs_diff": float((ref["logits"] - nt_logits).abs().max()),
        }
        if ref["logits_unpatched"] is not None:
            forward["unpatched_max_abs_diff"] = float((ref["logits_unpatched"] - nt_logits).abs().max())
        comparisons["forward"] = forward

        for g, (prompt, answer) in enumerate(conf["graphs"]):
            base = {"prompt": prompt, "answer": answer, "node_threshold": NODE_THRESHOLD, "model": str(MODEL)}
            name = f"graph{g}/reference"
            out[name] = tmp / f"graph{g}-ref.pt"
            jobs[name] = _job(
                name, ref_py, REF_LOAD + REF_GRAPH, {**base, "out": str(out[name])}, ref_env, tmp, SRC
            )
            ref_graph = torch.load(out[name])
            for variant, rules in RULES.items():
                name = f"graph{g}/neurontrace-{variant}"
                out[name] = tmp / f"graph{g}-nt-{variant}.pt"
                spec = {**base, "rules": rules, "out": str(out[name])}
                jobs[name] = _job(name, nt_py, NT_GRAPH, spec, nt_env, tmp, REPO)
                ours = torch.load(out[name])
                if ours["ids"] != ref_graph["ids"]:
                    raise ReferenceUnavailable(f"the two tokenizers gave different token ids for {prompt!r}")
                comparisons[f"graph{g}/{variant}"] = compare_graphs(ours, ref_graph)
                comparisons[f"graph{g}/{variant}"]["tokens"] = len(ours["ids"])
    payload = {
        "configuration": "quick" if quick else "full",
        "command": "python benchmarks/bench_reference.py" + (" --quick" if quick else ""),
        "threads": threads,
        "reference": {
            "repo": REFERENCE_REPO,
            "commit": REFERENCE_COMMIT,
            "patch": PATCH.name,
            "patch_sha256": info["export"]["patch_sha256"],
            **info["venv"],
        },
        "reference_freeze": info["freeze"],
        "weights": info["weights"],
        "inputs": {
            "task": TASK,
            "seed": SEED,
            "pairs": [dataclasses.asdict(p) for p in pairs],
            "attribution_tokens": tokens,
            "graphs": conf["graphs"],
            "node_threshold": NODE_THRESHOLD,
        },
        "jobs": jobs,
        "comparisons": comparisons,
        "total_s": time.perf_counter() - wall,
    }
    path = save(
        "bench_reference_quick" if quick else "bench_reference", json.loads(json.dumps(payload, default=str))
    )
    _say(f"wrote {path} ({payload['total_s'] / 60:.1f} min in all)")
    return {
        "title": f"neurontrace vs the reference code ({REFERENCE_REPO} @ {REFERENCE_COMMIT[:7]}), "
        f"SmolLM2-135M, float32, CPU, {threads} thread(s)",
        "rows": _rows(payload, conf, pairs),
        "raw": json.dumps(payload, default=str),
    }


def _rows(p: dict, conf: dict, pairs) -> list[tuple[str, str]]:
    jobs, cmp = p["jobs"], p["comparisons"]

    def cost(name: str) -> str:
        return f"{jobs[name]['seconds']:.1f} s, peak +{jobs[name]['peak_mb']:.0f} MB"

    def ratio(ref: str, ours: str) -> str:
        r, o = jobs[ref], jobs[ours]
        return f"{r['seconds'] / o['seconds']:.0f}x the time, {r['peak_mb'] / max(o['peak_mb'], 1e-9):.1f}x the memory"

    n, tokens = len(pairs), p["inputs"]["attribution_tokens"]
    rows = [
        (
            f"node attribution, {n} SVA {TASK} pair(s) of {tokens} tokens, RelP, zero baseline, logit difference",
            "",
        )
    ]
    rows += [
        ("  neurontrace, default rules", cost("attribution/neurontrace-default")),
        (
            "  neurontrace, attention rule off (the reference's maths)",
            cost("attribution/neurontrace-attention-off"),
        ),
        ("  reference (two calls: one per answer)", cost("attribution/reference")),
        (
            "  reference ÷ neurontrace (attention off)",
            ratio("attribution/reference", "attribution/neurontrace-attention-off"),
        ),
    ]
    for variant, label in (("attention-off", "attention rule off"), ("default", "default rules")):
        c = cmp[f"attribution/{variant}"]
        rows.append(
            (
                f"  scores vs the reference, {label}",
                f"Pearson {c['pearson']:.6f}, Spearman {c['spearman']:.6f}, max |diff| {c['max_abs_diff']:.1e} "
                f"(largest |score| {c['max_abs_score']:.2f})",
            )
        )
    f = cmp["forward"]
    value = f"max |Δ logit| {f['patched_max_abs_diff']:.1e} (largest |logit| {f['max_abs_logit']:.1f})"
    if "unpatched_max_abs_diff" in f:
        value += f"; without the patch's causal mask {f['unpatched_max_abs_diff']:.2f}"
    rows.append(("  reference's replacement-model forward vs neurontrace's logits", value))
    for g, (prompt, answer) in enumerate(conf["graphs"]):
        c_off, c_def = cmp[f"graph{g}/attention-off"], cmp[f"graph{g}/default"]
        rows.append(
            (
                f"graph of {prompt!r} ({c_off['tokens']} tokens, target {answer!r}, nodes >= {NODE_THRESHOLD} m)",
                "",
            )
        )
        rows += [
            (
                "  neurontrace, default rules",
                f"{cost(f'graph{g}/neurontrace-default')}, {c_def['neurons']} neurons, {c_def['edges']:,} edges",
            ),
            (
                "  neurontrace, attention rule off",
                f"{cost(f'graph{g}/neurontrace-attention-off')}, {c_off['neurons']} neurons, {c_off['edges']:,} edges",
            ),
            (
                "  reference",
                f"{cost(f'graph{g}/reference')}, {c_off['neurons_reference']} neurons, {c_off['edges_reference']:,} edges",
            ),
            (
                "  reference ÷ neurontrace (attention off)",
                ratio(f"graph{g}/reference", f"graph{g}/neurontrace-attention-off"),
            ),
        ]
        for label, c in (("attention rule off", c_off), ("default rules", c_def)):
            rows.append(
                (
                    f"  vs the reference, {label}",
                    f"neuron sets Jaccard {c['neuron_jaccard']:.3f}; {c['shared_edges']:,} shared node pairs: raw "
                    f"edge max |diff| {c['edge_max_abs_diff']:.1e} (largest |weight| {c['edge_max_abs_weight']:.0f}), "
                    f"Pearson {c['edge_pearson']:.6f}",
                )
            )
    return rows


def _cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 pair and one 5-token graph")
    parser.add_argument("--reference", metavar="DIR", help=f"a git clone of {REFERENCE_REPO} to export from")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every worker (default 1)")
    parser.add_argument("--python", help="interpreter for the reference's venv (default: this one's base)")
    parser.add_argument("--setup-only", action="store_true", help="export, patch and install, then stop")
    args = parser.parse_args(argv)
    try:
        if args.setup_only:
            info = setup(args.reference, args.python)
            print(json.dumps({k: v for k, v in info.items() if k != "freeze"}, indent=2))
            return 0
        section = main(quick=args.quick, reference=args.reference, threads=args.threads, python=args.python)
    except ReferenceUnavailable as exc:
        print(f"bench_reference: {exc}", file=sys.stderr)
        return 2
    print(f"### {section['title']}\n\n| measurement | value |\n|---|---|")
    for name, value in section["rows"]:
        print(f"| {name} | {value} |")
    return 0


if __name__ == "__main__":
    sys.exit(_cli())

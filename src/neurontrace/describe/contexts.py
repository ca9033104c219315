"""Where a neuron fires: its top-activating contexts over a text corpus, per polarity.

The corpus is cut into windows of ``window`` tokens, each starting with the tokenizer's special prefix (e.g.
BOS). A window's first position (the prefix, or the first text token when the tokenizer adds none) is never
counted: it is the attention sink, with huge activations that say nothing about the neuron. One
scan runs the windows in batches through :func:`neurontrace.sites.capture` for the layers asked and keeps, for
*every* neuron of those layers and each polarity, the ``k`` largest activations (``+``) and the ``k`` most
negative ones (``-``) with their window and position. The scan is cached on disk, one safetensors file per
layer under ``neurontrace_home()/contexts/<model>-<key>/``, keyed by the model (name and a weight
fingerprint), the corpus fingerprint, the window size and the token budget; so describing more neurons of a
scanned layer later runs no model at all.

Corpus sources: a ``.txt`` file; a folder of ``.txt`` files (recursively, in name order); ``"hf:NAME"``,
``"hf:NAME:CONFIG"`` or ``"hf:NAME:CONFIG@SPLIT"`` for a Hugging Face dataset (needs the optional ``datasets``
package and hub access; streamed); a list of strings; or ``"model"``: text sampled from the model itself
(continuations of a few neutral seed prompts, with a fixed seed), which needs no data and no network.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from neurontrace.describe.writes import check_neuron
from neurontrace.errors import NeurontraceError, check_finite
from neurontrace.io import JsonResult, write_bytes_atomic
from neurontrace.models.model import NeuronModel
from neurontrace.models.placement import loaded_weights
from neurontrace.neurons import NeuronId
from neurontrace.sites import capture
from neurontrace.tokens import Batch, encode, pad_id_of, token_strings

SCHEMA_VERSION = 1
CACHE_K = 20  # contexts kept per neuron and polarity in the cache (more when a call asks for more)
BEFORE, AFTER = 8, 4  # snippet tokens shown around the activating token
SEED_PROMPTS = (
    "The",
    "In the",
    "I",
    "It was",
    "Once upon a time",
    "A",
    "We",
    "This is",
    "There are",
    "When",
    "My",
    "Today",
)
GENERATE_BATCH = 32  # rows sampled at once for the "model" corpus
_CHARS_PER_PIECE = 16_000  # long texts are tokenised in pieces split at whitespace
_CHARS_PER_TOKEN = 32  # generous upper bound: text files are read up to max_tokens * this many characters


@dataclass
class Context:
    """One activating token with a few tokens around it."""

    activation: float
    window: int  # index of the corpus window
    position: int  # position in the window (0 = the window's first token, special prefix included)
    token: str
    before: list[str]
    after: list[str]

    def render(self) -> str:
        """``'...before' ['token'] 'after...'`` with repr so spaces and markup are visible."""
        return f"{''.join(self.before)!r} [{self.token!r}] {''.join(self.after)!r}"


@dataclass
class ContextsDescription(JsonResult):
    """The top-activating contexts of one neuron for one polarity."""

    neuron: str  # "L5/N3+"
    layer: int
    index: int
    polarity: str
    contexts: list[Context]
    corpus: str
    n_tokens: int  # tokens scanned (first window positions excluded)
    window: int
    schema_version: int = field(default=SCHEMA_VERSION)


# ------------------------------------------------------------------------------------------------ corpus
@dataclass
class Corpus:
    description: str
    fingerprint: str
    windows: Callable[[], list[list[int]]]  # builds the windows (may run the model for "model")


def _tokenizer(model: NeuronModel) -> Any:
    if model.tokenizer is None:
        raise NeurontraceError("describing where a neuron fires needs a model with a tokenizer")
    return model.tokenizer


def _special_prefix(tokenizer: Any) -> list[int]:
    """The ids a tokenizer puts before any text (e.g. BOS), found by encoding with and without specials."""
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start])
    return []


def _pieces(text: str) -> Iterator[str]:
    """``text`` in pieces of at most about ``_CHARS_PER_PIECE`` characters, split at whitespace."""
    while len(text) > _CHARS_PER_PIECE:
        cut = max(text.rfind("\n", 0, _CHARS_PER_PIECE), text.rfind(" ", 0, _CHARS_PER_PIECE))
        cut = cut if cut > 0 else _CHARS_PER_PIECE
        yield text[:cut]
        text = text[cut:]
    if text:
        yield text


def windows_from_texts(
    model: NeuronModel, texts: Iterable[str], *, window: int, max_tokens: int
) -> list[list[int]]:
    """Tokenise documents into windows of at most ``window`` tokens (special prefix + text) until
    ``max_tokens`` text tokens; windows never cross documents and a document's short tail (< 4) is dropped."""
    tok = _tokenizer(model)
    prefix = _special_prefix(tok)
    body = window - len(prefix)
    out: list[list[int]] = []
    total = 0
    for text in texts:
        ids: list[int] = []
        for piece in _pieces(text):
            ids += tok.encode(piece, add_special_tokens=False)
            if len(ids) >= max_tokens - total:
                break
        ids = ids[: max_tokens - total]
        for start in range(0, len(ids), body):
            chunk = ids[start : start + body]
            if len(chunk) >= min(4, body):
                out.append(prefix + chunk)
                total += len(chunk)
        if total >= max_tokens:
            break
    return out


def _sha(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8") if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()


def _text_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*.txt") if p.is_file())
    if not files:
        raise NeurontraceError(
            f"folder {path} has no .txt files; give a .txt file, a folder of them, or 'model'"
        )
    return files


def _hf_texts(spec: str) -> Iterator[str]:
    """Texts of a Hugging Face dataset ``NAME[:CONFIG][@SPLIT]``, streamed."""
    match = re.match(r"^(?P<name>[^:@]+)(?::(?P<config>[^@]+))?(?:@(?P<split>.+))?$", spec)
    if match is None:
        raise NeurontraceError(
            f"cannot read dataset spec {spec!r}; write hf:NAME, hf:NAME:CONFIG or hf:NAME@SPLIT"
        )
    try:
        import datasets
    except ImportError:
        raise NeurontraceError(
            "a Hugging Face dataset corpus needs the datasets package (pip install datasets); "
            "or give a .txt file, a folder of .txt files, or 'model'"
        ) from None
    try:
        rows = datasets.load_dataset(
            match["name"], match["config"], split=match["split"] or "train", streaming=True
        )
        for row in rows:
            text = row.get("text")
            if not isinstance(text, str):
                text = next((v for v in row.values() if isinstance(v, str)), None)
            if text:
                yield text
    except NeurontraceError:
        raise
    except Exception as exc:
        raise NeurontraceError(f"cannot load dataset {spec!r}: {str(exc).splitlines()[0]}") from None


def _model_windows(model: NeuronModel, *, window: int, max_tokens: int, seed: int) -> list[list[int]]:
    """Windows of text sampled from the model: continuations of ``SEED_PROMPTS`` (top-p 0.95, fixed seed, in
    batches of ``GENERATE_BATCH`` rows so that the text does not depend on the scan's batch size)."""
    tok = _tokenizer(model)
    prefix = _special_prefix(tok)
    prompts = [prefix + encode(tok, p, add_special_tokens=False) for p in SEED_PROMPTS]
    longest = max(len(p) for p in prompts)
    new = window - longest
    if new < 4:
        raise NeurontraceError(
            f"window {window} is too short to sample text from the model; use at least {longest + 4}"
        )
    n = math.ceil(max_tokens / new)
    rows = [prompts[i % len(prompts)] for i in range(n)]
    cuda = model.device.type == "cuda"
    out = []
    for start in range(0, n, GENERATE_BATCH):
        chunk = rows[start : start + GENERATE_BATCH]
        batch = Batch.from_ids(chunk, pad_id=pad_id_of(tok)).to(model.device)
        if start == 0:  # a model with NaN outputs cannot be sampled: say so rather than fail inside generate
            check_finite(model.logits(batch)[:, -1], "next-token logits")
        devices = list(range(torch.cuda.device_count())) if cuda else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(seed + start)
            ids = model.hf.generate(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                do_sample=True,
                top_p=0.95,
                top_k=0,
                temperature=1.0,
                min_new_tokens=new,
                max_new_tokens=new,
                pad_token_id=pad_id_of(tok),
            )
        for row, prompt in enumerate(chunk):
            out.append(list(prompt) + ids[row, batch.width :].tolist())
    return out


def resolve_corpus(
    model: NeuronModel,
    corpus: str | Path | Sequence[str],
    *,
    window: int,
    max_tokens: int,
    seed: int = 0,
) -> Corpus:
    """What ``corpus`` names, its fingerprint (no model run) and how to build its windows."""

    def texts_corpus(description: str, fingerprint: str, texts: Callable[[], Iterable[str]]) -> Corpus:
        return Corpus(
            description,
            fingerprint,
            lambda: windows_from_texts(model, texts(), window=window, max_tokens=max_tokens),
        )

    if not isinstance(corpus, (str, Path)):
        texts = [str(t) for t in corpus]
        if not texts:
            raise NeurontraceError("the corpus is an empty list; give some texts")
        return texts_corpus(f"{len(texts)} texts", _sha("texts", *texts), lambda: texts)
    spec = str(corpus)
    if spec == "model":
        fp = _sha("model", json.dumps([SEED_PROMPTS, seed, GENERATE_BATCH]))
        return Corpus(
            "text sampled from the model",
            fp,
            lambda: _model_windows(model, window=window, max_tokens=max_tokens, seed=seed),
        )
    if spec.startswith("hf:"):
        name = spec[3:]
        return texts_corpus(f"dataset {name}", _sha("hf", name), lambda: _hf_texts(name))
    path = Path(spec).expanduser()
    if not path.exists():
        raise NeurontraceError(
            f"corpus {spec!r} is not a file or folder; give a .txt file, a folder of .txt files, "
            "hf:DATASET or 'model' (text sampled from the model)"
        )
    contents, budget = [], max_tokens * _CHARS_PER_TOKEN  # read no more text than the windows can use
    for f in _text_files(path):
        with f.open(encoding="utf-8", errors="replace") as fh:
            contents.append(fh.read(budget))
        budget -= len(contents[-1])
        if budget <= 0:
            break
    fp = _sha("files", *contents)
    return texts_corpus(str(path), fp, lambda: contents)


# ------------------------------------------------------------------------------------------------- cache
def _weights_fingerprint(model: NeuronModel) -> str:
    """A cheap fingerprint of the weights (a strided sample of a few matrices), so that two models of one name
    never share a cache entry."""
    h = hashlib.sha256()
    last = model.n_layers - 1
    reads = [
        (model.embed, lambda: model.embed.weight),
        (model.unembed, lambda: model.unembed.weight),
        (model.down_proj(0), lambda: model.w_out(0)),
        (model.down_proj(last), lambda: model.w_out(last)),
    ]
    try:
        for module, weight in reads:
            with loaded_weights(module):  # weights accelerate offloads are loaded for the read
                flat = weight().detach().reshape(-1)
                sample = flat[:: max(1, flat.numel() // 4096)][:4096]
                h.update(sample.float().cpu().numpy().tobytes())
    except (NotImplementedError, RuntimeError):  # weights on the meta device that no hook can load
        h.update(model.source.encode("utf-8"))
    return h.hexdigest()


def _cache_folder(
    model: NeuronModel, corpus: Corpus, *, window: int, max_tokens: int, cache_dir: str | Path | None
) -> Path:
    from neurontrace.models.loading import neurontrace_home

    root = Path(cache_dir) if cache_dir is not None else neurontrace_home() / "contexts"
    key = _sha(
        json.dumps(
            {
                "schema": SCHEMA_VERSION,
                "model": model.name,
                "weights": _weights_fingerprint(model),
                "corpus": corpus.fingerprint,
                "window": window,
                "max_tokens": max_tokens,
            },
            sort_keys=True,
        )
    )[:16]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(model.name).name or "model")[:48]
    return root / f"{name}-{key}"


def _save(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    from safetensors.torch import save

    data = save(
        {k: v.contiguous().cpu() for k, v in tensors.items()},
        metadata={"neurontrace": json.dumps({**meta, "schema_version": SCHEMA_VERSION})},
    )
    write_bytes_atomic(path, data)


def _load(path: Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    """Tensors and metadata of a cache file, or None if it is missing, unreadable or of another schema."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("neurontrace", "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception:
        return None
    if meta.get("schema_version") != SCHEMA_VERSION:
        return None
    return tensors, meta


@dataclass
class _LayerTop:
    """Running top-k per neuron and polarity: ``values``/``ids`` ``[2, K, d_ff]`` (0: ``+``, 1: ``-``)."""

    values: torch.Tensor  # actual activations ([0]: largest first, [1]: most negative first)
    ids: torch.Tensor  # window * window_size + position; -1 where nothing was found


def _scan(
    model: NeuronModel,
    windows: list[list[int]],
    layers: list[int],
    *,
    k: int,
    window: int,
    n_skip: int,
    batch_size: int,
    progress: bool,
) -> dict[int, _LayerTop]:
    """Top-``k`` activations of every neuron of ``layers`` over ``windows``, per polarity."""
    d, device = model.d_ff, model.device
    best = {
        layer: [
            (
                torch.full((k, d), -math.inf, device=device),
                torch.full((k, d), -1, dtype=torch.long, device=device),
            )
            for _ in range(2)
        ]
        for layer in layers
    }
    pad_id = pad_id_of(model.tokenizer) if model.tokenizer is not None else 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(windows), desc=f"scanning layers {_ranges(layers)}", unit="window", leave=False)
    for start in range(0, len(windows), batch_size):
        rows = windows[start : start + batch_size]
        batch = Batch.from_ids(rows, pad_id=pad_id)
        acts = capture(model, batch, layers=layers, keep_logits=False)
        rel = torch.arange(batch.width)[None, :] - batch.pad[:, None]  # [B, T] position in the window
        valid = (rel >= n_skip) & batch.attention_mask.bool()
        gid = (torch.arange(start, start + batch.size)[:, None] * window + rel).reshape(-1).to(device)
        valid = valid.reshape(-1).to(device)
        for layer in layers:
            a = acts.get(layer).reshape(-1, d).float().to(device)  # layers may sit on other devices
            for pol, signed in enumerate((a, -a)):
                values, ids = best[layer][pol]
                cand = signed.masked_fill(~valid[:, None], -math.inf)
                all_values = torch.cat([values, cand])
                all_ids = torch.cat([ids, gid[:, None].expand(-1, d)])
                top = all_values.topk(k, dim=0)
                best[layer][pol] = (top.values, all_ids.gather(0, top.indices))
        if bar is not None:
            bar.update(len(rows))
    if bar is not None:
        bar.close()
    out = {}
    for layer in layers:
        (pv, pi), (nv, ni) = best[layer]
        values = torch.stack([pv, -nv]).cpu()
        ids = torch.stack([pi, ni]).cpu()
        ids[~torch.isfinite(values)] = -1
        out[layer] = _LayerTop(values, ids)
    return out


def _ranges(layers: Sequence[int]) -> str:
    return (
        ",".join(str(x) for x in layers) if len(layers) <= 4 else f"{layers[0]}..{layers[-1]} ({len(layers)})"
    )


# ---------------------------------------------------------------------------------------------------- API
def top_contexts(
    model: NeuronModel,
    neurons: Sequence[NeuronId] | NeuronId,
    *,
    corpus: str | Path | Sequence[str] = "model",
    k: int = 10,
    window: int = 64,
    max_tokens: int = 20_000,
    batch_size: int = 8,
    progress: bool = True,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    seed: int = 0,
) -> dict[NeuronId, ContextsDescription]:
    """The ``k`` top-activating contexts of each neuron over ``corpus``, per polarity.

    Keys are the neurons with their polarity (``L5/N3+``); a neuron given without a sign gets both polarities,
    and an ``@pos`` is ignored. A context's activation is the neuron's activation at that token (positive for
    ``+``, negative for ``-``; a neuron that never fires with a polarity has fewer contexts than ``k``). Only the
    layers of ``neurons`` are scanned, and the scan is cached for all neurons of those layers (see the module
    docstring); ``cache_dir`` overrides the cache folder, ``use_cache=False`` neither reads nor writes it.
    """
    neurons = [neurons] if isinstance(neurons, NeuronId) else list(neurons)
    if not neurons:
        raise NeurontraceError("no neurons given; name them as L<layer>/N<index>, e.g. L5/N123+")
    for n in neurons:
        check_neuron(model, n)
    if k < 1 or max_tokens < 1 or batch_size < 1:
        raise NeurontraceError("k, max_tokens and batch_size must be at least 1")
    tok = _tokenizer(model)
    n_prefix = len(_special_prefix(tok))
    n_skip = max(n_prefix, 1)  # positions not counted at the start of a window (see the module docstring)
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(
        model.config, "n_positions", None
    )
    if window < n_prefix + 4 or (limit is not None and window > limit):
        raise NeurontraceError(
            f"window must be between {n_prefix + 4} and {limit or 'the context size'} tokens"
        )
    src = resolve_corpus(model, corpus, window=window, max_tokens=max_tokens, seed=seed)
    layers = sorted({n.layer for n in neurons})
    keep = max(k, CACHE_K)
    folder = _cache_folder(model, src, window=window, max_tokens=max_tokens, cache_dir=cache_dir)

    windows: list[list[int]] | None = None
    tops: dict[int, _LayerTop] = {}
    if use_cache:
        loaded = _load(folder / "windows.safetensors")
        if loaded is not None:
            tensors, _ = loaded
            windows = [
                row[:n].tolist()
                for row, n in zip(tensors["tokens"], tensors["lengths"].tolist(), strict=True)
            ]
            for layer in layers:
                cached = _load(folder / f"layer-{layer}.safetensors")
                if (
                    cached is not None
                    and cached[1].get("k", 0) >= k
                    and cached[0]["values"].shape[-1] == model.d_ff
                ):
                    tops[layer] = _LayerTop(cached[0]["values"], cached[0]["ids"].long())
    if windows is None:
        windows = src.windows()
        if not windows:
            raise NeurontraceError(f"the corpus {src.description} has no text to scan")
        if use_cache:
            lengths = torch.tensor([len(w) for w in windows])
            tokens = torch.full((len(windows), window), -1, dtype=torch.long)
            for i, w in enumerate(windows):
                tokens[i, : len(w)] = torch.tensor(w)
            _save(
                folder / "windows.safetensors",
                {"tokens": tokens, "lengths": lengths},
                {"corpus": src.description},
            )
    missing = [layer for layer in layers if layer not in tops]
    if missing:
        scanned = _scan(
            model,
            windows,
            missing,
            k=keep,
            window=window,
            n_skip=n_skip,
            batch_size=batch_size,
            progress=progress,
        )
        for layer, top in scanned.items():
            tops[layer] = top
            if use_cache:
                _save(
                    folder / f"layer-{layer}.safetensors",
                    {"values": top.values, "ids": top.ids.int()},
                    {
                        "model": model.name,
                        "corpus": src.description,
                        "layer": layer,
                        "k": keep,
                        "window": window,
                    },
                )

    n_tokens = sum(max(0, len(w) - n_skip) for w in windows)
    strings: dict[int, str] = {}

    def text(i: int) -> str:
        if i not in strings:
            strings[i] = token_strings(tok, [i])[0]
        return strings[i]

    out: dict[NeuronId, ContextsDescription] = {}
    for n in neurons:
        for sign in [n.sign] if n.sign else ["+", "-"]:
            key = NeuronId(n.layer, n.index, sign)
            if key in out:
                continue
            pol = 0 if sign == "+" else 1
            top = tops[n.layer]
            contexts = []
            for value, gid in zip(
                top.values[pol, :, n.index].tolist(), top.ids[pol, :, n.index].tolist(), strict=True
            ):
                if gid < 0 or len(contexts) >= k or (value <= 0 if sign == "+" else value >= 0):
                    continue
                w, p = divmod(int(gid), window)
                ids = windows[w]
                contexts.append(
                    Context(
                        activation=float(value),
                        window=w,
                        position=p,
                        token=text(ids[p]),
                        before=[text(i) for i in ids[max(n_prefix, p - BEFORE) : p]],
                        after=[text(i) for i in ids[p + 1 : p + 1 + AFTER]],
                    )
                )
            out[key] = ContextsDescription(
                neuron=str(key),
                layer=n.layer,
                index=n.index,
                polarity=sign,
                contexts=contexts,
                corpus=src.description,
                n_tokens=n_tokens,
                window=window,
            )
    return out

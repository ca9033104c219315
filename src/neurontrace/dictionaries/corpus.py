"""Text sources for training dictionaries: fixed-length blocks of token ids.

A corpus yields blocks of ``context`` token ids (``LongTensor [context]``); each block starts with the model's
BOS token when its tokenizer (or config) has one, and the rest is a stretch of the corpus's token stream, in
which documents follow each other separated by the EOS token. A block never runs past the corpus's end (the
incomplete last stretch is dropped). Sources (:func:`open_corpus`):

``FILE.txt`` / ``FILE.md``
    documents separated by blank lines.
``FILE.jsonl``
    one JSON object a line with a string field ``text``.
``FOLDER``
    every ``.txt``, ``.md`` and ``.jsonl`` file below it (recursively, in sorted order).
``hf:NAME[:CONFIG][:SPLIT]``
    a Hugging Face dataset streamed with the ``datasets`` package (split ``train`` by default), column ``text``.
``sample:N``
    N tokens sampled from the model itself (offline): ``model.hf.generate`` at temperature 1 from the BOS token,
    in batches of sequences, batch ``b`` seeded with ``(seed, b)``. The samples can be cached in a safetensors
    file, which an interrupted sampling resumes (same model, seed, context and batch), so a resumed training run
    sees the very same blocks.

Every corpus is replayable: ``blocks(skip=M)`` starts at block M, the same blocks on every call.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from neurontrace.errors import DatasetError, NeurontraceError

SAMPLE_PREFIX = "sample:"
HF_PREFIX = "hf:"
TEXT_SUFFIXES = (".txt", ".md", ".jsonl")
SAMPLE_BATCH = 256  # sequences generated together by sample:N (fewer: slower per token on a CPU)
_BLANK_LINES = re.compile(r"\n[ \t\r\f\v]*\n")


def special_ids(model: Any) -> tuple[int | None, int | None]:
    """(BOS, EOS) token ids of a model: its tokenizer's, else its config's; None where it has none."""
    tok = getattr(model, "tokenizer", None)
    config = getattr(getattr(model, "hf", None), "config", None)

    def pick(attr: str) -> int | None:
        for source in (tok, config):
            value = getattr(source, attr, None)
            if isinstance(value, list):
                value = value[0] if value else None
            if isinstance(value, int):
                return value
        return None

    return pick("bos_token_id"), pick("eos_token_id")


class Corpus:
    """A replayable source of token blocks ``[context]``; subclasses implement :meth:`_stream`."""

    spec: str = ""
    context: int = 128

    def blocks(self, skip: int = 0) -> Iterator[torch.Tensor]:
        """The corpus's blocks from block ``skip`` on (the same blocks on every call)."""
        for i, block in enumerate(self._blocks()):
            if i >= skip:
                yield block

    def _blocks(self) -> Iterator[torch.Tensor]:
        raise NotImplementedError

    @property
    def n_blocks(self) -> int | None:
        """How many blocks the corpus holds, or None where that is not known without reading it all."""
        return None

    def describe(self) -> str:
        n = self.n_blocks
        return self.spec if n is None else f"{self.spec} ({n} blocks of {self.context} tokens)"


class _TokenStream(Corpus):
    """Blocks cut from a stream of documents, tokenised one by one."""

    def __init__(self, model: Any, spec: str, context: int) -> None:
        if getattr(model, "tokenizer", None) is None:
            raise NeurontraceError(
                f"the corpus {spec} is text, but this model has no tokenizer; use --corpus sample:N"
            )
        self.model, self.spec, self.context = model, spec, context
        self.bos, self.eos = special_ids(model)
        self._count: int | None = None

    def documents(self) -> Iterator[str]:
        raise NotImplementedError

    def _blocks(self) -> Iterator[torch.Tensor]:
        tok = self.model.tokenizer
        prefix = [] if self.bos is None else [self.bos]
        body = self.context - len(prefix)
        if body < 1:
            raise NeurontraceError(f"the context ({self.context} tokens) leaves no room after the BOS token")
        pending: list[int] = []
        count = 0
        for doc in self.documents():
            ids = tok.encode(doc, add_special_tokens=False)
            if not ids:
                continue
            pending.extend(ids)
            if self.eos is not None:
                pending.append(self.eos)
            while len(pending) >= body:
                yield torch.tensor(prefix + pending[:body], dtype=torch.long)
                del pending[:body]
                count += 1
        if count == 0:
            have = len(pending) - (1 if pending and self.eos is not None else 0)
            raise NeurontraceError(
                f"the corpus {self.spec} is empty: it holds {max(have, 0)} tokens, fewer than one block of "
                f"{self.context}; give more text or a smaller --context"
            )
        self._count = count

    @property
    def n_blocks(self) -> int | None:
        return self._count


class TextCorpus(_TokenStream):
    """Documents from text files: ``.txt``/``.md`` split at blank lines, ``.jsonl`` with a ``text`` field."""

    @property
    def n_blocks(self) -> int:
        """Counted by tokenising the files once (local files are finite)."""
        if self._count is None:
            for _ in self._blocks():
                pass
        return self._count

    def __init__(self, model: Any, path: str | os.PathLike, context: int = 128) -> None:
        root = Path(path).expanduser()
        if root.is_dir():
            files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
            if not files:
                raise NeurontraceError(
                    f"the corpus folder {root} has no {', '.join(TEXT_SUFFIXES)} files; add text or choose another"
                )
        elif root.is_file():
            if root.suffix.lower() not in TEXT_SUFFIXES:
                raise NeurontraceError(
                    f"the corpus file {root} is not {'/'.join(TEXT_SUFFIXES)}; give text, markdown or JSONL"
                )
            files = [root]
        else:
            raise NeurontraceError(f"no such corpus file or folder: {path}")
        super().__init__(model, str(path), context)
        self.files = files

    def documents(self) -> Iterator[str]:
        for file in self.files:
            try:
                text = file.read_text(encoding="utf-8")
            except UnicodeDecodeError as exc:
                raise DatasetError(f"{file} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
            if file.suffix.lower() != ".jsonl":
                for doc in _BLANK_LINES.split(text):
                    if doc.strip():
                        yield doc.strip()
                continue
            # split on "\n" only (not splitlines): a JSON string may hold U+2028
            for number, line in enumerate(text.split("\n"), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as exc:
                    raise DatasetError(f"{file}:{number} is not JSON: {exc}") from None
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise DatasetError(f"{file}:{number} has no string field 'text'")
                if row["text"].strip():
                    yield row["text"]


class HubCorpus(_TokenStream):
    """A Hugging Face dataset, streamed (``hf:NAME[:CONFIG][:SPLIT]``), column ``text``."""

    def __init__(self, model: Any, spec: str, context: int = 128) -> None:
        parts = spec[len(HF_PREFIX) :].split(":")
        if not parts[0] or len(parts) > 3:
            raise NeurontraceError(f"give a Hugging Face dataset as hf:NAME[:CONFIG][:SPLIT], got {spec!r}")
        self.name = parts[0]
        self.config = parts[1] if len(parts) > 1 and parts[1] else None
        self.split = parts[2] if len(parts) > 2 and parts[2] else "train"
        super().__init__(model, spec, context)
        self._dataset()  # fail now (not installed, unreachable, no such dataset), not after the model ran

    def _dataset(self) -> Any:
        try:
            import datasets
        except ImportError:
            raise NeurontraceError(
                f"--corpus {self.spec} needs the datasets package: pip install datasets (or give a local text "
                "file or folder, or sample:N)"
            ) from None
        try:
            return datasets.load_dataset(self.name, self.config, split=self.split, streaming=True)
        except Exception as exc:  # hub unreachable, offline mode, unknown dataset/config/split
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise NeurontraceError(
                f"could not open the Hugging Face dataset {self.spec[len(HF_PREFIX) :]}: {first}; check the "
                "name and the connection (HF_HUB_OFFLINE unset), or give a local --corpus"
            ) from None

    def documents(self) -> Iterator[str]:
        rows = iter(self._dataset())
        while True:
            try:
                row = next(rows)
            except StopIteration:
                return
            except Exception as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise NeurontraceError(f"reading the dataset {self.spec} failed: {first}") from None
            text = row.get("text") if isinstance(row, dict) else None
            if not isinstance(text, str):
                raise NeurontraceError(
                    f"the dataset {self.spec} has no string column 'text' (columns: {', '.join(row)})"
                )
            if text.strip():
                yield text


class SampleCorpus(Corpus):
    """``n_tokens`` tokens sampled from the model itself, in blocks of ``context`` that start with BOS."""

    def __init__(self, model: Any, n_tokens: int, context: int = 128, *, seed: int = 0,
                 batch: int = SAMPLE_BATCH, cache: str | os.PathLike | None = None,
                 reuse: str | os.PathLike | None = None, progress: bool = False) -> None:  # fmt: skip
        if n_tokens < 1:
            raise NeurontraceError(f"sample:N needs N >= 1 tokens, got {n_tokens}")
        if context < 2:
            raise NeurontraceError(f"sampling needs a context of at least 2 tokens, got {context}")
        bos, eos = special_ids(model)
        self.start = next((t for t in (bos, eos) if t is not None), 0)
        self.model, self.n_tokens, self.context, self.seed = model, n_tokens, context, seed
        self.batch, self.progress = batch, progress
        self.cache = None if cache is None else Path(cache)
        self.reuse = None if reuse is None else Path(reuse)  # another run's cache: read, never written
        if self.reuse is not None and not self.reuse.is_file():
            raise NeurontraceError(
                f"no sampled corpus at {self.reuse}; give another run's {self.reuse.name} file"
            )
        self.spec = f"{SAMPLE_PREFIX}{n_tokens}"
        self._tokens: torch.Tensor | None = None

    @property
    def n_blocks(self) -> int:
        return math.ceil(self.n_tokens / self.context)

    def _key(self) -> dict[str, str]:
        return {"model": str(getattr(self.model, "name", "")), "seed": str(self.seed), "context": str(self.context),
                "batch": str(self.batch), "start": str(self.start), "dtype": str(self.model.dtype)}  # fmt: skip

    def _load_cache(self, path: Path | None = None) -> torch.Tensor:
        """The samples in ``path`` (default: the cache) when drawn with this corpus's settings, else none."""
        path = self.cache if path is None else path
        empty = torch.zeros(0, self.context, dtype=torch.long)
        if path is None or not path.is_file():
            return empty
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}) != self._key():
                    return empty
                return f.get_tensor("tokens").long()
        except Exception:  # a foreign or damaged cache is sampled again
            return empty

    def _save_cache(self, tokens: torch.Tensor) -> None:
        if self.cache is None:
            return
        from safetensors.torch import save

        from neurontrace.io import write_bytes_atomic

        data = save({"tokens": tokens.to(torch.int32).contiguous()}, metadata=self._key())
        write_bytes_atomic(self.cache, data)

    def tokens(self) -> torch.Tensor:
        """All sampled blocks ``[n_blocks, context]`` (sampled on first use, resumed from the cache)."""
        if self._tokens is not None:
            return self._tokens
        done = self._load_cache()
        want = self.n_blocks
        if self.reuse is not None and done.shape[0] < want:
            reused = self._load_cache(self.reuse)
            done = reused if reused.shape[0] > done.shape[0] else done
        per_batch = self.batch
        if done.shape[0] % per_batch and done.shape[0] < want:  # only whole batches resume exactly
            done = done[: done.shape[0] - done.shape[0] % per_batch]
        chunks = [done]
        have = done.shape[0]
        bar = None
        if self.progress and have < want:
            from tqdm.auto import tqdm

            bar = tqdm(total=want * self.context, initial=have * self.context, desc="sampling the corpus",
                       unit="tok", unit_scale=True, leave=False)  # fmt: skip
        try:
            while have < want:
                rows = self._generate(have // per_batch, min(per_batch, want - have))
                chunks.append(rows)
                have += rows.shape[0]
                self._save_cache(torch.cat(chunks))
                if bar is not None:
                    bar.update(rows.numel())
        finally:
            if bar is not None:
                bar.close()
        self._tokens = torch.cat(chunks)[:want]
        return self._tokens

    def _generate(self, index: int, rows: int) -> torch.Tensor:
        """Batch ``index`` of sampled sequences, ``[rows, context]``, seeded with (seed, index)."""
        from transformers import GenerationConfig

        model = self.model
        steps = self.context - 1
        config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=steps,
                                  min_new_tokens=steps, pad_token_id=self.start, eos_token_id=None,
                                  bos_token_id=self.start)  # fmt: skip
        start = torch.full((rows, 1), self.start, dtype=torch.long, device=model.device)
        devices = [model.device] if model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(self.seed * 1_000_003 + index)
            out = model.hf.generate(input_ids=start, attention_mask=torch.ones_like(start),
                                    generation_config=config)  # fmt: skip
        if out.shape[1] != self.context:
            raise NeurontraceError(f"sampling stopped after {out.shape[1]} of {self.context} tokens")
        return out.cpu()

    def _blocks(self) -> Iterator[torch.Tensor]:
        yield from self.tokens()

    def blocks(self, skip: int = 0) -> Iterator[torch.Tensor]:
        tokens = self.tokens()
        for i in range(skip, tokens.shape[0]):
            yield tokens[i]


def open_corpus(spec: str, model: Any, *, context: int = 128, seed: int = 0,
                cache: str | os.PathLike | None = None, reuse: str | os.PathLike | None = None,
                progress: bool = False) -> Corpus:  # fmt: skip
    """The corpus named by ``spec``: a text file or folder, ``hf:NAME[:CONFIG][:SPLIT]`` or ``sample:N``.

    ``cache`` is where ``sample:N`` keeps its samples (so a rerun does not sample again); ``seed`` seeds them.
    ``reuse``: another run's cache, read (when its samples were drawn with the same model, seed and context) and
    never written; what it lacks is sampled into ``cache``.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise NeurontraceError("the corpus is empty; give a text file, a folder, hf:NAME or sample:N")
    if context < 2:
        raise NeurontraceError(f"the context must be at least 2 tokens, got {context}")
    if spec.startswith(SAMPLE_PREFIX):
        text = spec[len(SAMPLE_PREFIX) :].replace("_", "")
        try:
            n = int(float(text)) if re.fullmatch(r"\d+(\.\d+)?(e\d+)?", text) else int(text)
        except ValueError:
            raise NeurontraceError(
                f"give sample:N with N a number of tokens, e.g. sample:200000; got {spec!r}"
            ) from None
        return SampleCorpus(model, n, context, seed=seed, cache=cache, reuse=reuse, progress=progress)
    if reuse is not None:
        raise NeurontraceError("a corpus cache is reused only with a sample:N corpus; drop --corpus-cache")
    if spec.startswith(HF_PREFIX):
        return HubCorpus(model, spec, context)
    return TextCorpus(model, spec, context)

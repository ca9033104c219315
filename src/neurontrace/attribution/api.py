"""``attribute``: score every unit at every layer and position for one prompt, pairs, or a JSONL dataset.

Runs in batches with a progress bar, aggregates per position (when all examples share one token length) and
summed over positions, and can checkpoint a long dataset run so that an interrupted run resumes.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from neurontrace import __version__, distributed, memory
from neurontrace.attribution.blacklist import Blacklist, blacklist_for
from neurontrace.attribution.engine import METHODS, BatchAttributor, run_sites
from neurontrace.attribution.metrics import Metric, check_centred, make_metric
from neurontrace.attribution.replacement import RelPRules
from neurontrace.attribution.result import SCHEMA_VERSION, AttributionResult
from neurontrace.errors import NeurontraceError, TokenizationError
from neurontrace.models.model import NeuronModel
from neurontrace.sites import check_site, site_layers, site_width
from neurontrace.tokens import Batch, encode, pad_id_of, single_token_id, token_strings, tokenize_pairs

AUTO_KEEP_ELEMENTS = 32_000_000  # keep per-example per-position scores up to this many floats (128 MB)


@dataclass(frozen=True)
class Example:
    """One attribution example: a prompt, optionally its counterfactual, and the answer(s) scored."""

    clean: str
    patch: str | None = None
    answer: str | None = None
    contrast: str | None = None
    where: str | None = None  # where it came from ("file:line"), for error messages


def examples_from(
    *,
    prompt: str | None = None,
    answer: str | None = None,
    contrast: str | None = None,
    counterfactual: str | None = None,
    pairs: Sequence[Any] | None = None,
    dataset: str | os.PathLike | None = None,
    prompts: Sequence[str] | None = None,
    answers: Sequence[str] | None = None,
) -> list[Example]:
    """Normalise the accepted inputs into a list of :class:`Example`."""
    given = sum(x is not None for x in (prompt, pairs, dataset, prompts))
    if given != 1:
        raise NeurontraceError(
            "give exactly one of: a prompt, a list of prompts, a list of pairs, or a dataset file"
        )
    if prompt is not None:
        return [Example(prompt, counterfactual, answer, contrast)]
    if prompts is not None:
        prompts = list(prompts)
        answers = [None] * len(prompts) if answers is None else list(answers)
        if len(answers) != len(prompts):
            raise NeurontraceError(
                f"{len(prompts)} prompts but {len(answers)} answers; give one answer per prompt"
            )
        if not prompts:
            raise NeurontraceError("no prompts given; pass at least one prompt")
        return [Example(p, None, a) for p, a in zip(prompts, answers, strict=True)]
    if dataset is not None:
        from neurontrace.tasks.pairs import load_pairs

        pairs = load_pairs(dataset)
    out = []
    for p in pairs:
        get = (lambda k, p=p: p[k]) if isinstance(p, dict) else (lambda k, p=p: getattr(p, k))
        where = p.get("source") if isinstance(p, dict) else getattr(p, "source", None)
        out.append(
            Example(get("clean_prefix"), get("patch_prefix"), get("clean_answer"), get("patch_answer"), where)
        )
    if not out:
        raise NeurontraceError("the dataset is empty; give at least one pair")
    return out


def _where(example: Example, index: int) -> str:
    return example.where or f"example {index + 1}"


def _check_example(e: Example, metric: str, *, where: str | None) -> None:
    """Examples whose scores would all be 0 or whose options would be ignored are errors, not silent results.

    ``where`` is None for a single prompt, whose contrast is an option (a pair's second answer is data)."""
    at = f"{where}: " if where else ""
    if e.answer == "":
        raise TokenizationError(
            f"{at}the answer is empty; give the answer token, usually with a leading space"
        )
    if where is None and e.contrast is not None and metric in ("logprob", "logit", "prob", "topk"):
        raise NeurontraceError(
            f"{at}a contrast answer is not used by the {metric} metric; drop --contrast or use --metric logit-diff"
        )
    if metric == "logit-diff" and e.answer is not None and e.answer == e.contrast:
        raise NeurontraceError(
            f"{at}the answer and the contrast are both {e.answer!r}: their logit difference is 0 whatever the "
            "model does; give two different answers"
        )
    if e.patch is not None and e.patch == e.clean:
        raise NeurontraceError(
            f"{at}the counterfactual prompt is the prompt itself ({e.clean!r}): patching it changes nothing and "
            "every score would be 0; give a different counterfactual"
        )


def _locate(model: NeuronModel, chunk: Sequence[Example], start: int, metric, metric_fn, topk: int) -> None:
    """Re-raise the first error of ``chunk`` with the example's line (or number) in the whole dataset."""
    import re

    for i, e in enumerate(chunk):
        try:
            metric_obj, forced = _metric_for(model, [e], metric, metric_fn, topk)
            _tokenize(model, [e], metric_obj if forced else None)
        except NeurontraceError as exc:
            message = re.sub(r"^pair 0 has", "the pair has", str(exc))
            raise type(exc)(f"{_where(e, start + i)}: {message}") from None


def _metric_for(
    model: NeuronModel,
    examples: Sequence[Example],
    kind: str,
    fn: Callable | None,
    k: int,
    center: bool = False,
) -> tuple[Metric, bool]:
    """The batch's metric; second value: whether the answer tokens are teacher-forced into the prompt."""
    if fn is not None:
        return make_metric("custom", fn=fn), False
    if kind == "topk":
        return make_metric("topk", k=k, center=center), False
    if kind == "logprob" and all(e.patch is None for e in examples):
        answers = [
            model.tokenizer.encode(e.answer, add_special_tokens=False) if e.answer else [] for e in examples
        ]
        if any(len(a) == 0 for a in answers):
            raise TokenizationError("the logprob metric needs an answer for every prompt")
        if any(len(a) > 1 for a in answers):
            n = max(len(a) for a in answers)
            padded = [[-1] * (n - len(a)) + a for a in answers]
            return Metric("teacher-forced", answer=torch.tensor(padded)), True
    answer = [single_token_id(model, e.answer) for e in examples] if examples[0].answer is not None else None
    contrast = None
    if kind == "logit-diff":
        if any(e.contrast is None for e in examples):
            raise NeurontraceError(
                "the logit-diff metric needs a contrast answer (--contrast), or use --metric logit"
            )
        contrast = [single_token_id(model, e.contrast) for e in examples]
    return make_metric(kind, answer=answer, contrast=contrast, k=k, center=center), False


def _tokenize(
    model: NeuronModel, examples: Sequence[Example], forced: Metric | None
) -> tuple[Batch, Batch | None]:
    if examples[0].patch is not None:
        if any(e.patch is None for e in examples):
            raise NeurontraceError("either every example has a counterfactual prompt or none has")
        return tokenize_pairs(model, [e.clean for e in examples], [e.patch for e in examples])
    ids = [encode(model, e.clean) for e in examples]
    if forced is not None:  # teacher forcing: append all answer tokens but the last
        for row, answer in zip(ids, forced.answer.tolist(), strict=True):
            row += [t for t in answer if t >= 0][:-1]
    return Batch.from_ids(ids, pad_id=pad_id_of(model.tokenizer), prompts=[e.clean for e in examples]), None


def _token_strings(
    model: NeuronModel, examples: Sequence[Example], kind: str, fn: Callable | None, k: int
) -> list[list[str]]:
    """The token strings of each example's clean prompt as attributed (with any teacher-forced answer)."""
    if not model.tokenizer:
        return [[] for _ in examples]
    metric_obj, forced = _metric_for(model, examples, kind, fn, k)
    clean, _ = _tokenize(model, examples, metric_obj if forced else None)
    return [token_strings(model, clean.ids(row)) for row in range(clean.size)]


def _fingerprint(model: NeuronModel, examples: Sequence[Example], config: dict) -> str:
    digest = hashlib.sha256(json.dumps([model.name, config], sort_keys=True, default=str).encode())
    for e in examples:
        digest.update(json.dumps(e.__dict__).encode())
    return digest.hexdigest()[:32]


def restrict_scores(
    scores: torch.Tensor,
    *,
    layers: Sequence[int],
    suffix_length: int | None = None,
    blacklist: Blacklist | None = None,
) -> torch.Tensor:
    """``[B, L, T, d]`` batch scores (left-padded) with the positions before each prompt's last ``suffix_length``
    and the blacklisted neurons set to 0: the one place both restrictions are applied to attribution scores."""
    if suffix_length is not None and suffix_length < scores.shape[2]:
        scores = scores.clone()
        scores[:, :, : scores.shape[2] - suffix_length] = 0
    if blacklist is not None:
        scores = blacklist.apply(scores, layers=layers, layer_dim=1)
    return scores


def check_suffix_length(suffix_length: int | None) -> None:
    if suffix_length is not None and (
        isinstance(suffix_length, bool) or not isinstance(suffix_length, int) or suffix_length < 1
    ):
        raise NeurontraceError(
            f"the suffix length must be a whole number >= 1 (the last positions kept), got {suffix_length!r}"
        )


def mean_activations(
    model: NeuronModel, examples: Sequence[Example], *, site: str, layers: Sequence[int], batch_size: int
) -> torch.Tensor:
    """Mean of the site over every real token of the examples' clean prompts, ``[L, width]``.

    Launched distributed, each process runs its share of the examples and the sums and counts are reduced.
    """
    total, count = None, 0
    metric = make_metric("custom", fn=lambda logits: logits[:, -1, 0])
    share = distributed.shard(len(examples))
    for start in range(share.start, share.stop, batch_size):
        batch = Batch.from_ids(
            [encode(model, e.clean) for e in examples[start : min(start + batch_size, share.stop)]]
        )
        run = run_sites(model, batch, metric, site=site, layers=layers, grad=False)
        mask = batch.attention_mask.to(model.device)[:, None, :, None].float()
        acts = torch.stack([run.acts[layer].to(mask.device) for layer in layers], dim=1).float() * mask
        part = acts.sum(dim=(0, 2))
        total = part if total is None else total + part
        count += int(batch.attention_mask.sum())
    if distributed.world().size > 1:
        if total is None:  # a process with no examples
            total = torch.zeros(len(layers), site_width(model, site), device=model.device)
        total = distributed.all_reduce_sum(total)
        count = int(distributed.all_reduce_sum(torch.tensor(count)))
    return total / count


@memory.pin_allocator()  # the process's memory follows the tensors (and the estimate) while it runs
def attribute(
    model: NeuronModel,
    *,
    prompt: str | None = None,
    answer: str | None = None,
    contrast: str | None = None,
    counterfactual: str | None = None,
    pairs: Sequence[Any] | None = None,
    dataset: str | os.PathLike | None = None,
    prompts: Sequence[str] | None = None,
    answers: Sequence[str] | None = None,
    method: str = "relp",
    metric: str | None = None,
    metric_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    topk: int = 5,
    site: str = "neurons",
    layers: Sequence[int] | None = None,
    baseline: str = "zero",
    rules: RelPRules | None = None,
    steps: int = 32,
    ig_rule: str = "midpoint",
    batch_size: int | str = 8,
    max_rows: int = 64,
    seed: int = 0,
    keep_per_example: bool | None = None,
    progress: bool = False,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every_s: float | None = None,
    keep_checkpoint: bool = False,
    center_logits: bool = False,
    suffix_length: int | None = None,
    blacklist: Blacklist | str | os.PathLike | Sequence[Sequence[int]] | None = None,
) -> AttributionResult:
    """Attribute a metric to every unit at every layer and position.

    Inputs: one ``prompt`` (with ``answer``, optional ``contrast`` and ``counterfactual``), or ``prompts`` with
    one answer each (unpaired, zero or mean baseline), or ``pairs`` (Marks-format dicts or
    :class:`neurontrace.tasks.Pair`), or a JSONL ``dataset``. The default metric is the
    logit difference for pairs or a prompt with a contrast, else the answer's logit (``logprob`` teacher-forces
    multi-token answers). ``baseline`` (``zero`` or ``mean``) is used for prompts without a counterfactual.
    ``batch_size="auto"`` takes the largest batch (at most 64) whose estimated peak memory fits in a quarter
    of the free memory (:mod:`neurontrace.memory`); a fixed batch that cannot fit stops before any compute.
    ``checkpoint`` names a file where partial results are saved every ``checkpoint_every_s`` seconds (default
    60, or ``$NEURONTRACE_CHECKPOINT_SECONDS``); a run
    with the same inputs and settings resumes from it. It is removed when the result is complete, unless
    ``keep_checkpoint``: then a complete checkpoint is left for the caller to remove once it has saved the result
    (a failed save then loses nothing: the same call returns the result again without recomputing).

    Launched by ``torchrun`` with several processes (:mod:`neurontrace.distributed`), each process attributes a
    contiguous share of the examples and every process returns the whole, identical result; each then keeps
    its own checkpoint, ``CHECKPOINT.rank{r}-of-{n}``, which resumes with the same number of processes. The
    ``random`` control and runs with fewer examples than processes are not split (every process runs them all).

    ``center_logits``: the ``logit``/``topk`` metric reads logits minus their mean over the vocabulary (the
    reference code's ``center_logits``). ``suffix_length``: only the last N positions of each prompt (as
    attributed, teacher-forced answer tokens included) keep their scores, the others score 0 (the reference's
    ``suffix_length``: nodes of a chat prompt's final tokens only). ``blacklist``: neurons (a
    :class:`~neurontrace.attribution.blacklist.Blacklist`, a JSON file, or ``(layer, neuron)`` pairs) that score 0
    at every position, so no circuit selected from the result contains them; ``site="neurons"`` only.
    """
    check_site(site)
    check_suffix_length(suffix_length)
    blacklist = blacklist_for(blacklist, model=model, site=site)
    if method not in METHODS:
        raise NeurontraceError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if baseline not in ("zero", "mean"):
        raise NeurontraceError(f"unknown baseline {baseline!r}; choose zero or mean")
    auto_batch = batch_size == "auto"
    if not auto_batch and (not isinstance(batch_size, int) or batch_size < 1):
        raise NeurontraceError(f"the batch size must be a whole number >= 1 or 'auto', got {batch_size!r}")
    examples = examples_from(
        prompt=prompt,
        answer=answer,
        contrast=contrast,
        counterfactual=counterfactual,
        pairs=pairs,
        dataset=dataset,
        prompts=prompts,
        answers=answers,
    )
    paired = examples[0].patch is not None
    if metric is None:
        metric = (
            "logit-diff" if examples[0].contrast is not None else ("logit" if examples[0].answer else "topk")
        )
    if center_logits:
        check_centred(metric if metric_fn is None else "custom")
    layers = site_layers(model, site) if layers is None else list(layers)
    for layer in layers:
        if not 0 <= layer < model.n_layers:
            raise NeurontraceError(
                f"layer {layer} does not exist; the model has layers 0..{model.n_layers - 1}"
            )
    rules = rules or RelPRules()
    config = dict(
        method=method, metric=metric if metric_fn is None else "custom", site=site, layers=layers,
        baseline=None if paired else baseline, rules=rules.to_dict() if method == "relp" else None,
        steps=steps if method.startswith("ig") else None, ig_rule=ig_rule if method.startswith("ig") else None,
        seed=seed if method == "random" else None, center_logits=center_logits, suffix_length=suffix_length,
        blacklist=None if blacklist is None else blacklist.to_list(),
    )  # fmt: skip
    attributor = BatchAttributor(
        model,
        method=method,
        site=site,
        layers=layers,
        rules=rules,
        steps=steps,
        ig_rule=ig_rule,
        max_rows=max_rows,
        seed=seed,
    )
    width = site_width(model, site)
    longest = 0
    several = prompt is None
    for i, e in enumerate(examples):
        _check_example(e, metric if metric_fn is None else "custom", where=_where(e, i) if several else None)
    for start in range(0, len(examples), 256):  # fail on bad examples before any compute or progress bar
        chunk = examples[start : start + 256]
        try:
            metric_obj, forced = _metric_for(model, chunk, metric, metric_fn, topk)
            longest = max(longest, _tokenize(model, chunk, metric_obj if forced else None)[0].width)
        except NeurontraceError:
            if several:
                _locate(model, chunk, start, metric, metric_fn, topk)
            raise
    if auto_batch:  # the largest batch whose estimated peak takes a quarter of the free memory
        batch_size = memory.auto_batch_size(
            memory.Shape.of(model), prompt_len=longest, paired=paired, device=model.device
        )
    _check_memory(model, longest, min(batch_size, len(examples)), paired)
    base = None
    if not paired and baseline == "mean":
        base = mean_activations(model, examples, site=site, layers=layers, batch_size=batch_size)

    rank, size = distributed.world()
    split = size > 1 and method != "random" and len(examples) >= size  # random draws depend on the batches
    share = distributed.split(len(examples), rank, size) if split else range(len(examples))
    mine = examples[share.start : share.stop]
    if checkpoint is not None:
        checkpoint = process_checkpoint(checkpoint, split=split)
        distributed.note_resumable(checkpoint)  # named if another process of the run stops
    # the random control's draws depend on the batches: its checkpoints resume only with the same batch size
    fingerprint = _fingerprint(
        model, mine, {**config, "batch_size": batch_size if method == "random" else None}
    )
    generator = attributor.generator if method == "random" else None
    state = None
    if checkpoint is not None:
        state = _State.load(
            Path(checkpoint), fingerprint, keep_per_example, total=len(mine), generator=generator
        )
    state = state or _State(keep_per_example)
    resumed_complete = state.done == len(mine) and state.done > 0
    bar = None
    if progress and distributed.is_main():
        from tqdm.auto import tqdm

        bar = tqdm(total=len(mine), initial=state.done, desc=f"{method} attribution", unit="ex", leave=False)
    if checkpoint_every_s is None:
        checkpoint_every_s = float(os.environ.get("NEURONTRACE_CHECKPOINT_SECONDS", 60.0))
    last_save = time.monotonic()
    for start in range(state.done, len(mine), batch_size):
        chunk = mine[start : start + batch_size]
        metric_obj, forced = _metric_for(model, chunk, metric, metric_fn, topk, center_logits)
        clean, patch = _tokenize(model, chunk, metric_obj if forced else None)
        if metric_obj.kind == "topk" and metric_obj.answer is None:
            with torch.no_grad():
                last = model.forward(clean, logits_to_keep=1).logits[:, -1]
            metric_obj.answer = last.topk(topk, dim=-1).indices.cpu()
        out = attributor(clean, metric_obj, patch=patch, baseline=base)
        out.scores = restrict_scores(
            out.scores, layers=layers, suffix_length=suffix_length, blacklist=blacklist
        )
        if suffix_length is not None and out.embed_scores is not None and suffix_length < clean.width:
            out.embed_scores = out.embed_scores.clone()
            out.embed_scores[:, : clean.width - suffix_length] = 0
        mask = clean.attention_mask.to(out.scores.device)[:, None, :, None].to(out.scores.dtype)
        scores, acts = (out.scores * mask).float().cpu(), (out.acts * mask).float().cpu()
        state.tokens += [
            token_strings(model, clean.ids(row)) if model.tokenizer else [] for row in range(clean.size)
        ]
        state.add(scores, acts, clean, out)
        out = scores = acts = mask = None  # freed before the next batch's backward (as memory.py counts)
        if bar is not None:
            bar.update(len(chunk))
        if checkpoint is not None and time.monotonic() - last_save > checkpoint_every_s:
            state.save(Path(checkpoint), fingerprint, generator)
            last_save = time.monotonic()
    if bar is not None:
        bar.close()
    if checkpoint is not None and keep_checkpoint and state.done and not resumed_complete:
        state.save(
            Path(checkpoint), fingerprint, generator
        )  # complete: kept until the caller's save succeeds
    tokens = state.tokens[:64]
    if split:
        state = state.merged()
        tokens = _token_strings(model, examples[:64], metric, metric_fn, topk)
    result = state.result(
        meta={
            "schema_version": SCHEMA_VERSION,
            "neurontrace_version": __version__,
            "model": model.name,
            "family": model.adapter.family,
            **config,
            "paired": paired,
            "n_examples": len(examples),
            "width": width,
            "tokens": tokens,
            "prompts": [e.clean for e in examples[:64]],
            "sign": "m(patched) - m(clean)" if paired else "m(clean) - m(baseline)",
        }
    )
    if checkpoint is not None and not keep_checkpoint:
        Path(checkpoint).unlink(missing_ok=True)
    return result


def process_checkpoint(checkpoint: str | os.PathLike, *, split: bool = True) -> Path:
    """This process's checkpoint file: ``checkpoint`` itself, or ``.rank{r}-of-{n}`` beside it under torchrun."""
    rank, size = distributed.world()
    path = Path(checkpoint)
    return path.with_name(f"{path.name}.rank{rank}-of-{size}") if split and size > 1 else path


def remove_checkpoint(checkpoint: str | os.PathLike) -> None:
    """Remove this process's checkpoint of ``checkpoint`` (after the result of ``keep_checkpoint`` is saved)."""
    for path in {Path(checkpoint), process_checkpoint(checkpoint)}:
        path.unlink(missing_ok=True)


def _check_memory(model: NeuronModel, prompt_len: int, batch_size: int, paired: bool) -> None:
    """Stop before any compute when one batch will not fit (see :mod:`neurontrace.memory`)."""
    parts = memory.attribution_bytes(
        memory.Shape.of(model), prompt_len=prompt_len, batch_size=batch_size, paired=paired
    )
    memory.check_fits(memory.attribution_peak(parts), what=f"attribution of a batch of {batch_size} prompts of "
                      f"{prompt_len} tokens", lower="batch_size (--batch-size)", device=model.device)  # fmt: skip


class _State:
    """Running totals of a dataset run (also what a checkpoint stores).

    Position-summed scores are kept per example. Per-position sums are kept while every example has one token
    length (aligned at the prompt end); per-example per-position scores only if asked, or, by default, while
    they stay under ``AUTO_KEEP_ELEMENTS`` floats.
    """

    def __init__(self, keep: bool | None = None) -> None:
        self.keep = keep
        self.done = 0
        self.lengths: list[int] = []
        self.tokens: list[list[str]] = []
        self.t: dict[str, list[torch.Tensor]] = {}  # name -> per-batch tensors (concatenated on demand)
        self.pos_sum: torch.Tensor | None = None  # [L, T, d]
        self.pos_act_sum: torch.Tensor | None = None

    def _push(self, name: str, value: torch.Tensor | None) -> None:
        if value is not None:
            self.t.setdefault(name, []).append(value.detach().float().cpu())

    def get(self, name: str) -> torch.Tensor | None:
        parts = self.t.get(name)
        if not parts:
            return None
        if len(parts) > 1:
            self.t[name] = [torch.cat(parts)]
        return self.t[name][0]

    @property
    def one_length(self) -> bool:
        return len(set(self.lengths)) == 1

    def add(self, scores: torch.Tensor, acts: torch.Tensor, clean: Batch, out) -> None:
        self.done += scores.shape[0]
        self.lengths += clean.lengths.tolist()
        self._push("scores_sum", scores.sum(2))
        self._push("acts_sum", acts.sum(2))
        self._push("metric_clean", out.metric_clean)
        self._push("metric_patch", out.metric_patch)
        if not self.one_length:
            self.pos_sum = self.pos_act_sum = None
            self.t.pop("scores", None)
            self.t.pop("embed_scores", None)
            return
        n = self.lengths[0]
        part, part_acts = scores[..., -n:, :], acts[..., -n:, :]
        self.pos_sum = part.sum(0) if self.pos_sum is None else self.pos_sum + part.sum(0)
        self.pos_act_sum = (
            part_acts.sum(0) if self.pos_act_sum is None else self.pos_act_sum + part_acts.sum(0)
        )
        if self.keep or (self.keep is None and self.done * part[0].numel() <= AUTO_KEEP_ELEMENTS):
            self._push("scores", part)
        else:
            self.t.pop("scores", None)
            self.keep = False
        if out.embed_scores is not None:
            self._push("embed_scores", out.embed_scores[:, -n:])

    def result(self, *, meta: dict) -> AttributionResult:
        one = self.one_length
        return AttributionResult(
            scores_sum=self.get("scores_sum"),
            acts_sum_mean=self.get("acts_sum").mean(0),
            metric_clean=self.get("metric_clean"),
            meta=meta,
            scores=self.get("scores") if one else None,
            mean_scores=self.pos_sum / self.done if one else None,
            acts_mean=self.pos_act_sum / self.done if one else None,
            metric_patch=self.get("metric_patch"),
            extra={"embed_scores": self.get("embed_scores")}
            if one and self.get("embed_scores") is not None
            else {},
        )

    def merged(self) -> _State:
        """The state of the whole run from every process's share (in rank order), identical on every process.

        Per-example tensors are gathered; per-position sums are kept only if every example of every share has
        one length, and per-example scores only under the limit for the whole run, as in one process.
        """
        names = ("scores_sum", "acts_sum", "metric_clean", "metric_patch", "scores", "embed_scores")
        lengths = distributed.gather_rows(torch.tensor(self.lengths, dtype=torch.long))
        local = [self.get(name) is not None for name in names] + [self.pos_sum is not None]
        have = distributed.gather_rows(torch.tensor([local], dtype=torch.long)).min(0).values.tolist()
        out = _State(self.keep)
        out.done, out.lengths = int(lengths.numel()), lengths.tolist()
        one = out.one_length
        for name, present in zip(names, have, strict=False):
            if not present or (name in ("scores", "embed_scores") and not one):
                continue
            if name == "scores" and not (
                self.keep
                or (self.keep is None and out.done * self.get(name)[0].numel() <= AUTO_KEEP_ELEMENTS)
            ):
                out.keep = False
                continue
            out.t[name] = [distributed.gather_rows(self.get(name))]
        if one and have[-1]:
            # Gathered, then summed in rank order (not all-reduced): the mean scores then agree bit for bit on
            # every process, so circuits selected from them by a threshold agree too.
            out.pos_sum = distributed.gather_rows(self.pos_sum[None]).sum(0)
            out.pos_act_sum = distributed.gather_rows(self.pos_act_sum[None]).sum(0)
        return out

    # ---------------------------------------------------------- checkpoints
    def save(self, path: Path, fingerprint: str, generator: torch.Generator | None = None) -> None:
        """Write the state with its counts and a SHA-256 of everything in it (checked by :meth:`load`)."""
        from safetensors.torch import save

        from neurontrace.io import write_bytes_atomic

        tensors = {name: self.get(name) for name in self.t if self.get(name) is not None}
        if self.pos_sum is not None:
            tensors["pos_sum"], tensors["pos_act_sum"] = self.pos_sum, self.pos_act_sum
        if generator is not None:  # the random control's draws continue where they stopped
            tensors["generator_state"] = generator.get_state()
        meta = {
            "fingerprint": fingerprint,
            "done": self.done,
            "lengths": self.lengths,
            "tokens": self.tokens,
            "keep": self.keep,
            "rows": {name: int(t.shape[0]) for name, t in tensors.items() if name in _PER_EXAMPLE},
        }
        meta["checksum"] = _checksum(tensors, meta)
        write_bytes_atomic(path, save(tensors, metadata={"neurontrace-checkpoint": json.dumps(meta)}))

    @classmethod
    def load(
        cls,
        path: Path,
        fingerprint: str,
        keep: bool | None,
        *,
        total: int,
        generator: torch.Generator | None = None,
    ) -> _State | None:
        """The state saved at ``path`` if it belongs to this very run and is intact, else None (said on stderr).

        Intact: its SHA-256 matches, and its counts agree with each other and with the ``total`` examples.
        """
        if not path.is_file():
            return None
        from safetensors import safe_open

        def start_over(why: str) -> None:
            print(f"[neurontrace] checkpoint {path} {why}; starting the run over", file=sys.stderr)

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["neurontrace-checkpoint"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        except Exception:
            start_over("cannot be read (damaged or not a checkpoint)")
            return None
        if meta.get("fingerprint") != fingerprint:
            start_over("belongs to another run (other inputs or settings)")
            return None
        claimed = meta.pop("checksum", None)
        if claimed != _checksum(tensors, meta):
            start_over("is damaged (its checksum does not match its contents)")
            return None
        done = meta["done"]
        counts = [len(meta["lengths"]), len(meta["tokens"]), *(int(t.shape[0]) for n, t in tensors.items()
                  if n in _PER_EXAMPLE)]  # fmt: skip
        if (
            not 0 < done <= total
            or any(c != done for c in counts)
            or meta.get("rows", {}) != {n: int(t.shape[0]) for n, t in tensors.items() if n in _PER_EXAMPLE}
        ):
            start_over(f"is inconsistent ({done} examples done of {total}, counts {sorted(set(counts))})")
            return None
        state = cls(keep if keep is not None else meta.get("keep"))
        state.done, state.lengths, state.tokens = done, meta["lengths"], meta["tokens"]
        state.pos_sum, state.pos_act_sum = tensors.pop("pos_sum", None), tensors.pop("pos_act_sum", None)
        generator_state = tensors.pop("generator_state", None)
        if generator is not None and generator_state is not None:
            generator.set_state(generator_state)
        state.t = {name: [value] for name, value in tensors.items()}
        return state


_PER_EXAMPLE = ("scores_sum", "acts_sum", "metric_clean", "metric_patch", "scores", "embed_scores")


def _checksum(tensors: dict[str, torch.Tensor], meta: dict) -> str:
    """SHA-256 of a checkpoint's tensors (names, shapes, dtypes, bytes) and of its metadata."""
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name]
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        if t.numel():
            digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def verify_top(
    model: NeuronModel,
    result: AttributionResult,
    *,
    k: int = 10,
    prompt: str,
    answer: str | None = None,
    contrast: str | None = None,
    counterfactual: str | None = None,
    metric: str | None = None,
    baseline: torch.Tensor | None = None,
) -> list[float]:
    """Exact activation patching of a one-prompt result's top ``k`` (per-position) nodes, in ``top`` order.

    Each value is on the result's scale: ``m(patched) - m(clean)`` for a counterfactual, else
    ``m(clean) - m(node set to the baseline)``.
    """
    from neurontrace.attribution.engine import patch_effects

    if result.n_examples != 1 or result.mean_scores is None:
        raise NeurontraceError("verification patches the nodes of a single-prompt result")
    examples = [Example(prompt, counterfactual, answer, contrast)]
    kind = metric or result.meta["metric"]
    metric_obj, forced = _metric_for(model, examples, kind, None, 5, bool(result.meta.get("center_logits")))
    clean, patch = _tokenize(model, examples, metric_obj if forced else None)
    layers, site = result.layers, result.meta["site"]
    if metric_obj.kind == "topk":
        with torch.no_grad():
            metric_obj.answer = model.forward(clean, logits_to_keep=1).logits[:, -1].topk(5).indices.cpu()
    acts = run_sites(model, clean, metric_obj, site=site, layers=layers, grad=False)
    m_clean = acts.metric[0]
    if patch is not None:
        run = run_sites(model, patch, metric_obj, site=site, layers=layers, grad=False)
        values = torch.stack([run.acts[layer].to(model.device) for layer in layers], dim=1)
    else:
        shape = torch.stack([acts.acts[layer].to(model.device) for layer in layers], dim=1)
        values = torch.zeros_like(shape) if baseline is None else baseline[None, :, None, :].expand_as(shape)
    nodes = result.top(k, per_position=True)
    sets = [[(layers.index(n.layer), n.position, n.neuron)] for n in nodes]
    with torch.no_grad():
        patched = patch_effects(
            model, clean, metric_obj, site=site, layers=layers, node_sets=sets, values=values
        )[:, 0]
    change = patched - m_clean
    return [float(c) if patch is not None else float(-c) for c in change]

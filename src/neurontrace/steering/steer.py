"""Steering: scale, set, add to or patch chosen neurons and report how the prediction and generated text change.

>>> result = steer(model, prompt="The keys to the cabinet", neurons=parse_neurons("L24/N6"), mode="scale",
...                value=0.0, answers=[" are", " is"], generate=20)

Built on :func:`neurontrace.interventions.intervene`. A neuron id's ``@pos`` pins the edit to one prompt
position; without it the edit applies at every position, generated tokens included.

**Positions during generation.** With a key/value cache each generation step feeds only the newest token.
``intervene`` follows the columns across steps, and ``intervene`` reads negative positions relative to the end
of the sequence *in each forward pass* (so there ``-1`` would be "the newest token" at every step, and ``-2``
a token whose activations are already cached, i.e. never edited after the prefill). Steering instead fixes a
pinned position to one *prompt token*: ``steer`` converts negative positions to absolute prompt positions
before it calls ``intervene`` (``@-1`` is the prompt's last token). A pinned edit therefore acts in the prefill
only (the generated tokens then attend to the edited prompt token), and an unpinned edit acts on every token,
prompt and generated. Greedy decoding with the cache gives the same tokens as re-running the full sequence
with the same edits at every step.

**Polarity.** The sign of a neuron id (``L5/N3-``) names which feature of the neuron the user means; steering
acts on the raw activation whatever its sign: ``scale 2`` doubles it (a negative activation gets more negative),
``set``/``add`` values are raw activation values (to push ``L5/N3-`` further negative, add a negative value).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Literal

import torch

from neurontrace.errors import InterventionError, NeurontraceError, check_finite
from neurontrace.inspection import TokenProb
from neurontrace.interventions import Edit, intervene
from neurontrace.io import JsonResult, write_bytes_atomic
from neurontrace.models.model import NeuronModel
from neurontrace.neurons import NeuronId, check_neuron
from neurontrace.sites import capture, site_layers, site_width
from neurontrace.tokens import Batch, pad_id_of, single_token_id, token_strings

SCHEMA_VERSION = 1
Mode = Literal["scale", "set", "add", "patch"]
MODES: tuple[str, ...] = ("scale", "set", "add", "patch")


@dataclass
class AnswerChange:
    """How the probability and logit of one answer token change under the steering."""

    answer: str
    token_id: int
    prob_before: float
    prob_after: float
    prob_change: float
    logit_before: float
    logit_after: float
    logit_change: float


@dataclass
class SteerResult(JsonResult):
    """Next-token distribution before and after steering, answer changes, KL and (optionally) generated text."""

    model: str
    prompt: str
    tokens: list[str]
    neurons: list[str]
    mode: str
    value: float | None  # None for patch (the values come from ``from_prompt``)
    from_prompt: str | None
    top_before: list[TokenProb]
    top_after: list[TokenProb]
    answers: list[AnswerChange]
    kl_divergence: float  # KL(before || after) of the next-token distribution, in nats
    generated_before: str | None = None
    generated_after: str | None = None
    generated_ids_before: list[int] | None = None
    generated_ids_after: list[int] | None = None
    schema_version: int = field(default=SCHEMA_VERSION)


@dataclass
class SweepResult(JsonResult):
    """Answer probabilities for each steering value (e.g. multipliers 0, 0.5, 1, 2, 4)."""

    model: str
    prompt: str
    neurons: list[str]
    mode: str
    values: list[float]
    answers: list[str]
    answer_ids: list[int]
    probs: list[list[float]]  # [value][answer]
    logits: list[list[float]]  # [value][answer]
    baseline_probs: list[float]  # [answer], unsteered
    top_tokens: list[str]  # the most likely next token at each value
    schema_version: int = field(default=SCHEMA_VERSION)

    def plot(self, path: str | Path, *, title: str | None = None) -> Path:
        """Write a PNG line plot of each answer's probability against the steering value (atomically)."""
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError:
            raise NeurontraceError(
                "plotting needs matplotlib; install it with: pip install matplotlib"
            ) from None
        order = sorted(range(len(self.values)), key=lambda i: self.values[i])
        xs = [self.values[i] for i in order]
        fig = Figure(figsize=(6.4, 4.0), dpi=120)
        FigureCanvasAgg(fig)  # Agg canvas without touching pyplot's global backend
        ax = fig.add_subplot()
        for j, answer in enumerate(self.answers):
            (line,) = ax.plot(xs, [self.probs[i][j] for i in order], marker="o", label=repr(answer))
            ax.axhline(self.baseline_probs[j], color=line.get_color(), linestyle=":", linewidth=1)
        what = {"scale": "multiplier", "set": "value set", "add": "value added"}.get(self.mode, self.mode)
        ax.set_xlabel(f"{what} ({self.mode})")
        ax.set_ylabel("next-token probability")
        ax.set_ylim(bottom=0)
        ax.set_title(title or f"{', '.join(self.neurons)} on {self.prompt!r}", fontsize=9)
        ax.legend(title="answer (dotted: unsteered)", fontsize=8, title_fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        buf = BytesIO()
        fig.savefig(buf, format="png")
        return write_bytes_atomic(path, buf.getvalue())


# ----------------------------------------------------------------------------------------------- edits
def check_neurons(model: NeuronModel, neurons: Sequence[NeuronId], site: str = "neurons") -> list[NeuronId]:
    """The neurons as a list, or a clear error if none is given or one does not exist in ``model``.

    On another site (``mlp_out``, ``sae:DIR``...) ``L5/N3`` names unit 3 of layer 5's site (a dictionary's
    latent 3)."""
    neurons = list(neurons)
    if not neurons:
        raise NeurontraceError("no neurons given; name them as L<layer>/N<index>, e.g. L5/N123")
    if site == "neurons":
        for n in neurons:
            check_neuron(model, n)
        return neurons
    layers, width = site_layers(model, site), site_width(model, site)
    for n in neurons:
        if n.layer not in layers or not 0 <= n.index < width:
            raise NeurontraceError(
                f"{n} does not exist at site {site}: it has layers {layers[0]}..{layers[-1]} and {width} units"
            )
    return neurons


def _absolute(neuron: NeuronId, length: int, what: str) -> int:
    """The pinned position of ``neuron`` as an absolute position in a prompt of ``length`` tokens."""
    p = neuron.position
    if not -length <= p < length:
        raise InterventionError(
            f"position {p} of {neuron} is outside the {what}, which has {length} tokens; "
            f"use a position in {-length}..{length - 1}"
        )
    return p % length


def check_mode(mode: str, value: float | None, *, has_source: bool) -> None:
    """Validate a steering mode with its value and whether a source prompt (``from_prompt``) is given."""
    if mode not in MODES:
        raise NeurontraceError(f"unknown steering mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "patch" and not has_source:
        raise NeurontraceError("mode 'patch' takes the neurons' values from another prompt; give from_prompt")
    if mode != "patch" and has_source:
        raise NeurontraceError(
            f"from_prompt is only used by mode 'patch', not {mode!r}; drop it or use patch"
        )
    if mode != "patch" and (value is None or not math.isfinite(float(value))):
        raise NeurontraceError(f"mode {mode!r} needs a finite number as value, got {value!r}")


def steering_edits(
    model: NeuronModel,
    neurons: Sequence[NeuronId],
    *,
    prompt_length: int,
    mode: Mode,
    value: float = 0.0,
    source: Batch | None = None,
    extra_columns: int = 0,
    site: str = "neurons",
) -> list[Edit]:
    """The :class:`Edit` list that steers ``neurons`` on a prompt of ``prompt_length`` tokens.

    Pinned positions become absolute prompt positions (see the module docstring). For ``patch``, ``source`` is
    the tokenised ``from_prompt`` (one row, no padding): a pinned neuron is set to its source value at the same
    prompt-relative position of the source (``@-1``: the source's last token), so the two prompts may differ in
    length; an unpinned neuron is patched at every prompt position from the same position of the source, which
    needs equal lengths. ``extra_columns`` (the number of tokens to be generated) pads the patch values so that
    generation steps run; generated tokens are not patched (the source has no values there).
    """
    check_mode(mode, value, has_source=source is not None)
    neurons = check_neurons(model, neurons, site)
    src_acts = None
    if mode == "patch":
        src_len = int(source.lengths[0])
        unpinned = [n for n in neurons if n.position is None]
        if unpinned and src_len != prompt_length:
            raise NeurontraceError(
                f"patching {unpinned[0]} at every position needs prompts of equal token length (prompt: "
                f"{prompt_length} tokens, from_prompt: {src_len}); pin positions with @pos (e.g. "
                f"{NeuronId(unpinned[0].layer, unpinned[0].index)}@-1) to patch across lengths"
            )
        layers = sorted({n.layer for n in neurons})
        src_acts = capture(model, source, sites=site, layers=layers, keep_logits=False)

    groups: dict[tuple[int, int | None], list[int]] = {}
    sources: dict[tuple[int, int | None], list[float]] = {}
    for n in neurons:
        pos = None if n.position is None else _absolute(n, prompt_length, "prompt")
        key = (n.layer, pos)
        if n.index in groups.setdefault(key, []):
            continue  # the same neuron twice (e.g. with both polarities) is edited once
        groups[key].append(n.index)
        if src_acts is not None and pos is not None:
            src_pos = _absolute(n, src_len, "from_prompt")
            src_col = source.column(0, src_pos)
            sources.setdefault(key, []).append(float(src_acts.get(n.layer, site)[0, src_col, n.index]))

    edits = []
    for (layer, pos), indices in groups.items():
        positions = None if pos is None else [pos]
        if mode != "patch":
            edits.append(
                Edit(
                    layer=layer, neurons=indices, positions=positions, op=mode, value=float(value), site=site
                )
            )
        elif pos is not None:
            edits.append(
                Edit(
                    layer=layer,
                    neurons=indices,
                    positions=positions,
                    op="set",
                    value=torch.tensor(sources[(layer, pos)]),
                    site=site,
                )
            )
        else:
            acts = source.unpad(src_acts.get(layer, site), 0)[None]  # [1, T, width]
            if extra_columns:
                acts = torch.cat([acts, acts.new_zeros(1, extra_columns, acts.shape[-1])], dim=1)
            edits.append(
                Edit(
                    layer=layer,
                    neurons=indices,
                    positions=list(range(prompt_length)),
                    op="patch",
                    value=acts,
                    site=site,
                )
            )
    return edits


# ------------------------------------------------------------------------------------------- generation
def greedy_generate(
    model: NeuronModel, batch: Batch, *, max_new_tokens: int, edits: Sequence[Edit] = ()
) -> list[list[int]]:
    """Greedy continuation ids of each prompt (up to and including an end-of-sequence token), with ``edits``
    applied in every forward pass of ``model.hf.generate`` (which uses the key/value cache)."""
    if max_new_tokens < 1:
        raise NeurontraceError("the number of tokens to generate must be at least 1")
    batch = batch.to(model.device)
    pad = pad_id_of(model.tokenizer) if model.tokenizer is not None else 0
    eos = model.hf.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    with intervene(model, list(edits)), torch.no_grad():
        out = model.hf.generate(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
        )
    rows = []
    for ids in out[:, batch.width :].tolist():
        stop = next((i + 1 for i, t in enumerate(ids) if t in eos), len(ids))
        rows.append(ids[:stop])
    return rows


def _decode(model: NeuronModel, ids: list[int]) -> str:
    if model.tokenizer is None:
        return " ".join(f"<{i}>" for i in ids)
    return model.tokenizer.decode(ids, skip_special_tokens=True)


# --------------------------------------------------------------------------------------------- steering
def top_tokens(model: NeuronModel, logits: torch.Tensor, k: int) -> list[TokenProb]:
    """The ``k`` most likely tokens of one logit vector, with probability and logit."""
    probs = logits.float().softmax(-1)
    values, ids = probs.topk(min(k, probs.numel()))
    strings = token_strings(model, ids.tolist()) if model.tokenizer is not None else [f"<{i}>" for i in ids]
    return [
        TokenProb(int(i), s, float(p), float(logits[i]))
        for i, s, p in zip(ids.tolist(), strings, values.tolist(), strict=True)
    ]


def kl_divergence(before: torch.Tensor, after: torch.Tensor) -> float:
    """KL(before || after) of two next-token logit vectors, in nats."""
    lp, lq = before.float().log_softmax(-1), after.float().log_softmax(-1)
    return float((lp.exp() * (lp - lq)).sum())


def _answer_ids(model: NeuronModel, answers: Sequence[str]) -> list[int]:
    return [single_token_id(model, a) for a in answers]


def steer(
    model: NeuronModel,
    *,
    prompt: str,
    neurons: Sequence[NeuronId],
    mode: Mode = "scale",
    value: float = 0.0,
    from_prompt: str | None = None,
    answers: Sequence[str] = (),
    top: int = 10,
    generate: int = 0,
    site: str = "neurons",
) -> SteerResult:
    """Steer ``neurons`` on ``prompt`` and report the next-token distribution before and after.

    Modes: ``scale`` (multiply by ``value``; 0 is ablation, 1 changes nothing), ``set`` (to ``value``), ``add``
    (``value``) and ``patch`` (the activations the neurons have on ``from_prompt``; ``value`` is unused): with
    unpinned neurons the prompts need equal token length; when every neuron has a pinned ``@pos`` the source
    value is read at the same prompt-relative position of ``from_prompt`` (``@-1``: its last token), so the
    lengths may differ. ``answers`` are single tokens whose probability and logit change is reported. With
    ``generate > 0`` also the greedy continuation of that many tokens, unsteered and steered. Positions and
    polarity: see the module docstring. ``site`` steers units of another basis (e.g. a dictionary's latents,
    ``sae:DIR``) instead of neurons.
    """
    check_mode(mode, value, has_source=from_prompt is not None)
    neurons = check_neurons(model, neurons, site)
    if top < 1:
        raise NeurontraceError("top must be at least 1")
    if generate < 0:
        raise NeurontraceError("generate must be 0 (no generation) or a positive number of tokens")
    answers = [answers] if isinstance(answers, str) else list(answers)
    answer_ids = _answer_ids(model, answers)
    batch = model.tokenize(prompt)
    source = model.tokenize(from_prompt) if mode == "patch" else None
    edits = steering_edits(
        model,
        neurons,
        prompt_length=batch.width,
        mode=mode,
        value=value,
        source=source,
        extra_columns=generate,
        site=site,
    )
    before = model.logits(batch)[0, -1]
    check_finite(before, "next-token logits")
    with intervene(model, edits):
        after = model.logits(batch)[0, -1]
    check_finite(after, "next-token logits after steering")
    lp_before, lp_after = before.float().log_softmax(-1), after.float().log_softmax(-1)
    changes = []
    for answer, i in zip(answers, answer_ids, strict=True):
        pb, pa = float(lp_before[i].exp()), float(lp_after[i].exp())
        lb, la = float(before[i]), float(after[i])
        changes.append(AnswerChange(answer, i, pb, pa, pa - pb, lb, la, la - lb))
    result = SteerResult(
        model=model.name,
        prompt=prompt,
        tokens=token_strings(model, batch.ids(0)),
        neurons=[str(n) for n in neurons],
        mode=mode,
        value=None if mode == "patch" else float(value),
        from_prompt=from_prompt,
        top_before=top_tokens(model, before, top),
        top_after=top_tokens(model, after, top),
        answers=changes,
        kl_divergence=kl_divergence(before, after),
    )
    if generate:
        ids_before = greedy_generate(model, batch, max_new_tokens=generate)[0]
        ids_after = greedy_generate(model, batch, max_new_tokens=generate, edits=edits)[0]
        result.generated_ids_before, result.generated_ids_after = ids_before, ids_after
        result.generated_before, result.generated_after = (
            _decode(model, ids_before),
            _decode(model, ids_after),
        )
    return result


def sweep(
    model: NeuronModel,
    *,
    prompt: str,
    neurons: Sequence[NeuronId],
    values: Sequence[float],
    mode: Mode = "scale",
    answers: Sequence[str] = (),
    site: str = "neurons",
) -> SweepResult:
    """Answer probabilities for each steering ``value`` (one forward each); see :meth:`SweepResult.plot`.

    Without ``answers``, the three most likely unsteered next tokens are followed. ``patch`` has no value to
    sweep.
    """
    if mode == "patch":
        raise NeurontraceError("a sweep varies a value; use mode scale, set or add (patch has no value)")
    values = [float(v) for v in values]
    if not values:
        raise NeurontraceError("no sweep values given; pass e.g. values=[0, 0.5, 1, 2, 4]")
    for v in values:
        check_mode(mode, v, has_source=False)
    neurons = check_neurons(model, neurons, site)
    batch = model.tokenize(prompt)
    before = model.logits(batch)[0, -1]
    check_finite(before, "next-token logits")
    answers = [answers] if isinstance(answers, str) else list(answers)
    if answers:
        answer_ids = _answer_ids(model, answers)
    else:
        answer_ids = before.topk(3).indices.tolist()
        answers = token_strings(model, answer_ids)
    probs, logits, tops = [], [], []
    for v in values:
        edits = steering_edits(model, neurons, prompt_length=batch.width, mode=mode, value=v, site=site)
        with intervene(model, edits):
            after = model.logits(batch)[0, -1]
        check_finite(after, f"next-token logits at value {v}")
        p = after.float().softmax(-1)
        probs.append([float(p[i]) for i in answer_ids])
        logits.append([float(after[i]) for i in answer_ids])
        tops.append(token_strings(model, [int(after.argmax())])[0])
    base = before.float().softmax(-1)
    return SweepResult(
        model=model.name,
        prompt=prompt,
        neurons=[str(n) for n in neurons],
        mode=mode,
        values=values,
        answers=answers,
        answer_ids=answer_ids,
        probs=probs,
        logits=logits,
        baseline_probs=[float(base[i]) for i in answer_ids],
        top_tokens=tops,
    )

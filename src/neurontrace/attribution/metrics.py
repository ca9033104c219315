"""Scalar metrics of a forward pass, one value per example (METHOD.md section 3).

A metric maps ``logits [B, T', V]`` (``T'`` = the positions kept, the last ``keep`` of the batch) to ``[B]``.
Gradients of ``metric.sum()`` give every example its own gradient, since examples do not interact.

Centred logits (``center=True``, the reference code's ``center_logits``): each logit read by ``logit`` or ``topk``
is taken minus the mean logit over the vocabulary at its position, so a node that raises every logit alike
scores 0. The mean is linear in the final residual stream, so RelP still conserves. It changes nothing for
``logit-diff`` (the means cancel), ``logprob`` and ``prob`` (softmax ignores a shift), which therefore refuse it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from neurontrace.errors import NeurontraceError

METRICS: tuple[str, ...] = ("logit-diff", "logit", "logprob", "prob", "topk")
CENTRED: tuple[str, ...] = ("logit", "topk")
"""The metrics that centred logits change (see the module docstring)."""


@dataclass
class Metric:
    """A metric of the next-token logits at the last position (or of teacher-forced answer tokens).

    Attributes:
        kind: one of ``METRICS`` or ``"custom"`` / ``"teacher-forced"``.
        answer: ``[B]`` answer token ids (``[B, n]`` padded with -1 for teacher-forced answers).
        contrast: ``[B]`` contrast token ids for ``logit-diff``.
        k: how many top logits ``topk`` sums (their ids are fixed from the clean run: ``answer`` ``[B, k]``).
        fn: a user callable ``fn(logits, batch_rows) -> [B]`` for ``custom``.
        center: read logits minus their mean over the vocabulary (``logit`` and ``topk`` only).
    """

    kind: str
    answer: torch.Tensor | None = None
    contrast: torch.Tensor | None = None
    k: int = 0
    fn: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, repr=False)
    center: bool = False

    @property
    def keep(self) -> int:
        """How many final positions of logits the metric reads (lets the model skip the rest of the unembedding)."""
        if self.kind == "teacher-forced":
            return int(self.answer.shape[1])
        return 0 if self.kind == "custom" else 1

    def select(self, rows: torch.Tensor | slice) -> Metric:
        """The same metric restricted to some batch rows (or repeated rows)."""
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        return Metric(self.kind, pick(self.answer), pick(self.contrast), self.k, self.fn, self.center)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.kind == "custom":
            value = self.fn(logits)
        elif self.kind == "teacher-forced":
            value = _teacher_forced(logits, self.answer.to(logits.device))
        else:
            last = logits[:, -1].to(torch.promote_types(logits.dtype, torch.float32))
            if self.center:
                last = centred(last)
            rows = torch.arange(last.shape[0], device=last.device)
            answer = None if self.answer is None else self.answer.to(last.device)
            if self.kind == "logit-diff":
                value = last[rows, answer] - last[rows, self.contrast.to(last.device)]
            elif self.kind == "logit":
                value = last[rows, answer]
            elif self.kind == "logprob":
                value = last.log_softmax(-1)[rows, answer]
            elif self.kind == "prob":
                value = last.softmax(-1)[rows, answer]
            elif self.kind == "topk":
                value = last.gather(1, answer).sum(-1)
            else:  # pragma: no cover - guarded by make_metric
                raise NeurontraceError(f"unknown metric {self.kind!r}")
        if value.dim() != 1 or value.shape[0] != logits.shape[0]:
            raise NeurontraceError(
                f"a metric must give one value per example, got shape {tuple(value.shape)}"
            )
        if not torch.isfinite(value).all():
            bad = int((~torch.isfinite(value)).nonzero()[0])
            raise NeurontraceError(
                f"the metric is {float(value[bad].detach())} for example {bad}; check the model and inputs"
            )
        return value


def centred(logits: torch.Tensor) -> torch.Tensor:
    """``logits`` minus their mean over the vocabulary (the last dimension)."""
    return logits - logits.mean(-1, keepdim=True)


def _teacher_forced(logits: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """Sum of log-probs of answer tokens; ``logits[:, -n + j]`` predicts answer token ``j + 1`` (j < n)."""
    n = answer.shape[1]
    logp = (
        logits[:, -n:].to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)
    )  # position -n predicts answer token 0 ... -1 predicts n-1
    valid = answer >= 0
    picked = logp.gather(-1, answer.clamp(min=0)[..., None])[..., 0]
    return (picked * valid).sum(-1)


def make_metric(
    kind: str,
    *,
    answer: Sequence[int] | torch.Tensor | None = None,
    contrast: Sequence[int] | torch.Tensor | None = None,
    k: int = 5,
    fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    center: bool = False,
) -> Metric:
    """Build a metric by name; checks it has what it needs. ``center``: centred logits (``logit``, ``topk``)."""
    if center:
        check_centred(kind if fn is None else "custom")
    if fn is not None or kind == "custom":
        if fn is None:
            raise NeurontraceError("a custom metric needs a callable fn(logits) -> [batch]")
        return Metric("custom", fn=fn)
    if kind not in METRICS:
        raise NeurontraceError(
            f"unknown metric {kind!r}; choose one of {', '.join(METRICS)}, or pass a callable"
        )
    as_tensor = lambda x: None if x is None else torch.as_tensor(x, dtype=torch.long)  # noqa: E731
    answer, contrast = as_tensor(answer), as_tensor(contrast)
    if kind != "topk" and answer is None:
        raise NeurontraceError(f"the {kind} metric needs an answer token")
    if kind == "logit-diff" and contrast is None:
        raise NeurontraceError("the logit-diff metric needs a contrast answer (or use --metric logit)")
    return Metric(kind, answer, contrast, k, center=center)


def check_centred(kind: str) -> None:
    """Centred logits with a metric they do not change (or a custom one) are an error, not a silent no-op."""
    if kind in CENTRED:
        return
    why = {
        "logit-diff": "the two logits' means cancel in their difference",
        "logprob": "softmax ignores a shift of every logit",
        "prob": "softmax ignores a shift of every logit",
        "teacher-forced": "softmax ignores a shift of every logit",
        "custom": "a metric function gets the raw logits (centre them in the function)",
    }.get(kind, "it reads no logits")
    raise NeurontraceError(
        f"centred logits do not change the {kind} metric ({why}); use them with the logit or topk metric"
    )

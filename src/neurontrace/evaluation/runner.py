"""An evaluation run: attribute on the train split, sweep circuits on the test split, for several methods and
bases, writing every piece to a results folder as it is finished so that an interrupted run resumes.

Folder layout (``out/``): ``config.json`` (the run's settings), ``attributions/{method}-{basis}.safetensors``
(train-split attribution results; ``.partial`` checkpoints while running), ``curves/{method}-{basis}.json``,
then ``curves.json`` (all curves), ``faithfulness.png`` and ``report.md`` (see :mod:`.report`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neurontrace import distributed
from neurontrace.attribution.api import attribute
from neurontrace.attribution.engine import METHODS
from neurontrace.attribution.result import AttributionResult
from neurontrace.errors import NeurontraceError
from neurontrace.evaluation.faithfulness import (
    ABLATIONS,
    Curve,
    EvalSet,
    default_thresholds,
    prepare_eval,
    sweep,
)
from neurontrace.io import write_text_atomic
from neurontrace.models.model import NeuronModel

BASES: dict[str, str] = {"neurons": "neurons", "mlp-out": "mlp_out", "resid": "resid", "attn-out": "attn_out"}


@dataclass
class EvaluationRun:
    """Settings of a run (what ``config.json`` holds)."""

    model: str
    data: str
    methods: list[str]
    bases: list[str]
    ablation: str = "mean"
    nodes: str = "per-position"  # or "summed" (a unit at every position)
    n_train: int = 0
    n_test: int = 0
    steps: int = 16
    points: int = 30  # thresholds in the logspace sweep (plus 0)
    batch_size: int = 16
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        for m in self.methods:
            if m not in METHODS:
                raise NeurontraceError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
        for b in self.bases:
            if b not in BASES:
                raise NeurontraceError(f"unknown basis {b!r}; choose from {', '.join(BASES)}")
        if self.ablation not in ABLATIONS:
            raise NeurontraceError(f"unknown ablation {self.ablation!r}; choose from {', '.join(ABLATIONS)}")
        if self.nodes not in ("per-position", "summed"):
            raise NeurontraceError("nodes must be per-position or summed")
        if not self.methods or not self.bases:
            raise NeurontraceError("give at least one method and one basis")

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def run_evaluation(
    model: NeuronModel,
    run: EvaluationRun,
    *,
    train: Sequence[Any],
    test: Sequence[Any],
    out: str | Path,
    progress: bool = True,
    log=print,
) -> list[Curve]:
    """Attribute with every method on ``train`` and sweep circuits on ``test`` for every basis; resumable.

    Launched distributed, every process computes its share of each attribution and sweep (and gets every
    curve); only the main process logs and writes files.
    """
    run.validate()
    if not train or not test:
        raise NeurontraceError("the train and test sets must both be non-empty")
    out = Path(out)
    (out / "attributions").mkdir(parents=True, exist_ok=True)
    (out / "curves").mkdir(exist_ok=True)
    config_path = out / "config.json"
    config = run.to_dict()
    if config_path.is_file():
        previous = json.loads(config_path.read_text())
        if previous != config:
            raise NeurontraceError(
                f"{out} holds the results of a different run; choose another --out, or pass --fresh to replace it"
            )
    main = distributed.is_main()
    if not main:
        log = lambda message: None  # noqa: E731
    distributed.barrier()  # every process has read the old config before the main one writes it
    if main:
        write_text_atomic(config_path, json.dumps(config, indent=2))
    evalsets: dict[str, EvalSet] = {}
    curves: list[Curve] = []
    for basis in run.bases:
        site = BASES[basis]
        for method in run.methods:
            key = f"{method}-{basis}"
            curve_path = out / "curves" / f"{key}.json"
            if curve_path.is_file():
                curves.append(Curve.from_dict(json.loads(curve_path.read_text())))
                log(f"  {key}: done already (resumed)")
                continue
            start = time.perf_counter()
            result_path = out / "attributions" / f"{key}.safetensors"
            if result_path.is_file():
                result = AttributionResult.load(result_path)
            else:
                result = attribute(
                    model,
                    pairs=train,
                    method=method,
                    site=site,
                    steps=run.steps,
                    batch_size=run.batch_size,
                    seed=run.seed,
                    progress=progress,
                    checkpoint=result_path.with_name(result_path.name + ".partial"),
                    checkpoint_every_s=30.0,
                )
                if main:
                    result.save(result_path)
            t_attr = time.perf_counter() - start
            scores = result.mean_scores if run.nodes == "per-position" else result.position_free
            if scores is None:
                raise NeurontraceError(
                    "per-position nodes need train prompts of one token length; use --nodes summed"
                )
            if site not in evalsets:
                evalsets[site] = prepare_eval(
                    model,
                    test,
                    site=site,
                    ablation=run.ablation,
                    batch_size=run.batch_size * 4,
                    seed=run.seed,
                )
            forwards = evalsets[site].forwards
            start = time.perf_counter()
            thresholds = default_thresholds(scores, run.points)
            curve = sweep(
                evalsets[site], scores, method=method, thresholds=thresholds, seed=run.seed, progress=progress
            )
            curve.meta = {
                "attribution_seconds": t_attr,
                "sweep_seconds": time.perf_counter() - start,
                "sweep_forwards": evalsets[site].forwards - forwards,
                "test_batches": len(evalsets[site].batches),
                "nodes": run.nodes,
            }
            if main:
                write_text_atomic(curve_path, curve.to_json())
            reach = curve.nodes_to_reach(0.8)
            log(
                f"  {key}: attribution {t_attr:.1f} s, sweep {curve.meta['sweep_seconds']:.1f} s; "
                + (
                    f"faithfulness 0.8 at {reach.n_nodes} nodes"
                    if reach
                    else "faithfulness never reaches 0.8"
                )
            )
            curves.append(curve)
    if main:
        write_text_atomic(out / "curves.json", json.dumps([c.to_dict() for c in curves], indent=2))
    return curves

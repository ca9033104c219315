"""An evaluation run: attribute on the train split, sweep circuits on the test split, for several methods and
bases, writing every piece to a results folder as it is finished so that an interrupted run resumes.

Several seeds give several train/test splits (and random-control draws); every number of the report then has
a 95% interval over seeds and test examples (:mod:`.intervals`).

Folder layout (``out/``): ``config.json`` (the run's settings and what data was kept),
``attributions/{method}-{basis}-seed{seed}.safetensors`` (train-split attribution results; ``.partial``
checkpoints while running), ``curves/{method}-{basis}-seed{seed}.json``, then ``curves.json`` (all curves),
``faithfulness.png`` and ``report.md`` (see :mod:`.report`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from neurontrace import distributed
from neurontrace.attribution.api import attribute, check_suffix_length, remove_checkpoint
from neurontrace.attribution.engine import METHODS
from neurontrace.attribution.replacement import RelPRules
from neurontrace.attribution.result import AttributionResult
from neurontrace.errors import NeurontraceError
from neurontrace.evaluation.faithfulness import (
    ABLATIONS,
    ERROR_NODES,
    GRIDS,
    LEVELS,
    SCAN_LIMIT,
    Curve,
    EvalSet,
    error_node_mask,
    prepare_eval,
    sweep,
    thresholds_for,
)
from neurontrace.io import write_bytes_atomic, write_text_atomic
from neurontrace.models.model import NeuronModel
from neurontrace.sites import check_site
from neurontrace.tasks.slots import slot_map

SELECTIONS: tuple[str, ...] = ("nodes", "edges")
"""How circuits are selected: ``nodes`` (each method's ranking of nodes by |score|, every method and basis) and
``edges`` (the neurons on strong edges of the train prompts' attribution graphs, :mod:`neurontrace.circuits.edges`:
one more curve per seed, method ``relp-edges``, basis neurons)."""

NODES: tuple[str, ...] = ("per-position", "summed", "slots")
"""Node alignment: (layer, token position, unit); (layer, unit) at every position; (layer, template slot, unit)."""

BASES: dict[str, str] = {"neurons": "neurons", "mlp-out": "mlp_out", "resid": "resid", "attn-out": "attn_out"}
DICTIONARY_BASES: tuple[str, ...] = ("sae:", "transcoder:")
"""Bases given as ``sae:DIR`` or ``transcoder:DIR``: a dictionary's latents and error nodes."""


def is_dictionary(basis: str) -> bool:
    return basis.startswith(DICTIONARY_BASES)


def site_of_basis(basis: str) -> str:
    """The site a basis name stands for (a dictionary basis is its own site)."""
    return basis if is_dictionary(basis) else BASES[basis]


def dictionary_fingerprint(basis: str) -> str:
    """SHA-256 over a dictionary folder's weight and config files (a retrained dictionary is another run)."""
    import hashlib

    from neurontrace.dictionaries.hub import resolve_dictionary

    spec = basis.partition(":")[2]
    folder = Path(resolve_dictionary(spec) if spec.startswith("hf:") else spec).expanduser()
    digest = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.suffix in (".safetensors", ".json", ".yaml", ".yml"):
            digest.update(str(f.relative_to(folder)).encode())
            with f.open("rb") as fh:
                for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def basis_label(basis: str) -> str:
    """A short name for file names and reports: ``sae:runs/smollm2/mlp`` -> ``sae-mlp``."""
    if not is_dictionary(basis):
        return basis
    kind, _, path = basis.partition(":")
    name = Path(path.rstrip("/")).name or "dictionary"
    return f"{kind}-" + "".join(c if c.isalnum() or c in "-_." else "-" for c in name)


@dataclass
class EvaluationRun:
    """Settings of a run (what ``config.json`` holds)."""

    model: str
    data: str
    methods: list[str]
    bases: list[str]
    ablation: str = "mean"
    nodes: str = "per-position"  # or "summed" (a unit at every position) or "slots" (template slots)
    n_train: int = 0
    n_test: int = 0
    steps: int = 16
    points: int = 32  # thresholds in the logspace sweep (plus 0)
    batch_size: int = 16
    seed: int = 0
    seeds: int = 1  # splits seed, seed+1, ...
    grid: str = "log"  # or "paper": [0] + logspace(-6, 0, 30) + [inf, -1]
    levels: list[float] = field(default_factory=lambda: list(LEVELS))
    scan_limit: int = SCAN_LIMIT
    extra: dict[str, Any] = field(default_factory=dict)
    error_nodes: str = "count"  # how a dictionary basis's error nodes count (faithfulness.ERROR_NODES)
    select: list[str] = field(default_factory=lambda: ["nodes"])  # SELECTIONS: node ranks, graph edges
    rules: dict[str, Any] | None = None  # RelP rules (RelPRules.to_dict()); None: the default, RelPRules()
    blacklist: list[list[int]] | None = None  # [layer, neuron] pairs never in a circuit (neurons basis)
    suffix_length: int | None = None  # only the last N positions of each train prompt keep their scores
    full_passes: bool = False  # every ablation pass in full, without evaluation/shortcuts.py

    def attribution_options(self, site: str) -> dict[str, Any]:
        """The keywords of :func:`attribute` (and of ``build_graph``) that this run sets for ``site``."""
        options: dict[str, Any] = {"suffix_length": self.suffix_length}
        if self.rules is not None:
            options["rules"] = RelPRules(**self.rules)
        if self.blacklist is not None and site == "neurons":  # a blacklist names neurons
            options["blacklist"] = self.blacklist
        return options

    @property
    def seed_list(self) -> list[int]:
        return [self.seed + i for i in range(self.seeds)]

    def validate(self) -> None:
        for m in self.methods:
            if m not in METHODS:
                raise NeurontraceError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
        for b in self.bases:
            if not (b in BASES or is_dictionary(b)):
                raise NeurontraceError(
                    f"unknown basis {b!r}; choose from {', '.join(BASES)}, sae:DIR or transcoder:DIR"
                )
            if is_dictionary(b):
                check_site(b)  # the folder exists and holds a dictionary
        labels = [basis_label(b) for b in self.bases]
        if len(set(labels)) != len(labels):
            raise NeurontraceError(
                f"two bases share the name {max(labels, key=labels.count)!r}; give the dictionaries folders "
                "of different names"
            )
        if self.error_nodes not in ERROR_NODES:
            raise NeurontraceError(
                f"unknown error-node rule {self.error_nodes!r}; choose from {', '.join(ERROR_NODES)}"
            )
        if self.ablation not in ABLATIONS:
            raise NeurontraceError(f"unknown ablation {self.ablation!r}; choose from {', '.join(ABLATIONS)}")
        if self.nodes not in NODES:
            raise NeurontraceError(f"nodes must be one of {', '.join(NODES)}")
        if not self.methods or not self.bases:
            raise NeurontraceError("give at least one method and one basis")
        if self.grid not in GRIDS:
            raise NeurontraceError(f"unknown grid {self.grid!r}; choose from {', '.join(GRIDS)}")
        if self.seeds < 1 or self.scan_limit < 0 or self.points < 1:
            raise NeurontraceError("--seeds and --points must be at least 1 and --scan-limit at least 0")
        if not self.levels or not all(0 < x <= 2 for x in self.levels):
            raise NeurontraceError("--levels must be faithfulness levels such as 0.8,0.9")
        if self.blacklist is not None and "neurons" not in self.bases:
            raise NeurontraceError("a blacklist names neurons; add the neurons basis or drop --blacklist")
        check_suffix_length(self.suffix_length)
        if not self.select or any(s not in SELECTIONS for s in self.select):
            raise NeurontraceError(
                f"--select takes a comma list of {', '.join(SELECTIONS)}, got {self.select}"
            )
        if "edges" in self.select and self.nodes == "slots":
            raise NeurontraceError("edge-based circuits need --nodes per-position or summed, not slots")

    def to_dict(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        if not any(is_dictionary(b) for b in self.bases):
            del data["error_nodes"]  # no dictionary: the rule is moot (and older results folders resume)
        if self.select == ["nodes"]:
            del data["select"]  # the default: older results folders resume
        for name in ("rules", "blacklist", "suffix_length"):
            if data[name] is None:
                del data[name]  # the default: older results folders resume
        if not self.full_passes:
            del data["full_passes"]  # the default: older results folders resume
        return data


def run_evaluation(
    model: NeuronModel,
    run: EvaluationRun,
    *,
    train: Sequence[Any] | None = None,
    test: Sequence[Any] | None = None,
    splits: dict[int, tuple[Sequence[Any], Sequence[Any]]] | None = None,
    out: str | Path,
    progress: bool = True,
    log=print,
) -> list[Curve]:
    """Attribute with every method on ``train`` and sweep circuits on ``test`` for every basis; resumable.

    ``splits`` maps each of ``run.seed_list`` to its (train, test) pairs; ``train``/``test`` give one split for
    a one-seed run.

    Launched distributed, every process computes its share of each attribution and sweep (and gets every
    curve); only the main process logs and writes files.
    """
    run.validate()
    if splits is None:
        if run.seeds != 1:
            raise NeurontraceError("a run of several seeds needs splits={seed: (train, test)}")
        splits = {run.seed: (train, test)}
    if sorted(splits) != run.seed_list:
        raise NeurontraceError(f"splits must have the seeds {run.seed_list}, got {sorted(splits)}")
    if not all(tr and te for tr, te in splits.values()):
        raise NeurontraceError("the train and test sets must both be non-empty")
    out = Path(out)
    (out / "attributions").mkdir(parents=True, exist_ok=True)
    (out / "curves").mkdir(exist_ok=True)
    for saved in ("attributions", "curves"):  # what a rerun resumes from, named if another process stops
        distributed.note_resumable(out / saved)
    config_path = out / "config.json"
    config = run.to_dict()
    if config_path.is_file():
        try:
            previous = json.loads(config_path.read_text(encoding="utf-8"))
        except (ValueError, RecursionError):
            raise NeurontraceError(
                f"{config_path} is damaged (not JSON), so the run there cannot be resumed; pass --fresh to start "
                "over, or choose another --out"
            ) from None
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
    curves: list[Curve] = []
    for seed in run.seed_list:
        train, test = splits[seed]
        evalsets: dict[str, EvalSet] = {}
        for basis in run.bases if "nodes" in run.select else ():
            for method in run.methods:
                curves.append(
                    _one_curve(
                        model, run, method, basis, seed, train, test, evalsets, out, progress, log, main
                    )
                )
        if "edges" in run.select:
            curves.append(_edge_curve(model, run, seed, train, test, evalsets, out, progress, log, main))
    if main:
        write_text_atomic(out / "curves.json", json.dumps([c.to_dict() for c in curves], indent=2))
    return curves


def _one_curve(model, run, method, basis, seed, train, test, evalsets, out, progress, log, main) -> Curve:
    """Attribute (or load the saved attribution), then sweep one curve (or load it when done already)."""
    site = site_of_basis(basis)
    key = f"{method}-{basis_label(basis)}-seed{seed}"
    curve_path = out / "curves" / f"{key}.json"
    if (done := _resumed_curve(curve_path, key, log)) is not None:
        return done
    start = time.perf_counter()
    if run.nodes == "slots":
        scores = _slot_scores_cached(
            model, run, method, site, seed, train, out / "attributions" / key, progress, main
        )
    else:
        result_path = out / "attributions" / f"{key}.safetensors"
        checkpoint = result_path.with_name(result_path.name + ".partial")
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
                seed=seed,
                progress=progress,
                checkpoint=checkpoint,
                checkpoint_every_s=30.0,
                keep_checkpoint=True,
                **run.attribution_options(site),
            )
            if main:
                result.save(result_path)
            distributed.barrier()
            remove_checkpoint(checkpoint)  # once the result is safe
        scores = result.mean_scores if run.nodes == "per-position" else result.position_free
        if scores is None:
            raise NeurontraceError(
                "per-position nodes need train prompts of one token length; use --nodes summed"
            )
    t_attr = time.perf_counter() - start
    evalset = _evalset(model, run, site, seed, test, evalsets)
    forwards = evalset.forwards
    start = time.perf_counter()
    scores = evalset.nodes_of(
        scores
    )  # a dictionary's error components -> one error node per (layer, position)
    ranked = scores * error_node_mask(evalset, scores, run.error_nodes)
    curve = sweep(
        evalset,
        scores,
        method=method,
        thresholds=thresholds_for(ranked, grid=run.grid, points=run.points),
        levels=run.levels,
        scan_limit=run.scan_limit,
        seed=seed,
        progress=progress,
        error_nodes=run.error_nodes,
    )
    curve.meta = _curve_meta(run, evalset, train, test, seconds=t_attr, start=start, forwards=forwards)
    if is_dictionary(basis):
        curve.basis = basis_label(basis)
        curve.meta["dictionary"] = basis
        curve.meta["error_nodes"] = run.error_nodes
    if main:
        write_text_atomic(curve_path, curve.to_json())
    found = []
    for lv in curve.levels:
        if lv.n_nodes is None:
            found.append(f"never reaches {lv.level:g}")
        else:
            found.append(f"{lv.n_nodes}{'' if lv.exact else ' (upper bound)'} nodes for {lv.level:g}")
    log(
        f"  {key}: attribution {t_attr:.1f} s, sweep {curve.meta['sweep_seconds']:.1f} s; " + ", ".join(found)
    )
    return curve


def _evalset(model, run, site, seed, test, evalsets) -> EvalSet:
    """The test set of ``site`` (prepared once per seed and site, shared by every curve on it)."""
    if site not in evalsets:
        maps = [slot_map(model.tokenizer, p) for p in test] if run.nodes == "slots" else None
        evalsets[site] = prepare_eval(
            model,
            test,
            site=site,
            ablation=run.ablation,
            batch_size=run.batch_size * 4,
            seed=seed,
            slot_maps=maps,
            shortcuts=not run.full_passes,
        )
    return evalsets[site]


def _edge_curve(model, run, seed, train, test, evalsets, out, progress, log, main) -> Curve:
    """The edge-based curve of a seed: the attribution graph of every train prompt (targets: its answer and
    counterfactual answer), edge scores over them, then the sweep of edge percentiles on the neuron test set.

    Launched distributed, every process builds every graph (the edge percentiles need all of them); only the
    sweep is shared."""
    from neurontrace.circuits.edges import edge_percentiles, edge_scores, sweep_edges
    from neurontrace.graphs.build import build_graph

    key = f"relp-edges-neurons-seed{seed}"
    curve_path = out / "curves" / f"{key}.json"
    if (done := _resumed_curve(curve_path, key, log)) is not None:
        return done
    start = time.perf_counter()
    get = lambda p, k: p[k] if isinstance(p, dict) else getattr(p, k)  # noqa: E731
    items: Any = train
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(train, desc="attribution graphs", disable=not main)
    graphs = (
        build_graph(
            model,
            get(p, "clean_prefix"),
            answers=[get(p, "clean_answer"), get(p, "patch_answer")],
            **run.attribution_options("neurons"),
        )
        for p in items
    )
    scores = edge_scores(graphs=graphs, summed=run.nodes == "summed")
    t_graphs = time.perf_counter() - start
    evalset = _evalset(model, run, "neurons", seed, test, evalsets)
    forwards = evalset.forwards
    start = time.perf_counter()
    curve = sweep_edges(
        evalset,
        scores=scores,
        percentiles=edge_percentiles(run.points),
        levels=run.levels,
        scan_limit=run.scan_limit,
        seed=seed,
        progress=progress,
    )
    curve.meta = {
        **curve.meta,
        **_curve_meta(run, evalset, train, test, seconds=t_graphs, start=start, forwards=forwards),
    }
    if main:
        write_text_atomic(curve_path, curve.to_json())
    found = [
        f"never reaches {lv.level:g}"
        if lv.n_nodes is None
        else f"{lv.n_nodes}{'' if lv.exact else ' (upper bound)'} nodes for {lv.level:g}"
        for lv in curve.levels
    ]
    log(
        f"  {key}: {len(train)} graphs {t_graphs:.1f} s, sweep {curve.meta['sweep_seconds']:.1f} s; "
        + ", ".join(found)
    )
    return curve


def slot_scores(
    model: NeuronModel,
    pairs: Sequence[Any],
    *,
    method: str,
    site: str,
    steps: int = 16,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = False,
    rules: RelPRules | None = None,
    blacklist: Any = None,
    suffix_length: int | None = None,
) -> torch.Tensor:
    """Mean over ``pairs`` of each template slot's score (its tokens' scores added), ``[L, S, d]``.

    Pairs are attributed in groups of one token layout (same slot of every token), each group's per-position
    mean scores added into slots, and the groups combined by their sizes.
    """
    maps = [tuple(slot_map(model.tokenizer, p)) for p in pairs]
    groups: dict[tuple[int, ...], list[Any]] = {}
    for p, m in zip(pairs, maps, strict=True):
        groups.setdefault(m, []).append(p)
    n_slots = 1 + max(max(m) for m in maps)
    total = None
    items = list(groups.items())
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc=f"{method} attribution (slot layouts)", disable=not distributed.is_main())
    for m, group in items:
        result = attribute(
            model, pairs=group, method=method, site=site, steps=steps, batch_size=batch_size, seed=seed,
            rules=rules, blacklist=blacklist, suffix_length=suffix_length,
        )  # fmt: skip
        per_position = result.mean_scores  # [L, T, d]
        slots = torch.zeros(per_position.shape[0], n_slots, per_position.shape[2])
        slots.index_add_(1, torch.tensor(m), per_position)
        total = slots * len(group) if total is None else total + slots * len(group)
    return total / len(pairs)


def _slot_scores_cached(model, run, method, site, seed, train, stem: Path, progress, main) -> torch.Tensor:
    from safetensors.torch import load, save

    path = stem.with_name(stem.name + ".slots.safetensors")
    if path.is_file():
        return load(path.read_bytes())["scores"]
    scores = slot_scores(
        model,
        train,
        method=method,
        site=site,
        steps=run.steps,
        batch_size=run.batch_size,
        seed=seed,
        progress=progress,
        **run.attribution_options(site),
    )
    if main:
        write_bytes_atomic(path, save({"scores": scores.contiguous()}))
    return scores


def _curve_meta(
    run: Any, evalset: Any, train: Sequence, test: Sequence, *, seconds: float, start: float, forwards: int
) -> dict[str, Any]:
    """A curve's cost and data: attribution and sweep seconds, forwards, sizes, the test cases (in the order of
    the per-example samples)."""
    return {
        "attribution_seconds": seconds,
        "sweep_seconds": time.perf_counter() - start,
        "sweep_forwards": evalset.forwards - forwards,
        "test_batches": len(evalset.batches),
        "nodes": run.nodes,
        "n_train": len(train),
        "n_test": len(test),
        "test_cases": [getattr(p, "case", None) for p in test],
    }


def _resumed_curve(curve_path: Path, key: str, log) -> Curve | None:
    """The curve a previous run finished and saved at ``curve_path``, or None."""
    if not curve_path.is_file():
        return None
    try:
        curve = Curve.from_dict(json.loads(curve_path.read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError, RecursionError):  # cut short or edited: not a curve of this run
        log(f"  {key}: {curve_path} is damaged (not a whole curve); computing that curve again")
        return None
    log(f"  {key}: done already (resumed)")
    return curve

"""Run by ``tests/test_distributed.py`` under ``torchrun``: dataset attribution and evaluation curves of one
model, written per rank so the test can compare every process's result with a one-process run.

Usage: ``distributed_worker.py MODEL TRAIN.jsonl TEST.jsonl SCORES.pt OUT [LAYERS]`` where ``SCORES.pt`` holds
the ``[L, T, d]`` scores the curves are swept on (the same for the one-process run) and ``LAYERS`` is an
optional comma list. Writes ``OUT/rank{r}.safetensors`` (attribution), ``OUT/rank{r}-mean.safetensors``
(unpaired prompts, mean baseline) and ``OUT/rank{r}-curves.json``.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from neurontrace import distributed
from neurontrace.attribution.api import attribute
from neurontrace.evaluation import prepare_eval, sweep
from neurontrace.models.loading import load_model
from neurontrace.tasks import load_pairs

# Shared with the test: the same settings for the one-process run.
BATCH_SIZE = 3
THRESHOLDS = 2  # thresholds 0, 1e-3 and 1 times the largest score
ABLATIONS = ("mean", "resample")


def run(model, train, test, scores, layers):
    """(pair attribution, mean-baseline attribution, {ablation: curve}) with this module's settings.

    The curves sweep ``scores``, or without them the pair attribution's mean scores.
    """
    result = attribute(model, pairs=train, method="relp", layers=layers, batch_size=BATCH_SIZE)
    scores = result.mean_scores if scores is None else scores
    # Prompts, then the same prompts less their last word: with two processes each one's share has one token
    # length, but the whole set has two (so no per-position scores).
    prompts = [p.clean_prefix for p in train] + [p.clean_prefix.rsplit(" ", 1)[0] for p in train]
    unpaired = attribute(
        model,
        prompts=prompts,
        answers=[p.clean_answer for p in train] * 2,
        baseline="mean",
        method="atp",
        layers=layers,
        batch_size=BATCH_SIZE,
    )
    top = float(scores.abs().max())
    thresholds = [0.0] + [top * x for x in torch.logspace(-3, 0, THRESHOLDS).tolist()]
    curves = {}
    for ablation in ABLATIONS:
        evalset = prepare_eval(model, test, layers=layers, ablation=ablation, batch_size=BATCH_SIZE)
        curves[ablation] = sweep(
            evalset, scores, method="relp", thresholds=thresholds, scan_limit=4
        ).to_dict()
    return result, unpaired, curves


def main(argv: list[str]) -> None:
    model_spec, train_path, test_path, scores_path, out = argv[:5]
    layers = [int(x) for x in argv[5].split(",")] if len(argv) > 5 else None
    model = load_model(model_spec, device="cpu")
    rank, size = distributed.world()
    assert size == int(os.environ["WORLD_SIZE"]) > 1, "run me under torchrun with several processes"
    result, unpaired, curves = run(
        model, load_pairs(train_path), load_pairs(test_path), torch.load(scores_path), layers
    )
    result.save(f"{out}/rank{rank}.safetensors")
    unpaired.save(f"{out}/rank{rank}-mean.safetensors")
    with open(f"{out}/rank{rank}-curves.json", "w") as f:
        json.dump(curves, f)


if __name__ == "__main__":
    main(sys.argv[1:])

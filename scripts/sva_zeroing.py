"""Zero the top RelP neurons of an SVA circuit (and, as a control, as many random neurons) and measure the
agreement preference logit(correct verb) - logit(wrong verb) on held-out pairs. Used by docs/case-studies.md.

    .venv/bin/python scripts/sva_zeroing.py [--task nounpp] [--k 10,25,50,100]
"""

from __future__ import annotations

import argparse

import torch

from neurontrace.attribution.api import attribute
from neurontrace.attribution.metrics import make_metric
from neurontrace.interventions import Edit, intervene
from neurontrace.models.loading import load_model
from neurontrace.tasks import generate_sva, train_test_split
from neurontrace.tokens import single_token_id, tokenize_pairs


def preference(model, test, edits) -> torch.Tensor:
    clean, _ = tokenize_pairs(model, [p.clean_prefix for p in test], [p.patch_prefix for p in test])
    metric = make_metric(
        "logit-diff",
        answer=[single_token_id(model, p.clean_answer) for p in test],
        contrast=[single_token_id(model, p.patch_answer) for p in test],
    )
    with intervene(model, edits), torch.no_grad():
        return metric(model.forward(clean, logits_to_keep=1).logits)


def node_edits(nodes) -> list[Edit]:
    return [Edit(layer=layer, neurons=[unit], positions=[pos], op="zero") for layer, pos, unit in nodes]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="nounpp")
    parser.add_argument("--k", default="10,25,50,100")
    parser.add_argument("--seeds", type=int, default=5, help="random control draws")
    args = parser.parse_args()
    model = load_model("smollm2-135m", device="cpu")
    pairs = generate_sva(args.task, n=96, seed=0, tokenizer=model.tokenizer)
    train, test = train_test_split(pairs, test_fraction=1 / 3, seed=0)
    result = attribute(model, pairs=train, method="relp")
    scores = result.mean_scores  # [L, T, d]
    L, T, d = scores.shape
    base = preference(model, test, [])
    print(f"{args.task}: {len(train)} train pairs (RelP), {len(test)} test pairs; "
          f"clean preference {float(base.mean()):+.3f}, correct on {float((base > 0).float().mean()):.0%}")  # fmt: skip
    print("| neurons zeroed | which | mean preference | change | still correct |")
    print("|---|---|---|---|---|")
    order = scores.flatten().abs().argsort(descending=True)
    for k in [int(x) for x in args.k.split(",")]:
        top = [(int(i) // (T * d), (int(i) // d) % T, int(i) % d) for i in order[:k]]
        after = preference(model, test, node_edits(top))
        print(f"| {k} | top RelP | {float(after.mean()):+.3f} | {float((after - base).mean()):+.3f} | "
              f"{float((after > 0).float().mean()):.0%} |")  # fmt: skip
        means, correct = [], []
        for seed in range(args.seeds):
            g = torch.Generator().manual_seed(seed)
            idx = torch.randperm(L * T * d, generator=g)[:k]
            rand = [(int(i) // (T * d), (int(i) // d) % T, int(i) % d) for i in idx]
            after = preference(model, test, node_edits(rand))
            means.append(float(after.mean()))
            correct.append(float((after > 0).float().mean()))
        print(f"| {k} | random (mean of {args.seeds}) | {sum(means) / len(means):+.3f} | "
              f"{sum(means) / len(means) - float(base.mean()):+.3f} | {sum(correct) / len(correct):.0%} |")  # fmt: skip


if __name__ == "__main__":
    main()

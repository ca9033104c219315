"""Integrated gradients: completeness error of the left (METHOD.md) and midpoint rules against the step count,
on tiny random models (float64). Error = max over layers of |sum of a layer's scores - (m(layer patched) - m)|
relative to that change."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from common import save
from conftest import make_tiny

from neurontrace.attribution.api import attribute
from neurontrace.interventions import Edit, intervene
from neurontrace.sites import capture
from neurontrace.tokens import single_token_id

CLEAN, CF = "the keys to the cabinet", "the key to the cabinets"


def worst_error(model, rule: str, steps: int) -> float:
    def logit_diff(batch) -> float:
        logits = model.logits(batch)[0, -1]
        return float(logits[single_token_id(model, " are")] - logits[single_token_id(model, " is")])

    clean, cf = model.tokenize(CLEAN), model.tokenize(CF)
    base = logit_diff(clean)
    result = attribute(model, prompt=CLEAN, counterfactual=CF, answer=" are", contrast=" is", method="ig",
                       steps=steps, ig_rule=rule)  # fmt: skip
    errors = []
    for layer in range(model.n_layers):
        with intervene(model, Edit(layer=layer, op="patch", value=capture(model, cf).get(layer))):
            target = logit_diff(clean) - base
        errors.append(abs(float(result.scores[0, layer].sum()) - target) / abs(target))
    return max(errors)


def main() -> dict:
    rows, raw = [], {}
    for family in ("llama", "gpt_neox", "gemma3"):
        model = make_tiny(family)
        model.hf.double()
        for rule in ("left", "midpoint"):
            errs = {steps: worst_error(model, rule, steps) for steps in (16, 64, 256)}
            raw[f"{family}/{rule}"] = errs
            rows.append((f"tiny {family}, {rule} rule: worst per-layer completeness error at 16 / 64 / 256 steps",
                         " / ".join(f"{100 * e:.2f}%" for e in errs.values())))  # fmt: skip
    save("ig_rule", raw)
    return {"title": "Integrated gradients: left vs midpoint rule (tiny models, float64)", "rows": rows}


if __name__ == "__main__":
    for name, value in main()["rows"]:
        print(f"{name}: {value}")

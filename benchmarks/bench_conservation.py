"""Conservation of the rule presets on the default model: the sum of the input-embedding attributions of a logit
against the logit itself (RelP's LRP rules make the two equal; gradient through the softmax does not).

For each prompt, one RelP backward per preset (``relp``, ``transluce``, ``none``) to the input embeddings, the
metric being the answer's logit at the last position; the embeddings' attribution is ``sum(e * dm/de)`` over
positions and dimensions (zero baseline). A few seconds on a CPU.
"""

from __future__ import annotations

import torch
from common import save

from neurontrace.attribution.engine import frozen_parameters, run_sites
from neurontrace.attribution.metrics import make_metric
from neurontrace.attribution.replacement import RULE_PRESETS
from neurontrace.models.loading import load_model
from neurontrace.tokens import single_token_id

PROMPTS = [
    ("The keys to the cabinet", " are"),
    ("The keys that the man left near the cabinet", " are"),
    ("The author near the senators", " is"),
    ("The dogs of the farmer", " are"),
]


def embedding_totals(model, prompt: str, answer: str) -> dict:
    batch = model.tokenize(prompt)
    metric = make_metric("logit", answer=[single_token_id(model, answer)])
    out = {}
    for name in ("relp", "transluce", "none"):
        with frozen_parameters(model):
            run = run_sites(model, batch, metric, site="neurons", layers=[0], rules=RULE_PRESETS[name])
            (g,) = torch.autograd.grad(run.metric.sum(), [run.embeds])
        out[name] = float((run.embeds.detach().float() * g.float()).sum())
        out["logit"] = float(run.metric[0].detach())
    return out


def main() -> dict:
    model = load_model("smollm2-135m")
    rows, results = [], []
    for prompt, answer in PROMPTS:
        r = embedding_totals(model, prompt, answer)
        results.append({"prompt": prompt, "answer": answer, **r})
        rows.append(
            (
                f"{prompt!r} -> {answer!r}: logit",
                f"{r['logit']:.3f}; embedding attributions sum to {r['relp']:.3f} (relp), "
                f"{r['transluce']:.3f} (transluce), {r['none']:.3f} (none)",
            )
        )
    save("conservation", {"results": results})
    return {
        "title": "Conservation of the rule presets (input-embedding attributions vs the logit)",
        "rows": rows,
    }


if __name__ == "__main__":
    section = main()
    print(f"### {section['title']}\n\n| measurement | value |\n|---|---|")
    for name, value in section["rows"]:
        print(f"| {name} | {value} |")

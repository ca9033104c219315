"""Case study: multilingual antonyms. "What is the opposite of {word}?" in several languages.

Twelve pairs of opposite adjectives or nouns (hot/cold, big/small, ...) in six languages, asked both ways (hot ->
cold and cold -> hot): 24 prompts per language, in the model's chat template with the start of the answer written
in the same language ("The opposite of hot is", "Le contraire de chaud est", ...). The metric is the
teacher-forced log-probability of the answer word. Each neuron's RelP attribution, summed over positions, is
scored with per-class AUROC (:func:`neurontrace.circuits.score_hypotheses`) for three labelings:

- **language**: neurons selective for one language (language-specific);
- **answer concept** (e.g. "cold", whatever the language): concept neurons;
- **attribute** (the pair, e.g. temperature, for both hot -> cold and cold -> hot): attribute neurons.

A concept or attribute neuron counts as **shared** across languages when, inside every language taken alone, its
attribution still separates its class from the rest (AUROC >= ``shared_auroc`` in at least ``len(languages) - 1``
languages); it is **language-bound** when that holds in fewer languages. The strongest shared concept neuron is then
steered in every language: zeroed (and amplified x3) on the prompts of its concept, with the change in the
log-probability of the right answer, against a random neuron of the same layer.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from neurontrace.casestudies.common import (
    answer_readout,
    bar_plot,
    chat_prompt,
    first_token,
    next_token_logprobs,
    teacher_forced_correct,
    write_graph_bundle,
)
from neurontrace.circuits.hypotheses import attribute_prompts, auroc, score_hypotheses
from neurontrace.errors import NeurontraceError
from neurontrace.interventions import Edit
from neurontrace.io import JsonResult, write_text_atomic
from neurontrace.models.model import NeuronModel

# attribute -> (word, opposite) per language
PAIRS: dict[str, dict[str, tuple[str, str]]] = {
    "temperature": {"en": ("hot", "cold"), "fr": ("chaud", "froid"), "de": ("heiß", "kalt"), "es": ("caliente", "frío"), "it": ("caldo", "freddo"), "pt": ("quente", "frio")},
    "size": {"en": ("big", "small"), "fr": ("grand", "petit"), "de": ("groß", "klein"), "es": ("grande", "pequeño"), "it": ("grande", "piccolo"), "pt": ("grande", "pequeno")},
    "speed": {"en": ("fast", "slow"), "fr": ("rapide", "lent"), "de": ("schnell", "langsam"), "es": ("rápido", "lento"), "it": ("veloce", "lento"), "pt": ("rápido", "lento")},
    "quality": {"en": ("good", "bad"), "fr": ("bon", "mauvais"), "de": ("gut", "schlecht"), "es": ("bueno", "malo"), "it": ("buono", "cattivo"), "pt": ("bom", "mau")},
    "height": {"en": ("high", "low"), "fr": ("haut", "bas"), "de": ("hoch", "niedrig"), "es": ("alto", "bajo"), "it": ("alto", "basso"), "pt": ("alto", "baixo")},
    "length": {"en": ("long", "short"), "fr": ("long", "court"), "de": ("lang", "kurz"), "es": ("largo", "corto"), "it": ("lungo", "corto"), "pt": ("longo", "curto")},
    "time of day": {"en": ("day", "night"), "fr": ("jour", "nuit"), "de": ("Tag", "Nacht"), "es": ("día", "noche"), "it": ("giorno", "notte"), "pt": ("dia", "noite")},
    "strength": {"en": ("strong", "weak"), "fr": ("fort", "faible"), "de": ("stark", "schwach"), "es": ("fuerte", "débil"), "it": ("forte", "debole"), "pt": ("forte", "fraco")},
    "colour": {"en": ("black", "white"), "fr": ("noir", "blanc"), "de": ("schwarz", "weiß"), "es": ("negro", "blanco"), "it": ("nero", "bianco"), "pt": ("preto", "branco")},
    "wealth": {"en": ("rich", "poor"), "fr": ("riche", "pauvre"), "de": ("reich", "arm"), "es": ("rico", "pobre"), "it": ("ricco", "povero"), "pt": ("rico", "pobre")},
    "age": {"en": ("young", "old"), "fr": ("jeune", "vieux"), "de": ("jung", "alt"), "es": ("joven", "viejo"), "it": ("giovane", "vecchio"), "pt": ("jovem", "velho")},
    "mood": {"en": ("happy", "sad"), "fr": ("heureux", "triste"), "de": ("glücklich", "traurig"), "es": ("feliz", "triste"), "it": ("felice", "triste"), "pt": ("feliz", "triste")},
}  # fmt: skip

# language -> (question, start of the answer)
TEMPLATES: dict[str, tuple[str, str]] = {
    "en": ("What is the opposite of {word}?", "The opposite of {word} is"),
    "fr": ("Quel est le contraire de {word} ?", "Le contraire de {word} est"),
    "de": ("Was ist das Gegenteil von {word}?", "Das Gegenteil von {word} ist"),
    "es": ("¿Qué es lo contrario de {word}?", "Lo contrario de {word} es"),
    "it": ("Qual è il contrario di {word}?", "Il contrario di {word} è"),
    "pt": ("Qual é o oposto de {word}?", "O oposto de {word} é"),
}
LANGUAGE_NAMES = {
    "en": "English",
    "fr": "French",
    "de": "German",
    "es": "Spanish",
    "it": "Italian",
    "pt": "Portuguese",
}
LABELINGS = ("language", "answer concept", "attribute")


@dataclass(frozen=True)
class Item:
    language: str
    attribute: str
    word: str
    answer: str
    concept: str  # the answer's meaning, named by its English word

    def prompt(self, model: NeuronModel) -> str:
        question, start = TEMPLATES[self.language]
        return chat_prompt(model, question.format(word=self.word), start.format(word=self.word))


def items(languages: Sequence[str]) -> list[Item]:
    """Every pair both ways, in every language."""
    out = []
    for lang in languages:
        for attribute, by_lang in PAIRS.items():
            a, b = by_lang[lang]
            en_a, en_b = by_lang["en"]
            out += [Item(lang, attribute, a, b, en_b), Item(lang, attribute, b, a, en_a)]
    return out


@dataclass
class AntonymsReport(JsonResult):
    model: str
    languages: list[str]
    n_prompts: int
    accuracy: dict[str, float]  # language -> share of prompts whose answer is the argmax (teacher-forced)
    english_answer: dict[
        str, float
    ]  # language -> share whose next token is the English antonym's first token
    selective: dict[str, dict[str, int]]  # labeling -> {"neurons": n, "shared": n, "language-bound": n}
    top: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    steering: dict[str, Any] = field(default_factory=dict)
    graph: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    schema_version: int = 1


def _within_language(
    scores: torch.Tensor, labels: list[str], langs: list[str], cls: str, languages: Sequence[str]
) -> torch.Tensor:
    """AUROC of each column of ``scores`` for ``cls`` inside each language alone: ``[n_languages, M]``."""
    rows = []
    for lang in languages:
        idx = [i for i, g in enumerate(langs) if g == lang]
        pos = torch.tensor([[labels[i] == cls for i in idx]])
        if bool(pos.all()) or not bool(pos.any()):
            rows.append(torch.full((scores.shape[1],), 0.5, dtype=torch.float64))
            continue
        rows.append(auroc(scores[idx], pos)[0])
    return torch.stack(rows)


def run_antonyms(
    model: NeuronModel,
    *,
    out: str | Path,
    languages: Sequence[str] = tuple(TEMPLATES),
    method: str = "relp",
    high: float = 0.9,
    low: float = 0.1,
    shared_auroc: float = 0.8,
    batch_size: int = 12,
    seed: int = 0,
    progress: bool = True,
) -> AntonymsReport:
    """Attribute every prompt, score the three labelings, find shared versus language-bound neurons, steer one."""
    languages = list(languages)
    unknown = [g for g in languages if g not in TEMPLATES]
    if unknown:
        raise NeurontraceError(f"unknown language {unknown[0]!r}; choose from {', '.join(TEMPLATES)}")
    if len(languages) < 2:
        raise NeurontraceError("give at least two languages: shared neurons are compared across languages")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = items(languages)
    prompts = [it.prompt(model) for it in data]
    answers = [f" {it.answer}" for it in data]
    langs = [it.language for it in data]
    times: dict[str, float] = {}

    start = time.perf_counter()
    correct = teacher_forced_correct(model, prompts, answers)
    accuracy = {
        g: float(correct[[i for i, x in enumerate(langs) if x == g]].float().mean()) for g in languages
    }
    english = [first_token(model, f" {it.concept}") for it in data]
    top1 = next_token_logprobs(model, prompts).argmax(-1).tolist()
    english_answer = {
        g: sum(top1[i] == english[i] for i, x in enumerate(langs) if x == g) / langs.count(g)
        for g in languages
    }
    times["accuracy"] = time.perf_counter() - start

    start = time.perf_counter()
    result = attribute_prompts(
        model, prompts, answers, method=method, batch_size=batch_size, progress=progress
    )
    result.save(out / "attribution.safetensors")
    times["attribution"] = time.perf_counter() - start

    start = time.perf_counter()
    flat = result.scores_sum.flatten(1)  # [N, L * d]
    d = result.scores_sum.shape[2]
    labelings = {
        "language": langs,
        "answer concept": [it.concept for it in data],
        "attribute": [it.attribute for it in data],
    }
    selective: dict[str, dict[str, int]] = {}
    top: dict[str, list[dict[str, Any]]] = {}
    for name, labels in labelings.items():
        scores = score_hypotheses(result, labels, high=high, low=low)
        scores.save(out / f"auroc-{name.replace(' ', '-')}.json")
        chosen = scores.selective()
        rows = []
        n_shared = 0
        for s in chosen:
            row = {**s.__dict__}
            if name != "language":
                col = result.layers.index(s.layer) * d + s.neuron
                per = _within_language(flat[:, col : col + 1], labels, langs, s.class_label, languages)[:, 0]
                per = per if s.auroc >= 0.5 else 1 - per
                row["within_language_auroc"] = {
                    g: round(float(v), 3) for g, v in zip(languages, per, strict=True)
                }
                row["shared"] = int((per >= shared_auroc).sum()) >= len(languages) - 1
                n_shared += row["shared"]
            rows.append(row)
        selective[name] = {"neurons": len(chosen)}
        if name != "language":
            selective[name] |= {"shared": n_shared, "language-bound": len(chosen) - n_shared}
        top[name] = rows[:12]
        if name == "answer concept":
            concept_rows = rows
    times["scoring"] = time.perf_counter() - start

    start = time.perf_counter()
    steering = _steer_shared(model, data, prompts, answers, concept_rows, languages, seed=seed)
    times["steering"] = time.perf_counter() - start

    start = time.perf_counter()
    first = next(i for i, it in enumerate(data) if it.language == languages[0])
    target = model.token_str(first_token(model, answers[first]))
    graph = write_graph_bundle(
        model, prompts[first], answers=[target], out=out, slug=f"graph-{data[first].word}"
    )
    times["graph"] = time.perf_counter() - start

    report = AntonymsReport(
        model.name, languages, len(data), accuracy, english_answer, selective, top, steering, graph, times
    )
    _write(out, model, report, data)
    report.save(out / "report.json")
    return report


def _steer_shared(model: NeuronModel, data: list[Item], prompts: list[str], answers: list[str], rows: list[dict],
                  languages: list[str], *, seed: int) -> dict[str, Any]:  # fmt: skip
    """Zero and amplify the shared concept neuron of largest in-class attribution (it supports the answer) on its
    concept's prompts, in every language."""
    shared = [r for r in rows if r.get("shared") and r["auroc"] >= 0.5 and r["in_class_mean"] > 0]
    if not shared:
        return {}
    best = max(shared, key=lambda r: r["in_class_mean"])  # the shared one that supports the answer most
    layer, neuron, concept = best["layer"], best["neuron"], best["class_label"]
    rng = random.Random(seed)
    control = rng.randrange(model.d_ff)
    while control == neuron:
        control = rng.randrange(model.d_ff)
    out: dict[str, Any] = {"neuron": f"L{layer}/N{neuron}", "concept": concept, "control": f"L{layer}/N{control}",
                           "auroc": best["auroc"], "languages": {}}  # fmt: skip
    for lang in languages:
        idx = [i for i, it in enumerate(data) if it.language == lang and it.concept == concept]
        p, a = [prompts[i] for i in idx], [answers[i] for i in idx]
        base = answer_readout(model, p, a)[0]
        row = {"prompts": [data[i].word + " -> " + data[i].answer for i in idx], "logp": float(base.mean())}
        for label, unit, op, value in (("zeroed", neuron, "zero", None), ("x3", neuron, "scale", 3.0),
                                       ("control zeroed", control, "zero", None), ("control x3", control, "scale", 3.0)):  # fmt: skip
            edit = Edit(layer=layer, neurons=[unit], op=op, value=value)
            row[label] = float((answer_readout(model, p, a, edits=[edit])[0] - base).mean())
        out["languages"][lang] = row
    return out


def _write(out: Path, model: NeuronModel, report: AntonymsReport, data: list[Item]) -> None:
    languages = report.languages
    lines = [
        f"# Multilingual antonyms on {model.name}",
        "",
        f"{len(PAIRS)} pairs of opposites, both ways, in {len(languages)} languages ({report.n_prompts} prompts), chat "
        "template with the answer's start written in the prompt's language. Metric: teacher-forced log-probability "
        f"of the answer word; RelP attribution summed over positions; selective at AUROC >= 0.9 or <= 0.1.",
        "",
        "| language | example | answer right (teacher-forced argmax) | next token is the English antonym |",
        "|---|---|---|---|",
    ]
    for g in languages:
        it = next(x for x in data if x.language == g)
        q, s = TEMPLATES[g]
        lines.append(
            f"| {LANGUAGE_NAMES[g]} | {q.format(word=it.word)} / {s.format(word=it.word)} → {it.answer} | {report.accuracy[g]:.0%} | {report.english_answer[g]:.0%} |"
        )
    lines += ["", "## Selective neurons", "", "| labeling | selective (neuron, class) | shared across languages | language-bound |", "|---|---|---|---|"]  # fmt: skip
    for name in LABELINGS:
        s = report.selective.get(name, {})
        lines.append(
            f"| {name} | {s.get('neurons', 0)} | {s.get('shared', '—')} | {s.get('language-bound', '—')} |"
        )
    lines.append("")
    for name in LABELINGS:
        rows = report.top.get(name, [])
        if not rows:
            continue
        lines += [f"### {name}", "", "| neuron | class | AUROC | in-class mean (share) | within-language AUROC | shared |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for r in rows:
            share = "n/a" if r["in_class_share"] is None else f"{r['in_class_share']:+.3f}"
            within = " ".join(f"{g}:{v:.2f}" for g, v in r.get("within_language_auroc", {}).items()) or "—"
            lines.append(
                f"| {r['node']} | {r['class_label']} | {r['auroc']:.3f} | {r['in_class_mean']:+.4f} ({share}) | {within} | {r.get('shared', '—')} |"
            )
        lines.append("")
    st = report.steering
    lines += ["## Steering one shared neuron", ""]
    if not st:
        lines += ["No shared concept neuron was found, so nothing was steered.", ""]
    else:
        lines += [
            f'{st["neuron"]} (selective for the answer concept "{st["concept"]}", AUROC {st["auroc"]:.3f}), at every '
            f'position, on the "{st["concept"]}" prompts of each language; control: {st["control"]} (random, same '
            "layer). Change of the answer's mean log-probability:",
            "",
            "| language | prompts | log p(answer) | zeroed | x3 | control zeroed | control x3 |",
            "|---|---|---|---|---|---|---|",
        ]
        for g, row in st["languages"].items():
            lines.append(f"| {LANGUAGE_NAMES[g]} | {', '.join(row['prompts'])} | {row['logp']:+.2f} | {row['zeroed']:+.3f} | "
                         f"{row['x3']:+.3f} | {row['control zeroed']:+.3f} | {row['control x3']:+.3f} |")  # fmt: skip
        lines += ["", "![steering](steering.png)", ""]
        labels = [LANGUAGE_NAMES[g] for g in st["languages"]]
        bar_plot(out / "steering.png", labels, [r["zeroed"] for r in st["languages"].values()],
                 title=f"zeroing {st['neuron']}: change of log p(answer) on \"{st['concept']}\" prompts",
                 ylabel="Δ log p(answer)")  # fmt: skip
    g = report.graph
    lines += [
        "## Attribution graph",
        "",
        f"First English prompt: {g['neurons']} neuron nodes and {g['edges']} edges, pruned to {g['pruned_neurons']} and "
        f"{g['pruned_edges']}: [{g['json']}]({g['json']}), [{g['html']}]({g['html']}) (offline viewer).",
        "",
        f"Times: {json.dumps({k: round(v, 1) for k, v in report.seconds.items()})} s. Raw numbers: report.json, "
        "auroc-*.json, attribution.safetensors.",
        "",
    ]
    write_text_atomic(out / "report.md", "\n".join(lines))

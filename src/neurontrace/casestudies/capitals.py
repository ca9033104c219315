"""Case study: two-hop capitals. "What is the capital of the state containing {city}?" -> the state's capital.

One city per US state (not the capital). Three prompt sets, each in the model's chat template with the start of
the answer written out so that the next token is the answer:

- two-hop: "What is the capital of the state containing Dallas?" / "The capital of the state containing Dallas is"
- one-hop: "What is the capital of Texas?" / "The capital of Texas is"
- city -> state: "Which state is Dallas in?" / "Dallas is in the state of"

The last two say which hop the model can do on its own. Per prompt, RelP attributes the teacher-forced
log-probability of the capital to every (layer, position, neuron); the ``top_k`` nodes are sorted into

- **state** neurons: at the last token of a mention of the city (two-hop) whose activation there is selective for
  that state among all prompts (|z| >= ``z``) *and* is selective, with the same sign, at the state's name in the
  one-hop prompt of the same state: they carry "Texas" whether it is named or reached through Dallas;
- **city** neurons: selective at the city's mention but not at the state's name;
- **say {capital}** neurons: at the last position, whose writes (down-projection column through the final norm and
  unembedding, for the sign they fire with) put the capital's first token among their top 20;
- **say a capital** neurons: at the last position, whose top 50 written tokens hold at least 3 capitals' first
  tokens (no state names), without being the specific one.

Steering: each prompt's steering set is its ``max_steer`` neurons of largest |attribution| at the mentions that
pass the state test above (whatever their rank among all nodes: a 135M model keeps few of them in its top nodes).
For pairs of states (A, B) whose capitals the model names in the one-hop prompt, we zero A's set where it fires and set B's set, at A's mentions, to the values it takes
at B's mentions ("ablate Texas, add California"), and count how often the next token becomes B's capital, against
a control that edits as many random neurons at the same places. The same is done for the one-hop prompts.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from neurontrace.casestudies.common import (
    PromptScores,
    attribute_each,
    bar_plot,
    chat_prompt,
    first_token,
    layer_histogram,
    next_token_logprobs,
    spans,
    write_graph_bundle,
)
from neurontrace.describe.writes import logit_effects
from neurontrace.errors import NeurontraceError
from neurontrace.interventions import Edit, intervene
from neurontrace.io import JsonResult, write_text_atomic
from neurontrace.models.model import NeuronModel
from neurontrace.steering.steer import greedy_generate
from neurontrace.tokens import tokenize

# (state, capital, a well-known city of the state that is not its capital and does not contain its name)
STATES: list[tuple[str, str, str]] = [
    ("Alabama", "Montgomery", "Birmingham"), ("Alaska", "Juneau", "Anchorage"), ("Arizona", "Phoenix", "Tucson"),
    ("Arkansas", "Little Rock", "Fayetteville"), ("California", "Sacramento", "Los Angeles"),
    ("Colorado", "Denver", "Boulder"), ("Connecticut", "Hartford", "Bridgeport"), ("Delaware", "Dover", "Wilmington"),
    ("Florida", "Tallahassee", "Miami"), ("Georgia", "Atlanta", "Savannah"), ("Hawaii", "Honolulu", "Hilo"),
    ("Idaho", "Boise", "Pocatello"), ("Illinois", "Springfield", "Chicago"), ("Indiana", "Indianapolis", "Fort Wayne"),
    ("Iowa", "Des Moines", "Davenport"), ("Kansas", "Topeka", "Wichita"), ("Kentucky", "Frankfort", "Louisville"),
    ("Louisiana", "Baton Rouge", "New Orleans"), ("Maine", "Augusta", "Bangor"), ("Maryland", "Annapolis", "Baltimore"),
    ("Massachusetts", "Boston", "Worcester"), ("Michigan", "Lansing", "Detroit"), ("Minnesota", "Saint Paul", "Minneapolis"),
    ("Mississippi", "Jackson", "Biloxi"), ("Missouri", "Jefferson City", "St. Louis"), ("Montana", "Helena", "Billings"),
    ("Nebraska", "Lincoln", "Omaha"), ("Nevada", "Carson City", "Las Vegas"), ("New Hampshire", "Concord", "Nashua"),
    ("New Jersey", "Trenton", "Newark"), ("New Mexico", "Santa Fe", "Albuquerque"), ("New York", "Albany", "Buffalo"),
    ("North Carolina", "Raleigh", "Charlotte"), ("North Dakota", "Bismarck", "Fargo"), ("Ohio", "Columbus", "Cleveland"),
    ("Oklahoma", "Oklahoma City", "Tulsa"), ("Oregon", "Salem", "Portland"), ("Pennsylvania", "Harrisburg", "Philadelphia"),
    ("Rhode Island", "Providence", "Newport"), ("South Carolina", "Columbia", "Charleston"),
    ("South Dakota", "Pierre", "Sioux Falls"), ("Tennessee", "Nashville", "Memphis"), ("Texas", "Austin", "Dallas"),
    ("Utah", "Salt Lake City", "Provo"), ("Vermont", "Montpelier", "Burlington"), ("Virginia", "Richmond", "Norfolk"),
    ("Washington", "Olympia", "Seattle"), ("West Virginia", "Charleston", "Morgantown"), ("Wisconsin", "Madison", "Milwaukee"),
    ("Wyoming", "Cheyenne", "Casper"),
]  # fmt: skip

CATEGORIES = ("state", "city", "say {capital}", "say a capital")


def two_hop_prompt(model: NeuronModel, city: str) -> str:
    return chat_prompt(
        model,
        f"What is the capital of the state containing {city}?",
        f"The capital of the state containing {city} is",
    )


def one_hop_prompt(model: NeuronModel, state: str) -> str:
    return chat_prompt(model, f"What is the capital of {state}?", f"The capital of {state} is")


def city_state_prompt(model: NeuronModel, city: str) -> str:
    return chat_prompt(model, f"Which state is {city} in?", f"{city} is in the state of")


@dataclass
class CapitalsReport(JsonResult):
    model: str
    n_states: int
    accuracy: dict[
        str, float
    ]  # prompt set -> share of prompts whose next token is the right answer's first token
    two_hop_answers: dict[str, int]  # what the two-hop prompts' next token is: capital / city / state / other
    categories: dict[str, dict[str, float]]  # set -> category -> mean nodes per prompt (of top_k)
    steering: dict[str, dict[str, Any]]
    examples: list[dict[str, Any]] = field(default_factory=list)
    graph: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    schema_version: int = 1


@dataclass
class _Set:
    """One prompt set: its prompts, per-prompt scores and the entity mentions' last tokens."""

    name: str
    prompts: list[str]
    scored: list[PromptScores]
    entity: list[list[int]]  # per prompt: last token position of each mention of the entity (city or state)
    entity_acts: torch.Tensor  # [S, L, M, d] activations at those positions (M mentions)

    def z(self) -> torch.Tensor:
        mean, std = self.entity_acts.mean(0), self.entity_acts.std(0).clamp_min(1e-6)
        return (self.entity_acts - mean) / std


def _make_set(model: NeuronModel, name: str, prompts: list[str], entities: list[str], answers: list[str],
              method: str, progress: bool) -> _Set:  # fmt: skip
    scored = attribute_each(model, prompts, answers, method=method, progress=progress)
    entity = []
    for prompt, word in zip(prompts, entities, strict=True):
        mentions = [s[-1] for s in spans(model, prompt, word)]
        if not mentions:
            raise NeurontraceError(f"could not find {word!r} in the tokens of {prompt!r}")
        entity.append(mentions)
    m = min(len(e) for e in entity)
    entity = [e[-m:] for e in entity]  # the same number of mentions everywhere (the template may add none)
    acts = torch.stack([s.acts[:, e, :] for s, e in zip(scored, entity, strict=True)])
    return _Set(name, prompts, scored, entity, acts)


def _write_tops(model: NeuronModel, needed: dict[int, set[int]]) -> dict[tuple[int, int, bool], list[int]]:
    """The 50 tokens each (layer, neuron, fires positive?) writes most, one product per layer."""
    out: dict[tuple[int, int, bool], list[int]] = {}
    for layer, neurons in needed.items():
        neurons = sorted(neurons)
        effects = logit_effects(model, layer, neurons)  # [k, vocab]
        for sign, values in ((True, effects), (False, -effects)):
            for n, row in zip(
                neurons, values.topk(min(50, values.shape[-1]), dim=-1).indices.tolist(), strict=True
            ):
                out[(layer, n, sign)] = row
    return out


def _classify(model: NeuronModel, main: _Set, other: _Set, capitals: list[int], capital_set: set[int],
              top_k: int, z: float, max_steer: int) -> list[dict[str, list[tuple]]]:  # fmt: skip
    """Per prompt of ``main``: category -> nodes (layer, position, neuron, score, mention); ``steer``: the state
    neurons to swap (the ``max_steer`` state-selective ones of largest attribution, whatever their rank)."""
    z_main, z_other = main.z(), other.z()
    needed: dict[int, set[int]] = {}
    for scored in main.scored:
        last = scored.scores.shape[1] - 1
        for layer, pos, neuron, _ in scored.top_nodes(top_k):
            if pos == last:
                needed.setdefault(layer, set()).add(neuron)
    tops = _write_tops(model, needed)
    out = []
    for s, scored in enumerate(main.scored):
        cats: dict[str, list[tuple]] = {c: [] for c in CATEGORIES}
        last = scored.scores.shape[1] - 1
        for layer, pos, neuron, score in scored.top_nodes(top_k):
            if pos in main.entity[s]:
                j = main.entity[s].index(pos)
                zm = float(z_main[s, layer, j, neuron])
                if abs(zm) < z:
                    continue
                zo = z_other[s, layer, :, neuron] * (1.0 if zm > 0 else -1.0)
                cats["state" if float(zo.max()) >= z else "city"].append((layer, pos, neuron, score, j))
            elif pos == last:
                top = tops[(layer, neuron, float(scored.acts[layer, pos, neuron]) >= 0)]
                if capitals[s] in top[:20]:
                    cats["say {capital}"].append((layer, pos, neuron, score, None))
                elif len(set(top) & capital_set) >= 3:
                    cats["say a capital"].append((layer, pos, neuron, score, None))
        cats["steer"] = _state_neurons(main, scored, s, z_main[s], z_other[s], z, max_steer)
        out.append(cats)
    return out


def _state_neurons(main: _Set, scored: PromptScores, s: int, zm: torch.Tensor, zo: torch.Tensor, z: float,
                   k: int) -> list[tuple]:  # fmt: skip
    """The ``k`` state-selective neurons (any attribution rank) of largest |attribution| at the mentions."""
    matched = torch.where(zm > 0, zo.max(1).values[:, None, :], (-zo).max(1).values[:, None, :]) >= z
    at = scored.scores[:, main.entity[s], :]  # [L, M, d]
    ranked = torch.where((zm.abs() >= z) & matched, at.abs(), torch.zeros_like(at)).flatten()
    top = ranked.topk(min(k, ranked.numel()))
    _, m, d = at.shape
    return [
        (i // (m * d), main.entity[s][(i // d) % m], i % d, float(at.flatten()[i]), (i // d) % m)
        for v, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
        if v > 0
    ]


def swap_edits(target: _Set, cats: list[dict[str, list[tuple]]], a: int, b: int) -> list[Edit]:
    """Zero prompt ``a``'s state neurons where they fire; set ``b``'s, at ``a``'s mentions, to their values in ``b``."""
    edits = [
        Edit(layer=node[0], neurons=[node[2]], positions=[node[1]], op="zero") for node in cats[a]["steer"]
    ]
    for layer, _, neuron, _, mention in cats[b]["steer"]:
        value = float(target.entity_acts[b, layer, mention, neuron])
        where = [target.entity[a][mention]]
        edits.append(Edit(layer=layer, neurons=[neuron], positions=where, op="set", value=value))
    return edits


def _steer_pairs(model: NeuronModel, target: _Set, cats: list[dict[str, list[tuple]]], capitals: list[int],
                 names: list[str], known: list[bool], *, n_states: int, seed: int) -> dict[str, Any]:  # fmt: skip
    """Swap the state neurons of A for B's on A's prompt; how often does the next token become B's capital?

    Only states whose capital the model names in the one-hop prompt (``known``) take part: a swap cannot make
    the model say a capital it does not know."""
    mass = lambda s: sum(abs(node[3]) for node in cats[s]["steer"])  # noqa: E731
    usable = [s for s in range(len(cats)) if cats[s]["steer"] and known[s]]
    with_state = sorted(usable, key=lambda s: -mass(s))[:n_states]
    rng = random.Random(seed)
    d_ff = model.d_ff
    rows = []
    for a in with_state:
        for b in with_state:
            if a == b or capitals[a] == capitals[b]:
                continue
            edits = swap_edits(target, cats, a, b)
            control = [
                Edit(
                    layer=e.layer,
                    neurons=[rng.randrange(d_ff)],
                    positions=e.positions,
                    op=e.op,
                    value=e.value,
                )
                for e in edits
            ]
            row = {"a": names[a], "b": names[b], "edits": len(edits)}
            for label, chosen in (("steered", edits), ("control", control)):
                batch = tokenize(model, target.prompts[a])
                with torch.no_grad(), intervene(model, chosen):
                    logp = model.forward(batch, logits_to_keep=1).logits[0, -1].float().log_softmax(-1)
                row[label] = {
                    "top": int(logp.argmax()),
                    "switched": int(logp.argmax()) == capitals[b],
                    "logp_b": float(logp[capitals[b]]),
                    "logp_a": float(logp[capitals[a]]),
                }
            rows.append(row)
    base = next_token_logprobs(model, [target.prompts[a] for a in with_state]) if with_state else None
    base_by = {a: base[i] for i, a in enumerate(with_state)}
    for row in rows:
        a, b = names.index(row["a"]), names.index(row["b"])
        row["before"] = {"logp_b": float(base_by[a][capitals[b]]), "logp_a": float(base_by[a][capitals[a]])}
    n = max(1, len(rows))
    summary = {
        "states": [names[s] for s in with_state],
        "pairs": len(rows),
        "switched": sum(r["steered"]["switched"] for r in rows) / n,
        "switched_control": sum(r["control"]["switched"] for r in rows) / n,
        "b_above_a": sum(r["steered"]["logp_b"] > r["steered"]["logp_a"] for r in rows) / n,
        "b_above_a_before": sum(r["before"]["logp_b"] > r["before"]["logp_a"] for r in rows) / n,
        "b_above_a_control": sum(r["control"]["logp_b"] > r["control"]["logp_a"] for r in rows) / n,
        "mean_delta_logp_b": sum(r["steered"]["logp_b"] - r["before"]["logp_b"] for r in rows) / n,
        "mean_delta_logp_b_control": sum(r["control"]["logp_b"] - r["before"]["logp_b"] for r in rows) / n,
        "mean_delta_logp_a": sum(r["steered"]["logp_a"] - r["before"]["logp_a"] for r in rows) / n,
    }
    return {"summary": summary, "pairs": rows}


def run_capitals(
    model: NeuronModel,
    *,
    out: str | Path,
    n_states: int | None = None,
    method: str = "relp",
    top_k: int = 500,
    z: float = 3.0,
    steer_states: int = 10,
    max_steer: int = 20,
    graph_state: str = "Texas",
    seed: int = 0,
    progress: bool = True,
) -> CapitalsReport:
    """Run the capitals case study on ``n_states`` states (all 50 by default) and write the report folder."""
    rows = STATES[: n_states or len(STATES)]
    if len(rows) < 12:
        raise NeurontraceError(
            "give at least 12 states: a neuron is called selective when its z-score among the states is >= 3, "
            "which fewer than 11 states cannot reach"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = [s for s, _, _ in rows]
    capitals = [first_token(model, f" {c}") for _, c, _ in rows]
    state_tokens = {first_token(model, f" {s}") for s, _, _ in rows}
    capital_set = set(capitals) - state_tokens
    times: dict[str, float] = {}

    start = time.perf_counter()
    two = [two_hop_prompt(model, city) for _, _, city in rows]
    one = [one_hop_prompt(model, state) for state, _, _ in rows]
    cs = [city_state_prompt(model, city) for _, _, city in rows]
    lp_two, lp_one, lp_cs = (next_token_logprobs(model, p) for p in (two, one, cs))
    top_two = lp_two.argmax(-1).tolist()
    accuracy = {
        "two-hop (city -> capital)": sum(t == c for t, c in zip(top_two, capitals, strict=True)) / len(rows),
        "one-hop (state -> capital)": sum(int(lp_one[i].argmax()) == capitals[i] for i in range(len(rows))) / len(rows),
        "city -> state": sum(
            int(lp_cs[i].argmax()) == first_token(model, f" {rows[i][0]}") for i in range(len(rows))
        ) / len(rows),
    }  # fmt: skip
    answers: dict[str, int] = {"capital": 0, "the city itself": 0, "the state": 0, "other": 0}
    for i, t in enumerate(top_two):
        kind = (
            "capital" if t == capitals[i]
            else "the city itself" if t == first_token(model, f" {rows[i][2]}")
            else "the state" if t == first_token(model, f" {rows[i][0]}")
            else "other"
        )  # fmt: skip
        answers[kind] += 1
    known = [int(lp_one[i].argmax()) == capitals[i] for i in range(len(rows))]
    times["behaviour"] = time.perf_counter() - start

    start = time.perf_counter()
    caps = [f" {c}" for _, c, _ in rows]
    two_set = _make_set(model, "two-hop", two, [c for _, _, c in rows], caps, method, progress)
    one_set = _make_set(model, "one-hop", one, names, caps, method, progress)
    times["attribution"] = time.perf_counter() - start

    start = time.perf_counter()
    cats_two = _classify(model, two_set, one_set, capitals, capital_set, top_k, z, max_steer)
    cats_one = _classify(model, one_set, two_set, capitals, capital_set, top_k, z, max_steer)
    categories = {
        name: {c: sum(len(p[c]) for p in cats) / len(cats) for c in CATEGORIES}
        for name, cats in (("two-hop", cats_two), ("one-hop", cats_one))
    }
    times["classification"] = time.perf_counter() - start

    start = time.perf_counter()
    steering = {
        label: _steer_pairs(model, target, cats, capitals, names, known, n_states=steer_states, seed=seed)
        for label, target, cats in (("two-hop", two_set, cats_two), ("one-hop", one_set, cats_one))
    }
    examples = _examples(model, two_set, one_set, cats_two, cats_one, rows, steering)
    times["steering"] = time.perf_counter() - start

    start = time.perf_counter()
    gi = names.index(graph_state) if graph_state in names else 0
    wanted = [model.token_str(capitals[gi])]
    top_token = model.token_str(top_two[gi])
    if top_two[gi] != capitals[gi]:
        wanted.append(top_token)
    graph = write_graph_bundle(
        model, two[gi], answers=wanted, out=out, slug=f"graph-{names[gi].lower().replace(' ', '-')}"
    )
    times["graph"] = time.perf_counter() - start

    report = CapitalsReport(
        model.name, len(rows), accuracy, answers, categories,
        {k: v["summary"] for k, v in steering.items()}, examples, graph, times,
    )  # fmt: skip
    _write(out, model, report, rows, cats_two, cats_one, steering, two[gi], names[gi])
    report.save(out / "report.json")
    write_text_atomic(out / "steering.json", json.dumps(steering, indent=1))
    return report


def _examples(
    model, two_set, one_set, cats_two, cats_one, rows, steering, n: int = 3
) -> list[dict[str, Any]]:
    """Greedy continuations before and after the swap for the first ``n`` pairs of each set."""
    names = [s for s, _, _ in rows]
    out = []
    for label, target, cats in (("two-hop", two_set, cats_two), ("one-hop", one_set, cats_one)):
        for row in steering[label]["pairs"][:n]:
            a, b = names.index(row["a"]), names.index(row["b"])
            edits = swap_edits(target, cats, a, b)
            batch = tokenize(model, target.prompts[a])
            before = greedy_generate(model, batch, max_new_tokens=8)[0]
            after = greedy_generate(model, batch, max_new_tokens=8, edits=edits)[0]
            out.append({
                "set": label, "a": row["a"], "b": row["b"],
                "before": model.tokenizer.decode(before), "after": model.tokenizer.decode(after),
            })  # fmt: skip
    return out


def _write(out: Path, model: NeuronModel, report: CapitalsReport, rows, cats_two, cats_one, steering,
           graph_prompt: str, graph_state: str) -> None:  # fmt: skip
    names = [s for s, _, _ in rows]
    layer_histogram(
        out / "categories-two-hop.png",
        {c: [node[0] for p in cats_two for node in p[c]] for c in CATEGORIES},
        model.n_layers, title="two-hop prompts: top RelP nodes by category and layer (all prompts)",
    )  # fmt: skip
    layer_histogram(
        out / "categories-one-hop.png",
        {c: [node[0] for p in cats_one for node in p[c]] for c in CATEGORIES},
        model.n_layers, title="one-hop prompts: top RelP nodes by category and layer (all prompts)",
    )  # fmt: skip
    s2, s1 = steering["two-hop"]["summary"], steering["one-hop"]["summary"]
    bar_plot(
        out / "steering.png",
        ["two-hop swap", "two-hop control", "one-hop swap", "one-hop control"],
        [s2["switched"], s2["switched_control"], s1["switched"], s1["switched_control"]],
        title="share of state pairs (A, B) whose next token becomes B's capital", ylabel="share of pairs",
    )  # fmt: skip
    acc = report.accuracy
    lines = [
        f"# Two-hop capitals on {model.name}",
        "",
        f"{len(rows)} states, one city each (not the capital). Prompts in the chat template with the answer's start "
        "written out; the next token should be the capital's first token.",
        "",
        "| prompt set | example | next token is the answer |",
        "|---|---|---|",
        f"| two-hop | What is the capital of the state containing Dallas? / The capital of the state containing Dallas is | {acc['two-hop (city -> capital)']:.0%} |",
        f"| one-hop | What is the capital of Texas? / The capital of Texas is | {acc['one-hop (state -> capital)']:.0%} |",
        f"| city -> state | Which state is Dallas in? / Dallas is in the state of | {acc['city -> state']:.0%} |",
        "",
        "What the two-hop prompts' next token is: "
        + ", ".join(f"{k} {v}" for k, v in report.two_hop_answers.items()) + ".",
        "",
        "## Neurons",
        "",
        "Mean number per prompt, among each prompt's top RelP nodes (attribution of the capital's log-probability; "
        "categories defined in the module docstring of `neurontrace.casestudies.capitals`):",
        "",
        "| prompt set | " + " | ".join(CATEGORIES) + " |",
        "|---|" + "---|" * len(CATEGORIES),
    ]  # fmt: skip
    for name, counts in report.categories.items():
        lines.append(f"| {name} | " + " | ".join(f"{counts[c]:.1f}" for c in CATEGORIES) + " |")
    lines += ["", "![categories](categories-two-hop.png)", "", "![categories](categories-one-hop.png)", ""]
    recurring = _recurring(cats_two + cats_one, "say a capital")
    if recurring:
        lines += ["Most frequent \"say a capital\" neurons (prompts where they are among the top nodes): "
                  + ", ".join(f"L{l}/N{n} ({c})" for (l, n), c in recurring[:8]) + ".", ""]  # fmt: skip
    gi = names.index(graph_state)
    for label, cats in (("two-hop", cats_two), ("one-hop", cats_one)):
        lines += [f"{label}, {graph_state}: " + "; ".join(
            f"{c}: " + (", ".join(f"L{n[0]}/N{n[2]}@{n[1]} ({n[3]:+.3f})" for n in cats[gi][c][:6]) or "none")
            for c in CATEGORIES) + ".", ""]  # fmt: skip
    lines += ["## Steering the state neurons", ""]
    for label in ("two-hop", "one-hop"):
        s = steering[label]["summary"]
        lines += [
            f"**{label}**: {s['pairs']} ordered pairs over the {len(s['states'])} states of largest state-neuron attribution among those whose capital the model names in the one-hop prompt "
            f"({', '.join(s['states'])}). Next token becomes B's capital: {s['switched']:.0%} (control with as many "
            f"random neurons: {s['switched_control']:.0%}). log p(B's capital) above log p(A's capital): "
            f"{s['b_above_a']:.0%} after the swap, {s['b_above_a_before']:.0%} before, {s['b_above_a_control']:.0%} "
            f"control. Mean change of log p(B's capital): {s['mean_delta_logp_b']:+.2f} "
            f"(control {s['mean_delta_logp_b_control']:+.2f}); of log p(A's capital): {s['mean_delta_logp_a']:+.2f}.",
            "",
        ]  # fmt: skip
    lines += ["![steering](steering.png)", "", "| set | A | B | before | after |", "|---|---|---|---|---|"]
    for e in report.examples:
        clean = lambda t: t.replace("|", "\\|").replace("\n", " ")  # noqa: E731
        lines.append(f"| {e['set']} | {e['a']} | {e['b']} | {clean(e['before'])} | {clean(e['after'])} |")
    g = report.graph
    lines += [
        "",
        "## Attribution graph",
        "",
        f"`{graph_prompt!r}`: {g['neurons']} neuron nodes and {g['edges']} edges, pruned to {g['pruned_neurons']} "
        f"and {g['pruned_edges']}: [{g['json']}]({g['json']}) (circuit-tracer format), [{g['html']}]({g['html']}) "
        "(offline viewer).",
        "",
        f"Times: {json.dumps({k: round(v, 1) for k, v in report.seconds.items()})} s. Raw numbers: report.json, "
        "steering.json.",
        "",
    ]
    write_text_atomic(out / "report.md", "\n".join(lines))


def _recurring(cats: list[dict[str, list[tuple]]], category: str) -> list[tuple[tuple[int, int], int]]:
    counts: dict[tuple[int, int], int] = {}
    for p in cats:
        for key in {(node[0], node[2]) for node in p[category]}:
            counts[key] = counts.get(key, 0) + 1
    return sorted(counts.items(), key=lambda kv: -kv[1])

"""The capitals and antonyms case studies run end to end and write their report folders (tiny model; the real
runs on the default model are in docs/case-studies.md), and their pieces do what they say."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny

from neurontrace.casestudies.antonyms import PAIRS, TEMPLATES, items, run_antonyms
from neurontrace.casestudies.capitals import STATES, run_capitals, swap_edits
from neurontrace.casestudies.common import chat_prompt, spans
from neurontrace.cli import main
from neurontrace.interventions import intervene
from neurontrace.sites import capture


def test_state_table_is_one_city_per_state_and_never_the_capital():
    assert len(STATES) == 50 and len({s for s, _, _ in STATES}) == 50
    for state, capital, city in STATES:
        assert city != capital and state not in city


def test_antonym_items_cover_every_pair_both_ways_in_every_language():
    data = items(list(TEMPLATES))
    assert len(data) == 2 * len(PAIRS) * len(TEMPLATES)
    hot = [it for it in data if it.attribute == "temperature" and it.language == "de"]
    assert {(it.word, it.answer, it.concept) for it in hot} == {
        ("heiß", "kalt", "cold"),
        ("kalt", "heiß", "hot"),
    }


def test_spans_find_every_mention():
    model = make_tiny("llama")
    prompt = chat_prompt(model, "the keys to the cabinet", "the cabinet")
    assert prompt == "Q: the keys to the cabinet\nA: the cabinet"  # no chat template: plain Q/A
    found = spans(model, prompt, "the cabinet")
    ids = model.tokenizer.encode(prompt)
    assert len(found) == 2
    for span in found:
        assert model.tokenizer.decode([ids[i] for i in span]).strip() == "the cabinet"


def test_capitals_report_folder_and_the_swap_edits(tmp_path):
    model = make_tiny("llama")
    report = run_capitals(model, out=tmp_path, n_states=12, top_k=50, z=1.5, steer_states=3, progress=False)
    assert report.n_states == 12 and set(report.accuracy) == {
        "two-hop (city -> capital)", "one-hop (state -> capital)", "city -> state"
    }  # fmt: skip
    text = (tmp_path / "report.md").read_text()
    assert "## Steering the state neurons" in text and "## Attribution graph" in text
    assert json.loads((tmp_path / "report.json").read_text())["schema_version"] == 1
    assert (tmp_path / report.graph["json"]).is_file() and (tmp_path / report.graph["html"]).is_file()
    assert (tmp_path / "steering.png").is_file()


def test_swap_edits_zero_a_and_write_b_values_at_a_mentions():
    from neurontrace.casestudies.capitals import _Set

    model = make_tiny("llama")
    prompts = ["the keys to the cabinet", "the key of the door"]
    acts = torch.arange(2 * 2 * 1 * model.d_ff, dtype=torch.float32).reshape(2, 2, 1, model.d_ff)
    target = _Set("t", prompts, [], [[4], [4]], acts)
    cats = [{"steer": [(1, 4, 7, 0.5, 0)]}, {"steer": [(0, 4, 3, 0.2, 0)]}]
    edits = swap_edits(target, cats, 0, 1)
    batch = model.tokenize(prompts[0])
    with intervene(model, edits):
        got = capture(model, batch, layers=[0, 1]).acts
    assert float(got[("neurons", 1)][0, 4, 7]) == 0.0
    assert float(got[("neurons", 0)][0, 4, 3]) == float(acts[1, 0, 0, 3])


def test_antonyms_report_folder(tmp_path):
    model = make_tiny("llama")
    report = run_antonyms(model, out=tmp_path, languages=["en", "fr"], shared_auroc=0.5, progress=False)
    assert report.n_prompts == 2 * 2 * len(PAIRS)
    assert set(report.accuracy) == {"en", "fr"} and set(report.english_answer) == {"en", "fr"}
    assert set(report.selective) == {"language", "answer concept", "attribute"}
    text = (tmp_path / "report.md").read_text()
    assert "## Selective neurons" in text and "## Steering one shared neuron" in text
    assert (tmp_path / report.graph["html"]).is_file()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["case", "capitals", "--states", "5"], "at least 12 states"),
        (["case", "antonyms", "--languages", "en,xx"], "unknown language 'xx'"),
    ],
)
def test_bad_case_arguments_are_one_line_errors(argv, message, capsys, monkeypatch):
    import neurontrace.commands.case as case

    monkeypatch.setattr(case, "model_from_args", lambda args: make_tiny("llama"))
    assert main(argv) == 2
    assert message in capsys.readouterr().err

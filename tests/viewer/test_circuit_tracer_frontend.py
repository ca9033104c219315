"""Our graph files in circuit-tracer's own frontend (pip ``circuit-tracer`` 0.5.0), offline, in headless Chromium.

Three graphs of the default model (a short prompt, a 32-token one, one with markup whose targets include the
``"`` token) are written by ``neurontrace graph`` into one folder, which circuit-tracer's request handler serves
as its data folder (``ct_frontend.py``). Every check is on what circuit-tracer's code does with the files: its
pydantic graph model accepts them, its page renders every pruned node with no console error, its node panel
shows a neuron's activation and promoted tokens, its logit axis shows the target tokens, and a graph saved by its
Save button (qParams as strings) opens in our viewer with the pins and supernodes.
"""

from __future__ import annotations

import json
import urllib.parse
from pathlib import Path

import pytest
from ct_frontend import chromium, console_errors, missing, prepare, serve, wait_for

from neurontrace.cli import main
from neurontrace.graphs.export import NEURON_TYPE, validate_circuit_tracer

pytestmark = [pytest.mark.browser, pytest.mark.default_model]

SHORT = "The keys to the cabinet"
LONG = (
    "The old man who lived in the small house at the end of the long and winding road near the river told "
    "all of the children that the keys to the cabinet"
)
MARKUP = 'She wrote <b>"the keys</b> to the <script>window.__xss=1</script> cabinet'
SLUGS = ["sva-000", "sva-001", "markup"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    why = missing()
    if why or not Path("/usr/bin/chromedriver").exists():
        pytest.skip(why or "needs /usr/bin/chromium and /usr/bin/chromedriver")
    out = tmp_path_factory.mktemp("graphs")
    prompts = out.parent / "prompts.txt"
    prompts.write_text(f"{SHORT}\n{LONG}\n", encoding="utf-8")
    assert main(["graph", "--prompts", str(prompts), "--slug", "sva", "--out", str(out)]) == 0
    assert main(["graph", "--prompt", MARKUP, "--answer", '"', "--answer", " are", "--slug", "markup",
                 "--out", str(out)]) == 0  # fmt: skip
    return out


def _graph(data_dir: Path, slug: str) -> dict:
    return json.loads((data_dir / f"{slug}.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def site(data_dir, tmp_path_factory):
    frontend = prepare(tmp_path_factory.mktemp("frontend"))
    with serve(data_dir, frontend) as url:
        yield url


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    drv = chromium(tmp_path_factory.mktemp("profile"))
    try:
        yield drv
    finally:
        drv.quit()


def open_graph(driver, site: str, slug: str, **params: str) -> int:
    query = urllib.parse.urlencode({"slug": slug, **params})
    driver.get(f"{site}/index.html?{query}")
    return wait_for(driver, "return document.querySelectorAll('.link-graph text.node').length")


def test_graph_files_pass_circuit_tracers_models_and_index(data_dir):
    from circuit_tracer.frontend.graph_models import Metadata, Model

    index = json.loads((data_dir / "graph-metadata.json").read_text(encoding="utf-8"))
    assert [g["slug"] for g in index["graphs"]] == SLUGS  # one entry per graph, both runs
    for entry in index["graphs"]:
        Metadata(**entry)
    for slug in SLUGS:
        data = _graph(data_dir, slug)
        Model(**data)  # circuit-tracer's own graph-file model
        validate_circuit_tracer(data)
        neurons = [n for n in data["nodes"] if n["feature_type"] == NEURON_TYPE]
        threshold = data["metadata"]["node_threshold"]
        assert neurons and all(n["influence"] <= threshold for n in neurons)
        # on circuit-tracer's scale: the largest cumulative influence of a kept neuron (not renormalised to 1)
        assert threshold == max(n["influence"] for n in neurons) and 0.5 < threshold < 0.9
        logits = [n for n in data["nodes"] if n["feature_type"] == "logit"]
        assert [n["is_target_logit"] for n in logits] == [True] + [False] * (len(logits) - 1)
        for n in data["nodes"]:
            if n["feature_type"] == "embedding":
                assert n["feature"] == n["ctx_idx"] and n["jsNodeId"] == f"E_{n['index']}-{n['ctx_idx']}"
        for n in neurons:  # the feature file the node panel loads
            feature = json.loads(
                (data_dir / "features" / "smollm2-135m" / f"{n['feature']}.json").read_text()
            )
            assert feature["index"] == n["feature"] and feature["top_logits"]
    assert len(_graph(data_dir, "sva-001")["metadata"]["prompt_tokens"]) >= 31
    assert '"' in [n["token"] for n in _graph(data_dir, "markup")["nodes"] if n["feature_type"] == "logit"]


@pytest.mark.parametrize("slug", SLUGS)
def test_every_pruned_node_renders_with_no_console_error(driver, site, data_dir, slug):
    data = _graph(data_dir, slug)
    assert open_graph(driver, site, slug) == len(data["nodes"])
    drawn = driver.execute_script("return d3.selectAll('.link-graph text.node').data().map(d => d.node_id)")
    assert sorted(drawn) == sorted(n["node_id"] for n in data["nodes"])
    labels = driver.execute_script(
        "return [...document.querySelectorAll('.link-graph g.axis > g text')].map(t => t.textContent)"
    )
    want = [n["token"].replace('"', "\uff02") for n in data["nodes"] if n["feature_type"] == "logit"]
    assert sorted(labels[-len(want) :]) == sorted(want) and all(want)  # the logit label shows the token
    tokens = driver.execute_script(
        "return [...document.querySelectorAll('g.prompt-token text')].map(t => t.textContent)"
    )
    assert len(tokens) == len(data["metadata"]["prompt_tokens"])
    assert driver.execute_script("return window.__xss") is None  # markup in the prompt is shown as text
    assert console_errors(driver) == []


def test_neuron_panel_shows_activation_and_promoted_tokens(driver, site, data_dir):
    data = _graph(data_dir, "sva-000")
    node = min((n for n in data["nodes"] if n["feature_type"] == NEURON_TYPE), key=lambda n: n["influence"])
    open_graph(driver, site, "sva-000", clickedId=node["node_id"])
    text = wait_for(
        driver,
        "const t = document.querySelector('.feature-detail').textContent; return t.includes('Top Outputs') && t",
    )
    assert text, "the node panel shows no outputs"
    assert f"Act: {node['activation']:.2f}" in text
    assert all(token in text for token in node["top_logit_effects"])
    predictions = wait_for(
        driver,
        "const t = document.querySelector('.feature-examples').textContent; return t.includes('Top') && t",
    )
    assert predictions and "Token Predictions" in predictions  # its feature file was loaded
    assert console_errors(driver) == []


def test_graph_saved_by_circuit_tracer_opens_in_our_viewer(driver, site, data_dir, tmp_path):
    from circuit_tracer.frontend.graph_models import Model
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    slug = "markup"
    data = _graph(data_dir, slug)
    neurons = sorted(
        (n for n in data["nodes"] if n["feature_type"] == NEURON_TYPE), key=lambda n: n["influence"]
    )
    pins = [n["node_id"] for n in neurons[:3]]
    group = [["say a verb", pins[0], pins[1]]]
    open_graph(driver, site, slug, supernodes=json.dumps(group))
    for pin in pins:  # ctrl-click pins a node in circuit-tracer's page
        element = driver.execute_script(
            "return [...document.querySelectorAll('.link-graph text.node')].find(e => d3.select(e).datum().node_id"
            " == arguments[0])",
            pin,
        )
        ActionChains(driver).key_down(Keys.CONTROL).click(element).key_up(Keys.CONTROL).perform()
    assert wait_for(driver, "return new URL(location).searchParams.get('pinnedIds')") == ",".join(pins)
    driver.find_element("css selector", "button.save-button").click()
    assert wait_for(driver, "return document.querySelector('button.save-button').textContent == 'Saved!'")
    saved = _graph(data_dir, slug)
    assert saved["qParams"]["pinnedIds"] == ",".join(pins)  # circuit-tracer saves its URL parameters
    assert json.loads(saved["qParams"]["supernodes"]) == group
    assert saved["nodes"] == data["nodes"] and saved["links"] == data["links"]
    validate_circuit_tracer(saved)  # our schema takes the saved form
    # it reopens in circuit-tracer with the pins (its fetches use force-cache: drop the cached graph first)
    driver.execute_cdp_cmd("Network.clearBrowserCache", {})
    assert open_graph(driver, site, slug) == len(data["nodes"])
    assert wait_for(driver, "return document.querySelectorAll('.link-graph text.node.pinned').length") == 3
    assert console_errors(driver) == []
    # and in our viewer, pins and supernodes intact, nothing dropped
    saved_file = tmp_path / "saved.json"
    saved_file.write_text(json.dumps(saved), encoding="utf-8")
    assert main(["view", str(saved_file), "--out", str(tmp_path)]) == 0
    driver.get((tmp_path / "saved.html").as_uri())
    driver.get_log("browser")
    got = driver.execute_script("return window.neurontraceGraph()")
    assert got["qParams"]["pinnedIds"] == pins and got["qParams"]["supernodes"] == group
    assert got["nodes"] == data["nodes"] and got["links"] == data["links"]
    Model(**{**got, "qParams": {**got["qParams"], "supernodes": got["qParams"]["supernodes"]}})
    drawn = driver.execute_script("return [...document.querySelectorAll('.node')].map(e => e.dataset.nodeId)")
    assert set(pins) <= set(drawn)
    assert driver.find_element("id", "graph-model").text == "smollm2-135m"  # not the feature folder of `scan`
    assert console_errors(driver) == []

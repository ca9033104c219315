"""The offline graph viewer: embedding and escaping (plain), then the page itself in headless Chromium.

The browser tests share one Chromium per module and need the Debian packages ``chromium`` and
``chromium-driver`` (``/usr/bin/chromium``, ``/usr/bin/chromedriver``); Selenium is pointed at both, so
Selenium Manager never goes to the network.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import re
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from sample_graph import build_sample_graph, visible_count

from neurontrace.errors import NeurontraceError
from neurontrace.viewer import embed_json, graph_from_html, render_viewer, write_viewer

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
HOSTILE = [
    "<script>alert(1)</script>",
    '"quotes"',
    "'single'",
    "</script>",
    '<img src=x onerror="window.__xss=1">',
]


def hostile_graph() -> dict:
    """The sample graph with hostile strings in the prompt, tokens, slug, a clerp and promoted tokens."""
    graph = build_sample_graph()
    meta = graph["metadata"]
    meta["prompt_tokens"] = [*HOSTILE, " cabinet"]
    meta["prompt"] = "".join(meta["prompt_tokens"])
    meta["slug"] = HOSTILE[0]
    node = next(n for n in graph["nodes"] if n["feature_type"] == "mlp neuron" and n["influence"] <= 0.5)
    node["clerp"] = " ".join(HOSTILE)
    node["top_tokens"] = list(HOSTILE)
    node["top_contexts"] = [
        {"activation": 4.5, "before": [HOSTILE[0], " and"], "token": HOSTILE[1], "after": [HOSTILE[2]]}
    ]
    node["token"] = HOSTILE[4]
    for n in graph["nodes"]:  # the page should show the hostile tokens, not the sample's own
        if n["feature_type"] != "logit" and n is not node:
            n.pop("token", None)
    return graph


def _neurons(graph: dict) -> list[dict]:
    return [n for n in graph["nodes"] if n["feature_type"] == "mlp neuron"]


# ---------------------------------------------------------------- plain tests (no browser)


def test_embedded_json_round_trips_exactly():
    graph = build_sample_graph()
    graph["metadata"]["note"] = "unicode é 漢字 \u2028 \u2029 & <b> \\ \"q\" 'q' \n\t"
    page = render_viewer(graph)
    assert graph_from_html(page) == graph
    assert json.loads(embed_json(graph)) == graph


def test_hostile_strings_cannot_leave_the_data_block():
    graph = hostile_graph()
    graph["metadata"]["extra"] = "\u2028\u2029<!-- -->]]>&amp;"
    page = render_viewer(graph)
    data = re.search(r'<script type="application/json" id="graph-data">(.*?)</script>', page, re.S)[1]
    for ch in "<>&\u2028\u2029":
        assert ch not in data
    assert "\\u003c/script\\u003e" in data
    assert page.lower().count("<script") == 2 and page.lower().count("</script") == 2
    assert "<img" not in page
    assert graph_from_html(page) == graph
    title = re.search(r"<title>(.*?)</title>", page, re.S)[1]
    assert "<" not in title and "&lt;script&gt;" in title


def test_page_is_self_contained_and_csp_hashes_match():
    page = render_viewer(build_sample_graph())
    assert not re.search(r"https?:", page, re.I)
    assert not re.search(r"<link\b|\bsrc=|@import", page, re.I) and "url(" not in page
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', page)[1]
    assert "default-src 'none'" in csp
    for tag in ("script", "style"):
        body = re.search(rf"<{tag}>(.*?)</{tag}>", page, re.S)[1]
        digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
        assert f"{tag}-src 'sha256-{digest}'" in csp


def test_write_viewer_is_atomic_and_returns_the_path(tmp_path):
    graph = build_sample_graph()
    path = write_viewer(graph, tmp_path / "sub" / "graph.html")
    assert path == tmp_path / "sub" / "graph.html"
    assert path.read_text(encoding="utf-8") == render_viewer(graph)
    assert [p.name for p in path.parent.iterdir()] == ["graph.html"]  # no temporary file left behind


def test_numpy_values_are_written_as_plain_json():
    graph = build_sample_graph()
    graph["nodes"][10]["activation"] = np.float32(1.5)
    graph["nodes"][10]["top_ids"] = np.arange(3)
    back = graph_from_html(render_viewer(graph))
    assert back["nodes"][10]["activation"] == 1.5 and back["nodes"][10]["top_ids"] == [0, 1, 2]


@pytest.mark.parametrize(
    "graph, match",
    [
        ([], "JSON object"),
        ({"nodes": []}, "'links'"),
        ({"nodes": {}, "links": []}, "'nodes'"),
        ({"nodes": [{"influence": float("nan")}], "links": []}, "NaN"),
        ({"nodes": [{"x": object()}], "links": []}, "JSON"),
    ],
)
def test_bad_graphs_are_user_errors(graph, match):
    with pytest.raises(NeurontraceError, match=match):
        render_viewer(graph)


def test_graph_from_html_rejects_other_pages():
    with pytest.raises(NeurontraceError, match="not a neurontrace viewer"):
        graph_from_html("<html><body>hello</body></html>")


def test_sample_graph_has_the_promised_shape():
    graph = build_sample_graph()
    neurons = _neurons(graph)
    assert len(neurons) >= 200 and len({n["layer"] for n in neurons}) >= 25
    assert sum(n["feature_type"] == "embedding" for n in graph["nodes"]) == len(
        graph["metadata"]["prompt_tokens"]
    )
    assert sum(n["feature_type"] == "logit" for n in graph["nodes"]) == 3
    weights = [link["weight"] for link in graph["links"]]
    assert len(weights) >= 300 and min(weights) < 0 < max(weights)
    ids = {n["node_id"] for n in graph["nodes"]}
    assert len(ids) == len(graph["nodes"])
    assert all(link["source"] in ids and link["target"] in ids for link in graph["links"])
    assert 0 < visible_count(graph, 0.3) < visible_count(graph, 0.8) < len(graph["nodes"])


# ---------------------------------------------------------------- browser tests

browser = pytest.mark.browser
needs_chromium = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason="needs the Debian packages chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver)",
)


@pytest.fixture(scope="module")
def downloads(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def driver(tmp_path_factory, downloads):
    """One headless Chromium for the module, with no network services and downloads into ``downloads``."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("needs /usr/bin/chromium and /usr/bin/chromedriver (Debian: chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1600,1000",
        f"--user-data-dir={tmp_path_factory.mktemp('chrome-profile')}",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        drv.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1600, "height": 1000, "deviceScaleFactor": 1, "mobile": False},
        )
        drv.execute_cdp_cmd(
            "Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)}
        )
        yield drv
    finally:
        drv.quit()


@pytest.fixture(scope="module")
def open_graph(driver, tmp_path_factory):
    """Write a graph's viewer to disk, open it from a file:// URL and check the console stayed clean."""
    folder = tmp_path_factory.mktemp("pages")
    count = iter(range(1000))

    def _open(graph: dict):
        path = write_viewer(graph, folder / f"graph{next(count)}.html")
        driver.get(path.as_uri())
        driver.get_log("browser")  # drop anything from the previous page
        return path

    return _open


def console_errors(driver) -> list:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def node_el(driver, node_id: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, f'.node[data-node-id="{node_id}"]')


def click_with(driver, element, key=None):
    from selenium.webdriver.common.action_chains import ActionChains

    chain = ActionChains(driver)
    if key:
        chain.key_down(key)
    chain.click(element)
    if key:
        chain.key_up(key)
    chain.perform()


def graph_now(driver) -> dict:
    return driver.execute_script("return window.neurontraceGraph()")


@browser
@needs_chromium
def test_loads_offline_and_draws_the_default_threshold(driver, open_graph):
    graph = build_sample_graph()
    path = open_graph(graph)
    assert not re.search(r"https?:", path.read_text(encoding="utf-8"), re.I)
    expected = visible_count(graph, graph["metadata"]["node_threshold"])
    assert len(driver.find_elements("css selector", ".node")) == expected
    assert driver.find_element("id", "node-count").text == str(expected)
    assert driver.find_element("id", "node-total").text == str(len(graph["nodes"]))
    # nothing was fetched: no resource loads at all, and no console errors (CSP violations, exceptions)
    assert driver.execute_script("return performance.getEntriesByType('resource').length") == 0
    assert console_errors(driver) == []
    # every drawn edge joins two drawn nodes; the three logits sit above every neuron, embeddings below
    shown = {e.get_attribute("data-node-id") for e in driver.find_elements("css selector", ".node")}
    ends = driver.execute_script(
        "return [...document.querySelectorAll('.edge')].map(e => [e.dataset.source, e.dataset.target])"
    )
    assert ends and all(s in shown and t in shown for s, t in ends)
    ys = driver.execute_script(
        "const y = {}; for (const k of ['logit', 'neuron', 'embedding']) y[k] = [...document"
        ".querySelectorAll('.node.' + k)].map(e => e.getBoundingClientRect().top); return y"
    )
    assert max(ys["logit"]) < min(ys["neuron"]) and max(ys["neuron"]) < min(ys["embedding"])
    tokens = driver.execute_script(
        "return [...document.querySelectorAll('.tok-label title')].map(t => t.textContent)"
    )
    assert tokens == graph["metadata"]["prompt_tokens"]


@browser
@needs_chromium
def test_threshold_slider_changes_the_visible_nodes(driver, open_graph):
    graph = build_sample_graph()
    open_graph(graph)
    counts = []
    for value in (0.3, 0.05, 1.0, 0.8):
        driver.execute_script(
            "const s = document.getElementById('threshold'); s.value = arguments[0];"
            "s.dispatchEvent(new Event('input', {bubbles: true}));",
            str(value),
        )
        expected = visible_count(graph, value)
        assert len(driver.find_elements("css selector", ".node")) == expected
        assert driver.find_element("id", "node-count").text == str(expected)
        counts.append(expected)
    assert counts[1] < counts[0] < counts[3] < counts[2] == len(graph["nodes"])
    # pinned nodes stay visible at any threshold, even one above it
    pinned = graph["qParams"]["pinnedIds"]
    assert any(n["node_id"] in pinned and n["influence"] and n["influence"] > 0.8 for n in graph["nodes"])
    driver.execute_script("window.neurontrace.setThreshold(0)")
    shown = {e.get_attribute("data-node-id") for e in driver.find_elements("css selector", ".node")}
    assert set(pinned) <= shown
    assert all("pinned" in node_el(driver, i).get_attribute("class") for i in pinned)


@browser
@needs_chromium
def test_clicking_a_node_shows_its_details(driver, open_graph):
    from selenium.webdriver.common.action_chains import ActionChains

    graph = build_sample_graph()
    open_graph(graph)
    node = next(n for n in _neurons(graph) if n["clerp"] and n["influence"] <= 0.5 and n["activation"] < 0)
    layer, index, pos = node["node_id"].split("_")
    element = node_el(driver, node["node_id"])

    ActionChains(driver).move_to_element(element).perform()
    tooltip = driver.find_element("id", "tooltip")
    assert tooltip.is_displayed() and f"L{layer}/N{index}-" in tooltip.text

    element.click()
    details = driver.find_element("id", "details")
    text = details.get_attribute("textContent")
    assert driver.find_element("id", "details-title").text == f"L{layer}/N{index}-"
    assert node["node_id"] in text
    assert f"\u201c{graph['metadata']['prompt_tokens'][int(pos)]}\u201d" in text
    assert f"{node['activation']:.3f}" in text and f"{node['influence']:.3f}" in text
    assert node["clerp"] in text
    assert all(t in text for t in node["top_tokens"])
    assert "Strongest incoming" in text and "Strongest outgoing" in text
    assert "selected" in node_el(driver, node["node_id"]).get_attribute("class")
    assert graph_now(driver)["qParams"]["clickedId"] == node["node_id"]
    # an entry of the edge list selects that neighbour
    strongest = max(
        (link for link in graph["links"] if link["target"] == node["node_id"]),
        key=lambda link: abs(link["weight"]),
    )
    details.find_element("css selector", ".edges button").click()
    assert graph_now(driver)["qParams"]["clickedId"] == strongest["source"]
    assert console_errors(driver) == []


@browser
@needs_chromium
def test_screenshot(driver, open_graph):
    graph = build_sample_graph()
    open_graph(graph)
    focus = min(_neurons(graph), key=lambda n: n["influence"] if n["ctx_idx"] == 5 else 9)
    node_el(driver, focus["node_id"]).click()
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "viewer.png"
    assert driver.save_screenshot(str(shot))
    head = shot.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", head[16:24]) == (1600, 1000)
    assert shot.stat().st_size > 30_000


@browser
@needs_chromium
def test_hostile_strings_render_as_text_and_run_nothing(driver, open_graph):
    from selenium.common.exceptions import NoAlertPresentException

    graph = hostile_graph()
    open_graph(graph)
    node = next(n for n in graph["nodes"] if n["clerp"] == " ".join(HOSTILE))
    driver.execute_script("window.neurontrace.select(arguments[0])", node["node_id"])
    assert driver.execute_script("return typeof window.__xss") == "undefined"
    with pytest.raises(NoAlertPresentException):
        _ = driver.switch_to.alert.text
    assert driver.execute_script("return document.querySelectorAll('img').length") == 0
    assert driver.execute_script("return document.scripts.length") == 2
    body = driver.execute_script("return document.body.textContent")
    for s in HOSTILE:
        assert s in body
    assert driver.find_element("id", "prompt").get_attribute("textContent") == graph["metadata"]["prompt"]
    assert driver.find_element("id", "graph-title").get_attribute("textContent") == HOSTILE[0]
    assert driver.title == f"{HOSTILE[0]} \u00b7 neurontrace"
    tokens = driver.execute_script(
        "return [...document.querySelectorAll('.tok-label title')].map(t => t.textContent)"
    )
    assert tokens == graph["metadata"]["prompt_tokens"]
    details = driver.find_element("id", "details").get_attribute("textContent")
    assert node["clerp"] in details and f"\u201c{HOSTILE[4]}\u201d" in details
    chips = driver.execute_script(
        "return [...document.querySelectorAll('#details .chip')].map(c => c.textContent)"
    )
    assert chips[: len(HOSTILE)] == HOSTILE
    context = driver.execute_script(  # top-activating contexts show on click, as text
        "return [...document.querySelectorAll('#details .contexts li')].map(c => c.textContent)"
    )
    assert context == [f"4.500 {HOSTILE[0]} and{HOSTILE[1]}{HOSTILE[2]}"]
    assert (
        driver.execute_script("return document.querySelector('#details .contexts mark').textContent")
        == HOSTILE[1]
    )
    assert graph_now(driver)["metadata"] == graph["metadata"]


@browser
@needs_chromium
def test_pins_supernodes_and_save_json(driver, open_graph, downloads):
    from selenium.webdriver.common.keys import Keys

    graph = build_sample_graph()
    original = copy.deepcopy(graph)
    open_graph(graph)
    free = [
        n["node_id"]
        for n in _neurons(graph)
        if n["influence"] <= 0.6 and n["node_id"] not in graph["qParams"]["pinnedIds"]
    ]
    a, b, c, d = free[:4]

    click_with(driver, node_el(driver, a), Keys.SHIFT)  # shift-click pins
    assert graph_now(driver)["qParams"]["pinnedIds"] == [*original["qParams"]["pinnedIds"], a]
    assert "pinned" in node_el(driver, a).get_attribute("class")
    node_el(driver, b).click()  # the details' pin button pins and unpins
    driver.find_element("id", "pin-btn").click()
    assert graph_now(driver)["qParams"]["pinnedIds"][-1] == b
    driver.find_element("id", "pin-btn").click()
    click_with(driver, node_el(driver, a), Keys.SHIFT)
    assert graph_now(driver)["qParams"]["pinnedIds"] == original["qParams"]["pinnedIds"]
    click_with(driver, node_el(driver, a), Keys.SHIFT)

    click_with(driver, node_el(driver, c), Keys.CONTROL)  # ctrl-click selects for a supernode
    driver.find_element("id", "group-mode").click()  # so does a plain click in group mode
    node_el(driver, d).click()
    driver.find_element("id", "group-mode").click()
    assert driver.find_element("id", "group-selection-count").text == "2"
    driver.find_element("id", "supernode-label").send_keys("say are")
    driver.find_element("id", "group-btn").click()
    supernodes = graph_now(driver)["qParams"]["supernodes"]
    assert supernodes == [*original["qParams"]["supernodes"], ["say are", c, d]]
    labels = [e.get_attribute("textContent") for e in driver.find_elements("css selector", ".supernode text")]
    assert labels == ["plural subject (3)", "say are (2)"]
    driver.find_elements("css selector", ".ungroup-btn")[0].click()
    assert graph_now(driver)["qParams"]["supernodes"] == [["say are", c, d]]

    exported = json.loads(driver.execute_script("return window.neurontraceExportJSON()"))
    assert exported == graph_now(driver)
    assert exported["qParams"]["pinnedIds"] == [*original["qParams"]["pinnedIds"], a]
    assert exported["qParams"]["clickedId"] == b
    assert {k: v for k, v in exported.items() if k != "qParams"} == {
        k: v for k, v in original.items() if k != "qParams"
    }

    driver.find_element("id", "save-json").click()  # the Blob download
    target = downloads / "keys-cabinet-sva.json"
    deadline = time.monotonic() + 10
    while not target.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert json.loads(target.read_text(encoding="utf-8")) == exported

    open_graph(exported)  # and the saved JSON loads back into a viewer with the edits in place
    assert "pinned" in node_el(driver, a).get_attribute("class")
    assert [
        e.get_attribute("textContent") for e in driver.find_elements("css selector", ".supernode text")
    ] == ["say are (2)"]
    assert graph_now(driver) == exported
    assert console_errors(driver) == []

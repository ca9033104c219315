"""The offline graph viewer: embedding and escaping (plain), then the page itself in headless Chromium.

The browser tests share one Chromium per module and need the Debian packages ``chromium`` and
``chromium-driver`` (``/usr/bin/chromium``, ``/usr/bin/chromedriver``); Selenium is pointed at both, so
Selenium Manager never goes to the network.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import itertools
import json
import re
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from sample_graph import (
    build_sample_graph,
    circuit_tracer_style,
    is_neuron,
    legacy_names,
    logit_clerp,
    long_prompt_graph,
    pct_input,
    saved_by_circuit_tracer,
    visible_count,
    with_error_nodes,
)

from neurontrace.errors import NeurontraceError
from neurontrace.viewer import embed_json, graph_from_html, render_viewer, write_viewer
from neurontrace.viewer.html import siblings_from_html

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
    node = next(n for n in graph["nodes"] if is_neuron(n) and n["influence"] <= 0.5)
    node["clerp"] = " ".join(HOSTILE)
    node["top_logit_effects"] = list(HOSTILE)
    node["top_contexts"] = [
        {"activation": 4.5, "before": [HOSTILE[0], " and"], "token": HOSTILE[1], "after": [HOSTILE[2]]}
    ]
    node["token"] = HOSTILE[4]
    for n in graph["nodes"]:  # the page should show the hostile tokens, not the sample's own
        if n["feature_type"] != "logit" and n is not node:
            n.pop("token", None)
    return graph


def _neurons(graph: dict) -> list[dict]:
    return [n for n in graph["nodes"] if is_neuron(n)]


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


SIBLINGS = [
    {"slug": "keys-cabinet-sva", "prompt": "The keys to the old cabinet", "html": "graph-000.html"},
    {
        "slug": "key-cabinets",
        "prompt": "The key to the old </script><b>cabinets</b>",
        "html": "graph-001.html",
    },
    {"slug": "sub", "prompt": "in a folder", "html": "more/graph-002.html"},
]


def test_siblings_go_in_their_own_escaped_block():
    graph = build_sample_graph()
    plain = render_viewer(graph)
    assert render_viewer(graph, siblings=None) == plain and 'id="graph-index"' not in plain
    assert siblings_from_html(plain) is None
    page = render_viewer(graph, siblings=SIBLINGS)
    block = re.search(r'<script type="application/json" id="graph-index">(.*?)</script>', page, re.S)[1]
    assert "<" not in block and ">" not in block
    assert siblings_from_html(page) == SIBLINGS
    assert graph_from_html(page) == graph  # the graph block is unchanged by the index
    assert page.lower().count("<script") == 3 and page.lower().count("</script") == 3
    assert not re.search(r"https?:", page, re.I)
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', page)[1]
    assert csp == re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', plain)[1]


def test_write_viewer_takes_siblings(tmp_path):
    graph = build_sample_graph()
    path = write_viewer(graph, tmp_path / "graph-000.html", siblings=SIBLINGS)
    assert path.read_text(encoding="utf-8") == render_viewer(graph, siblings=SIBLINGS)


@pytest.mark.parametrize(
    "siblings, match",
    [
        ("graph-001.html", "list"),
        ([1], r"siblings\[0\] must be a dict"),
        ([{"slug": "a", "prompt": "p"}], "relative file name"),
        ([{"html": ""}], "relative file name"),
        ([{"html": "https://example.org/g.html"}], "relative file name"),
        ([{"html": "/tmp/g.html"}], "relative file name"),
        ([{"html": "C:\\g.html"}], "relative file name"),
        ([{"html": "g.html", "prompt": 3}], "'prompt'.*string"),
    ],
)
def test_bad_siblings_are_user_errors(siblings, match):
    with pytest.raises(NeurontraceError, match=match):
        render_viewer(build_sample_graph(n_neurons=10), siblings=siblings)


def test_sample_graph_has_the_promised_shape():
    graph = build_sample_graph()
    meta = graph["metadata"]
    neurons = _neurons(graph)
    assert len(neurons) >= 200 and len({n["layer"] for n in neurons}) >= 25
    assert all(n["feature_type"] == "cross layer transcoder" and n["unit"] == "mlp neuron" for n in neurons)
    n = neurons[0]
    layer, index, _ = n["node_id"].split("_")
    assert (
        n["jsNodeId"] == f"{layer}_{index}-0"
        and n["index"] == int(index)
        and n["clerp"].startswith(f"L{layer}/N")
    )
    embeddings = [n for n in graph["nodes"] if n["feature_type"] == "embedding"]
    assert len(embeddings) == len(meta["prompt_tokens"])
    assert all(e["feature"] == e["ctx_idx"] and isinstance(e["influence"], float) for e in embeddings)
    logits = [n for n in graph["nodes"] if n["feature_type"] == "logit"]
    assert len(logits) == 3 and [x["is_target_logit"] for x in logits] == [True, False, False]
    assert logits[0]["clerp"] == 'Output " are" (p=0.623)' and logits[0]["jsNodeId"] == "L_359-5"
    assert logit_clerp('say "hi"', 0.5) == 'Output "say ＂hi＂" (p=0.500)'
    weights = [link["weight"] for link in graph["links"]]
    assert len(weights) >= 300 and min(weights) < 0 < max(weights)
    ids = {n["node_id"] for n in graph["nodes"]}
    assert len(ids) == len(graph["nodes"])
    assert all(link["source"] in ids and link["target"] in ids for link in graph["links"])
    # cumulative influence over the unpruned graph: every kept neuron is within node_threshold (~0.8)
    assert (
        meta["node_threshold"] == max(n["influence"] for n in neurons)
        and 0.75 < meta["node_threshold"] <= 0.8
    )
    assert 0 < visible_count(graph, 0.3) < visible_count(graph, 0.6) < len(graph["nodes"])
    assert visible_count(graph, meta["node_threshold"]) == len(graph["nodes"])


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
    from ct_frontend import chromium

    drv = chromium(tmp_path_factory.mktemp("chrome-profile"))
    try:
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
        driver.get("about:blank")
        driver.get_log("browser")  # drop anything from the previous page, keep what this one logs as it loads
        driver.get(path.as_uri())
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
    assert expected == len(graph["nodes"])
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
    for value in (0.3, 0.05, 1.0, 0.6):
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
    assert any(n["node_id"] in pinned and n["influence"] and n["influence"] > 0.6 for n in graph["nodes"])
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
    assert all(t in text for t in node["top_logit_effects"])
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


# ---------------------------------------------------------------- browser tests: the circuit-tracer level features


def js(driver, code: str, *args):
    return driver.execute_script(code, *args)


def state(driver) -> dict:
    return js(driver, "return window.neurontrace.state()")


def workspace(driver) -> dict:
    return js(driver, "return window.neurontrace.workspace()")


def shown_ids(driver) -> set[str]:
    return set(js(driver, "return [...document.querySelectorAll('.node')].map(e => e.dataset.nodeId)"))


def edge_attrs(driver, selector: str) -> list[dict]:
    return js(
        driver,
        "return [...document.querySelectorAll(arguments[0])].map(e => ({source: e.dataset.source,"
        " target: e.dataset.target, weight: Number(e.dataset.weight), pct: Number(e.dataset.pctInput),"
        " cls: e.getAttribute('class'), stroke: e.getAttribute('stroke'),"
        " opacity: Number(e.getAttribute('stroke-opacity')), width: Number(e.getAttribute('stroke-width')),"
        " links: Number(e.dataset.links || 1)}))",
        selector,
    )


def ws_positions(driver) -> dict[str, tuple[float, float]]:
    return {n["key"]: (n["x"], n["y"]) for n in workspace(driver)["nodes"]}


def same_positions(got: dict, want: dict) -> bool:
    return got.keys() == want.keys() and all(got[k] == pytest.approx(want[k], abs=0.01) for k in want)


def ws_node_ids(driver) -> list[str]:
    return js(driver, "return [...document.querySelectorAll('#ws-svg .sg-node')].map(e => e.dataset.sgId)")


def reload_with_hash(driver) -> str:
    """Reload the page from its current URL (hash included) as a fresh document; returns that URL."""
    href = js(driver, "window.neurontrace.flushHash(); return location.href")
    driver.get("about:blank")
    driver.get(href)
    return href


def hash_params(url_or_hash: str) -> dict[str, str]:
    from urllib.parse import unquote

    frag = url_or_hash.split("#", 1)[-1]
    return {k: unquote(v) for k, _, v in (part.partition("=") for part in frag.split("&") if part)}


def _links_by_pair(graph: dict) -> dict[tuple[str, str], float]:
    return {(link["source"], link["target"]): link["weight"] for link in graph["links"]}


def _chain(graph: dict) -> tuple[str, str, str]:
    """Three nodes a -> b -> c joined by links (an embedding at the bottom when the graph has such a chain)."""
    kind = {n["node_id"]: n["feature_type"] for n in graph["nodes"]}
    out: dict[str, list[str]] = {}
    for s, t in _links_by_pair(graph):
        out.setdefault(s, []).append(t)
    chains = [(a, b, c) for a, bs in out.items() for b in bs for c in out.get(b, [])]
    return max(chains, key=lambda ch: (kind[ch[0]] == "embedding", kind[ch[2]] == "logit"))


def _fresh(graph: dict, pinned=(), supernodes=()) -> dict:
    graph["qParams"].update(pinnedIds=list(pinned), supernodes=[list(s) for s in supernodes])
    return graph


@browser
@needs_chromium
def test_default_threshold_shows_every_node_even_above_node_threshold(driver, open_graph):
    # an older file in the legacy names whose node_threshold is below its largest neuron influence
    graph = legacy_names(build_sample_graph())
    graph["metadata"]["node_threshold"] = 0.3
    largest = max(n["influence"] for n in _neurons(graph))
    assert visible_count(graph, 0.3) < len(graph["nodes"])
    open_graph(graph)
    st = state(driver)
    assert st["threshold"] == st["defaultThreshold"] == st["sliderMax"] == largest and st["sliderMin"] == 0
    assert len(shown_ids(driver)) == len(graph["nodes"])
    assert driver.find_element("id", "node-count").text == str(len(graph["nodes"]))
    # legacy "mlp neuron" nodes are neurons, and their top_tokens are shown
    assert len(driver.find_elements("css selector", ".node.neuron")) == len(_neurons(graph))
    node = next(n for n in _neurons(graph) if n.get("bottom_tokens"))
    js(driver, "window.neurontrace.select(arguments[0])", node["node_id"])
    chips = js(driver, "return [...document.querySelectorAll('#details .chip')].map(c => c.textContent)")
    assert chips == node["top_tokens"] + node["bottom_tokens"]
    layer, index, _ = node["node_id"].split("_")
    assert driver.find_element("id", "details-title").text.startswith(f"L{layer}/N{index}")
    assert console_errors(driver) == []


@browser
@needs_chromium
def test_link_filter_highlights_the_selected_nodes_inputs_outputs_or_both(driver, open_graph):
    graph = build_sample_graph()
    ins: dict[str, int] = {}
    outs: dict[str, int] = {}
    for link in graph["links"]:
        ins[link["target"]] = ins.get(link["target"], 0) + 1
        outs[link["source"]] = outs.get(link["source"], 0) + 1
    node = max(
        _neurons(graph),
        key=lambda n: (min(ins.get(n["node_id"], 0), outs.get(n["node_id"], 0)), n["node_id"]),
    )
    nid = node["node_id"]
    assert ins[nid] >= 2 and outs[nid] >= 2
    open_graph(graph)
    node_el(driver, nid).click()
    total = len(graph["links"])  # every node is shown at the default threshold
    expected = {
        "input": {(s, t) for s, t in _links_by_pair(graph) if t == nid},
        "output": {(s, t) for s, t in _links_by_pair(graph) if s == nid},
    }
    expected["both"] = expected["input"] | expected["output"]
    for kind in ("input", "output", "both", "input"):
        driver.find_element("id", f"link-{kind}").click()
        edges = edge_attrs(driver, "#graph-svg .edge")
        hot = {(e["source"], e["target"]) for e in edges if " hot" in e["cls"]}
        assert hot == expected[kind], kind
        assert sum(" dim" in e["cls"] for e in edges) == total - len(expected[kind])
        assert graph_now(driver)["qParams"]["linkType"] == kind
        assert hash_params(js(driver, "return window.neurontrace.flushHash()"))["link"] == kind
    # nothing selected: nothing highlighted, nothing dimmed
    js(driver, "window.neurontrace.select(null)")
    assert not any(" hot" in e["cls"] or " dim" in e["cls"] for e in edge_attrs(driver, "#graph-svg .edge"))
    assert console_errors(driver) == []


@browser
@needs_chromium
def test_edges_are_shaded_by_their_share_of_the_targets_input(driver, open_graph):
    graph = build_sample_graph()
    pct = pct_input(graph)
    # a target with two positive incoming links of clearly different share
    by_target: dict[str, list[tuple[str, str]]] = {}
    for (s, t), p in pct.items():
        if p > 0:
            by_target.setdefault(t, []).append((s, t))
    target, pair = next(
        (t, (min(ps, key=pct.get), max(ps, key=pct.get)))
        for t, ps in sorted(by_target.items())
        if len(ps) >= 2 and max(pct[x] for x in ps) > 2 * min(pct[x] for x in ps)
    )
    open_graph(graph)
    edges = {(e["source"], e["target"]): e for e in edge_attrs(driver, "#graph-svg .edge")}
    assert all(e["pct"] == pytest.approx(pct[k], abs=1e-12) for k, e in edges.items())
    weak, strong = edges[pair[0]], edges[pair[1]]
    assert weak["opacity"] < strong["opacity"] and weak["width"] < strong["width"]

    def rgb(e):
        return [int(v) for v in re.findall(r"\d+", e["stroke"])]

    assert sum(rgb(strong)) < sum(rgb(weak))  # darker
    for e in edges.values():  # green excites, purple inhibits
        r, g, b = rgb(e)
        assert (g > r and g > b) if e["weight"] >= 0 else (r > g and b > g)
    # the details list each edge's share of the input
    js(driver, "window.neurontrace.select(arguments[0])", target)
    rows = js(
        driver,
        "return [...document.querySelectorAll('#details .edges')][0].querySelectorAll('button').length ? "
        "[...[...document.querySelectorAll('#details .edges')][0].querySelectorAll('button')]"
        ".map(b => [b.dataset.nodeId, b.querySelector('.pct').textContent]) : []",
    )
    assert rows and all(text == f"{100 * pct[(src, target)]:+.1f}%" for src, text in rows)
    assert console_errors(driver) == []


@browser
@needs_chromium
def test_workspace_shows_the_pinned_nodes_and_the_links_among_them(driver, open_graph):
    from selenium.webdriver.common.keys import Keys

    graph = _fresh(build_sample_graph())
    a, b, c = _chain(graph)
    open_graph(graph)
    assert ws_node_ids(driver) == [] and driver.find_element("id", "ws-node-count").text == "0"
    for nid in (a, b, c):
        click_with(driver, node_el(driver, nid), Keys.SHIFT)
    assert sorted(ws_node_ids(driver)) == sorted([a, b, c])
    among = {k for k in _links_by_pair(graph) if k[0] in (a, b, c) and k[1] in (a, b, c)}
    drawn = edge_attrs(driver, "#ws-svg .sg-edge")
    assert {(e["source"], e["target"]) for e in drawn} == among and len(drawn) == len(among)
    weights = _links_by_pair(graph)
    assert all(e["weight"] == pytest.approx(weights[(e["source"], e["target"])]) for e in drawn)
    assert driver.find_element("id", "ws-edge-count").text == str(len(among))
    # layered: the source of a chain below its target (embeddings at the bottom, logits on top)
    ys = {n["key"]: n["y"] for n in workspace(driver)["nodes"]}
    assert ys[a] > ys[b] > ys[c]
    # shift-click in the workspace unpins
    click_with(driver, driver.find_element("css selector", f'#ws-svg .sg-node[data-sg-id="{c}"]'), Keys.SHIFT)
    assert sorted(ws_node_ids(driver)) == sorted([a, b])
    assert graph_now(driver)["qParams"]["pinnedIds"] == [a, b]
    assert console_errors(driver) == []


@browser
@needs_chromium
def test_dragged_workspace_positions_survive_a_reload_and_the_saved_json(driver, open_graph):
    from selenium.webdriver.common.action_chains import ActionChains

    graph = build_sample_graph()
    a, b, c = _chain(graph)
    _fresh(graph, pinned=[a, b, c])
    open_graph(graph)
    before = ws_positions(driver)
    element = driver.find_element("css selector", f'#ws-svg .sg-node[data-sg-id="{b}"]')
    ActionChains(driver).click_and_hold(element).move_by_offset(60, -10).move_by_offset(
        60, -10
    ).release().perform()
    after = ws_positions(driver)
    assert after[b][0] == pytest.approx(before[b][0] + 120, abs=2) and after[b][1] == pytest.approx(
        before[b][1] - 20, abs=2
    )
    assert after[a] == before[a] and after[c] == before[c]
    sg_pos = graph_now(driver)["qParams"]["sg_pos"]
    assert sg_pos.startswith(f"{b}:") and sg_pos.count(";") == 0
    assert hash_params(js(driver, "return window.neurontrace.flushHash()"))["sg"] == sg_pos
    moved = driver.find_element("css selector", f'#ws-svg .sg-node[data-sg-id="{b}"]').get_attribute(
        "transform"
    )

    reload_with_hash(driver)  # through the URL hash
    assert graph_now(driver)["qParams"]["sg_pos"] == sg_pos
    assert (
        driver.find_element("css selector", f'#ws-svg .sg-node[data-sg-id="{b}"]').get_attribute("transform")
        == moved
    )
    saved = graph_now(driver)

    open_graph(saved)  # through the saved JSON (no hash)
    assert graph_now(driver)["qParams"]["sg_pos"] == sg_pos
    assert same_positions(ws_positions(driver), after)
    driver.find_element("id", "relayout").click()
    assert graph_now(driver)["qParams"]["sg_pos"] == ""
    assert same_positions(ws_positions(driver), before)
    assert console_errors(driver) == []


@browser
@needs_chromium
def test_supernode_is_one_workspace_node_with_summed_links_and_an_editable_label(driver, open_graph):
    from selenium.webdriver.common.keys import Keys

    graph = build_sample_graph()
    weights = _links_by_pair(graph)
    neuron_ids = {n["node_id"] for n in _neurons(graph)}
    into: dict[str, list[str]] = {}
    for s, t in weights:
        if s in neuron_ids:
            into.setdefault(t, []).append(s)
    target, (a, b) = next(
        (t, tuple(sorted(srcs)[:2]))
        for t, srcs in sorted(into.items())
        if len(srcs) >= 2
        and (sorted(srcs)[0], sorted(srcs)[1]) not in weights
        and (sorted(srcs)[1], sorted(srcs)[0]) not in weights
    )
    _fresh(graph, pinned=[a, b, target])
    open_graph(graph)
    js(driver, "const n = window.neurontrace; n.toggleGroupSelection(arguments[0]);"
       "n.toggleGroupSelection(arguments[1]); n.group('pair')", a, b)  # fmt: skip
    assert graph_now(driver)["qParams"]["supernodes"] == [["pair", a, b]]
    assert sorted(ws_node_ids(driver)) == sorted([f"S:{a}", target])
    sup = driver.find_element("css selector", "#ws-svg .sg-node.super")
    assert sup.get_attribute("data-members") == "2"
    assert sup.find_element("css selector", ".sg-label").text == "pair"
    [edge] = edge_attrs(driver, "#ws-svg .sg-edge")
    total_in = sum(abs(w) for (s, t), w in weights.items() if t == target)
    summed = weights[(a, target)] + weights[(b, target)]
    assert (edge["source"], edge["target"], edge["links"]) == (f"S:{a}", target, 2)
    assert edge["weight"] == pytest.approx(summed) and edge["pct"] == pytest.approx(summed / total_in)

    sup.click()  # rename in place
    editor = driver.find_element("id", "ws-label-edit")
    assert editor.is_displayed()
    editor.send_keys("plural pair", Keys.ENTER)
    assert graph_now(driver)["qParams"]["supernodes"] == [["plural pair", a, b]]
    assert driver.find_element("css selector", "#ws-svg .sg-node.super .sg-label").text == "plural pair"
    assert "plural pair (2)" in [
        e.get_attribute("textContent") for e in driver.find_elements("css selector", ".supernode text")
    ]
    field = driver.find_element("css selector", "#supernodes .sn-label-input")  # and in the supernode panel
    field.click()
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys("subject <pair>", Keys.ENTER)
    assert graph_now(driver)["qParams"]["supernodes"] == [["subject <pair>", a, b]]
    assert driver.find_element("css selector", "#ws-svg .sg-node.super .sg-label").text == "subject <pair>"

    driver.find_element("css selector", "#ws-svg .sg-ungroup").click()
    assert graph_now(driver)["qParams"]["supernodes"] == []
    assert sorted(ws_node_ids(driver)) == sorted([a, b, target])
    assert console_errors(driver) == []


@browser
@needs_chromium
def test_url_hash_round_trip(driver, open_graph):
    from selenium.webdriver.common.keys import Keys

    graph = build_sample_graph()
    path = open_graph(graph)
    file_pins = graph["qParams"]["pinnedIds"]
    extra = next(
        n["node_id"] for n in _neurons(graph) if n["node_id"] not in file_pins and n["influence"] < 0.3
    )
    clicked = next(n["node_id"] for n in _neurons(graph) if n["influence"] < 0.2 and n["node_id"] != extra)
    click_with(driver, node_el(driver, extra), Keys.SHIFT)
    js(driver, "window.neurontrace.togglePin(arguments[0])", file_pins[0])  # unpin one the file pins
    js(driver, "window.neurontrace.setThreshold(0.42)")
    node_el(driver, clicked).click()
    driver.find_element("id", "link-output").click()
    pins = [*file_pins[1:], extra]
    href = reload_with_hash(driver)
    params = hash_params(href)
    assert href.startswith(path.as_uri() + "#pinned=")
    assert params == {
        "pinned": ",".join(pins),
        "threshold": "0.42",
        "clicked": clicked,
        "link": "output",
        "graph": "keys-cabinet-sva",
    }
    st = state(driver)  # the reloaded page: the hash wins over the file's qParams
    assert (st["pinned"], st["threshold"], st["selected"], st["linkType"]) == (pins, 0.42, clicked, "output")
    assert driver.find_element("id", "threshold").get_attribute("value") == "0.42"
    assert "selected" in node_el(driver, clicked).get_attribute("class")
    assert len(shown_ids(driver)) == visible_count(_fresh(copy.deepcopy(graph), pinned=pins), 0.42)
    assert graph_now(driver)["qParams"]["pinnedIds"] == pins
    assert console_errors(driver) == []
    # a hash written for another graph carries its view settings but not its node ids
    driver.get("about:blank")
    driver.get(path.as_uri() + f"#pinned={extra}&clicked={clicked}&threshold=0.3&link=input&graph=other")
    st = state(driver)
    assert (st["pinned"], st["threshold"], st["selected"], st["linkType"]) == (file_pins, 0.3, None, "input")


@browser
@needs_chromium
def test_qparams_saved_by_circuit_tracer_as_strings(driver, open_graph):
    graph = build_sample_graph()
    neurons = sorted(_neurons(graph), key=lambda n: n["influence"])
    pinned = [neurons[0]["node_id"], neurons[5]["node_id"], neurons[-1]["node_id"]]
    group = [neurons[10]["node_id"], neurons[11]["node_id"]]
    labelled = neurons[0]
    saved_by_circuit_tracer(
        graph,
        pinned=pinned,
        supernodes=[["say a plural verb", *group]],
        clerps=[[str(labelled["feature"]), "my <label>"]],
        pruning_threshold="0.55",
    )
    original = copy.deepcopy(graph)
    open_graph(graph)
    st = state(driver)
    assert st["threshold"] == 0.55 and st["pinned"] == pinned
    assert len(shown_ids(driver)) == visible_count(graph, 0.55) < len(graph["nodes"])
    assert all("pinned" in node_el(driver, i).get_attribute("class") for i in pinned)
    assert sorted(ws_node_ids(driver)) == sorted([*pinned, f"S:{group[0]}"])
    assert [
        e.get_attribute("textContent") for e in driver.find_elements("css selector", ".supernode text")
    ] == ["say a plural verb (2)"]
    labels = {n["key"]: n["label"] for n in workspace(driver)["nodes"]}
    assert labels[labelled["node_id"]] == "my <label>" and labels[f"S:{group[0]}"] == "say a plural verb"
    js(driver, "window.neurontrace.select(arguments[0])", labelled["node_id"])
    assert driver.find_element("id", "details-label").text == "my <label>"
    # a new label from the details panel joins the edited clerps
    other = neurons[5]
    js(driver, "window.neurontrace.select(arguments[0])", other["node_id"])
    field = driver.find_element("id", "clerp-input")
    field.clear()
    field.send_keys("number agreement")
    driver.find_element("id", "clerp-save").click()
    q = graph_now(driver)["qParams"]
    assert q == {
        "pinnedIds": pinned,
        "supernodes": [["say a plural verb", *group]],
        "clerps": [[str(labelled["feature"]), "my <label>"], [str(other["feature"]), "number agreement"]],
        "pruningThreshold": 0.55,
        "clickedId": other["node_id"],
        "linkType": "both",
        "sg_pos": "",
        "unknownKey": "kept as it is",
    }
    exported = graph_now(driver)
    assert {k: v for k, v in exported.items() if k != "qParams"} == {
        k: v for k, v in original.items() if k != "qParams"
    }
    assert console_errors(driver) == []


@browser
@needs_chromium
def test_graph_selector_opens_a_sibling_page(driver, tmp_path):
    from selenium.webdriver.support.ui import Select, WebDriverWait

    first = build_sample_graph(slug="keys-000")
    second = build_sample_graph(seed=1, slug="keys-001")
    siblings = [
        {"slug": "keys-000", "prompt": first["metadata"]["prompt"], "html": "keys-000.html"},
        {"slug": "keys-001", "prompt": "The key to the <b>old</b>\ncabinets", "html": "keys-001.html"},
    ]
    write_viewer(first, tmp_path / "keys-000.html", siblings=siblings)
    write_viewer(second, tmp_path / "keys-001.html", siblings=siblings)
    driver.get("about:blank")
    driver.get_log("browser")
    driver.get((tmp_path / "keys-000.html").as_uri())
    select = Select(driver.find_element("id", "graph-select"))
    assert driver.find_element("id", "graph-select").is_displayed()
    assert [o.get_attribute("title") for o in select.options] == [s["prompt"] for s in siblings]
    assert select.options[1].text.startswith("2. The key to the <b>old</b>")
    assert select.first_selected_option.get_attribute("value") == "0"
    js(driver, "window.neurontrace.setThreshold(0.5); window.neurontrace.setLinkType('input')")
    select.select_by_index(1)
    WebDriverWait(driver, 10).until(lambda d: "keys-001.html" in d.current_url)
    WebDriverWait(driver, 10).until(lambda d: d.execute_script("return !!window.neurontrace"))
    assert graph_now(driver)["metadata"]["slug"] == "keys-001"
    st = state(driver)
    assert (st["threshold"], st["linkType"]) == (0.5, "input")
    assert st["pinned"] == second["qParams"]["pinnedIds"]  # its own pins, not the first graph's
    assert (
        Select(driver.find_element("id", "graph-select")).first_selected_option.get_attribute("value") == "1"
    )
    assert console_errors(driver) == []


@browser
@needs_chromium
def test_long_prompt_scrolls_under_sticky_axes(driver, open_graph):
    graph = long_prompt_graph(40)
    tokens = graph["metadata"]["prompt_tokens"]
    open_graph(graph)
    labels = js(
        driver,
        "return [...document.querySelectorAll('#token-axis .tok-label')].map(t => ({text: t.textContent"
        ".slice(0, -t.querySelector('title').textContent.length || undefined), full: t.querySelector('title')"
        ".textContent, x: Number(t.getAttribute('x')), transform: t.getAttribute('transform') || ''}))",
    )
    assert [lab["full"] for lab in labels] == tokens
    assert len(shown_ids(driver)) == len(graph["nodes"])
    shown = js(
        driver, "return [...document.querySelectorAll('#token-axis .tok-label')].map(t => t.firstChild.data)"
    )
    # the labels are rotated and cut (with the full token as title), in order, never on top of each other
    assert all("rotate(" in lab["transform"] for lab in labels)
    assert shown[5] != tokens[5].replace(" ", "\u2423") and shown[5].endswith("\u2026")
    xs = [lab["x"] for lab in labels]
    assert all(b - a >= 14 for a, b in itertools.pairwise(xs))
    # make the pane short too, then scroll right and down: both axes stay in view
    js(
        driver,
        "const w = document.getElementById('graph-wrap'); w.style.flex = 'none'; w.style.height = '320px'",
    )
    wrap = js(
        driver,
        "const w = document.getElementById('graph-wrap'); return [w.scrollWidth, w.clientWidth, w.scrollHeight, w.clientHeight]",
    )
    assert wrap[0] > wrap[1] + 200 and wrap[2] > wrap[3]
    js(
        driver,
        "const w = document.getElementById('graph-wrap'); w.scrollLeft = w.scrollWidth; w.scrollTop = 150",
    )
    box = js(
        driver,
        "const r = e => document.getElementById(e).getBoundingClientRect(); const w = document"
        ".getElementById('graph-wrap'); return {wrap: r('graph-wrap'), axis: r('layer-axis'), tokens: r('token-axis'),"
        " left: w.scrollLeft, top: w.scrollTop, rows: [...document.querySelectorAll('#layer-axis .row-label')]"
        ".map(t => t.getBoundingClientRect().left)}",
    )
    assert box["left"] > 200 and box["top"] > 100
    assert box["axis"]["left"] == pytest.approx(box["wrap"]["left"], abs=1)
    assert all(box["wrap"]["left"] <= x < box["wrap"]["left"] + 60 for x in box["rows"])
    assert box["wrap"]["top"] <= box["tokens"]["top"] and box["tokens"]["bottom"] <= box["wrap"]["bottom"] + 1
    visible_tokens = js(
        driver,
        "const w = document.getElementById('graph-wrap').getBoundingClientRect(); return [...document"
        ".querySelectorAll('#token-axis .pos-label')].filter(t => { const r = t.getBoundingClientRect();"
        " return r.left > w.left + 60 && r.right < w.right && r.top > w.top && r.bottom < w.bottom }).length",
    )
    assert visible_tokens >= 10
    assert console_errors(driver) == []


@browser
@needs_chromium
def test_circuit_tracer_graph_with_error_nodes_and_no_extra_keys(driver, open_graph):
    graph = with_error_nodes(circuit_tracer_style(build_sample_graph()))
    logit = next(n for n in graph["nodes"] if n["feature_type"] == "logit" and not n["is_target_logit"])
    logit["clerp"] = logit_clerp('say "hi"', 0.2)
    errors = [n for n in graph["nodes"] if n["feature_type"] == "mlp reconstruction error"]
    assert errors and not any("token" in n or "index" in n for n in graph["nodes"])
    open_graph(graph)
    assert len(shown_ids(driver)) == len(graph["nodes"])
    drawn = driver.find_elements("css selector", "#graph-svg .node.error")
    assert sorted(e.get_attribute("data-node-id") for e in drawn) == sorted(n["node_id"] for n in errors)
    assert all(e.find_element("css selector", ".shape").tag_name == "path" for e in drawn)  # diamonds
    fills = {
        js(driver, "return getComputedStyle(arguments[0].querySelector('.shape')).fill", e) for e in drawn
    }
    assert fills == {"rgb(209, 213, 219)"}  # grey
    err = errors[0]
    js(driver, "window.neurontrace.select(arguments[0])", err["node_id"])
    assert driver.find_element("id", "details-title").text == f"Err L{err['layer']}@{err['ctx_idx']}"
    js(driver, "window.neurontrace.select(arguments[0])", logit["node_id"])
    assert driver.find_element("id", "details-title").text == 'Logit \u201csay "hi"\u201d'
    # feature nodes without `unit` are transcoder features; the error node shows in the workspace too
    neuron = _neurons(graph)[0]
    layer, index, _ = neuron["node_id"].split("_")
    js(driver, "window.neurontrace.select(arguments[0])", neuron["node_id"])
    assert driver.find_element("id", "details-title").text == f"L{layer}/F{index}"
    js(driver, "window.neurontrace.togglePin(arguments[0])", err["node_id"])
    assert err["node_id"] in ws_node_ids(driver)
    assert driver.find_elements("css selector", f'#ws-svg .sg-node.error[data-sg-id="{err["node_id"]}"]')
    assert console_errors(driver) == []


@browser
@needs_chromium
def test_sparse_and_malformed_fields_never_crash(driver, open_graph):
    graph = {
        "metadata": {"prompt_tokens": ["a", "b"]},
        "qParams": {
            "pinnedIds": "x,missing,,5",
            "supernodes": '[["grp", "x", "missing"], "junk", []]',
            "clerps": "not json",
            "pruningThreshold": "soon",
            "sg_pos": "x:oops;;::;x:0.2",
            "clickedId": "missing",
            "linkType": "sideways",
        },
        "nodes": [
            {"node_id": "x"},
            {"node_id": 5, "feature_type": "logit", "clerp": "no quotes here"},
            {"node_id": "e", "feature_type": "embedding", "ctx_idx": 7},
            {"node_id": "err", "feature_type": "mlp reconstruction error", "influence": "0.3"},
            {"feature_type": "embedding"},
            "not a node",
        ],
        "links": [
            {"source": "e", "target": "x", "weight": "0.5"},
            {"source": "x", "target": "5", "weight": None},
            {"source": "x", "target": "nowhere", "weight": 1},
            {"source": "err", "target": "x", "weight": -0.25},
            None,
        ],
    }
    open_graph(graph)
    assert shown_ids(driver) == {"x", "5", "e", "err"}
    assert len(driver.find_elements("css selector", "#graph-svg .edge")) == 2
    assert sorted(ws_node_ids(driver)) == ["5", "S:x"]
    for nid in ("x", "5", "e", "err"):
        js(driver, "window.neurontrace.select(arguments[0])", nid)
        assert driver.find_element("id", "details-title").text
    js(driver, "window.neurontrace.setLinkType('input'); window.neurontrace.relayout()")
    q = graph_now(driver)["qParams"]
    assert q["pinnedIds"] == ["x", "missing", "5"] and q["supernodes"] == [["grp", "x", "missing"]]
    assert q["clerps"] == [] and q["pruningThreshold"] == "soon" and q["linkType"] == "input"
    assert console_errors(driver) == []
    open_graph({"nodes": [], "links": []})
    assert shown_ids(driver) == set() and ws_node_ids(driver) == []
    assert console_errors(driver) == []

"""Render an attribution graph as one self-contained, offline HTML viewer.

The page inlines its script and style (package data in ``assets/``) and the graph itself, so it opens from disk
with no network; a Content-Security-Policy allows only that script and style (by hash) and no fetches at all.
The graph is embedded as JSON in a ``<script type="application/json">`` block with ``<``, ``>``, ``&`` and
U+2028/U+2029 written as ``\\u`` escapes: no string in the graph (a prompt such as ``</script><script>...``)
can end the block, and the page builds its DOM from the data with ``textContent`` only.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import os
import re
from collections.abc import Mapping
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from neurontrace.errors import NeurontraceError
from neurontrace.io import write_text_atomic

_UNSAFE = re.compile("[<>&\u2028\u2029\ud800-\udfff]")
_SLOT = re.compile(r"@@NT_([A-Z]+)@@")
_DATA = re.compile(r'<script type="application/json" id="graph-data">(.*?)</script>', re.S)
_CLOSERS = re.compile(r"</(script|style)|<!--", re.I)


@cache
def _asset(name: str) -> str:
    return (resources.files("neurontrace.viewer") / "assets" / name).read_text(encoding="utf-8")


def _plain(value: Any) -> Any:
    """JSON fallback for numpy/torch scalars and arrays, which an exporter may leave in the dict."""
    for attr in ("tolist", "item"):
        if hasattr(value, attr):
            return getattr(value, attr)()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def embed_json(graph: Mapping[str, Any]) -> str:
    """``graph`` as JSON that is safe inside an HTML ``<script>`` block and parses back to the same value.

    The characters escaped can only occur inside JSON strings, where ``\\u003c`` and ``<`` mean the same.
    """
    try:
        text = json.dumps(graph, ensure_ascii=False, allow_nan=False, separators=(",", ":"), default=_plain)
    except (TypeError, ValueError) as e:
        raise NeurontraceError(
            f"the graph cannot be written as JSON: {e} (NaN and infinity are not JSON)"
        ) from None
    return _UNSAFE.sub(lambda m: f"\\u{ord(m[0]):04x}", text)


def _sha256(text: str) -> str:
    return base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii")


def _check(graph: Any) -> None:
    if not isinstance(graph, Mapping):
        raise NeurontraceError(
            f"an attribution graph must be a JSON object (dict), not {type(graph).__name__}"
        )
    for key in ("nodes", "links"):
        if not isinstance(graph.get(key), list):
            raise NeurontraceError(
                f"the attribution graph has no {key!r} list; expected the circuit-tracer/Neuronpedia format "
                "{metadata, qParams, nodes, links}"
            )


def render_viewer(graph: Mapping[str, Any]) -> str:
    """The viewer page for ``graph`` (circuit-tracer/Neuronpedia attribution-graph dict) as an HTML string."""
    _check(graph)
    css, js = _asset("viewer.css"), _asset("viewer.js")
    for name, code in (("viewer.css", css), ("viewer.js", js)):
        if _CLOSERS.search(code):  # would end its inline block early; a packaging bug, not a user error
            raise RuntimeError(f"asset {name} contains '</script', '</style' or '<!--'")
    meta = graph.get("metadata")
    slug = meta.get("slug") if isinstance(meta, Mapping) else None
    csp = (
        f"default-src 'none'; script-src 'sha256-{_sha256(js)}'; style-src 'sha256-{_sha256(css)}'; "
        "img-src 'none'; connect-src 'none'; base-uri 'none'; form-action 'none'"
    )
    slots = {
        "CSP": csp,
        "TITLE": html.escape(f"{slug or 'attribution graph'} \u00b7 neurontrace"),
        "CSS": css,
        "JS": js,
        "GRAPH": embed_json(graph),
    }
    # One pass: text put into a slot is never scanned for further slots.
    return _SLOT.sub(lambda m: slots[m[1]], _asset("viewer.html"))


def write_viewer(graph: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write the viewer for ``graph`` to ``path`` (atomically) and return the path."""
    return write_text_atomic(path, render_viewer(graph))


def graph_from_html(page: str) -> dict[str, Any]:
    """The graph embedded in a viewer page (as written by :func:`render_viewer`, or saved by hand)."""
    match = _DATA.search(page)
    if match is None:
        raise NeurontraceError("no embedded graph found: the page is not a neurontrace viewer")
    return json.loads(match[1])

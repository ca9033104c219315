"""Render an attribution graph as one self-contained, offline HTML viewer.

The page inlines its script and style (package data in ``assets/``) and the graph itself, so it opens from disk
with no network; a Content-Security-Policy allows only that script and style (by hash) and no fetches at all.
The graph is embedded as JSON in a ``<script type="application/json">`` block with ``<``, ``>``, ``&`` and
U+2028/U+2029 written as ``\\u`` escapes: no string in the graph (a prompt such as ``</script><script>...``)
can end the block, and the page builds its DOM from the data with ``textContent`` only.

A multi-prompt run can give each page its ``siblings`` (``{slug, prompt, html}``, ``html`` a relative file name):
they go, escaped the same way, in a second block (``id="graph-index"``) and the page offers them in a selector
that opens the sibling's file next to it.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import os
import re
from collections.abc import Mapping, Sequence
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from neurontrace.errors import NeurontraceError
from neurontrace.io import write_text_atomic

_UNSAFE = re.compile("[<>&\u2028\u2029\ud800-\udfff]")
_SLOT = re.compile(r"@@NT_([A-Z]+)@@")
_DATA = re.compile(r'<script type="application/json" id="graph-data">(.*?)</script>', re.S)
_INDEX = re.compile(r'<script type="application/json" id="graph-index">(.*?)</script>', re.S)
_NOT_RELATIVE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:|^[/\\]|\\|[\x00-\x1f\x7f]")
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


def embed_json(graph: Any) -> str:
    """``graph`` as JSON that is safe inside an HTML ``<script>`` block and parses back to the same value.

    The characters escaped can only occur inside JSON strings, where ``\\u003c`` and ``<`` mean the same.
    """
    try:
        text = json.dumps(graph, ensure_ascii=False, allow_nan=False, separators=(",", ":"), default=_plain)
    except (TypeError, ValueError) as e:
        raise NeurontraceError(
            f"the graph cannot be written as JSON: {e} (NaN and infinity are not JSON)"
        ) from None
    except RecursionError:
        raise NeurontraceError("the graph cannot be written as JSON: it is nested too deeply") from None
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


def _check_siblings(siblings: Any) -> list[dict[str, Any]]:
    """``siblings`` as a list of plain dicts, each with string ``slug``, ``prompt`` and a relative ``html``."""
    if isinstance(siblings, (str, bytes)) or not isinstance(siblings, Sequence):
        raise NeurontraceError(
            f"siblings must be a list of {{slug, prompt, html}} dicts, not {type(siblings).__name__}"
        )
    out = []
    for i, entry in enumerate(siblings):
        if not isinstance(entry, Mapping):
            raise NeurontraceError(
                f"siblings[{i}] must be a dict {{slug, prompt, html}}, not {type(entry).__name__}"
            )
        name = entry.get("html")
        if not isinstance(name, str) or not name.strip() or _NOT_RELATIVE.search(name):
            raise NeurontraceError(
                f"siblings[{i}]['html'] must be a relative file name such as 'graph-001.html', not {name!r}"
            )
        for key in ("slug", "prompt"):
            if not isinstance(entry.get(key, ""), str):
                raise NeurontraceError(f"siblings[{i}][{key!r}] must be a string")
        out.append(dict(entry))
    return out


def render_viewer(graph: Mapping[str, Any], *, siblings: Sequence[Mapping[str, Any]] | None = None) -> str:
    """The viewer page for ``graph`` (circuit-tracer/Neuronpedia attribution-graph dict) as an HTML string.

    ``siblings``: the other graphs of a multi-prompt run, each ``{"slug", "prompt", "html"}`` with ``html`` the
    page's file name relative to this one (``graph-001.html``); the toolbar then offers a selector to open them.
    """
    _check(graph)
    index = ""
    if siblings is not None:
        block = embed_json(_check_siblings(siblings))
        index = f'<script type="application/json" id="graph-index">{block}</script>\n'
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
        "INDEX": index,
    }
    # One pass: text put into a slot is never scanned for further slots.
    return _SLOT.sub(lambda m: slots[m[1]], _asset("viewer.html"))


def write_viewer(
    graph: Mapping[str, Any], path: str | os.PathLike, *, siblings: Sequence[Mapping[str, Any]] | None = None
) -> Path:
    """Write the viewer for ``graph`` (and its ``siblings``, see :func:`render_viewer`) to ``path`` atomically."""
    return write_text_atomic(path, render_viewer(graph, siblings=siblings))


def graph_from_html(page: str) -> dict[str, Any]:
    """The graph embedded in a viewer page (as written by :func:`render_viewer`, or saved by hand)."""
    match = _DATA.search(page)
    if match is None:
        raise NeurontraceError("no embedded graph found: the page is not a neurontrace viewer")
    return _embedded_json(match[1], "graph")


def _embedded_json(text: str, what: str) -> Any:
    """The JSON of a page's data block; damaged or too deeply nested JSON is a one-line error."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise NeurontraceError(
            f"the embedded {what} is not JSON: {exc.msg} (line {exc.lineno}); the page was edited or cut short"
        ) from None
    except RecursionError:
        raise NeurontraceError(f"the embedded {what} is JSON nested too deeply to read") from None


def siblings_from_html(page: str) -> list[dict[str, Any]] | None:
    """The ``siblings`` a viewer page was rendered with, or None when it has none."""
    match = _INDEX.search(page)
    return None if match is None else _embedded_json(match[1], "graph index")

"""Offline interactive viewer for attribution graphs: one self-contained HTML file per graph."""

from __future__ import annotations

from neurontrace.viewer.html import (
    embed_json,
    graph_from_html,
    render_viewer,
    siblings_from_html,
    write_viewer,
)

__all__ = ["embed_json", "graph_from_html", "render_viewer", "siblings_from_html", "write_viewer"]

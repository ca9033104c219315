"""Screenshots of one graph in circuit-tracer's own frontend and in neurontrace's viewer (docs/images/).

    make screenshots        # = .venv/bin/python scripts/viewer_screenshots.py

Builds the graph of "The keys to the cabinet" on the default model with `neurontrace graph --supernodes`, pins
its four most influential neurons and selects the top one in both pages (circuit-tracer: URL parameters; ours:
the URL hash), and saves a 1600x1000 PNG of each. circuit-tracer's page is served offline as in the browser
test (tests/viewer/ct_frontend.py).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "viewer"))

from ct_frontend import chromium, console_errors, missing, prepare, serve, wait_for  # noqa: E402

from neurontrace.cli import main  # noqa: E402

PROMPT = "The keys to the cabinet"
OUT = ROOT / "docs" / "images"


def run() -> int:
    why = missing()
    if why:
        print(f"viewer_screenshots: {why}", file=sys.stderr)
        return 2
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "graphs"
        if main(["graph", "--prompt", PROMPT, "--slug", "keys", "--supernodes", "--out", str(data_dir)]):
            return 2
        graph = json.loads((data_dir / "keys.json").read_text(encoding="utf-8"))
        neurons = sorted(
            (n for n in graph["nodes"] if n["feature_type"] == "cross layer transcoder"),
            key=lambda n: n["influence"],
        )
        pins = [n["node_id"] for n in neurons[:4]]
        driver = chromium(Path(tmp) / "profile")
        try:
            with serve(data_dir, prepare(Path(tmp))) as site:
                query = urllib.parse.urlencode(
                    {"slug": "keys", "pinnedIds": ",".join(pins), "clickedId": pins[0]}
                )
                driver.get(f"{site}/index.html?{query}")
                wait_for(driver, "return document.querySelectorAll('.link-graph text.node').length")
                time.sleep(2.0)  # the subgraph's force layout settles
                driver.save_screenshot(str(OUT / "viewer-circuit-tracer.png"))
                errors = console_errors(driver)
            page = data_dir / "keys.html"
            fragment = urllib.parse.urlencode({"pinned": ",".join(pins), "clicked": pins[0]}, safe=",")
            driver.get(f"{page.as_uri()}#{fragment}")
            time.sleep(1.0)
            driver.save_screenshot(str(OUT / "viewer-neurontrace.png"))
            errors += console_errors(driver)
        finally:
            driver.quit()
    for name in ("viewer-circuit-tracer.png", "viewer-neurontrace.png"):
        print(f"wrote {OUT / name}")
    if errors:
        print("console errors:\n  " + "\n  ".join(errors), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run())

"""circuit-tracer's own graph frontend (pip ``circuit-tracer``), served offline on loopback for browser tests.

Its ``index.html`` loads d3, d3-jetpack, dagre and pako from CDNs; the copy made here loads them from the npm
packages in ``ct_frontend/`` (``npm ci`` there: ``make install`` does it) and drops the two scripts it needs only
on transformer-circuits.pub (the hot-reload client, the .npy reader). Nothing else is changed. The server is
circuit-tracer's own request handler (``/data/`` and ``/graph_data/`` from the data folder, ``POST /save_graph/``
as its Save button writes), bound to 127.0.0.1 on a free port.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import shutil
import socketserver
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

NPM_DIR = Path(__file__).with_name("ct_frontend")
# CDN script (by file name) -> the npm file that replaces it (None: dropped)
SCRIPTS = {
    "hotserver-client-ws.js": None,
    "d3.js": "../build/d3-jetpack.js",  # d3 v7 and d3-jetpack, bundled by `npm run build` (libs.js)
    "jetpack_2024-07-20.js": None,  # in the bundle above
    "npy_v0.js": None,  # only for .npy feature files, which no graph here uses
    "dagre.min.js": "dagre/dist/dagre.min.js",
    "pako.min.js": "pako/dist/pako.min.js",
}
_CDN = re.compile(r"<script src='(https?://[^']+)'></script>\n?")


def missing() -> str | None:
    """Why the frontend cannot run here, or None."""
    if importlib.util.find_spec("circuit_tracer") is None:
        return "needs circuit-tracer (pip install --no-deps circuit-tracer==0.5.0; make install does it)"
    for target in SCRIPTS.values():
        if target and not (NPM_DIR / "node_modules" / target).is_file():
            return f"needs the npm packages of {NPM_DIR} (npm ci --prefix {NPM_DIR}; make install does it)"
    return None


def assets_dir() -> Path:
    spec = importlib.util.find_spec("circuit_tracer")
    return Path(next(iter(spec.submodule_search_locations))) / "frontend" / "assets"


def prepare(folder: Path) -> Path:
    """A copy of the frontend in ``folder`` whose index.html loads only local files."""
    target = folder / "frontend"
    shutil.copytree(assets_dir(), target)
    vendor = target / "vendor"
    vendor.mkdir()
    page = (target / "index.html").read_text(encoding="utf-8")

    def local(match: re.Match) -> str:
        name = match[1].rsplit("/", 1)[-1]
        if name not in SCRIPTS:
            raise AssertionError(f"circuit-tracer's index.html loads an unknown script {match[1]}")
        if SCRIPTS[name] is None:
            return ""
        shutil.copy(NPM_DIR / "node_modules" / SCRIPTS[name], vendor / name)
        return f"<script src='./vendor/{name}'></script>\n"

    page = _CDN.sub(local, page)
    assert "http" not in re.sub(r"<!--.*?-->", "", page, flags=re.S), "a network reference is left"
    (target / "index.html").write_text(page, encoding="utf-8")
    return target


class _Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    allow_reuse_address = True
    daemon_threads = True


@contextmanager
def serve(data_dir: Path, frontend_dir: Path) -> Iterator[str]:
    """Serve ``data_dir`` with circuit-tracer's handler on loopback; yields the base URL."""
    from circuit_tracer.frontend.local_server import CircuitGraphHandler

    handler = functools.partial(CircuitGraphHandler, frontend_dir=frontend_dir, data_dir=str(data_dir))
    httpd = _Server(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def chromium(profile: Path, *, width: int = 1600, height: int = 1000):
    """A headless Chromium (Selenium) with no network services and the browser log enabled."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--window-size={width},{height}",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
    )
    return driver


def wait_for(driver, script: str, timeout: float = 20.0, *args):
    """Poll ``script`` (returning a value) until it is truthy; return it."""
    import time

    end = time.monotonic() + timeout
    while True:
        value = driver.execute_script(script, *args)
        if value or time.monotonic() > end:
            return value
        time.sleep(0.1)


def console_errors(driver) -> list[str]:
    """SEVERE browser-log entries, except the 404 of /favicon.ico (circuit-tracer's assets have no icon)."""
    return [
        e["message"]
        for e in driver.get_log("browser")
        if e["level"] == "SEVERE" and "favicon.ico" not in e["message"]
    ]

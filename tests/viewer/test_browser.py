"""``transferlab view`` in a real browser: Debian's Chromium driven by Playwright, against
the real command started as a process (and the exported report opened from disk).

Skipped with the reason when Playwright or a Chromium is missing (.ci/run installs
Debian's ``chromium``). Each test saves a screenshot into its temporary folder.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import env
from tests.imagegen import jpeg_bytes

pytest.importorskip("uvicorn", reason='the viewer needs pip install "transferlab[view]"')
sync_api = pytest.importorskip("playwright.sync_api",
                               reason='browser tests need playwright (pip install -e ".[test]")')
CHROMIUM = next((p for p in (os.environ.get("TRANSFERLAB_CHROMIUM"), "/usr/bin/chromium",
                             shutil.which("chromium"), shutil.which("chromium-browser")) if p
                 and Path(p).is_file()), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (apt-get install "
                                "chromium; .ci/run does it)")
READY = "window.TL_READY === true"


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield b
        b.close()


def start_view(store: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """``transferlab view STORE --port 0 --no-browser``: the process and its address."""
    proc = subprocess.Popen([sys.executable, "-m", "transferlab", "view", str(store), "--port",
                             "0", "--no-browser", *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env())
    deadline = time.monotonic() + 60
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        found = re.search(r"serving at (\S+)", line)
        if found:
            return proc, found.group(1)
    proc.kill()
    raise AssertionError("the viewer did not start:\n" + "".join(lines))


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def point_on_screen(page, trace: int, index: int) -> tuple[float, float]:
    """Page coordinates of point ``index`` of plotly trace ``trace``."""
    x, y = page.evaluate(f"""() => {{ const gd = document.getElementById('map');
        const L = gd._fullLayout, t = gd.data[{trace}];
        return [L._size.l + L.xaxis.d2p(t.x[{index}]), L._size.t + L.yaxis.d2p(t.y[{index}])];
        }}""")
    box = page.locator("#map").bounding_box()
    return box["x"] + x, box["y"] + y


def test_the_page_shows_the_store_in_a_browser(view_store, browser, tmp_path):
    proc, address = start_view(view_store.dir, "--data-root", str(view_store.dir.parent /
                                                                   "images"))
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 720})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(address)
        page.wait_for_function(READY, timeout=20000)
        # the map: one point per row, drawn by plotly's WebGL scatter
        assert page.evaluate("window.TL_POINTS") == len(view_store) == 24
        assert page.get_attribute("#count", "data-points") == "24"
        assert page.evaluate("document.getElementById('map').data.reduce("
                             "(s, t) => s + t.x.length, 0)") == 24
        assert page.evaluate("document.getElementById('map').data[0].type") == "scattergl"
        assert page.locator("#class-counts tr").count() == 3
        assert page.locator("#confusion tr").count() == 4  # header + 3 classes
        # click a point: its nearest images
        x, y = point_on_screen(page, 0, 0)
        page.mouse.move(x, y)
        page.wait_for_selector("#hover-img", state="visible")
        page.wait_for_function("document.getElementById('hover-img').naturalWidth > 0")
        page.wait_for_function("document.getElementById('hover-text').textContent"
                               ".includes('/')")  # the hovered point's key
        page.mouse.click(x, y)
        page.wait_for_selector("#results-grid .tile.query")
        page.wait_for_function("document.querySelectorAll('#results-grid .tile').length == 13")
        assert page.text_content("#results-title").startswith("nearest images of ")
        # a lasso (the default drag) around the whole plot area
        box = page.evaluate("""() => { const s = document.getElementById('map')._fullLayout._size;
            return [s.l, s.t, s.l + s.w, s.t + s.h]; }""")
        origin = page.locator("#map").bounding_box()
        x0, y0 = origin["x"] + box[0] + 2, origin["y"] + box[1] + 2
        x1, y1 = origin["x"] + box[2] - 2, origin["y"] + box[3] - 2
        page.mouse.move(x0, y0)
        page.mouse.down()
        for x, y in [(x1, y0), (x1, y1), (x0, y1), (x0, y0 + 3)]:
            page.mouse.move(x, y, steps=6)
        page.mouse.up()
        page.wait_for_function("document.getElementById('results-title').textContent"
                               ".startsWith('selection: 24 points')")
        assert page.locator("#results-grid .tile").count() == 24
        # filters: class, cluster, key prefix
        page.select_option("#filter-class", "1")
        page.wait_for_function("window.TL_POINTS === 8")
        page.select_option("#filter-class", "")
        page.fill("#filter-prefix", "fox/000")
        page.wait_for_function("window.TL_POINTS === 8")
        page.fill("#filter-prefix", "")
        page.wait_for_function("window.TL_POINTS === 24")
        clusters = page.evaluate("window.TL.info.cluster_counts")
        page.select_option("#filter-cluster", "0")
        page.wait_for_function(f"window.TL_POINTS === {clusters[0]}")
        page.select_option("#filter-cluster", "")
        # each curation gallery opens
        names = page.evaluate("Object.keys(window.TL.info.galleries)")
        assert {"outliers", "label_issues"} <= set(names)
        for name in names:
            page.click(f"#gallery-{name}")
            page.wait_for_function(f"document.getElementById('results-grid').dataset.gallery"
                                   f" === '{name}'")
            assert page.locator("#results-grid .tile").count() > 0
        # drop an image (the file input): its nearest stored images
        query = tmp_path / "query.jpg"
        query.write_bytes(jpeg_bytes(40, 40, seed=3))
        page.set_input_files("#upload", str(query))
        page.wait_for_function("document.getElementById('results-title').textContent"
                               ".startsWith('nearest images of the uploaded')", timeout=20000)
        assert page.locator("#results-grid .tile").count() == 12
        page.wait_for_timeout(300)  # thumbnails decode
        page.screenshot(path=str(tmp_path / "view.png"))
        # traversal URLs are refused by the running server too
        for url in ["static/../meta.json", "static/..%2fmeta.json", "thumb/..%2f..%2fetc",
                    "index.csv", "api/gallery/..%2fmeta.json"]:
            assert page.request.get(address.rstrip("/") + "/" + url).status == 404, url
        assert errors == []
        csp = page.request.get(address).headers["content-security-policy"]
        assert "script-src 'self' 'unsafe-eval';" in csp  # the page above ran under it
    finally:
        stop(proc)


def test_with_host_the_page_needs_the_printed_token(view_store, browser):
    proc, address = start_view(view_store.dir, "--host", "127.0.0.1")
    try:
        assert "?token=" in address
        page = browser.new_page()
        bare = address.split("?")[0]
        assert page.goto(bare).status == 403
        page.goto(address)
        page.wait_for_function(READY, timeout=20000)
        assert page.evaluate("window.TL_POINTS") == 24
    finally:
        stop(proc)


def test_the_exported_report_opens_without_a_server(view_store, browser, tmp_path):
    from transferlab.commands import main

    out = tmp_path / "report.html"
    assert main(["view", str(view_store.dir), "--export", str(out)]) == 0
    page = browser.new_page(viewport={"width": 1280, "height": 720})
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(out.as_uri())
    page.wait_for_function(READY, timeout=20000)
    assert page.evaluate("window.TL_POINTS") == 24
    page.click("#gallery-outliers")
    page.wait_for_function("document.getElementById('results-grid').dataset.gallery"
                           " === 'outliers'")
    srcs = page.eval_on_selector_all("#results-grid img", "els => els.map(e => e.src)")
    assert len(srcs) == 5 and all(s.startswith("data:image/jpeg;base64,") for s in srcs)
    assert all(u.startswith(("file:", "data:")) for u in requests), requests
    page.screenshot(path=str(tmp_path / "report.png"))

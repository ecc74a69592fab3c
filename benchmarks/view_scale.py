"""``transferlab view`` at scale: time to a served page, to the browser's first paint and to
an interactive map, with the projection computed (cold) or read from the store's view cache
(warm), and the server's memory; synthetic float16 stores of 10k, 100k and 1M rows.

    PYTHONPATH=. python benchmarks/view_scale.py                          # 10k, 100k, 1M
    PYTHONPATH=. python benchmarks/view_scale.py --rows 10000,100000      # some sizes
    PYTHONPATH=. python benchmarks/view_scale.py --quick                  # seconds

The server is the real command (``python -m transferlab view STORE --port 0``) in its own
process, timed from its start to the "serving at" line (store opened, map ready). The page
is loaded by Debian's Chromium through Playwright (headless, WebGL in software: SwiftShader);
"first paint" is the page's first-contentful-paint and "interactive" the moment the map is
drawn with its events bound (``window.TL_READY_AT``), both from navigation start. "zoom"
is one ``Plotly.relayout`` of the axes ranges (a redraw of every point). Server RSS is read
from /proc after the page loaded (VmRSS, and VmHWM for the peak). "open + map" is the
server's own work timed in this process (open the store, compute or read the map), without
the interpreter's start and imports that "server ready" includes. Cold and warm runs are
alternated ``--rounds`` times; the table gives medians.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    base_parser,
    load_line,
    machine_line,
    resolve_device,
    table,
    write_json,
)
from transferlab.errors import StoreError
from transferlab.store.reader import FeatureStore
from transferlab.store.writer import StoreWriter
from transferlab.viewer.mapcache import store_map

CHUNK = 65536
REPO = Path(__file__).resolve().parents[1]


def synthetic_store(path: Path, rows: int, dim: int, classes: int = 10, seed: int = 0) -> Any:
    """A labelled float16 store of ``classes`` Gaussian clusters (reused when present)."""
    try:
        store = FeatureStore.open(path)
        if store.features.shape == (rows, dim):
            return store
    except StoreError:
        pass
    shutil.rmtree(path, ignore_errors=True)
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, dim)).astype(np.float32) * 3
    with StoreWriter(path, {"bench": "view", "rows": rows, "dim": dim}, dtype="float16",
                     shard_size=CHUNK, fsync=False) as writer:
        for start in range(0, rows, CHUNK):
            n = min(CHUNK, rows - start)
            y = rng.integers(0, classes, n)
            x = centers[y] + rng.normal(size=(n, dim)).astype(np.float32)
            writer.add([f"c{c}/{i:08d}.png" for c, i in zip(y, range(start, start + n))],
                       y.tolist(), x)
        return writer.close({"class_names": [f"class {c}" for c in range(classes)]})


def rss_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process, MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        fields[name] = value.split()
    return int(fields["VmRSS"][0]) / 1024, int(fields["VmHWM"][0]) / 1024


def start_server(store: Path) -> tuple[subprocess.Popen, str, float]:
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "transferlab", "view", str(store), "--port",
                             "0", "--no-browser"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=REPO)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        found = re.search(r"serving at (\S+)", line)
        if found:
            return proc, found.group(1), time.perf_counter() - started
    proc.kill()
    raise SystemExit("the viewer did not start:\n" + "".join(lines))


def browser_times(browser: Any, address: str) -> tuple[float, float, float, int]:
    """(first paint ms, interactive ms, zoom redraw ms, points drawn) of one page load."""
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.goto(address)
    page.wait_for_function("window.TL_READY === true", timeout=600_000)
    paint = page.evaluate("""() => { const e = performance.getEntriesByName(
        'first-contentful-paint')[0]; return e ? e.startTime : null; }""")
    ready = page.evaluate("window.TL_READY_AT")
    zoom = page.evaluate("""async () => { const gd = document.getElementById('map');
        const [a, b] = gd._fullLayout.xaxis.range, [c, d] = gd._fullLayout.yaxis.range;
        const t = performance.now();
        await Plotly.relayout(gd, {'xaxis.range': [a / 2, b / 2], 'yaxis.range': [c / 2, d / 2]});
        await new Promise(requestAnimationFrame);
        return performance.now() - t; }""")
    points = page.evaluate("window.TL_POINTS")
    page.close()
    return float("nan") if paint is None else paint, ready, zoom, points


def main(argv: Sequence[str] | None = None) -> list[list]:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--rows", default="10000,100000,1000000", help="comma-separated sizes")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--chromium", default="/usr/bin/chromium")
    p.add_argument("--rounds", type=int, default=3, help="cold/warm pairs per size (medians)")
    args = p.parse_args(argv)
    sizes = [int(v) for v in args.rows.split(",")]
    if args.quick:
        sizes, args.dim, args.rounds = [2000], 32, 1
    print(machine_line(resolve_device(args.device)))
    print(load_line())
    browser = playwright = None
    try:
        from playwright.sync_api import sync_playwright

        if Path(args.chromium).is_file():
            playwright = sync_playwright().start()
            browser = playwright.chromium.launch(executable_path=args.chromium, headless=True)
    except ImportError:
        pass
    if browser is None:
        print("no Playwright or Chromium here: server times only")
    out_rows = []
    try:
        for n in sizes:
            path = Path(args.bench_dir) / f"view_store_{n}x{args.dim}"
            t = time.perf_counter()
            synthetic_store(path, n, args.dim)
            print(f"store: {n} x {args.dim} float16 (ready in {time.perf_counter() - t:.1f} s)")
            runs: dict[str, list[list]] = {"cold": [], "warm": []}
            kinds = ("cold",) if args.quick else ("cold", "warm")
            for _ in range(args.rounds):  # cold and warm alternated: the load hits both
                for cache in kinds:
                    if cache == "cold":
                        shutil.rmtree(path / "view-cache", ignore_errors=True)
                    t = time.perf_counter()  # this process: open + map (the server's work)
                    found = store_map(FeatureStore.open(path))
                    map_s = time.perf_counter() - t
                    assert found.cached == (cache == "warm")
                    if cache == "cold":  # the server computes it again
                        shutil.rmtree(path / "view-cache", ignore_errors=True)
                    proc, address, served = start_server(path)
                    try:
                        paint = ready = zoom = float("nan")
                        points: Any = "n/a"
                        if browser is not None:
                            paint, ready, zoom, points = browser_times(browser, address)
                        rss, peak = rss_mib(proc.pid)
                    finally:
                        proc.terminate()
                        proc.wait(30)
                    runs[cache].append([map_s, served, paint, ready, zoom, rss, peak])
                    print(n, cache, points, runs[cache][-1], flush=True)
            for cache in kinds:
                # a page whose first paint Chromium did not record counts as missing
                med = np.nanmedian(np.array(runs[cache], dtype=float), axis=0).tolist()
                out_rows.append([n, cache, points, *med])
    finally:
        if browser is not None:
            browser.close()
        if playwright is not None:
            playwright.stop()
    print()
    print(table(f"transferlab view, {args.dim}-d float16 stores (PCA map; cold: computed, "
                "warm: from STORE/view-cache)",
                ["rows", "map", "points drawn", "open + map s", "server ready s",
                 "first paint ms", "interactive ms", "zoom redraw ms", "server RSS MiB",
                 "peak RSS MiB"],
                out_rows))
    write_json(args.json, {"rows": out_rows, "args": vars(args)})
    return out_rows


if __name__ == "__main__":
    main()

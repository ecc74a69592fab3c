"""A local web page over a feature store: its 2-D map, thumbnails, nearest images, filters
and curation findings (``transferlab.viewer``).

Command line::

    transferlab view STORE [--port 8765] [--host H] [--no-browser] [--method pca]
        [--clusters CSV] [--curation DIR] [--confusion JSON] [--data-root DIR]
        [--export report.html]
        [--overwrite]

Binds 127.0.0.1 unless ``--host`` is given; then every request needs the token printed at
start (it is in the printed address). ``--export`` writes one self-contained HTML file
instead of serving.
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import secrets
import socket
import sys
import threading
import webbrowser
from collections.abc import Sequence
from typing import Any

from ..analysis.neighbors import METRICS
from ..analysis.projection import MAP_METHODS
from ..errors import ConfigError
from ..runtime.userfiles import check_output
from ..store.reader import FeatureStore
from . import run_cli

LOOPBACK_NAMES = ["127.0.0.1", "localhost", "::1", "[::1]"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="transferlab view",
        description="A local web page over a feature store: 2-D map, thumbnails, nearest "
                    "images of a point or a dropped image, filters, curation galleries.")
    p.add_argument("store", help="feature store directory")
    p.add_argument("--port", type=int, default=8765, help="port to serve on (0: any free one)")
    p.add_argument("--host", default=None,
                   help="address to bind instead of 127.0.0.1 (then a token printed at start "
                        "is required on every request)")
    p.add_argument("--no-browser", action="store_true", help="do not open a browser")
    p.add_argument("--method", choices=MAP_METHODS, default="pca",
                   help="the 2-D map (computed once, cached in STORE/view-cache)")
    p.add_argument("--max-points", type=int, default=None,
                   help="points drawn at most (a seeded random sample above; default 200000)")
    p.add_argument("--clusters", metavar="CSV",
                   help="key,cluster assignments (transferlab cluster --out); default "
                        "STORE/clusters.csv when present")
    p.add_argument("--curation", metavar="DIR",
                   help="curate's output folder (default STORE/curation when present)")
    p.add_argument("--confusion", metavar="JSON",
                   help="a confusion matrix to show (transferlab finetune's confusion.json); "
                        "default STORE/confusion.json when present")
    p.add_argument("--data-root", metavar="DIR",
                   help="folder the store's keys are relative to (default: as recorded)")
    p.add_argument("--metric", choices=METRICS, default="cosine")
    p.add_argument("--exact", action="store_true",
                   help="scan every row even when the store has a FAISS index")
    p.add_argument("--trust-code", action="store_true",
                   help="let a trusted store's metadata name a module:callable to run")
    p.add_argument("--export", metavar="HTML",
                   help="write one self-contained HTML report instead of serving")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --export file (default: refuse it)")
    return p


def command(argv: Sequence[str] | None = None) -> None:
    """Parse, run, print; user mistakes raise TransferlabError."""
    args = build_parser().parse_args(argv)
    from ..viewer.mapcache import MAX_MAP_POINTS
    from ..viewer.webapp import build_app, require_view_extra, viewer_data

    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be in [0, 65535], got {args.port}")
    if args.max_points is not None and args.max_points < 3:
        raise ConfigError(f"--max-points must be at least 3, got {args.max_points}")
    if args.export is not None:
        check_output(args.export, args.overwrite, "--export")
    else:
        require_view_extra()
    store = FeatureStore.open(args.store)
    print(f"opening {store.dir}: {len(store):,} rows ({args.method} map, cached in "
          f"{store.dir / 'view-cache'})", flush=True)
    data = viewer_data(store, args.method, args.max_points or MAX_MAP_POINTS,
                       clusters=args.clusters, curation=args.curation,
                       confusion=args.confusion, root=args.data_root,
                       metric=args.metric, exact=args.exact, trust_code=args.trust_code)
    if data.map.sampled:
        print(f"the map draws a seeded random sample of {len(data.map.rows):,} of "
              f"{len(store):,} rows")
    if args.export is not None:
        from ..viewer.htmlreport import write_html_report

        print(f"wrote {write_html_report(data, args.export, args.overwrite)}")
        return
    host = args.host or "127.0.0.1"
    token = secrets.token_urlsafe(18) if args.host is not None else None
    sock = _bind(host, args.port)
    port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    address = f"http://{shown}:{port}/" + (f"?token={token}" if token else "")
    allowed = LOOPBACK_NAMES if args.host is None else None
    app = build_app(data, token=token, allowed_hosts=allowed)
    print(f"serving at {address}  (Ctrl-C stops)", flush=True)
    if token:
        print(f"token: {token}  (needed on every request: ?token= or the "
              "X-Transferlab-Token header)", flush=True)
    if not args.no_browser and _has_display():
        threading.Timer(0.5, webbrowser.open, [address]).start()
    _serve(app, sock)


def _bind(host: str, port: int) -> socket.socket:
    try:
        family = socket.AF_INET6 if isinstance(ipaddress.ip_address(host),
                                               ipaddress.IPv6Address) else socket.AF_INET
    except ValueError:
        family = socket.AF_INET  # a host name
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose "
                          "another --port (or --port 0 for any free one)") from None
    sock.listen(128)  # before the address is printed: a browser opening it at once waits
    return sock


def _has_display() -> bool:
    return sys.platform in ("darwin", "win32") or bool(
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def _serve(app: Any, sock: socket.socket) -> None:
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[sock])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: the exit code (2 with one line on stderr for a user mistake)."""
    return run_cli(command, argv, build_parser())

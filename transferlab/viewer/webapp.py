"""The viewer's ASGI app (Starlette): the page, its data as compact binary and JSON, and
thumbnails, over one opened store.

Safety rules (issue #26), each tested in tests/viewer/test_webapp.py:

- No path from a URL reaches the file system. Static files are a fixed table of names;
  images are named by row number (``/thumb/{row}``), the key comes from the store and is
  resolved inside the data root (``thumbnails``); anything else is 404.
- With a token (``transferlab view --host``), every request must carry it (``?token=`` or
  the ``X-Transferlab-Token`` header), compared in constant time; without it the answer
  is 403 and nothing else is read.
- ``allowed_hosts``: the Host header must name the server (a page on another site cannot
  reach a server on 127.0.0.1 by rebinding its own name to it).
- Writes only into the store's ``view-cache`` folder: the map, thumbnails, and an uploaded
  query image for as long as it is embedded (deleted after).
- An upload is bounded (``MAX_UPLOAD_BYTES``, counted while it streams in) and decoded like
  any extracted image (``data.imageio.load_image``: regular file, bounded pixels).
- Blocking work (thumbnails, searches, embedding) runs in Starlette's thread pool, so many
  thumbnail requests do not stall the map.
- Every answer carries a Content-Security-Policy (the page runs only its own scripts and
  connects only to this server), ``nosniff`` and ``no-referrer``.
"""
from __future__ import annotations

import errno
import hmac
import json
import os
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from ..analysis.neighbors import store_search
from ..errors import DataError, MissingDependencyError, StoreError, TransferlabError
from ..extract.queries import query_embedder
from ..runtime.untrusted import open_inside
from .galleries import MAX_GROUPS, Gallery, read_clusters, read_confusion, read_curation
from .mapcache import MAX_MAP_POINTS, StoreMap, cache_folder, store_map
from .thumbnails import PLACEHOLDER_SVG, Thumbnailer

try:
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.middleware import Middleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route
except ImportError:  # the page needs the extra; the map cache and reports do not
    Starlette = None  # type: ignore[assignment,misc]

STATIC = Path(__file__).resolve().parent / "static"
# the only files served from disk besides thumbnails: URL name -> (file, content type)
STATIC_FILES = {
    "plotly-gl2d.min.js": ("plotly-gl2d.min.js", "text/javascript; charset=utf-8"),
    "viewer.js": ("viewer.js", "text/javascript; charset=utf-8"),
    "viewer.css": ("viewer.css", "text/css; charset=utf-8"),
}
MAX_UPLOAD_BYTES = 16 << 20  # a query image: larger uploads get 413 while they stream in
MAX_K = 100
TOKEN_HEADER = "x-transferlab-token"
VIEW_EXTRA = 'the viewer needs Starlette and uvicorn: pip install "transferlab[view]"'


def require_view_extra() -> None:
    """MissingDependencyError (one line) when the view extra is not installed."""
    if Starlette is None:
        raise MissingDependencyError(VIEW_EXTRA)
    try:
        import uvicorn  # noqa: F401
    except ImportError:
        raise MissingDependencyError(VIEW_EXTRA) from None


@dataclass
class ViewerData:
    """Everything the page shows, computed once when the viewer starts."""

    store: Any
    map: StoreMap
    thumbs: Thumbnailer
    cache_dir: Path | None  # None: the store cannot be written (nothing cached)
    clusters: np.ndarray | None = None  # (N,) int32, -1 unassigned
    galleries: dict[str, Gallery] = field(default_factory=dict)
    confusion: dict | None = None  # {classes, matrix (rows: true class), held_out}
    metric: str = "cosine"
    exact: bool = False
    trust_code: bool = False
    _map_bytes: bytes | None = None
    _embed: Any = None  # extract.queries.query_embedder of the store, once built
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def info(self) -> dict:
        """The page's first request: sizes, class names and counts, what can be shown."""
        store, m = self.store, self.map
        labels = np.asarray(store.labels)
        names = store.class_names or []
        n_classes = max(len(names), int(labels.max()) + 1 if len(labels) else 0)
        counts = (np.bincount(labels[labels >= 0], minlength=n_classes).tolist() if n_classes
                  else [])
        clusters = None
        if self.clusters is not None:
            assigned = self.clusters[self.clusters >= 0]
            clusters = np.bincount(assigned).tolist() if len(assigned) else []
        return {
            "store": Path(store.dir).name, "rows": len(store), "dim": int(store.features.shape[1]),
            "shown": len(m.rows), "sampled": m.sampled, "method": m.method,
            "max_points": MAX_MAP_POINTS, "cached": m.cached,
            "labelled": bool((labels >= 0).any()),
            "class_names": [names[c] if c < len(names) else str(c) for c in range(n_classes)],
            "class_counts": [int(c) for c in counts],
            "unlabelled": int((labels < 0).sum()),
            "cluster_counts": clusters,
            "galleries": {g.name: {"title": g.title, "total": g.total, "shown": len(g.items)}
                          for g in self.galleries.values()},
            "confusion": self.confusion,
            "images": self.thumbs.root is not None,
            "can_query": isinstance(store.meta.get("config"), dict) and self.cache_dir
            is not None,
            "cache": self.cache_dir is not None,
        }

    def map_bytes(self) -> bytes:
        """The shown points as little-endian arrays, one after another: x, y (float32),
        row, label, cluster (int32); M = info()["shown"] values each."""
        if self._map_bytes is None:
            rows = self.map.rows
            labels = np.asarray(self.store.labels)[rows].astype("<i4")
            clusters = (self.clusters[rows] if self.clusters is not None
                        else np.full(len(rows), -1)).astype("<i4")
            self._map_bytes = b"".join([
                np.ascontiguousarray(self.map.xy[:, 0], "<f4").tobytes(),
                np.ascontiguousarray(self.map.xy[:, 1], "<f4").tobytes(),
                rows.astype("<i4").tobytes(), labels.tobytes(), clusters.tobytes()])
        return self._map_bytes

    def point(self, row: int) -> dict:
        store = self.store
        label = int(store.labels[row])
        names = store.class_names or []
        return {"row": row, "key": store.keys[row], "label": label,
                "class": (names[label] if 0 <= label < len(names) else
                          (str(label) if label >= 0 else None)),
                "cluster": None if self.clusters is None else int(self.clusters[row])}

    def hits(self, vectors: np.ndarray, k: int, skip_key: str | None = None) -> list[dict]:
        """The k nearest stored keys of one query vector (its own key left out)."""
        found = store_search(self.store, vectors, k + (skip_key is not None), self.metric,
                             exact=self.exact)[0]
        out = [dict(self.point(r), distance=float(d)) for r, d in found
               if self.store.keys[r] != skip_key]
        return out[:k]

    def neighbours(self, row: int, k: int) -> list[dict]:
        vec = np.asarray(self.store.features[row], np.float32)[None]
        return self.hits(vec, k, self.store.keys[row])

    def query_image(self, data: bytes, k: int) -> list[dict]:
        """Nearest stored images of an uploaded image, embedded as ``transferlab search``
        embeds query files; the upload lives in the view cache while it is embedded."""
        if self.cache_dir is None:
            raise DataError("search by image needs a view-cache folder in the store to hold "
                            "the upload while it is embedded, and this store is read-only "
                            "here; copy the store somewhere writable")
        folder = self.cache_dir / "uploads"
        if folder.is_symlink():
            raise DataError(f"{folder} is a link; remove it")
        folder.mkdir(exist_ok=True)
        path = folder / f"query-{secrets.token_hex(8)}.img"
        try:
            with open_inside(path, "xb", self.store.dir, "the uploaded image", DataError) as f:
                f.write(data)
            with self._lock:  # the store's model, built on the first upload and kept
                if self._embed is None:
                    self._embed = query_embedder(self.store.meta, self.store.dir,
                                                 self.trust_code)
                vec = np.asarray(self._embed([str(path)]), np.float32)
        finally:
            path.unlink(missing_ok=True)
        return self.hits(vec, k)

    def prefix_mask(self, prefix: str) -> bytes:
        keys = self.store.keys
        return bytes(keys[r].startswith(prefix) for r in self.map.rows.tolist())


def viewer_data(store: Any, method: str = "pca", max_points: int = MAX_MAP_POINTS,
                clusters: str | os.PathLike | None = None,
                curation: str | os.PathLike | None = None,
                confusion: str | os.PathLike | None = None,
                root: str | os.PathLike | None = None, cache: bool = True,
                metric: str = "cosine", exact: bool = False,
                trust_code: bool = False) -> ViewerData:
    """Open what the page shows: the map (cached), cluster assignments (``clusters``, or
    ``STORE/clusters.csv`` when present), curation galleries (``curation``, or
    ``STORE/curation`` when present), a confusion matrix (``confusion``, or
    ``STORE/confusion.json`` when present), thumbnails from ``root`` (default: the data
    root the store records)."""
    labels = np.asarray(store.labels)
    if len(labels) and int(labels.max()) >= MAX_GROUPS:  # counted per class by the page
        raise StoreError(f"the store {store.dir} has label {int(labels.max()):,}: more than "
                         f"the {MAX_GROUPS:,} classes the viewer counts; its index.csv was "
                         "altered or it was not written by transferlab")
    try:
        folder: Path | None = cache_folder(store) if cache else None
    except PermissionError:  # a store on a read-only share: shown, nothing cached
        folder = None
    except OSError as exc:
        if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        folder = None
    found = store_map(store, method, max_points, cache=folder is not None)
    default_clusters = Path(store.dir) / "clusters.csv"
    if clusters is None and default_clusters.is_file():
        clusters = default_clusters
    cluster_rows = read_clusters(store, clusters) if clusters is not None else None
    default_curation = Path(store.dir) / "curation"
    if curation is None and default_curation.is_dir():
        curation = default_curation
    galleries = read_curation(store, curation) if curation is not None else {}
    default_confusion = Path(store.dir) / "confusion.json"
    if confusion is None and default_confusion.is_file():
        confusion = default_confusion
    matrix = read_confusion(confusion) if confusion is not None else None
    return ViewerData(store, found, Thumbnailer(store, folder, root), folder, cluster_rows,
                      galleries, matrix, metric, exact, trust_code)


def page_html(config: dict, head: str, script: str) -> str:
    """``static/index.html`` with ``head`` (styles, plotly), the page's config (JSON, with
    '<' escaped so no value can close the script element) and ``script`` (viewer.js)."""
    template = (STATIC / "index.html").read_text(encoding="utf-8")
    blob = json.dumps(config).replace("<", "\\u003c")
    head_at, config_at = template.index("<!--TL-HEAD-->"), template.index("/*TL-CONFIG*/null")
    script_at = template.index("<!--TL-SCRIPT-->")
    return (template[:head_at] + head + template[head_at + 14:config_at] + blob
            + template[config_at + 17:script_at] + script + template[script_at + 16:])


def _row(request: Request, data: ViewerData) -> int | None:
    row = request.path_params["row"]
    return row if 0 <= row < len(data.store) else None


def _k(request: Request) -> int:
    try:
        k = int(request.query_params.get("k", "12"))
    except ValueError:
        k = 12
    return max(1, min(MAX_K, k))


class _TokenGate:
    """Pure ASGI middleware: 403 unless the request carries the token."""

    def __init__(self, app: Any, token: str):
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        given = request.headers.get(TOKEN_HEADER) or request.query_params.get("token") or ""
        if not hmac.compare_digest(given.encode(), self.token):
            response = PlainTextResponse("a token is required: open the address transferlab "
                                         "view printed", status_code=403)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


# Every answer: the page runs only its own script files (no inline or foreign script) and
# talks only to this server; no answer is sniffed into another type (a cached thumbnail
# planted in the store stays an image); the address (with its token) is never sent on as
# a referrer; no framing. 'unsafe-eval': regl, plotly's WebGL layer, compiles its draw
# calls with new Function (without it scattergl draws but hover and click never fire).
SECURITY_HEADERS = [
    (b"content-security-policy",
     b"default-src 'self'; script-src 'self' 'unsafe-eval'; style-src 'self' 'unsafe-inline'; "
     b"img-src 'self' data: blob:; connect-src 'self'; worker-src 'self' blob:; "
     b"frame-ancestors 'none'; base-uri 'none'; form-action 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


class _SecurityHeaders:
    """Pure ASGI middleware adding ``SECURITY_HEADERS`` to every response."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        async def with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = dict(message, headers=[*message.get("headers", []),
                                                 *SECURITY_HEADERS])
            await send(message)

        await self.app(scope, receive, with_headers if scope["type"] == "http" else send)


class _TooLarge(Exception):
    pass


async def _bounded_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _TooLarge
    parts, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        parts.append(chunk)
    return b"".join(parts)


def build_app(data: ViewerData, token: str | None = None,
              allowed_hosts: list[str] | None = None,
              max_upload: int = MAX_UPLOAD_BYTES) -> Any:
    """The Starlette app serving ``data``; ``token``: required on every request;
    ``allowed_hosts``: Host header names accepted (None: any)."""
    require_view_extra()
    no_store = {"Cache-Control": "no-store"}

    # the page's own files carry the token too (a script tag sends no header)
    tail = f"?token={quote(token)}" if token else ""

    async def index(request: Request) -> Response:
        head = "".join([
            f'<link rel="stylesheet" href="static/viewer.css{tail}">',
            f'<script src="static/plotly-gl2d.min.js{tail}"></script>'])
        html = page_html({"static": False, "token": token}, head,
                         f'<script src="static/viewer.js{tail}"></script>')
        return HTMLResponse(html, headers=no_store)

    async def static(request: Request) -> Response:
        entry = STATIC_FILES.get(request.path_params["name"])
        if entry is None:
            return PlainTextResponse("not found", status_code=404)
        body = await run_in_threadpool((STATIC / entry[0]).read_bytes)
        return Response(body, media_type=entry[1])

    async def info(request: Request) -> Response:
        return JSONResponse(data.info())

    async def map_bin(request: Request) -> Response:
        body = await run_in_threadpool(data.map_bytes)
        return Response(body, media_type="application/octet-stream")

    async def point(request: Request) -> Response:
        row = _row(request, data)
        if row is None:
            return PlainTextResponse("no such row", status_code=404)
        return JSONResponse(data.point(row))

    async def neighbours(request: Request) -> Response:
        row = _row(request, data)
        if row is None:
            return PlainTextResponse("no such row", status_code=404)
        try:
            hits = await run_in_threadpool(data.neighbours, row, _k(request))
        except TransferlabError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse({"query": data.point(row), "hits": hits})

    async def query(request: Request) -> Response:
        try:
            body = await _bounded_body(request, max_upload)
        except _TooLarge:
            return JSONResponse({"error": f"the image is larger than {max_upload:,} bytes"},
                                status_code=413)
        if not body:
            return JSONResponse({"error": "send the image file as the request body"},
                                status_code=400)
        try:
            hits = await run_in_threadpool(data.query_image, body, _k(request))
        except TransferlabError as exc:
            text = str(exc)
            if data.cache_dir is not None:  # no server path in the answer
                text = text.replace(str(data.cache_dir), "upload")
            return JSONResponse({"error": text}, status_code=400)
        return JSONResponse({"hits": hits})

    async def thumb(request: Request) -> Response:
        row = _row(request, data)
        if row is None:
            return PlainTextResponse("no such row", status_code=404)
        jpeg = await run_in_threadpool(data.thumbs.jpeg, row)
        if jpeg is None:
            return Response(PLACEHOLDER_SVG, media_type="image/svg+xml",
                            headers={"X-Transferlab-Thumb": "missing"})
        return Response(jpeg, media_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=3600"})

    async def prefix(request: Request) -> Response:
        text = request.query_params.get("prefix", "")[:4096]
        body = await run_in_threadpool(data.prefix_mask, text)
        return Response(body, media_type="application/octet-stream")

    async def gallery(request: Request) -> Response:
        found = data.galleries.get(request.path_params["name"])
        if found is None:
            return PlainTextResponse("no such gallery", status_code=404)
        return JSONResponse({"name": found.name, "title": found.title, "total": found.total,
                             "items": [dict(data.point(i.row), caption=i.caption,
                                            group=i.group) for i in found.items]})

    async def favicon(request: Request) -> Response:
        return Response(status_code=204)

    routes = [
        Route("/", index),
        Route("/favicon.ico", favicon),
        Route("/static/{name}", static),
        Route("/api/info", info),
        Route("/api/map.bin", map_bin),
        Route("/api/point/{row:int}", point),
        Route("/api/neighbours/{row:int}", neighbours),
        Route("/api/query", query, methods=["POST"]),
        Route("/api/prefix.bin", prefix),
        Route("/api/gallery/{name}", gallery),
        Route("/thumb/{row:int}", thumb),
    ]
    middleware = [Middleware(_SecurityHeaders)]
    if allowed_hosts is not None:
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts))
    if token is not None:
        middleware.append(Middleware(_TokenGate, token=token))
    return Starlette(routes=routes, middleware=middleware)

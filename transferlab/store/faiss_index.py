"""A FAISS index inside a store, for nearest-neighbour search at scale.

Layout (beside the shards)::

    <store>/index/faiss.index   the FAISS index (faiss.write_index), rows in store order
    <store>/index/index.json    what it was built from: kind, metric, parameters, and the
                                store's rows / written_at / fingerprint / meta.json digest
                                and mtime

``index.json`` is written last and removed first, so an index without it (a killed build)
is never used. It is read before FAISS opens anything, and FAISS opens only the fixed path
above (never a path read from a file, never a link, never a pickle). An index whose recorded
store state differs from the store's (rewritten, resumed or merged after the build) is
stale: loading it raises a one-line StoreError naming the rebuild command.

Kinds: ``flat`` (exact), ``ivf`` (inverted lists over k-means cells; ``nprobe`` cells are
scanned per query), ``hnsw`` (a graph; ``ef_search`` candidates). ``auto`` is ``flat`` up to
``AUTO_FLAT_MAX_ROWS`` rows and ``ivf`` above. Cosine indexes hold unit vectors and inner
products; distances come back as the exact scan's: ``1 - cos`` and the L2 distance.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, MissingDependencyError, SettingError, StoreError
from ..runtime.atomicfile import atomic_write_text, replaced

INDEX_DIR, INDEX_FILE, INDEX_META = "index", "faiss.index", "index.json"
INDEX_FORMAT, INDEX_VERSION = "transferlab-faiss-index", 1
KINDS = ("auto", "flat", "ivf", "hnsw")
INDEX_METRICS = ("cosine", "l2")
_ALIASES = {"euclidean": "l2"}  # the exact scan's name for l2
# Up to this many rows a flat (exact) index is fast enough; above it `auto` builds IVF.
AUTO_FLAT_MAX_ROWS = 100_000
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 80, 128
_IVF_TRAIN_PER_LIST = 64  # k-means training rows per inverted list (faiss wants >= 39)


def _faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise MissingDependencyError('a FAISS index needs faiss: pip install '
                                     '"transferlab[faiss]" (or faiss-gpu)') from None
    return faiss


def index_metric(metric: str) -> str:
    """``cosine`` or ``l2`` (``euclidean`` is accepted as ``l2``)."""
    metric = _ALIASES.get(metric, metric)
    if metric not in INDEX_METRICS:
        raise ConfigError(f"unknown index metric {metric!r}; use one of "
                          f"{', '.join(INDEX_METRICS)}")
    return metric


def index_paths(store: Any) -> tuple[Path, Path]:
    """``(faiss.index, index.json)`` of a store."""
    base = Path(store.dir) / INDEX_DIR
    return base / INDEX_FILE, base / INDEX_META


def store_state(store: Any) -> dict:
    """What an index must match: rows, written_at, the fingerprint and meta.json's digest
    (a rewrite, resume or merge writes a new meta.json)."""
    meta = store.meta
    fingerprint = json.dumps(meta.get("fingerprint"), sort_keys=True, default=str)
    meta_file = Path(store.dir) / "meta.json"
    found = meta_file.is_file()
    # the mtime catches a rewrite within written_at's one second (a plain copy of the store
    # changes it too: then the index reads as stale and is rebuilt, never wrongly used)
    return {"rows": int(meta.get("rows", len(store))), "written_at": meta.get("written_at"),
            "fingerprint": hashlib.sha256(fingerprint.encode()).hexdigest(),
            "meta_sha256": hashlib.sha256(meta_file.read_bytes()).hexdigest() if found else None,
            "meta_mtime_ns": meta_file.stat().st_mtime_ns if found else None}


def resolve_kind(kind: str, rows: int) -> str:
    if kind not in KINDS:
        raise ConfigError(f"unknown index kind {kind!r}; use one of {', '.join(KINDS)}")
    if kind == "auto":
        return "flat" if rows <= AUTO_FLAT_MAX_ROWS else "ivf"
    return kind


def index_params(kind: str, rows: int, nlist: int | None = None, nprobe: int | None = None,
                 hnsw_m: int | None = None, ef_search: int | None = None) -> dict:
    """Build/search parameters with their defaults (IVF: sqrt(rows) lists, 1/16 of them
    probed, at least 8; HNSW: M 32, efSearch 128)."""
    for name, value in (("nlist", nlist), ("nprobe", nprobe), ("hnsw_m", hnsw_m),
                        ("ef_search", ef_search)):
        if value is not None and value < 1:
            raise SettingError(name, f"must be at least 1, got {value}")
    if kind == "ivf":
        lists = nlist or max(1, min(round(math.sqrt(rows)), rows // 39 or 1))
        if lists > rows:
            raise SettingError("nlist", f"{lists} exceeds the store's {rows} rows; pass a smaller "
                               "one, or the flat kind")
        probe = min(lists, nprobe or max(8, math.ceil(lists / 16)))
        return {"nlist": lists, "nprobe": probe,
                "train_rows": min(rows, lists * _IVF_TRAIN_PER_LIST)}
    if kind == "hnsw":
        return {"m": hnsw_m or HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION,
                "ef_search": ef_search or HNSW_EF_SEARCH}
    return {}


def _new_index(faiss: Any, kind: str, dim: int, metric: str, params: dict) -> Any:
    fm = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
    if kind == "flat":
        return faiss.IndexFlatIP(dim) if metric == "cosine" else faiss.IndexFlatL2(dim)
    if kind == "ivf":
        quantizer = faiss.IndexFlatIP(dim) if metric == "cosine" else faiss.IndexFlatL2(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, params["nlist"], fm)
        index.cp.seed = 0  # deterministic k-means
        return index
    index = faiss.IndexHNSWFlat(dim, params["m"], fm)
    index.hnsw.efConstruction = params["ef_construction"]
    return index


def prepare_vectors(x: Any, metric: str) -> np.ndarray:
    """float32, C-contiguous; unit length for cosine (a zero vector stays zero)."""
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if metric == "cosine":
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)
    return np.ascontiguousarray(x, dtype=np.float32)


def build_index(store: Any, kind: str = "auto", metric: str = "cosine",
                rows_per_chunk: int = 65536, seed: int = 0, **params: Any) -> dict:
    """Build a FAISS index of ``store`` chunk by chunk from its memory-mapped shards, save it
    inside the store and return its ``index.json`` record. ``params``: nlist, nprobe
    (IVF), hnsw_m, ef_search (HNSW)."""
    faiss = _faiss()
    metric = index_metric(metric)
    rows, dim = store.features.shape
    if rows == 0:
        raise StoreError(f"the store {store.dir} is empty; extract features before indexing")
    kind = resolve_kind(kind, rows)
    chosen = index_params(kind, rows, **params)
    started = time.perf_counter()
    index = _new_index(faiss, kind, dim, metric, chosen)
    if kind == "ivf":
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(rows, chosen["train_rows"], replace=False))
        index.train(prepare_vectors(store.features[sample], metric))
    for _, chunk in store.iter_chunks(rows=rows_per_chunk):
        index.add(prepare_vectors(chunk, metric))
    record = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "kind": kind, "metric": metric,
              "rows": rows, "dim": dim, "params": chosen, "store": store_state(store),
              "faiss_version": getattr(faiss, "__version__", "unknown"),
              "build_seconds": round(time.perf_counter() - started, 3),
              "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    _save(faiss, store, index, record)
    return record


def _save(faiss: Any, store: Any, index: Any, record: dict) -> None:
    path, meta_path = index_paths(store)
    _refuse_links(store)
    path.parent.mkdir(exist_ok=True)
    if read_record(meta_path) is not None:  # ours: drop it first so a kill leaves no pairing
        meta_path.unlink()
    with replaced(path) as tmp:
        faiss.write_index(index, str(tmp))
    atomic_write_text(meta_path, json.dumps(record, indent=1), fsync=True)


def _refuse_links(store: Any) -> None:
    path, meta_path = index_paths(store)
    for p in (path.parent, path, meta_path):
        if p.is_symlink() or (p.exists() and not (p.is_dir() if p == path.parent
                                                  else p.is_file())):
            raise StoreError(f"{p} is a link or not a regular file; transferlab writes and "
                             "reads the index only as its own files: remove it and rebuild")


def read_record(meta_path: Path) -> dict | None:
    """A parsed index.json written by transferlab, else None."""
    if meta_path.is_symlink() or not meta_path.is_file():
        return None
    try:
        record = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(record, dict) or record.get("format") != INDEX_FORMAT:
        return None
    return record


class StoreIndex:
    """A loaded, fresh index: ``search`` answers like the exact scan (distances, rows)."""

    def __init__(self, index: Any, record: dict):
        self.index = index
        self.record = record
        self.kind: str = record["kind"]
        self.metric: str = record["metric"]

    def __repr__(self) -> str:
        return f"StoreIndex(kind={self.kind!r}, metric={self.metric!r}, rows={self.record['rows']})"

    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(Q, k) distances and rows sorted by distance then row; missing hits are row -1
        at distance inf (IVF cells holding fewer than k rows)."""
        q = prepare_vectors(np.atleast_2d(np.asarray(queries, dtype=np.float32)), self.metric)
        if q.shape[1] != self.record["dim"]:
            raise StoreError(f"queries have {q.shape[1]} dimensions but the index holds "
                             f"{self.record['dim']}; embed queries with the store's backbone")
        if self.kind == "hnsw":
            self.index.hnsw.efSearch = max(int(self.record["params"]["ef_search"]), k)
        d, i = self.index.search(q, min(k, int(self.record["rows"])))
        d = (1.0 - d) if self.metric == "cosine" else np.sqrt(np.maximum(d, 0.0))
        d = np.where(i < 0, np.inf, d).astype(np.float32)
        order = np.lexsort((np.where(i < 0, np.iinfo(np.int64).max, i), d), axis=1)
        return np.take_along_axis(d, order, 1), np.take_along_axis(i, order, 1)


def load_index(store: Any, metric: str | None = None) -> StoreIndex | None:
    """The store's index if one exists for ``metric`` (any metric when None); None when there
    is none. Raises StoreError if it is stale or damaged."""
    if getattr(store, "dir", None) is None:
        return None
    path, meta_path = index_paths(store)
    record = read_record(meta_path)
    if record is None or (metric is not None and record.get("metric") != index_metric(metric)):
        return None
    _check_record(store, record)
    _refuse_links(store)
    if not path.is_file():
        raise StoreError(f"{path} is missing; rebuild it: {rebuild_command(store, record)}")
    stamp = (str(path.resolve()), _stat(path), _stat(meta_path))
    if stamp not in _LOADED:
        _LOADED.clear()  # keep one index in RAM: a large one takes as much as its vectors
        _LOADED[stamp] = StoreIndex(_read_index(path, store, record), record)
    return _LOADED[stamp]


# The last index loaded, keyed by its path and both files' (mtime, size, inode): a notebook
# calling store_nearest repeatedly reads it once; a rebuild replaces the files, so the key.
_LOADED: dict[tuple, StoreIndex] = {}


def _stat(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_mtime_ns, st.st_size, st.st_ino


def _read_index(path: Path, store: Any, record: dict) -> Any:
    try:
        faiss = _faiss()
    except MissingDependencyError:
        raise MissingDependencyError('the store has a FAISS index but faiss is not installed: '
                                     'pip install "transferlab[faiss]", or search exactly '
                                     '(exact=True)') from None
    index = faiss.read_index(str(path))
    if index.ntotal != record["rows"] or index.d != record["dim"]:
        raise StoreError(f"{path} does not match its index.json; rebuild it: "
                         f"{rebuild_command(store, record)}")
    if record["kind"] == "ivf":
        faiss.extract_index_ivf(index).nprobe = int(record["params"]["nprobe"])
    return index


def _check_record(store: Any, record: dict) -> None:
    ok = (record.get("version") == INDEX_VERSION and record.get("kind") in KINDS[1:]
          and record.get("metric") in INDEX_METRICS and isinstance(record.get("params"), dict)
          and isinstance(record.get("rows"), int) and isinstance(record.get("dim"), int))
    if not ok:
        raise StoreError(f"{index_paths(store)[1]} is not an index record this transferlab "
                         f"reads; rebuild it: {rebuild_command(store, record)}")
    if record.get("store") != store_state(store):
        built = (record.get("store") or {}).get("written_at")
        raise StoreError(f"the FAISS index of {store.dir} is stale (built for the store "
                         f"written at {built}, the store was written at "
                         f"{store.meta.get('written_at')}); rebuild it: "
                         f"{rebuild_command(store, record)} (or search exactly: exact=True)")


def rebuild_command(store: Any, record: dict | None = None) -> str:
    record = record or {}
    kind = record.get("kind") if record.get("kind") in KINDS else "auto"
    metric = record.get("metric") if record.get("metric") in INDEX_METRICS else "cosine"
    return f"python -m transferlab.index {os.fspath(store.dir)} --kind {kind} --metric {metric}"

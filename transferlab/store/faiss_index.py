"""A FAISS index inside a store, for nearest-neighbour search at scale.

Layout (beside the shards)::

    <store>/index/faiss.index   the FAISS index (faiss.write_index), rows in store order
    <store>/index/index.json    what it was built from: kind, metric, parameters, the
                                store's rows / written_at / fingerprint / meta.json and
                                index.csv digests, the index file's size and SHA-256, and
                                a tag: an HMAC-SHA256 of all of it under this user's key

Trust (issue #24): FAISS parses what a file says (an on-disk inverted-lists path it then
maps, sizes it allocates before reading), and everything that makes an index look fresh can
be written by whoever sent the store. So transferlab uses only indexes this user built on
this machine: ``build_index`` tags ``index.json`` with a key made once from ``os.urandom``
and kept outside every store (``runtime.localkey``: ``~/.config/transferlab/index.key``, or
``$TRANSFERLAB_INDEX_KEY_FILE``). ``load_index`` reads ``index.json`` (a regular file of at
most 1 MiB), checks its fields and its tag, then reads the index file (a regular file of
exactly the recorded size, read once into memory), checks its SHA-256, its type's magic
bytes, and only then hands the bytes to FAISS (from memory, never a path, so no path in
the file is followed); the loaded index must be the recorded type, metric, rows and width.
An index without a valid tag (built elsewhere, crafted, truncated, replaced, a link, a
FIFO, malformed ``index.json``) is never read by FAISS: it is ignored with one logged line
and the search scans exactly; ``python -m transferlab.index STORE`` replaces it. An index of
ours whose recorded store state differs from the store's (rewritten, resumed or merged
after the build) is stale: loading it raises a one-line StoreError naming the rebuild
command. Rows an index returns are checked to lie in the store; a FAISS failure is a
StoreError, never FAISS's RuntimeError.

Kinds: ``flat`` (exact), ``ivf`` (inverted lists over k-means cells; ``nprobe`` cells are
scanned per query), ``hnsw`` (a graph; ``ef_search`` candidates). ``auto`` is ``flat`` up to
``AUTO_FLAT_MAX_ROWS`` rows and ``ivf`` above. Cosine indexes hold unit vectors and inner
products; distances come back as the exact scan's: ``1 - cos`` and the L2 distance.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import (
    ConfigError,
    MissingDependencyError,
    SettingError,
    StoreError,
    TransferlabError,
)
from ..runtime.atomicfile import replaced
from ..runtime.localkey import local_key, tag, tagged
from ..runtime.untrusted import claimed_size, open_inside, open_untrusted, read_bounded
from ..yamlsafe import shown

_log = logging.getLogger(__name__)
INDEX_DIR, INDEX_FILE, INDEX_META = "index", "faiss.index", "index.json"
INDEX_FORMAT, INDEX_VERSION = "transferlab-faiss-index", 2
KINDS = ("auto", "flat", "ivf", "hnsw")
INDEX_METRICS = ("cosine", "l2")
_ALIASES = {"euclidean": "l2"}  # the exact scan's name for l2
# Up to this many rows a flat (exact) index is fast enough; above it `auto` builds IVF.
AUTO_FLAT_MAX_ROWS = 100_000
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 80, 128
_IVF_TRAIN_PER_LIST = 64  # k-means training rows per inverted list (faiss wants >= 39)
_RECORD_LIMIT = 1 << 20  # index.json: a few hundred bytes when transferlab writes it
_TAG_DOMAIN = b"transferlab-faiss-index-v2\n"
# The first four bytes faiss writes for each (kind, metric) transferlab builds.
_MAGIC = {("flat", "cosine"): b"IxFI", ("flat", "l2"): b"IxF2", ("ivf", "cosine"): b"IwFl",
          ("ivf", "l2"): b"IwFl", ("hnsw", "cosine"): b"IHNf", ("hnsw", "l2"): b"IHNf"}
_TYPES = {"flat": ("IndexFlatIP", "IndexFlatL2", "IndexFlat"), "ivf": ("IndexIVFFlat",),
          "hnsw": ("IndexHNSWFlat",)}


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
    """What an index must match: rows, written_at, the fingerprint, meta.json's digest and
    mtime (a rewrite, resume or merge writes a new meta.json) and index.csv's digest (the
    keys the index's rows stand for)."""
    meta = store.meta
    fingerprint = json.dumps(meta.get("fingerprint"), sort_keys=True, default=str)
    meta_file = Path(store.dir) / "meta.json"
    meta_digest, meta_mtime = _digest(meta_file, store.dir)
    # the mtime catches a rewrite within written_at's one second (a plain copy of the store
    # changes it too: then the index reads as stale and is rebuilt, never wrongly used)
    return {"rows": int(meta.get("rows", len(store))), "written_at": meta.get("written_at"),
            "fingerprint": hashlib.sha256(fingerprint.encode()).hexdigest(),
            "meta_sha256": meta_digest, "meta_mtime_ns": meta_mtime,
            "index_csv_sha256": _digest(Path(store.dir) / "index.csv", store.dir)[0]}


# SHA-256 of files read for store_state, keyed by (path, device, inode, size, mtime): a
# notebook's repeated searches hash a large index.csv once.
_DIGESTS: dict[tuple, str] = {}


def _digest(path: Path, root: Any) -> tuple[str | None, int | None]:
    """(SHA-256, mtime_ns) of a store file (a regular file inside the store); (None, None)
    when it is missing."""
    if not os.path.lexists(path):
        return None, None
    with open_untrusted(path, "the store file", StoreError, root) as handle:
        st = os.fstat(handle.fileno())
        stamp = (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if stamp not in _DIGESTS:
            digest = hashlib.sha256()
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
            if len(_DIGESTS) > 8:
                _DIGESTS.clear()
            _DIGESTS[stamp] = digest.hexdigest()
        return _DIGESTS[stamp], st.st_mtime_ns


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
    inside the store, tagged with this user's key, and return its ``index.json`` record.
    ``params``: nlist, nprobe (IVF), hnsw_m, ef_search (HNSW)."""
    faiss = _faiss()
    metric = index_metric(metric)
    rows, dim = store.features.shape
    if rows == 0:
        raise StoreError(f"the store {store.dir} is empty; extract features before indexing")
    kind = resolve_kind(kind, rows)
    chosen = index_params(kind, rows, **params)
    key = local_key(create=True)  # before the work: a key that cannot be made fails now
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
    _save(faiss, store, index, record, key)
    return record


def _save(faiss: Any, store: Any, index: Any, record: dict, key: bytes) -> None:
    """Write the index (through a temporary sibling, created without following a link),
    then its tagged record. A link or FIFO planted at either name, or at the index folder's,
    is replaced, never written through."""
    path, meta_path = index_paths(store)
    folder = path.parent
    if folder.is_symlink() or (os.path.lexists(folder) and not folder.is_dir()):
        folder.unlink()  # a link (only the link goes) or a file where the folder belongs
    folder.mkdir(exist_ok=True)
    _refuse_links(store)
    for p in (path, meta_path):
        if p.is_dir() and not p.is_symlink():
            raise StoreError(f"{p} is a directory; transferlab keeps its index there as a "
                             "file: remove it and rebuild")
    if os.path.lexists(meta_path):  # dropped first: a kill leaves an index without a record
        meta_path.unlink()
    digest, size = hashlib.sha256(), 0
    with replaced(path, store.dir, StoreError) as tmp, \
            open_inside(tmp, "wb", store.dir, "the index", StoreError) as f:
        def write(data: Any) -> int:
            nonlocal size
            data = bytes(data)
            f.write(data)
            digest.update(data)
            size += len(data)
            return len(data)

        if hasattr(faiss, "PyCallbackIOWriter"):
            faiss.write_index(index, faiss.PyCallbackIOWriter(write))
        else:  # older faiss: the bytes once in memory
            write(faiss.serialize_index(index).tobytes())
        f.flush()
        os.fsync(f.fileno())
    record.update(index_bytes=size, index_sha256=digest.hexdigest())
    record["tag"] = tag(key, _tag_payload(record))
    text = json.dumps(record, indent=1)
    with replaced(meta_path, store.dir, StoreError) as tmp, \
            open_inside(tmp, "w", store.dir, "the index record", StoreError,
                        encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _tag_payload(record: dict) -> bytes:
    """What the tag covers: every field of the record but the tag, canonically."""
    fields = {k: v for k, v in record.items() if k != "tag"}
    return _TAG_DOMAIN + json.dumps(fields, sort_keys=True, separators=(",", ":"),
                                    ensure_ascii=True).encode("ascii")


def _refuse_links(store: Any) -> None:
    """The index folder must be a real folder of the store: a link there would carry the
    index's writes outside it."""
    folder = index_paths(store)[0].parent
    if folder.is_symlink() or (os.path.lexists(folder) and not folder.is_dir()):
        raise StoreError(f"{folder} is a link or not a folder; transferlab writes and reads "
                         "the index only as its own files: remove it and rebuild")


class _Untrusted(Exception):
    """An index that is not used (a reason, logged in one line; the search scans)."""


def read_record(meta_path: Path, root: Any = None) -> dict:
    """The parsed ``index.json`` (a regular file of at most 1 MiB, inside ``root``), every
    field checked; _Untrusted otherwise."""
    try:
        data = read_bounded(meta_path, _RECORD_LIMIT, "the index record", StoreError, root)
        record = json.loads(data.decode("utf-8"))
    except TransferlabError as exc:
        raise _Untrusted(str(exc)) from None
    except (ValueError, RecursionError):
        raise _Untrusted(f"{meta_path} is not JSON") from None
    if not isinstance(record, dict) or record.get("format") != INDEX_FORMAT:
        raise _Untrusted(f"{meta_path} is not a transferlab index record")
    if record.get("version") != INDEX_VERSION:
        raise _Untrusted(f"{meta_path} has format version {shown(record.get('version'))}, "
                         f"not {INDEX_VERSION} (an older transferlab, or not transferlab)")
    _check_fields(meta_path, record)
    return record


def _check_fields(meta_path: Path, record: dict) -> None:
    """Types and ranges of every field load_index uses: one reason instead of a traceback."""
    def bad(field: str, value: Any) -> _Untrusted:
        return _Untrusted(f"{meta_path}: {field} is {shown(value)}")

    kind, metric, params = record.get("kind"), record.get("metric"), record.get("params")
    if kind not in KINDS[1:]:
        raise bad("kind", kind)
    if metric not in INDEX_METRICS:
        raise bad("metric", metric)
    try:
        for field, limit in (("rows", 1 << 40), ("dim", 1 << 24), ("index_bytes", 1 << 50)):
            claimed_size(record.get(field), limit, f"{meta_path}: {field}", StoreError, 1)
        wanted = {"ivf": ("nlist", "nprobe"), "hnsw": ("m", "ef_search")}.get(kind, ())
        if not isinstance(params, dict):
            raise bad("params", params)
        for name in wanted:
            claimed_size(params.get(name), 1 << 31, f"{meta_path}: params.{name}",
                         StoreError, 1)
    except StoreError as exc:
        raise _Untrusted(str(exc)) from None
    for field in ("tag", "index_sha256"):
        value = record.get(field)
        if not isinstance(value, str) or len(value) != 64:
            raise bad(field, value)
    if not isinstance(record.get("store"), dict):
        raise bad("store", record.get("store"))


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
        at distance inf (IVF cells holding fewer than k rows). A row outside the store or a
        FAISS failure is a StoreError."""
        q = prepare_vectors(np.atleast_2d(np.asarray(queries, dtype=np.float32)), self.metric)
        rows = int(self.record["rows"])
        if q.ndim != 2 or q.shape[1] != self.record["dim"]:
            raise StoreError(f"queries have {q.shape[-1]} dimensions but the index holds "
                             f"{self.record['dim']}; embed queries with the store's backbone")
        try:
            if self.kind == "hnsw":
                self.index.hnsw.efSearch = max(int(self.record["params"]["ef_search"]), k)
            d, i = self.index.search(q, min(k, rows))
        except RuntimeError as exc:
            raise StoreError(f"the FAISS index failed ({_first_line(exc)}); search exactly "
                             "(exact=True, --exact) or rebuild it") from None
        i = np.asarray(i, dtype=np.int64)
        outside = i[(i < -1) | (i >= rows)]
        if outside.size:
            raise StoreError(f"the FAISS index returned row {int(outside[0])}, outside the "
                             f"store's {rows} rows; rebuild it or search exactly (--exact)")
        d = (1.0 - d) if self.metric == "cosine" else np.sqrt(np.maximum(d, 0.0))
        d = np.where(i < 0, np.inf, d).astype(np.float32)
        order = np.lexsort((np.where(i < 0, np.iinfo(np.int64).max, i), d), axis=1)
        return np.take_along_axis(d, order, 1), np.take_along_axis(i, order, 1)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return shown(lines[-1] if lines else type(exc).__name__)


def load_index(store: Any, metric: str | None = None) -> StoreIndex | None:
    """The store's index if this user built one for ``metric`` (any metric when None) and
    the store is unchanged since; None when there is none or it is not trusted (logged in
    one line: the caller scans exactly). Raises StoreError if ours but stale."""
    if getattr(store, "dir", None) is None:
        return None
    wanted = None if metric is None else index_metric(metric)
    path, meta_path = index_paths(store)
    if not os.path.lexists(meta_path):
        return None  # no index (or a killed build's, without its record): scan
    try:
        _refuse_links(store)
        record = read_record(meta_path, path.parent)
        if wanted is not None and record["metric"] != wanted:
            return None
        _check_tag(record)
    except (_Untrusted, TransferlabError) as exc:
        _ignore(store, str(exc))
        return None
    _check_fresh(store, record)
    stamp = (str(path.resolve()), record["tag"])
    if stamp not in _LOADED:
        try:
            index = _read_index(path, record)
        except _Untrusted as exc:
            _ignore(store, str(exc), record)
            return None
        _LOADED.clear()  # keep one index in RAM: a large one takes as much as its vectors
        _LOADED[stamp] = StoreIndex(index, record)
    return _LOADED[stamp]


# The last index loaded, keyed by its path and its record's tag: a notebook calling
# store_nearest repeatedly reads it once; a rebuild writes a new tag. The index in memory
# was checked against the tag when read, whatever happens to the file later.
_LOADED: dict[tuple, StoreIndex] = {}


def _ignore(store: Any, reason: str, record: dict | None = None) -> None:
    _log.warning("ignoring the FAISS index of %s (%s): searching exactly; `%s` rebuilds it",
                 store.dir, " ".join(reason.split()), rebuild_command(store, record))


def _check_tag(record: dict) -> None:
    """The record's tag must be ours: made with this user's key on this machine."""
    try:
        key = local_key(create=False)
    except TransferlabError as exc:
        raise _Untrusted(str(exc)) from None
    if key is None:
        raise _Untrusted("no index was built on this machine by this user: it came with the "
                         "store")
    if not tagged(key, _tag_payload(record), record["tag"]):
        raise _Untrusted("it was not built by this user on this machine (its tag does not "
                         "match): transferlab reads only indexes it built")


def _check_fresh(store: Any, record: dict) -> None:
    """Our index, for this store as it is now: else a one-line StoreError (stale)."""
    rows, dim = store.features.shape
    if record["store"] != store_state(store) or record["rows"] != rows or \
            record["dim"] != dim:
        built = record["store"].get("written_at")
        raise StoreError(f"the FAISS index of {store.dir} is stale (built for the store "
                         f"written at {built}, the store was written at "
                         f"{store.meta.get('written_at')}); rebuild it: "
                         f"{rebuild_command(store, record)} (or search exactly: exact=True)")


def _read_index(path: Path, record: dict) -> Any:
    """The index file's bytes (a regular file of exactly the recorded size, read once),
    checked against the record's digest and magic bytes, then parsed by FAISS from memory;
    the result must be the recorded type, metric, rows and width."""
    try:
        faiss = _faiss()
    except MissingDependencyError:
        raise MissingDependencyError('the store has a FAISS index but faiss is not installed: '
                                     'pip install "transferlab[faiss]", or search exactly '
                                     '(exact=True)') from None
    size = record["index_bytes"]
    try:
        data = read_bounded(path, size, "the index", StoreError, path.parent)
    except StoreError as exc:
        raise _Untrusted(str(exc)) from None
    if len(data) != size or hashlib.sha256(data).hexdigest() != record["index_sha256"]:
        raise _Untrusted(f"{path} is not the file its index.json describes (truncated or "
                         "replaced)")
    kind, metric = record["kind"], record["metric"]
    if data[:4] != _MAGIC[kind, metric]:
        raise _Untrusted(f"{path} does not hold a {kind} index")
    try:
        index = _deserialize(faiss, data)
    except RuntimeError as exc:
        raise _Untrusted(f"faiss cannot read {path}: {_first_line(exc)}") from None
    del data
    want = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
    if type(index).__name__ not in _TYPES[kind] or index.metric_type != want or \
            index.ntotal != record["rows"] or index.d != record["dim"]:
        raise _Untrusted(f"{path} holds a {type(index).__name__} of {index.ntotal} x {index.d}, "
                         f"not the {kind} index of {record['rows']} x {record['dim']} its "
                         "index.json describes")
    if kind == "ivf":
        ivf = faiss.extract_index_ivf(index)
        if ivf.nlist != record["params"]["nlist"]:
            raise _Untrusted(f"{path} has {ivf.nlist} lists, not {record['params']['nlist']}")
        ivf.nprobe = min(int(record["params"]["nprobe"]), ivf.nlist)
    return index


def _deserialize(faiss: Any, data: bytes) -> Any:
    """An index parsed from ``data`` in memory (no copy of it where faiss has a callback
    reader)."""
    if not hasattr(faiss, "PyCallbackIOReader"):
        return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    view, position = memoryview(data), 0

    def read(n: int) -> bytes:
        nonlocal position
        chunk = view[position:position + n]
        position += len(chunk)
        return bytes(chunk)

    return faiss.read_index(faiss.PyCallbackIOReader(read))


def rebuild_command(store: Any, record: dict | None = None) -> str:
    record = record or {}
    kind = record.get("kind") if record.get("kind") in KINDS else "auto"
    metric = record.get("metric") if record.get("metric") in INDEX_METRICS else "cosine"
    return f"python -m transferlab.index {os.fspath(store.dir)} --kind {kind} --metric {metric}"

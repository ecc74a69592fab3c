"""Feature store: a directory of .npy shards plus a CSV index, readable with numpy alone.

Layout::

    <store>/
      meta.json              written last by a finished run (its presence = complete store):
                             caller's metadata (backbone, cut, preprocessing, versions, config,
                             elapsed time ...) plus format, version, fingerprint, dtype, dim,
                             rows, num_keys, num_failures, shard_size and
                             shards = [{"file": "shards/shard-00000.npy", "rows": 4096}, ...]
      index.csv              key,label,row,view - one line per feature row, in row order
                             (key: path relative to the data root; label -1 when unknown)
      failures.csv           key,reason - items that could not be read
      fingerprint.json       what the features depend on (backbone, cut, preprocessing,
                             dtype, views); a run with another fingerprint is refused
      shards/shard-00000.npy float16/float32 array (rows, dim); every shard but the last of a
                             run holds exactly shard_size rows; never rewritten once finished
      shards/shard-00000.json  the shard's keys/labels/views; written after the .npy, so its
                             presence marks the shard finished (used to resume)
      shards/failures.jsonl  failures as they happen, one JSON [key, reason] per line
      .lock                  held (flock) by the one process writing the store

Reading without transferlab::

    import csv, json, numpy as np
    meta = json.load(open("store/meta.json"))
    feats = np.concatenate([np.load(f"store/{s['file']}", mmap_mode="r") for s in meta["shards"]])
    rows = list(csv.DictReader(open("store/index.csv", newline="", encoding="utf-8")))

Resuming: ``StoreWriter`` reopens a store written with the same fingerprint, drops
unfinished temporary files and exposes ``done_keys``; a run that skips those keys and feeds
the rest in the same order produces a store identical, row for row, to an uninterrupted one,
because a shard is written only when it holds exactly ``shard_size`` rows. Items that failed
are not done: a rerun tries them again and lists them only if they fail again. Pickle is offered
as an export only; nothing here ever unpickles.
"""
from __future__ import annotations

import contextlib
import csv
import difflib
import json
import os
import pickle
import platform
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .atomicfile import atomic_write
from .errors import StoreError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no lock, one writer at a time is on you
    fcntl = None

FORMAT = "transferlab-feature-store"
VERSION = 1
DTYPES = ("float16", "float32")
META, INDEX, FAILURES, FINGERPRINT = "meta.json", "index.csv", "failures.csv", "fingerprint.json"
SHARDS, FAILURE_LOG, LOCK = "shards", "failures.jsonl", ".lock"
RESERVED_META = ("format", "version", "fingerprint", "dtype", "dim", "rows", "num_keys",
                 "num_failures", "shard_size", "shards", "written_at")


def shard_name(n: int) -> str:
    return f"shard-{n:05d}"


# ---------------------------------------------------------------------------------------
# Small file helpers
# ---------------------------------------------------------------------------------------


def _write_json(path: Path, data: Any) -> None:
    atomic_write(path, lambda f: json.dump(data, f, indent=1, ensure_ascii=False, default=str))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _normalized(data: Any) -> Any:
    """JSON round trip, so tuples/lists and numpy scalars compare the way they are stored."""
    return json.loads(json.dumps(data, sort_keys=True, default=str))


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): data}


def _differences(old: Any, new: Any, limit: int = 4) -> str:
    a, b = _flatten(old), _flatten(new)
    diffs = [f"{k}: stored {a.get(k)!r}, now {b.get(k)!r}"
             for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return "; ".join(diffs[:limit]) + (" ..." if len(diffs) > limit else "")


def _npy_rows(path: Path) -> tuple[int, int] | None:
    """(rows, dim) of a complete 2-D .npy file, or None if it is missing or damaged."""
    try:
        shape = np.load(path, mmap_mode="r", allow_pickle=False).shape  # checks the size too
    except (OSError, ValueError, EOFError):
        return None
    return (int(shape[0]), int(shape[1])) if len(shape) == 2 else None


def library_versions() -> dict[str, str]:
    """Versions worth recording beside features (missing libraries are left out)."""
    out = {"python": platform.python_version(), "numpy": np.__version__}
    for name in ("torch", "torchvision", "timm", "PIL"):
        with contextlib.suppress(Exception):
            out[name] = __import__(name).__version__
    return out


# ---------------------------------------------------------------------------------------
# Writer
# ---------------------------------------------------------------------------------------


class StoreWriter:
    """Appends feature rows to a store in shards, resuming whatever a killed run finished.

    Feed items in dataset order, skipping ``done_keys``; pass all rows (views) of one key in
    the same ``add`` call. Shards are saved on one background thread behind a bounded queue,
    so memory stays bounded and compute overlaps disk writes; its errors surface on the next
    call. Use as a context manager, or call ``close(meta)`` (or ``abort()``) at the end.
    """

    def __init__(self, directory: str | os.PathLike, fingerprint: dict, dtype: str = "float16",
                 shard_size: int = 4096, overwrite: bool = False, queue_size: int = 2,
                 fsync: bool = True):
        if str(np.dtype(dtype)) not in DTYPES:
            raise StoreError(f"store dtype must be one of {DTYPES}, got {dtype!r}; "
                             "set output.dtype")
        if shard_size < 1:
            raise StoreError(f"shard_size must be >= 1, got {shard_size}; set output.shard_size")
        self.dir = Path(directory)
        self.dtype = np.dtype(dtype)
        self.shard_size = int(shard_size)
        self.fsync = fsync
        self._wanted = _normalized({"fingerprint": fingerprint, "dtype": self.dtype.name})
        self._started = time.time()
        self._closed = False
        self._lock = self._acquire_lock()
        try:
            self._prepare(overwrite)
            self._recover()
        except BaseException:
            self._release_lock()
            raise
        self._done_at_open = frozenset(self._done)
        self._reset_buffer()
        self._dirty = False
        self._error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, queue_size))
        self._thread = threading.Thread(target=self._worker, name="store-writer", daemon=True)
        self._thread.start()

    # ---- public ------------------------------------------------------------------------

    @property
    def done_keys(self) -> frozenset[str]:
        """Keys whose rows were on disk when the writer opened: the runner skips these.
        Keys that failed before are not done: a rerun tries them again (the file may have
        been fixed). A snapshot, cheap to test membership on; ``is_done`` gives the live
        state."""
        return self._done_at_open

    def is_done(self, key: str) -> bool:
        """True once ``key``'s rows are in a shard (in this or an earlier run) or it failed
        in this run."""
        return key in self._done

    @property
    def rows_written(self) -> int:
        """Rows in finished or queued shards (not counting the buffer)."""
        return self._rows

    def add(self, keys: Sequence[str], labels: Sequence[int] | np.ndarray, features: Any,
            views: Sequence[int] | np.ndarray | None = None) -> None:
        """Buffer rows; full shards are handed to the writer thread.

        Rows of keys already on disk are ignored, so feeding a finished key twice is harmless.
        """
        self._check_open()
        feats = _as_rows(features)
        keys = [str(k) for k in keys]
        labels = np.asarray(labels, np.int64).reshape(-1)
        views = np.zeros(len(keys), np.int64) if views is None else np.asarray(views, np.int64)
        if not len(keys) == len(labels) == len(views) == len(feats):
            raise StoreError(f"add() got {len(keys)} keys, {len(labels)} labels, {len(views)} "
                             f"views and {len(feats)} feature rows; pass one of each per row")
        self._check_dim(feats.shape[1])
        keep = self._new_rows(keys, views)
        for key in self._partial.keys() & set(keys):  # its missing views are being added now
            del self._partial[key]
        if not keep.all():
            keys, labels, views, feats = ([keys[i] for i in np.flatnonzero(keep)], labels[keep],
                                          views[keep], feats[keep])
        for key in keys:  # it failed in an earlier run and has been read now
            self._failures.pop(key, None)
        self._buf_feats.append(feats.astype(self.dtype))  # a copy: callers may reuse buffers
        self._buf_keys += keys
        self._buf_labels.append(labels)
        self._buf_views.append(views)
        while len(self._buf_keys) >= self.shard_size:
            self._flush(self.shard_size)

    def add_failures(self, failures: Sequence[tuple[str, str]]) -> None:
        """Record items that could not be read; they are persisted at once."""
        self._check_open()
        items = [(str(k), " ".join(str(r).split())) for k, r in failures if k not in self._done]
        self._done.update(k for k, _ in items)
        new = [(k, r) for k, r in items if self._failures.get(k) != r]  # not logged yet
        self._failures.update(items)
        if new:
            self._submit(lambda: self._append_failures(new))

    def close(self, meta: dict | None = None) -> FeatureStore:
        """Write the last shard, the index, failures and ``meta.json``; return the reader.

        ``meta`` is stored as given (JSON; odd types as strings); include ``class_names`` for
        ``FeatureStore.class_names``. Keys in ``RESERVED_META`` are the store's own.
        """
        self._check_open()
        if self._buf_keys:
            self._flush(len(self._buf_keys))
        self._stop()
        try:
            self._raise_if_failed()
            self._write_index()
            atomic_write(self.dir / FAILURES, self._write_failures_csv, fsync=self.fsync)
            _write_json(self.dir / META, self._meta(meta or {}))
        finally:
            self._closed = True
            self._release_lock()
        return FeatureStore.open(self.dir)

    def abort(self) -> None:
        """Stop without finishing: queued shards are still written, buffered rows dropped.

        Rerunning the same command resumes from the finished shards. Never raises, so it is
        safe in ``except``/``finally`` blocks (a write error was or will be reported by add).
        """
        if self._closed:
            return
        self._closed = True
        self._stop()
        self._release_lock()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.abort()  # no-op after close()

    # ---- opening: fingerprint, lock, recovery -------------------------------------------

    def _acquire_lock(self) -> Any:
        self.dir.mkdir(parents=True, exist_ok=True)
        handle = open(self.dir / LOCK, "a")  # noqa: SIM115 - held until close/abort
        if fcntl is not None:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.close()
                raise StoreError(f"another run is writing the store {self.dir}; wait for it or "
                                 "use another output.dir") from None
        return handle

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _prepare(self, overwrite: bool) -> None:
        """Refuse (or wipe, with ``overwrite``) a store written with another fingerprint."""
        stored = _read_json(self.dir / FINGERPRINT)
        has_store = any((self.dir / n).exists() for n in (META, INDEX, FAILURES, SHARDS))
        if stored is None and not has_store or stored == self._wanted:
            (self.dir / SHARDS).mkdir(exist_ok=True)
            if stored is None:
                _write_json(self.dir / FINGERPRINT, self._wanted)
            return
        if not overwrite:
            why = _differences(stored, self._wanted) if stored is not None else \
                "it has no readable fingerprint.json"
            raise StoreError(f"the store {self.dir} was written with another configuration "
                             f"({why}); use another output.dir, or set output.overwrite=true "
                             "to replace it")
        wipe_store(self.dir)
        (self.dir / SHARDS).mkdir()
        _write_json(self.dir / FINGERPRINT, self._wanted)

    def _recover(self) -> None:
        """Load finished shards' parts and logged failures; delete everything unfinished."""
        shards = self.dir / SHARDS
        for tmp in list(shards.glob("*.tmp")) + list(self.dir.glob("*.tmp")):
            tmp.unlink(missing_ok=True)
        self._parts: list[dict] = []
        self.dim: int | None = None
        while True:
            part = self._finished_part(len(self._parts))
            if part is None:
                break
            self._parts.append(part)
        for path in shards.glob("shard-*"):
            number = path.name[6:11]
            if not number.isdigit() or int(number) >= len(self._parts):  # unfinished/gap
                path.unlink()
        self._rows = sum(p["rows"] for p in self._parts)
        self._done, self._partial = self._done_from_parts()
        # failed keys stay to do (retried); one read since then has rows: not a failure
        self._failures = {k: r for k, r in self._read_failure_log() if k not in self._done}

    def _finished_part(self, n: int) -> dict | None:
        part = _read_json(self.dir / SHARDS / f"{shard_name(n)}.json")
        header = _npy_rows(self.dir / SHARDS / f"{shard_name(n)}.npy")
        if not isinstance(part, dict) or header is None or header[0] != part.get("rows"):
            return None
        if self.dim is not None and header[1] != self.dim:
            return None
        self.dim = header[1]
        return part

    def _done_from_parts(self) -> tuple[set[str], dict[str, set[int]]]:
        done: set[str] = set()
        for part in self._parts:
            done.update(part["keys"])
        partial: dict[str, set[int]] = {}
        split = self._parts[-1].get("split_key") if self._parts else None
        if split is not None:  # its remaining views were lost with the buffer
            done.discard(split)
            partial[split] = {v for p in self._parts for k, v in zip(p["keys"], p["views"])
                              if k == split}
        return done, partial

    def _read_failure_log(self) -> list[tuple[str, str]]:
        path = self.dir / SHARDS / FAILURE_LOG
        if not path.is_file():
            return []
        items, clean = [], True
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines(True):
            try:
                if not line.endswith("\n"):
                    raise ValueError("partial line")
                key, reason = json.loads(line)
                items.append((str(key), str(reason)))
            except (ValueError, TypeError):
                clean = False
                break
        if not clean:  # a kill in the middle of a line: keep the complete ones
            atomic_write(path, lambda f: f.writelines(_failure_lines(items)), fsync=self.fsync)
        return items

    # ---- adding ---------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"the writer of {self.dir} is closed; open a new StoreWriter")
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise StoreError(f"writing the store {self.dir} failed: {self._error!r}; fix the "
                             "cause (disk full? permissions?) and rerun to resume") \
                from self._error

    def _check_dim(self, dim: int) -> None:
        if self.dim is None:
            self.dim = dim
        elif dim != self.dim:
            raise StoreError(f"features have {dim} columns but the store {self.dir} holds "
                             f"{self.dim}; use another output.dir or output.overwrite=true")

    def _new_rows(self, keys: list[str], views: np.ndarray) -> np.ndarray:
        keep = np.ones(len(keys), bool)
        for i, key in enumerate(keys):
            if key in self._done or int(views[i]) in self._partial.get(key, ()):
                keep[i] = False
        return keep

    def _reset_buffer(self) -> None:
        self._buf_feats: list[np.ndarray] = []
        self._buf_keys: list[str] = []
        self._buf_labels: list[np.ndarray] = []
        self._buf_views: list[np.ndarray] = []

    def _flush(self, rows: int) -> None:
        """Hand the first ``rows`` buffered rows to the writer thread as the next shard."""
        feats, labels, views = (np.concatenate(b) for b in
                                (self._buf_feats, self._buf_labels, self._buf_views))
        keys = self._buf_keys
        split = keys[rows - 1] if rows < len(keys) and keys[rows] == keys[rows - 1] else None
        part = {"rows": rows, "keys": keys[:rows], "labels": labels[:rows].tolist(),
                "views": views[:rows].tolist(), "split_key": split}
        n = len(self._parts)
        self._parts.append(part)
        self._rows += rows
        self._done.update(k for k in part["keys"] if k != split)
        shard = np.ascontiguousarray(feats[:rows])
        self._reset_buffer()
        if rows < len(keys):
            self._buf_feats, self._buf_keys = [feats[rows:]], keys[rows:]
            self._buf_labels, self._buf_views = [labels[rows:]], [views[rows:]]
        self._submit(lambda: self._write_shard(n, shard, part))

    # ---- the writer thread ------------------------------------------------------------------

    def _submit(self, job: Callable[[], None]) -> None:
        if not self._dirty:  # the store changes: it is no longer a finished one
            self._dirty = True
            for name in (META, INDEX):
                (self.dir / name).unlink(missing_ok=True)
        while True:
            self._check_open()
            try:
                self._queue.put(job, timeout=0.1)
                return
            except queue.Full:
                continue

    def _worker(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if self._error is None:
                try:
                    job()
                except BaseException as exc:  # noqa: BLE001 - surfaced in the main thread
                    self._error = exc

    def _stop(self) -> None:
        """Let the thread write what is queued, then end it."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def _write_shard(self, n: int, shard: np.ndarray, part: dict) -> None:
        base = self.dir / SHARDS / shard_name(n)
        atomic_write(base.with_suffix(".npy"), lambda f: np.save(f, shard), "wb", self.fsync)
        _write_json(base.with_suffix(".json"), part)  # last: marks the shard finished

    def _append_failures(self, items: list[tuple[str, str]]) -> None:
        with open(self.dir / SHARDS / FAILURE_LOG, "a", encoding="utf-8") as f:
            f.writelines(_failure_lines(items))
            f.flush()
            if self.fsync:
                os.fsync(f.fileno())

    # ---- closing ----------------------------------------------------------------------------

    def _write_index(self) -> None:
        def write(f: Any) -> None:
            out = csv.writer(f, lineterminator="\n")
            out.writerow(["key", "label", "row", "view"])
            row = 0
            for part in self._parts:
                for key, label, view in zip(part["keys"], part["labels"], part["views"]):
                    out.writerow([key, label, row, view])
                    row += 1
        atomic_write(self.dir / INDEX, write, fsync=self.fsync)

    def _write_failures_csv(self, f: Any) -> None:
        out = csv.writer(f, lineterminator="\n")
        out.writerow(["key", "reason"])
        out.writerows(self._failures.items())

    def _meta(self, meta: dict) -> dict:
        keys = {k for p in self._parts for k in p["keys"]}
        shards = [{"file": f"{SHARDS}/{shard_name(i)}.npy", "rows": p["rows"]}
                  for i, p in enumerate(self._parts)]
        own = {"format": FORMAT, "version": VERSION, "fingerprint": self._wanted["fingerprint"],
               "dtype": self.dtype.name, "dim": self.dim, "rows": self._rows,
               "num_keys": len(keys), "num_failures": len(self._failures),
               "shard_size": self.shard_size, "shards": shards,
               "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        return {**{k: v for k, v in meta.items() if k not in RESERVED_META}, **own}


def _as_rows(features: Any) -> np.ndarray:
    if hasattr(features, "detach"):  # a torch tensor, possibly bf16 or on a GPU
        features = features.detach().float().cpu().numpy()
    feats = np.asarray(features)
    if feats.ndim != 2:
        raise StoreError(f"features must be 2-D (rows, dim), got shape {feats.shape}; "
                         "pool or flatten them first")
    return feats


def _failure_lines(items: list[tuple[str, str]]) -> list[str]:
    return [json.dumps([k, r], ensure_ascii=False) + "\n" for k, r in items]


def wipe_store(directory: str | os.PathLike) -> None:
    """Delete a store's own files (shards, index, meta, failures); other files are kept."""
    directory = Path(directory)
    shards = directory / SHARDS
    if shards.is_dir():
        for path in shards.iterdir():
            path.unlink()
        shards.rmdir()
    for name in (META, INDEX, FAILURES, FINGERPRINT):
        (directory / name).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------
# Reader
# ---------------------------------------------------------------------------------------


class ShardedArray:
    """A read-only (rows, dim) array over memory-mapped shards; indexing loads only what it
    selects. ``np.asarray(features)`` loads everything (on purpose only)."""

    def __init__(self, files: list[Path], counts: list[int], dim: int, dtype: np.dtype,
                 cache: int = 64):
        self.files = files
        self.offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self.dtype = np.dtype(dtype)
        self.shape = (int(self.offsets[-1]), int(dim))
        self._maps: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache = cache

    ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"ShardedArray(shape={self.shape}, dtype={self.dtype}, shards={len(self.files)})"

    def shard(self, s: int) -> np.ndarray:
        """Shard ``s`` memory-mapped (a few stay open, least recently used closed first)."""
        if s in self._maps:
            self._maps.move_to_end(s)
            return self._maps[s]
        mapped = np.load(self.files[s], mmap_mode="r", allow_pickle=False)
        self._maps[s] = mapped
        if len(self._maps) > self._cache:
            self._maps.popitem(last=False)
        return mapped

    def __getitem__(self, index: Any) -> np.ndarray:
        if isinstance(index, tuple):
            rows = self[index[0]]
            rest = index[1:]
            return rows[rest] if np.ndim(rows) == 1 else rows[(slice(None), *rest)]
        if isinstance(index, (int, np.integer)):
            return self._row(int(index))
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step == 1:
                return self._range(start, max(start, stop))
            return self._take(np.arange(start, stop, step))
        return self._take(np.asarray(index))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self._range(0, len(self))
        return out if dtype is None else out.astype(dtype)

    def _locate(self, rows: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.offsets, rows, side="right") - 1

    def _row(self, i: int) -> np.ndarray:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"row {i} out of range for a store of {n} rows")
        i %= n
        s = int(self._locate(np.array([i]))[0])
        return np.array(self.shard(s)[i - self.offsets[s]])

    def _range(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((stop - start, self.shape[1]), self.dtype)
        if stop <= start:
            return out
        first, last = self._locate(np.array([start, stop - 1]))
        for s in range(int(first), int(last) + 1):
            lo, hi = max(start, self.offsets[s]), min(stop, self.offsets[s + 1])
            out[lo - start:hi - start] = self.shard(s)[lo - self.offsets[s]:hi - self.offsets[s]]
        return out

    def _take(self, rows: np.ndarray) -> np.ndarray:
        n = len(self)
        if rows.dtype == bool:
            if rows.shape != (n,):
                raise IndexError(f"boolean index of shape {rows.shape} for {n} rows")
            rows = np.flatnonzero(rows)
        rows = rows.astype(np.int64).reshape(-1)
        if rows.size and (rows.min() < -n or rows.max() >= n):
            raise IndexError(f"row index out of range for a store of {n} rows")
        rows = rows % max(n, 1)
        out = np.empty((len(rows), self.shape[1]), self.dtype)
        shard_of = self._locate(rows)
        for s in np.unique(shard_of):
            mask = shard_of == s
            out[mask] = self.shard(int(s))[rows[mask] - self.offsets[s]]
        return out


class FeatureStore:
    """A finished store, opened lazily: features stay on disk until indexed."""

    def __init__(self, directory: Path, meta: dict, keys: list[str], labels: np.ndarray,
                 views: np.ndarray, failures: list[tuple[str, str]]):
        self.dir = directory
        self.meta = meta
        self.paths = keys
        self.labels = labels
        self.views = views
        self.failures = failures
        files = [directory / s["file"] for s in meta["shards"]]
        counts = [int(s["rows"]) for s in meta["shards"]]
        self.features = ShardedArray(files, counts, int(meta.get("dim") or 0), meta["dtype"])
        self._first_row: dict[str, int] | None = None

    @classmethod
    def open(cls, directory: str | os.PathLike) -> FeatureStore:
        """Open the store at ``directory``; StoreError if missing, unfinished or damaged."""
        directory = Path(directory)
        meta = _read_meta(directory)
        keys, labels, views = _read_index(directory / INDEX, int(meta["rows"]))
        for shard in meta["shards"]:
            if not (directory / shard["file"]).is_file():
                raise StoreError(f"{directory / shard['file']} is missing; the store is "
                                 "damaged, rerun the extract with output.overwrite=true")
        return cls(directory, meta, keys, labels, views, _read_failures(directory / FAILURES))

    @property
    def keys(self) -> list[str]:
        return self.paths

    @property
    def class_names(self) -> list[str] | None:
        return self.meta.get("class_names")

    @property
    def dtype(self) -> np.dtype:
        return self.features.dtype

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return (f"FeatureStore({str(self.dir)!r}, rows={len(self)}, dim={self.features.shape[1]}"
                f", dtype={self.dtype}, failures={len(self.failures)})")

    def row(self, key: str, view: int = 0) -> int:
        """The row holding ``key`` (and ``view``); KeyError naming a close key if absent."""
        if self._first_row is None:
            self._first_row = {}
            for i, k in enumerate(self.paths):
                self._first_row.setdefault(k, i)
        if key not in self._first_row:
            raise KeyError(self._missing_message(key))
        r = self._first_row[key]
        while r < len(self.paths) and self.paths[r] == key:
            if self.views[r] == view:
                return r
            r += 1
        raise KeyError(f"{key!r} has no view {view} in the store {self.dir}")

    def get(self, key: str, view: int = 0) -> np.ndarray:
        """The feature vector of ``key``."""
        return self.features[self.row(key, view)]

    def iter_chunks(self, rows: int = 65536) -> Iterator[tuple[int, np.ndarray]]:
        """``(start_row, features[start:start + rows])`` in order, one chunk in RAM at a time."""
        for start in range(0, len(self), rows):
            yield start, self.features[start:start + rows]

    def nearest(self, vectors_or_paths: Any, k: int = 5,
                metric: str = "cosine") -> list[list[tuple[str, float]]]:
        """The k nearest stored keys of each query, as ``[(key, distance), ...]``.

        Queries are feature vectors (Q, D), store keys, or image files (embedded with this
        store's own backbone, cut and preprocessing). Exact search in chunks over the
        memory-mapped shards, so stores larger than RAM work.
        """
        from .neighbors import store_nearest

        return store_nearest(self, vectors_or_paths, k, metric)

    def to_torch(self, dtype: Any = None) -> Any:
        """All features as one torch tensor (float32 unless ``dtype``); loads everything."""
        import torch
        return torch.from_numpy(np.asarray(self.features)).to(dtype or torch.float32)

    def export_npz(self, path: str | os.PathLike) -> Path:
        """Write ``features``, ``paths``, ``labels``, ``views`` to one .npz (no pickles)."""
        path = Path(path)
        np.savez(path, features=np.asarray(self.features), paths=np.array(self.paths, dtype=str),
                 labels=self.labels, views=self.views)
        return path if path.suffix == ".npz" else path.with_name(path.name + ".npz")

    def export_pickle(self, path: str | os.PathLike, view: int = 0) -> Path:
        """Write ``{key: vector}`` (rows of ``view``) as a pickle, for code that expects the
        Keras-example dump. Export only: transferlab never loads pickles."""
        path = Path(path)
        rows = np.flatnonzero(self.views == view)
        feats = self.features[rows]
        data = {self.paths[r]: feats[i] for i, r in enumerate(rows)}
        atomic_write(path, lambda f: pickle.dump(data, f, protocol=4), "wb")
        return path

    def _missing_message(self, key: str) -> str:
        name = key.rsplit("/", 1)[-1]
        close = [k for k in self.paths if k.rsplit("/", 1)[-1] == name][:1]
        if not close:
            close = difflib.get_close_matches(key, self.paths[:20000], n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return (f"{key!r} is not in the store {self.dir}{hint} (keys are paths relative to the "
                "data root)")


def _read_meta(directory: Path) -> dict:
    if not directory.is_dir():
        raise StoreError(f"no feature store at {directory}; check the path or run "
                         "`python -m transferlab.extract CONFIG` to create it")
    meta_path = directory / META
    if not meta_path.is_file():
        if (directory / SHARDS).is_dir():
            raise StoreError(f"the store {directory} is unfinished (the run was interrupted); "
                             "rerun the same extract command to resume it")
        raise StoreError(f"{directory} is not a feature store (no {META}); check the path")
    meta = _read_json(meta_path)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise StoreError(f"{meta_path} is not a transferlab store's metadata; check the path")
    if meta.get("version", 0) > VERSION:
        raise StoreError(f"{directory} was written by a newer transferlab (format version "
                         f"{meta['version']}); upgrade transferlab")
    return meta


def _read_index(path: Path, rows: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    if not path.is_file():
        raise StoreError(f"{path} is missing; the store is damaged, rerun the extract")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        next(reader, None)
        records = list(reader)
    if len(records) != rows:
        raise StoreError(f"{path} lists {len(records)} rows but meta.json says {rows}; the "
                         "store is damaged, rerun the extract")
    keys = [r[0] for r in records]
    labels = np.array([int(r[1]) for r in records], np.int64)
    views = np.array([int(r[3]) for r in records], np.int64)
    return keys, labels, views


def _read_failures(path: Path) -> list[tuple[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        next(reader, None)
        return [(r[0], r[1]) for r in reader if r]


# ---------------------------------------------------------------------------------------
# Merging the stores of several processes (torchrun)
# ---------------------------------------------------------------------------------------


def check_fingerprint(directory: str | os.PathLike, fingerprint: dict, dtype: str,
                      overwrite: bool = False) -> None:
    """Refuse (or wipe, with ``overwrite``) a store at ``directory`` written otherwise."""
    directory = Path(directory)
    wanted = _normalized({"fingerprint": fingerprint, "dtype": str(np.dtype(dtype))})
    stored = _read_json(directory / FINGERPRINT)
    if stored is None or stored == wanted:
        return
    if not overwrite:
        raise StoreError(f"the store {directory} was written with another configuration "
                         f"({_differences(stored, wanted)}); use another output.dir, or set "
                         "output.overwrite=true to replace it")
    wipe_store(directory)


def merge_stores(target: str | os.PathLike, parts: Sequence[str | os.PathLike],
                 meta: dict | None = None) -> FeatureStore:
    """One store at ``target`` whose rows are the rows of ``parts`` in order.

    Shards are not copied: the merged ``meta.json`` lists the parts' shard files (relative
    to ``target``, so parts must lie below it), and ``index.csv``/``failures.csv`` are
    concatenated. The result reads exactly like a store written by a single process.
    """
    target = Path(target)
    stores = [FeatureStore.open(p) for p in parts]
    if not stores:
        raise StoreError("merge_stores needs at least one part")
    first = stores[0].meta
    for store in stores[1:]:
        if store.meta["fingerprint"] != first["fingerprint"] or store.dtype != stores[0].dtype:
            raise StoreError(f"cannot merge {store.dir}: written with another configuration "
                             f"than {stores[0].dir}")
    dims = {s.meta["dim"] for s in stores if s.meta.get("dim")}
    shards = [{"file": (s.dir / sh["file"]).relative_to(target).as_posix(), "rows": sh["rows"]}
              for s in stores for sh in s.meta["shards"]]
    keys = [k for s in stores for k in s.paths]
    atomic_write(target / INDEX, lambda f: _write_merged_index(f, stores))
    failures = [item for s in stores for item in s.failures]
    atomic_write(target / FAILURES, lambda f: csv.writer(f, lineterminator="\n").writerows(
        [["key", "reason"], *failures]))
    _write_json(target / FINGERPRINT, {"fingerprint": first["fingerprint"],
                                       "dtype": first["dtype"]})
    own = {**{k: first[k] for k in RESERVED_META if k in first},
           "dim": dims.pop() if dims else None, "rows": len(keys), "num_keys": len(set(keys)),
           "num_failures": len(failures), "shards": shards,
           "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    _write_json(target / META, {**{k: v for k, v in (meta or {}).items()
                                   if k not in RESERVED_META}, **own})
    return FeatureStore.open(target)


def _write_merged_index(f: Any, stores: Sequence[FeatureStore]) -> None:
    out = csv.writer(f, lineterminator="\n")
    out.writerow(["key", "label", "row", "view"])
    row = 0
    for store in stores:
        for key, label, view in zip(store.paths, store.labels.tolist(), store.views.tolist()):
            out.writerow([key, label, row, view])
            row += 1

"""The writer of a feature store: shards, index, failures and meta, resumable."""
from __future__ import annotations

import csv
import json
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import StoreError
from ..runtime.atomicfile import atomic_write
from ..runtime.lock import try_lock
from .format import (
    DTYPES,
    FAILURE_LOG,
    FAILURES,
    FINGERPRINT,
    FORMAT,
    INDEX,
    META,
    RESERVED_META,
    SHARDS,
    VERSION,
    _differences,
    _normalized,
    _npy_rows,
    _read_json,
    _write_json,
    shard_name,
    wipe_store,
)
from .reader import FeatureStore

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
        handle = try_lock(self.dir)
        if handle is None:
            raise StoreError(f"another run is writing the store {self.dir}; wait for it or "
                             "use another output.dir")
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




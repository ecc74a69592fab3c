"""The writer of a feature store: shards, index, failures and meta, resumable."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..config import MAX_KEY_CHARS, OutputConfig, check_range
from ..errors import StoreError
from ..runtime.atomicfile import atomic_write
from ..runtime.background import BackgroundJobs
from ..runtime.lock import try_lock
from ..runtime.untrusted import open_inside
from .files import INDEX_SIDECAR, finished_meta, write_failures, write_index
from .format import (
    DTYPES,
    FAILURE_LOG,
    FAILURES,
    INDEX,
    MAX_REASON_CHARS,
    META,
    SHARDS,
    _write_json,
    shard_name,
)
from .owner import prepare_store, refuse_foreign
from .reader import FeatureStore
from .recovery import failure_lines, recover

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
        check_range(OutputConfig, "output.shard_size", shard_size)
        self.dir = Path(directory)
        self.dtype = np.dtype(dtype)
        self.shard_size = int(shard_size)
        self.fsync = fsync
        self._fingerprint = fingerprint
        self._closed = False
        refuse_foreign(self.dir)  # before the lock file is written into a user's folder
        self._lock = self._acquire_lock()
        try:
            prepare_store(self.dir, fingerprint, self.dtype.name, overwrite)
            (self.dir / SHARDS).mkdir(exist_ok=True)
            state = recover(self.dir, fsync)
        except BaseException:
            self._release_lock()
            raise
        self._parts, self.dim = state.parts, state.dim
        self._done, self._partial, self._failures = state.done, state.partial, state.failures
        self._done_at_open = frozenset(self._done)
        self._reset_buffer()
        self._dirty = False
        self._jobs = BackgroundJobs("store-writer", queue_size)

    # ---- public ------------------------------------------------------------------------

    @property
    def done_keys(self) -> frozenset[str]:
        """Keys whose rows were on disk when the writer opened: the runner skips these.
        Keys that failed before are not done: a rerun tries them again (the file may have
        been fixed). A snapshot, cheap to test membership on."""
        return self._done_at_open

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
        long = [i for i, k in enumerate(keys) if len(k) > MAX_KEY_CHARS]
        if long:  # never stored: listed as failures (their rows dropped)
            keep[long] = False
            self.add_failures([(keys[i], "") for i in long])
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
        """Record items that could not be read; they are persisted at once. A key longer
        than ``MAX_KEY_CHARS`` is listed shortened (with its length), a reason cut at
        ``MAX_REASON_CHARS``: no field a store cannot read back is ever written."""
        self._check_open()
        items = [(str(k), " ".join(str(r).split())) for k, r in failures if k not in self._done]
        self._done.update(k for k, _ in items)
        items = [_bounded_failure(k, r) for k, r in items]
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
        self._jobs.stop()
        try:
            self._raise_if_failed()
            write_index(self.dir / INDEX, ((k, label, v) for p in self._parts
                                           for k, label, v in zip(p["keys"], p["labels"],
                                                                  p["views"])), self.fsync)
            write_failures(self.dir / FAILURES, self._failures.items(), self.fsync)
            _write_json(self.dir / META, finished_meta(meta or {}, self._own_meta()), self.dir)
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
        self._jobs.stop()
        self._release_lock()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()  # no-op after close()

    # ---- the lock -------------------------------------------------------------------------

    def _acquire_lock(self) -> Any:
        handle = try_lock(self.dir, StoreError)
        if handle is None:
            raise StoreError(f"another run is writing the store {self.dir}; wait for it or "
                             "use another output.dir")
        return handle

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    # ---- adding ---------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"the writer of {self.dir} is closed; open a new StoreWriter")
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        error = self._jobs.error
        if isinstance(error, StoreError):  # already one line naming the file and the fix
            raise StoreError(str(error)) from error
        if error is not None:
            raise StoreError(f"writing the store {self.dir} failed: {error!r}; fix the "
                             "cause (disk full? permissions?) and rerun to resume") from error

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
        self._done.update(k for k in part["keys"] if k != split)
        shard = np.ascontiguousarray(feats[:rows])
        self._reset_buffer()
        if rows < len(keys):
            self._buf_feats, self._buf_keys = [feats[rows:]], keys[rows:]
            self._buf_labels, self._buf_views = [labels[rows:]], [views[rows:]]
        self._submit(lambda: self._write_shard(n, shard, part))

    # ---- the writer thread ------------------------------------------------------------------

    def _submit(self, job: Any) -> None:
        if not self._dirty:  # the store changes: it is no longer a finished one
            self._dirty = True
            for name in (META, INDEX, INDEX_SIDECAR):
                (self.dir / name).unlink(missing_ok=True)
        self._jobs.submit(job, self._check_open)

    def _write_shard(self, n: int, shard: np.ndarray, part: dict) -> None:
        base = self.dir / SHARDS / shard_name(n)
        atomic_write(base.with_suffix(".npy"), lambda f: np.save(f, shard), "wb", self.fsync,
                     root=self.dir, error=StoreError)
        _write_json(base.with_suffix(".json"), part, self.dir)  # last: marks it finished

    def _append_failures(self, items: list[tuple[str, str]]) -> None:
        # never through a link planted in a store someone else wrote (issue #24)
        with open_inside(self.dir / SHARDS / FAILURE_LOG, "a", self.dir, "the failure log",
                         StoreError, encoding="utf-8") as f:
            f.writelines(failure_lines(items))
            f.flush()
            if self.fsync:
                os.fsync(f.fileno())

    # ---- closing ----------------------------------------------------------------------------

    def _own_meta(self) -> dict:
        keys = {k for p in self._parts for k in p["keys"]}
        shards = [{"file": f"{SHARDS}/{shard_name(i)}.npy", "rows": p["rows"]}
                  for i, p in enumerate(self._parts)]
        return {"fingerprint": self._fingerprint, "dtype": self.dtype.name, "dim": self.dim,
                "rows": sum(p["rows"] for p in self._parts), "num_keys": len(keys),
                "num_failures": len(self._failures), "shard_size": self.shard_size,
                "shards": shards}


def _bounded_failure(key: str, reason: str) -> tuple[str, str]:
    """(key, reason) as a store lists it: a key over MAX_KEY_CHARS shortened, naming its
    length (a store never holds a field csv cannot read back), a reason cut."""
    if len(key) > MAX_KEY_CHARS:
        reason = (f"bad-name: a key of {len(key):,} characters, more than the "
                  f"{MAX_KEY_CHARS:,} a store holds (rename the file or shorten the list "
                  f"line){'; ' + reason if reason else ''}")
        key = f"{key[:200]}... ({len(key):,} characters)"
    if len(reason) > MAX_REASON_CHARS:
        reason = reason[:MAX_REASON_CHARS - 3] + "..."
    return key, reason


def _as_rows(features: Any) -> np.ndarray:
    if hasattr(features, "detach"):  # a torch tensor, possibly bf16 or on a GPU
        features = features.detach().float().cpu().numpy()
    feats = np.asarray(features)
    if feats.ndim != 2:
        raise StoreError(f"features must be 2-D (rows, dim), got shape {feats.shape}; "
                         "pool or flatten them first")
    return feats

"""Reading a finished feature store: memory-mapped shards, index, metadata."""
from __future__ import annotations

import difflib
import os
import pickle
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime.atomicfile import atomic_write
from .files import read_failures, read_index, read_store_meta, shard_files
from .format import FAILURES, INDEX

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

    def __init__(self, directory: Path, meta: dict, files: list[Path], keys: list[str],
                 labels: np.ndarray, views: np.ndarray,
                 failures: list[tuple[str, str]] | None = None):
        self.dir = directory
        self.meta = meta
        self.keys = keys
        self.labels = labels
        self.views = views
        self._failures = failures  # None: failures.csv, read when first asked for
        counts = [int(s["rows"]) for s in meta["shards"]]
        self.features = ShardedArray(files, counts, int(meta.get("dim") or 0), meta["dtype"])
        self._first_row: dict[str, int] | None = None

    @classmethod
    def open(cls, directory: str | os.PathLike) -> FeatureStore:
        """Open the store at ``directory``; StoreError if missing, unfinished or damaged."""
        directory = Path(directory)
        meta = read_store_meta(directory)
        files = shard_files(directory, meta)
        keys, labels, views = read_index(directory / INDEX, meta["rows"], directory)
        return cls(directory, meta, files, keys, labels, views)

    @property
    def failures(self) -> list[tuple[str, str]]:
        """(key, reason) of the items that could not be read, from ``failures.csv`` (read
        on first use, not by ``open``: a store that lists many costs nothing until asked)."""
        if self._failures is None:
            count = self.meta.get("num_failures")
            self._failures = read_failures(self.dir / FAILURES, self.dir,
                                           count if type(count) is int else None)
        return self._failures

    @property
    def class_names(self) -> list[str] | None:
        return self.meta.get("class_names")

    @property
    def dtype(self) -> np.dtype:
        return self.features.dtype

    def __len__(self) -> int:
        return len(self.keys)

    def __repr__(self) -> str:
        return (f"FeatureStore({str(self.dir)!r}, rows={len(self)}, dim={self.features.shape[1]}"
                f", dtype={self.dtype}, failures={self.meta.get('num_failures')})")

    def row(self, key: str, view: int = 0) -> int:
        """The row holding ``key`` (and ``view``); KeyError naming a close key if absent."""
        if self._first_row is None:
            self._first_row = {}
            for i, k in enumerate(self.keys):
                self._first_row.setdefault(k, i)
        if key not in self._first_row:
            raise KeyError(self._missing_message(key))
        r = self._first_row[key]
        while r < len(self.keys) and self.keys[r] == key:
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

    def to_torch(self, dtype: Any = None) -> Any:
        """All features as one torch tensor (float32 unless ``dtype``); loads everything."""
        import torch
        return torch.from_numpy(np.asarray(self.features)).to(dtype or torch.float32)

    def export(self, path: str | os.PathLike, format: str | None = None,
               overwrite: bool = False) -> Path:
        """Write the store as Parquet, HDF5, .npz or pickle (format from the suffix), chunk
        by chunk; see ``transferlab.store.export_formats``."""
        from .export_formats import export_store

        return export_store(self, path, format, overwrite)

    def to_pandas(self) -> Any:
        """A DataFrame (key, label, class_name, view, embedding) of a small store."""
        from .export_formats import store_to_pandas

        return store_to_pandas(self)

    def nearest(self, queries: Any, k: int = 5, metric: str = "cosine",
                trust_code: bool = False, exact: bool = False) -> list[list[tuple[str, float]]]:
        """``transferlab.store_nearest(self, ...)``: the nearest stored keys of feature vectors,
        stored keys or image files (embedded as the store computed its rows)."""
        # the query side lives downstream of the store
        from ..analysis.neighbors import store_nearest

        return store_nearest(self, queries, k, metric, trust_code, exact)

    def nearest_text(self, texts: Any, k: int = 5, metric: str = "cosine",
                     trust_code: bool = False, exact: bool = False
                     ) -> list[list[tuple[str, float]]]:
        """The nearest stored keys of each text (a CLIP-family store: its recorded text
        tower embeds them), through the store's FAISS index unless ``exact``."""
        from ..analysis.neighbors import store_nearest_text

        return store_nearest_text(self, texts, k, metric, trust_code, exact)

    def export_npz(self, path: str | os.PathLike) -> Path:
        """Write ``features``, ``paths``, ``labels``, ``views`` to one .npz (no pickles)."""
        path = Path(path)
        np.savez(path, features=np.asarray(self.features), paths=np.array(self.keys, dtype=str),
                 labels=self.labels, views=self.views)
        return path if path.suffix == ".npz" else path.with_name(path.name + ".npz")

    def export_pickle(self, path: str | os.PathLike, view: int = 0) -> Path:
        """Write ``{key: vector}`` (rows of ``view``) as a pickle, for code that expects the
        Keras-example dump. Export only: transferlab never loads pickles."""
        path = Path(path)
        rows = np.flatnonzero(self.views == view)
        feats = self.features[rows]
        data = {self.keys[r]: feats[i] for i, r in enumerate(rows)}
        atomic_write(path, lambda f: pickle.dump(data, f, protocol=4), "wb")
        return path

    def _missing_message(self, key: str) -> str:
        name = key.rsplit("/", 1)[-1]
        close = [k for k in self.keys if k.rsplit("/", 1)[-1] == name][:1]
        if not close:
            close = difflib.get_close_matches(key, self.keys[:20000], n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return (f"{key!r} is not in the store {self.dir}{hint} (keys are paths relative to the "
                "data root)")

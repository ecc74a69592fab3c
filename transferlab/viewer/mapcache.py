"""The viewer's 2-D map of a store, computed once and cached inside the store.

The map is computed from at most ``MAX_MAP_POINTS`` rows (a seeded random sample above
that: ``projection.sample_rows``) and kept in ``STORE/view-cache/map-<method>.npz`` with the
signature of what it was computed from (rows, width, dtype, and the size and modification
time of meta.json, index.csv and every shard). Opening the viewer again reads the cache;
any change to the store (a resumed extraction, a re-extraction) changes the signature and
the map is computed again.

PCA is fitted by streaming the sampled rows (their mean and ``X^T X`` in float64, chunk by
chunk), so a million-row store never needs its features in memory at once; it gives the
same map as ``projection.pca_2d`` (same components, same sign convention). UMAP and t-SNE
(``projection.embed_2d``) run on their own smaller samples (``projection.MAP_MAX_POINTS``).
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..analysis.projection import MAP_MAX_POINTS, check_method, embed_2d, sample_rows
from ..errors import StoreError
from ..runtime.atomicfile import atomic_write
from ..runtime.untrusted import read_bounded
from ..store.format import INDEX, META
from . import CACHE_DIR

# Points drawn at most: plotly's WebGL scatter pans and zooms 200,000 points smoothly in a
# software-rendered browser (BENCHMARKS.md); above that a seeded random sample is drawn.
MAX_MAP_POINTS = 200_000
_CHUNK_ROWS = 16384
_EXACT_DIMS = 4096  # above: the components from a randomized PCA of a 20,000-row subset
_CACHE_FORMAT = 1


@dataclass
class StoreMap:
    """Map coordinates ``xy`` (M, 2) float32 of the store rows ``rows`` (M,) int64, sorted."""

    rows: np.ndarray
    xy: np.ndarray
    method: str
    total: int  # rows in the store
    cached: bool  # read from the cache (False: computed now)

    @property
    def sampled(self) -> bool:
        return len(self.rows) < self.total


def cache_folder(store: Any) -> Path:
    """``STORE/view-cache`` (created), refused when it is a link or not a directory."""
    path = Path(store.dir) / CACHE_DIR
    if path.is_symlink():
        raise StoreError(f"{path} is a link; transferlab writes its view cache only into a "
                         "real folder of the store (remove the link)")
    path.mkdir(exist_ok=True)
    if not path.is_dir():
        raise StoreError(f"{path} is not a folder; remove it so the viewer can cache its map")
    return path


def store_signature(store: Any) -> dict:
    """What a cached map was computed from: the store's shape and the size and modification
    time of each of its files (any rewrite changes one of them)."""
    files = [Path(store.dir) / META, Path(store.dir) / INDEX, *store.features.files]
    stats = []
    for f in files:
        st = os.stat(f)
        stats.append([f.name, st.st_size, st.st_mtime_ns])
    return {"format": _CACHE_FORMAT, "rows": len(store), "dim": int(store.features.shape[1]),
            "dtype": str(store.features.dtype), "files": stats}


def store_map(store: Any, method: str = "pca", max_points: int = MAX_MAP_POINTS,
              seed: int = 0, cache: bool = True) -> StoreMap:
    """The 2-D map of ``store`` (read from its view cache when still valid, else computed
    and cached); ``cache=False`` neither reads nor writes the cache."""
    check_method(method)
    limit = min(max_points, MAP_MAX_POINTS[method]) if method != "pca" else max_points
    wanted = {"signature": store_signature(store), "method": method, "max_points": limit,
              "seed": seed}
    path = cache_folder(store) / f"map-{method}.npz" if cache else None
    if path is not None:
        found = _read_cache(path, store, wanted)
        if found is not None:
            return StoreMap(found[0], found[1], method, len(store), True)
    rows = sample_rows(len(store), limit, seed)
    if method == "pca":
        xy = streamed_pca(store.features, rows)
    else:
        xy = embed_2d(store.features[rows], method, seed).astype(np.float32)
    if path is not None:
        _write_cache(path, store, wanted, rows, xy)
    return StoreMap(rows.astype(np.int64), xy, method, len(store), False)


def streamed_pca(features: Any, rows: np.ndarray, chunk_rows: int = _CHUNK_ROWS) -> np.ndarray:
    """(len(rows), 2) float32: ``features[rows]`` on their first two principal components,
    as ``projection.pca_2d`` computes them, one chunk of rows in memory at a time."""
    n, d = len(rows), int(features.shape[1])
    if n < 2:
        raise StoreError(f"a map needs at least two rows; the store has {n}")
    if d > _EXACT_DIMS:
        fit = sample_rows(n, 20000, 0)
        x = torch.as_tensor(np.asarray(features[rows[fit]], dtype=np.float64))
        mean = x.mean(0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            comps = torch.pca_lowrank(x - mean, q=min(10, *x.shape), center=False,
                                      niter=4)[2][:, :2]
    else:
        total = torch.zeros(d, dtype=torch.float64)
        gram = torch.zeros(d, d, dtype=torch.float64)
        for start in range(0, n, chunk_rows):
            x = torch.as_tensor(np.asarray(features[rows[start:start + chunk_rows]],
                                           dtype=np.float64))
            total += x.sum(0)
            gram += x.T @ x
        mean = total / n
        _, vecs = torch.linalg.eigh(gram - n * torch.outer(mean, mean))
        comps = vecs[:, -2:].flip(1) if d >= 2 else vecs
    comps = comps * torch.sign(comps.gather(0, comps.abs().argmax(0, keepdim=True)))
    out = np.zeros((n, 2), np.float32)
    for start in range(0, n, chunk_rows):
        x = torch.as_tensor(np.asarray(features[rows[start:start + chunk_rows]],
                                       dtype=np.float64))
        proj = ((x - mean) @ comps).numpy()
        out[start:start + len(proj), :proj.shape[1]] = proj
    return out


def _read_cache(path: Path, store: Any, wanted: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached (rows, xy) when the cache was computed from this very store with these
    settings and is well-formed; None otherwise (a damaged cache is computed again)."""
    if not path.exists():
        return None
    limit = 64 + wanted["max_points"] * 24 + (1 << 20)
    try:
        data = read_bounded(path, limit, "the viewer's map cache", StoreError, store.dir)
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            info = json.loads(str(npz["info"]))
            rows, xy = np.asarray(npz["rows"]), np.asarray(npz["xy"])
    except (StoreError, OSError, ValueError, KeyError):
        return None
    if info != wanted or rows.dtype != np.int64 or xy.dtype != np.float32:
        return None
    m = len(rows)
    if rows.ndim != 1 or xy.shape != (m, 2) or m > wanted["max_points"] or m == 0:
        return None
    if rows.min() < 0 or rows.max() >= len(store) or np.any(np.diff(rows) <= 0):
        return None
    return rows, xy


def _write_cache(path: Path, store: Any, wanted: dict, rows: np.ndarray, xy: np.ndarray) -> None:
    def write(f: Any) -> None:
        np.savez(f, info=np.array(json.dumps(wanted)), rows=rows.astype(np.int64),
                 xy=xy.astype(np.float32))

    atomic_write(path, write, "wb", fsync=False, root=store.dir, error=StoreError)

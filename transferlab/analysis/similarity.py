"""How alike are two representations of the same images? Linear CKA and RSA.

- **Linear CKA** (Kornblith et al. 2019): HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) of the
  linear Gram matrices K = X X^T, L = Y Y^T. ``unbiased=True`` uses the unbiased HSIC
  estimator of Song et al. (2012); over minibatches the three HSIC terms are averaged
  before the ratio (Nguyen, Raghu & Kornblith 2021, "Do wide and deep networks learn the
  same things?"), so memory is bounded by the batch and the estimate does not depend on N
  through the estimator's bias. ``unbiased=False`` with one batch is the plain (biased)
  full-batch linear CKA. 1 for identical representations; invariant to orthogonal
  transforms and isotropic scaling of either side, not to arbitrary linear maps.
- **RSA**: a representational dissimilarity matrix (RDM) per representation on a fixed,
  seeded sample of the images (correlation distance, 1 - Pearson r between two images'
  feature vectors), and Spearman's rank correlation between the RDMs' upper triangles. A
  constant feature vector (an image a ReLU layer maps to zeros) correlates 0 with every
  other image (distance 1).

Stores are compared on the plain-view rows (view 0) of the keys they all hold, read from
the memory-mapped shards one minibatch at a time.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError, SettingError, StoreError
from ..store.rows import views_of

# Fewer shared keys than this are refused: the unbiased HSIC needs 4 rows per batch, and an
# RSA over a handful of images says little.
MIN_SHARED_KEYS = 20
DEFAULT_CKA_BATCH = 1024
DEFAULT_RSA_SAMPLE = 1000


# ---------------------------------------------------------------------------------------
# Gram matrices and HSIC
# ---------------------------------------------------------------------------------------


@dataclass
class _Gram:
    """What HSIC needs of one representation's Gram matrix on one batch."""

    centered: np.ndarray | None  # biased: H K H
    zeroed: np.ndarray | None  # unbiased: K with its diagonal set to 0
    total: float = 0.0  # unbiased: 1^T K~ 1
    rowsum: np.ndarray | None = None  # unbiased: K~ 1


def _gram(x: np.ndarray, unbiased: bool) -> _Gram:
    x = np.asarray(x, dtype=np.float64)
    k = x @ x.T
    if unbiased:
        np.fill_diagonal(k, 0.0)
        rowsum = k.sum(axis=1)
        return _Gram(None, k, float(rowsum.sum()), rowsum)
    k -= k.mean(axis=0, keepdims=True)  # H K H without forming H
    k -= k.mean(axis=1, keepdims=True)
    return _Gram(k, None)


def _hsic(a: _Gram, b: _Gram, n: int) -> float:
    """HSIC of two Gram matrices of the same ``n`` rows: biased tr(KHLH) / (n-1)^2, or the
    unbiased estimator of Song et al. (2012), eq. 5."""
    if a.centered is not None:
        return float(np.vdot(a.centered, b.centered)) / (n - 1) ** 2
    trace = float(np.vdot(a.zeroed, b.zeroed))  # tr(K~ L~), both symmetric
    return (trace + a.total * b.total / ((n - 1) * (n - 2))
            - 2.0 / (n - 2) * float(a.rowsum @ b.rowsum)) / (n * (n - 3))


def _ratio(cross: float, self_a: float, self_b: float) -> float:
    denom = np.sqrt(max(self_a, 0.0) * max(self_b, 0.0))
    return float(cross / denom) if denom > 0 else float("nan")


def _check_pair(x: np.ndarray, y: np.ndarray) -> None:
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y):
        raise DataError(f"CKA compares two (N, D) arrays of the same N rows, got {x.shape} and "
                        f"{y.shape}")


def linear_cka(x: Any, y: Any, unbiased: bool = False) -> float:
    """Linear CKA of two representations ``x`` (N, D1) and ``y`` (N, D2) of the same N
    items, in memory: the plain (biased) full-batch estimate, or the unbiased HSIC one
    (N >= 4). NaN when one side is constant."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    _check_pair(x, y)
    n = len(x)
    if n < (4 if unbiased else 2):
        raise DataError(f"CKA needs at least {4 if unbiased else 2} rows, got {n}")
    gx, gy = _gram(x, unbiased), _gram(y, unbiased)
    return _ratio(_hsic(gx, gy, n), _hsic(gx, gx, n), _hsic(gy, gy, n))


def batch_slices(n: int, batch_size: int) -> list[np.ndarray]:
    """Positions 0..n-1 in near-equal consecutive batches of at most ``batch_size`` (no
    small last batch: each gets n // batches or one more)."""
    if batch_size < 4:
        raise SettingError("batch_size", f"must be at least 4 (the unbiased HSIC needs 4 rows "
                           f"per batch), got {batch_size}")
    return np.array_split(np.arange(n), max(1, -(-n // batch_size)))


def minibatch_cka(x: Any, y: Any, batch_size: int = DEFAULT_CKA_BATCH, unbiased: bool = True,
                  seed: int | None = 0) -> float:
    """Minibatch linear CKA of two arrays (or anything indexable by a row array, such as a
    store's memory-mapped ``features``): rows shuffled by ``seed`` (None: in order) into
    batches, HSIC terms averaged over batches, then the ratio."""
    return _cka_matrix([x], [y], len(x), batch_size, unbiased, seed)[0, 0]


def _cka_matrix(xs: Sequence[Any], ys: Sequence[Any], n: int, batch_size: int,
                unbiased: bool, seed: int | None,
                rows_x: Sequence[np.ndarray] | None = None,
                rows_y: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """CKA of every (xs[i], ys[j]); row p of the comparison is ``rows_x[i][p]`` of xs[i]
    (default: row p). Each representation's Gram matrix is computed once per batch."""
    for a in (*xs, *ys):
        if len(a.shape) != 2:
            raise DataError(f"CKA compares (N, D) arrays, got shape {tuple(a.shape)}")
    rows_x = [np.arange(n)] * len(xs) if rows_x is None else rows_x
    rows_y = [np.arange(n)] * len(ys) if rows_y is None else rows_y
    for a, r in zip((*xs, *ys), (*rows_x, *rows_y)):
        if len(r) != n or (n and int(np.max(r)) >= a.shape[0]):
            raise DataError(f"CKA compares representations of the same {n} rows, got one of "
                            f"{a.shape[0]} rows")
    order = np.arange(n) if seed is None else np.random.default_rng(seed).permutation(n)
    cross = np.zeros((len(xs), len(ys)))
    self_x, self_y = np.zeros(len(xs)), np.zeros(len(ys))
    batches = batch_slices(n, batch_size)
    for part in batches:
        pos = np.sort(order[part])  # sorted: reads follow the shards; HSIC ignores row order
        m = len(pos)
        if m < (4 if unbiased else 2):
            raise DataError(f"CKA needs at least {4 if unbiased else 2} rows, got {m}")
        gx = [_gram(_rows(a, r[pos]), unbiased) for a, r in zip(xs, rows_x)]
        same = xs is ys and rows_x is rows_y  # layer x layer of one run: each Gram once
        gy = gx if same else [_gram(_rows(a, r[pos]), unbiased) for a, r in zip(ys, rows_y)]
        self_x += [_hsic(g, g, m) for g in gx]
        self_y += [_hsic(g, g, m) for g in gy]
        cross += [[_hsic(a, b, m) for b in gy] for a in gx]
    return np.array([[_ratio(cross[i, j], self_x[i], self_y[j]) for j in range(len(ys))]
                     for i in range(len(xs))])


def _rows(a: Any, rows: np.ndarray) -> np.ndarray:
    return np.asarray(a[rows], dtype=np.float64)


# ---------------------------------------------------------------------------------------
# RSA
# ---------------------------------------------------------------------------------------


def rdm(x: Any) -> np.ndarray:
    """The (n, n) representational dissimilarity matrix: 1 - Pearson r between rows."""
    x = np.asarray(x, dtype=np.float64)
    x = x - x.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    x = np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)  # constant row: r = 0
    out = 1.0 - x @ x.T
    np.fill_diagonal(out, 0.0)
    return out


def _ranks(v: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties given their average rank (as Spearman's rho needs)."""
    order = np.argsort(v, kind="mergesort")
    s = v[order]
    first = np.r_[True, s[1:] != s[:-1]]
    group = np.cumsum(first) - 1
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], len(v)]
    avg = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    out = np.empty(len(v))
    out[order] = avg[group]
    return out


def spearman(a: Any, b: Any) -> float:
    """Spearman's rank correlation of two vectors (NaN when one is constant)."""
    ra, rb = _ranks(np.asarray(a, np.float64)), _ranks(np.asarray(b, np.float64))
    ra -= ra.mean()
    rb -= rb.mean()
    denom = np.sqrt((ra @ ra) * (rb @ rb))
    return float(ra @ rb / denom) if denom > 0 else float("nan")


def rsa(x: Any, y: Any) -> float:
    """RSA of two representations of the same n items: Spearman between the upper
    triangles of their correlation-distance RDMs."""
    x, y = np.asarray(x), np.asarray(y)
    _check_pair(x, y)
    if len(x) < 3:
        raise DataError(f"RSA needs at least 3 rows, got {len(x)}")
    upper = np.triu_indices(len(x), k=1)
    return spearman(rdm(x)[upper], rdm(y)[upper])


def rsa_sample(n: int, sample: int = DEFAULT_RSA_SAMPLE, seed: int = 0) -> np.ndarray:
    """The fixed, seeded positions (sorted) of the RSA sample among ``n`` shared items."""
    if sample < 3:
        raise SettingError("rsa_sample_size", f"must be 0 (no RSA) or at least 3, got {sample}")
    if n <= sample:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, sample, replace=False))


# ---------------------------------------------------------------------------------------
# Stores
# ---------------------------------------------------------------------------------------


@dataclass
class SimilarityResult:
    """CKA and RSA of every (a, b) pair of representations, over ``n_keys`` shared keys."""

    names_a: list[str]
    names_b: list[str]
    cka: np.ndarray  # (len(names_a), len(names_b))
    rsa: np.ndarray | None  # same shape; None when RSA was skipped
    n_keys: int
    rsa_n: int
    unbiased: bool
    symmetric: bool = False  # the same stores on both sides: each pair once in the table


def shared_rows(stores: Sequence[Any], names: Sequence[str] | None = None,
                minimum: int = MIN_SHARED_KEYS) -> tuple[list[str], list[np.ndarray]]:
    """The plain-view keys every store holds (in the first store's order) and, per store,
    the row of each; StoreError in one line when fewer than ``minimum`` are shared."""
    names = list(names) if names is not None else [str(getattr(s, "dir", i))
                                                   for i, s in enumerate(stores)]
    maps = []
    for store in stores:
        rows = np.flatnonzero(views_of(store) == 0)
        maps.append({store.keys[r]: int(r) for r in rows})
    keys = [k for k in maps[0] if all(k in m for m in maps[1:])]
    if len(keys) < minimum:
        sizes = ", ".join(f"{name}: {len(m)}" for name, m in zip(names, maps))
        raise StoreError(f"the stores share {len(keys)} keys, fewer than the {minimum} a "
                         f"comparison needs ({sizes}); compare stores extracted from the same "
                         "images (the same data section)")
    return keys, [np.fromiter((m[k] for k in keys), np.int64, len(keys)) for m in maps]


def compare_stores(stores_a: Mapping[str, Any], stores_b: Mapping[str, Any], *,
                   batch_size: int = DEFAULT_CKA_BATCH, unbiased: bool = True,
                   rsa_sample_size: int = DEFAULT_RSA_SAMPLE, seed: int = 0,
                   minimum: int = MIN_SHARED_KEYS) -> SimilarityResult:
    """Linear CKA (minibatch, streamed from the memory maps) and RSA of every store of
    ``stores_a`` against every store of ``stores_b`` (name -> FeatureStore), over the
    plain-view keys all of them hold. ``rsa_sample_size=0`` skips RSA."""
    names = [*stores_a, *stores_b]
    every = [*stores_a.values(), *stores_b.values()]
    _, rows = shared_rows(every, names, max(minimum, 4))
    n, na = len(rows[0]), len(stores_a)
    feats = [s.features for s in every]
    if stores_a is stores_b:
        cka = _cka_matrix(feats[:na], feats[:na], n, batch_size, unbiased, seed,
                          rows[:na], rows[:na])
    else:
        cka = _cka_matrix(feats[:na], feats[na:], n, batch_size, unbiased, seed,
                          rows[:na], rows[na:])
    rsa_m, rsa_n = None, 0
    if rsa_sample_size:
        pick = rsa_sample(n, rsa_sample_size, seed)
        rsa_n = len(pick)
        upper = np.triu_indices(rsa_n, k=1)
        count = na if stores_a is stores_b else len(feats)
        tri = [rdm(_rows(f, r[pick]))[upper] for f, r in zip(feats[:count], rows[:count])]
        side_b = tri[:na] if stores_a is stores_b else tri[na:]
        rsa_m = np.array([[spearman(ta, tb) for tb in side_b] for ta in tri[:na]])
    return SimilarityResult(list(stores_a), list(stores_b), cka, rsa_m, n, rsa_n, unbiased,
                            stores_a is stores_b)


def open_representations(path: str | Path) -> dict[str, Any]:
    """name -> FeatureStore of ``path``: the store itself, or, for a directory of per-cut
    stores (a multi-cut extraction's ``output.dir``), each cut's store in depth order
    (numbers compared as numbers, ``head`` last)."""
    from ..store.format import META
    from ..store.reader import FeatureStore

    path = Path(path)
    if (path / META).exists() or not path.is_dir():
        return {path.name or str(path): FeatureStore.open(path)}
    cuts = sorted((p for p in path.iterdir() if p.is_dir() and (p / META).exists()),
                  key=lambda p: depth_key(p.name))
    if not cuts:
        raise StoreError(f"{path} is neither a feature store nor a directory of per-cut stores "
                         "(a multi-cut extraction's output.dir); name a store directory")
    return {p.name: FeatureStore.open(p) for p in cuts}


def depth_key(name: str) -> tuple:
    """Sort key of a cut directory in depth order: 'stage-2' before 'stage-10', head last."""
    parts = re.split(r"(\d+)", name)
    return (name == "head", [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts])

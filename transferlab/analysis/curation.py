"""Curating a dataset from its stored features: near-duplicates, outliers, label issues and
duplicates across two stores (train/test leakage).

Every finding comes from each image's k nearest neighbours (cosine), never from an N x N
matrix: through the store's FAISS index when this user built a fresh one for cosine
(``transferlab index STORE``; approximate for IVF/HNSW kinds), else by an exact chunked
search (``neighbors.nearest``: query blocks of ``QUERY_BLOCK`` rows against the rows
streamed in chunks, with a running top-k), so memory is bounded by the blocks. Only the
plain view (view 0) of each key is used.

- **Near-duplicates**: neighbour pairs with cosine similarity >= ``threshold`` joined into
  connected components. The image kept in each group is the largest file when the images
  are present under the store's data root (most pixels / least compression, usually), ties
  and missing files going to the first key in store order. Members whose file has the same
  SHA-256 as another member's are marked ``exact`` (byte-identical copies). Only group
  members of equal size are hashed, so a million-image store is not read from disk.
  Groups are single-linkage: a member joined through a chain of pairs can be less similar
  to the kept image than the threshold (``similarity_to_kept`` says how much).
- **Outliers**: score = mean cosine distance to the k nearest other images; the top N.
- **Label issues** (labelled stores): out-of-fold predicted probabilities from the linear
  probe (``linear_probe.fit_logistic``, ``folds`` seeded folds, one L2 strength; each
  fold's probe trained on at most ``PROBE_ROWS`` rows of the others, every row predicted,
  the rows read from the store in blocks), then
  ``cleanlab.filter.find_label_issues`` (``pip install "transferlab[curate]"``). Without
  cleanlab the fallback is confident learning's rule written out: per-class thresholds
  t_j = mean probability of class j over the images labelled j; an image is an issue when the
  most probable class among those above their threshold is not its given label. Both are
  ranked by self-confidence (the probability of the given label, lowest first); the
  suggested label is the most probable class.
- **Leakage**: each image of the other store whose nearest image in this store has cosine
  similarity >= ``threshold``.

Library code: no printing; the command is ``transferlab curate``.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataError, SettingError, StoreError
from ..runtime.userfiles import write_output
from ..store.faiss_index import StoreIndex, _new_index, load_index, prepare_vectors
from ..store.rows import plain_rows
from .linear_probe import fit_logistic
from .neighbors import nearest
from .search_report import data_root, key_path

_log = logging.getLogger(__name__)

# Chosen by benchmarks/curate_quality.py (BENCHMARKS.md, "Curation quality"): with the
# features of configs/dedup.yaml, precision and recall are both >= 0.95 from 0.950 to 0.980
# on 1,000 photo-like images with planted copies, from 0.960 to 0.980 on 5,000 (the lower
# end rises as a store grows: more unrelated pairs); 0.97 is the middle of the latter.
DEFAULT_THRESHOLD = 0.97
DEFAULT_K = 10
DEFAULT_TOP = 100
DEFAULT_FOLDS = 5
DEFAULT_L2 = 1e-2
# Above this many rows (and with faiss installed) a store without a fresh saved index is
# searched through an IVF index built in memory: the exact search grows as N^2 (measured on
# 2 cores: 100k rows exact took 442 s, 1M rows through the IVF index 130 s; BENCHMARKS.md).
AUTO_INDEX_ROWS = 20_000
IVF_NPROBE = 8
# Query rows searched per pass over the store (each pass streams every row once).
QUERY_BLOCK = 16384
# Label issues: each fold's probe trains on at most this many rows (a seeded sample of the
# other folds; at 1M x 256 this bounds memory and time and finds the flipped labels as
# well as every row does at 100k: BENCHMARKS.md, "Curation at scale"), and predicts its
# fold this many rows at a time.
PROBE_ROWS = 200_000
PREDICT_BLOCK = 65536
BUILTIN_METHOD = "confident learning (built-in)"
TABLES = ("duplicates", "outliers", "label_issues", "leakage")
OUTPUT_FILES = (*(f"{t}.csv" for t in TABLES), "summary.json")
PARQUET_FILES = tuple(f"{t}.parquet" for t in TABLES)  # written when pyarrow is installed
# Written into a folder curate created: its own files there may be replaced by a rerun.
MARKER = ".transferlab-curation"


@dataclass
class DuplicateGroup:
    """One group of near-duplicates: the row kept and the others (store rows)."""

    keep: int
    others: list[int]
    similarity: list[float]  # cosine similarity of each other to the kept image
    exact: list[bool]  # byte-identical to another member (SHA-256), when the files exist
    sizes: dict[int, int] = field(default_factory=dict)  # file bytes, when present


@dataclass
class LabelIssue:
    row: int
    given: int
    suggested: int
    self_confidence: float  # out-of-fold probability of the given label
    suggested_probability: float


@dataclass
class CurationReport:
    """What ``curate`` found. Rows index the store; keys are in ``keys``."""

    keys: list[str]
    labels: np.ndarray
    class_names: list[str] | None
    threshold: float
    k: int
    neighbours_from: str  # "exact search" or "FAISS <kind> index"
    duplicates: list[DuplicateGroup]
    outlier_scores: np.ndarray  # per plain row (NaN elsewhere)
    outliers: list[int]  # top rows, highest score first
    label_issues: list[LabelIssue] | None  # None when the store is unlabelled
    label_method: str | None
    leakage: list[tuple[int, str, float, bool]] | None  # (row here, other key, sim, exact)
    notes: list[str] = field(default_factory=list)

    def label_name(self, label: int) -> str:
        names = self.class_names
        return str(names[label]) if names is not None and 0 <= label < len(names) else str(label)


def curate(store: Any, threshold: float = DEFAULT_THRESHOLD, k: int = DEFAULT_K,
           top: int = DEFAULT_TOP, against: Any = None, labels: bool = True,
           folds: int = DEFAULT_FOLDS, l2: float = DEFAULT_L2, seed: int = 0,
           exact: bool = False, center: bool = False,
           device: str | None = None) -> CurationReport:
    """Near-duplicate groups, outliers, label issues (when labelled and ``labels``) and,
    with ``against`` (another store), this store's images nearly duplicated there.

    ``center`` measures cosine similarity between features minus the store's mean feature:
    for features with a large common direction (a random-weight ResNet-18's pooled ReLU
    features: raw cosines of unrelated photos reach 0.99), which the mean removes; it
    hurts the outlier score of trained features (LeNet digits: BENCHMARKS.md, "Curation
    quality"). A saved FAISS index holds raw vectors, so it is used only without it."""
    _check(threshold, k, top, folds, l2)
    rows = plain_rows(store)
    if len(rows) < k + 1:
        raise SettingError("k", f"needs a store of at least k+1 = {k + 1} images; this one "
                           f"has {len(rows)}: lower k or curate a larger store")
    notes: list[str] = []
    mean = feature_mean(store, rows) if center else None
    index = None if exact else _fresh_index(store, rows, mean, notes)
    dist, idx, source = knn_graph(store, rows, k, index, mean, device)
    sim = 1.0 - dist
    groups = duplicate_groups(store, rows, idx, sim, threshold, mean)
    scores = np.full(len(store.keys), np.nan, dtype=np.float32)
    found = np.isfinite(dist)  # an approximate index can return fewer than k
    with np.errstate(invalid="ignore"):
        scores[rows] = np.where(found, dist, 0.0).sum(1) / found.sum(1)  # none: NaN
    scores[rows] = np.where(found.any(1), scores[rows], np.nan)
    valid = rows[np.isfinite(scores[rows])]
    order = valid[np.argsort(-scores[valid], kind="stable")][:top]
    all_labels = np.asarray(store.labels, dtype=np.int64)
    issues, method = None, None
    if labels:
        known = rows[all_labels[rows] >= 0]
        if len(np.unique(all_labels[known])) < 2:
            notes.append("label issues skipped: the store has no labels (or one class); "
                         "extract from a labelled folder or list to find them")
        else:
            if len(known) < len(rows):
                notes.append(f"label issues: {len(rows) - len(known)} unlabelled images "
                             "left out")
            issues, method = label_issues(store, known, folds, l2, seed, device, notes)
    leak = None
    if against is not None:
        leak = leakage(store, rows, against, threshold, index, mean, device)
    return CurationReport(list(store.keys), all_labels, store.class_names, threshold, k,
                          source, groups, scores, order.tolist(), issues, method, leak, notes)


def _check(threshold: float, k: int, top: int, folds: int, l2: float) -> None:
    if not 0.0 < threshold <= 1.0:
        raise SettingError("threshold", f"must be a cosine similarity in (0, 1], got {threshold}")
    if k < 1:
        raise SettingError("k", f"must be at least 1, got {k}")
    if top < 1:
        raise SettingError("top", f"must be at least 1, got {top}")
    if folds < 2:
        raise SettingError("folds", f"must be at least 2, got {folds}")
    if not (np.isfinite(l2) and l2 >= 0):
        raise SettingError("l2", f"must be >= 0, got {l2}")


# ---------------------------------------------------------------------------------------
# Neighbours
# ---------------------------------------------------------------------------------------


def feature_mean(store: Any, rows: np.ndarray) -> np.ndarray:
    """The mean plain-view feature (float64 sums, one pass over the store in chunks)."""
    total = np.zeros(store.features.shape[1], dtype=np.float64)
    for _, chunk in _Source(store, rows, None).iter_chunks():
        total += chunk.sum(0, dtype=np.float64)
    return (total / max(1, len(rows))).astype(np.float32)


def knn_graph(store: Any, rows: np.ndarray, k: int, index: StoreIndex | None = None,
              mean: np.ndarray | None = None,
              device: str | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """(len(rows), k) cosine distances and store rows of each plain row's k nearest other
    plain rows (features minus ``mean`` when given), sorted; ``-1`` / inf where an
    approximate index found fewer. Through ``index`` when given (it must hold the same
    vectors: ``_fresh_index``), else exact."""
    all_plain = len(rows) == len(store.keys)
    base = _Source(store, rows, mean)
    if index is not None:
        # a saved index holds every view: ask for enough hits to skip the others
        extra = 0 if all_plain or index.kind.startswith("in-memory") else len(store.keys) - len(
            rows)
        search_k = k + 1 + int(extra)
        src = f"FAISS {index.kind} index"
    else:
        search_k = k + 1
        src = "exact search"
    out_d = np.empty((len(rows), k), dtype=np.float32)
    out_i = np.empty((len(rows), k), dtype=np.int64)
    for s in range(0, len(rows), QUERY_BLOCK):
        block = rows[s:s + QUERY_BLOCK]
        q = base.take(s, len(block))
        if index is not None:
            d, i = index.search(q, search_k)
            if index.kind.startswith("in-memory"):  # built on the plain rows only
                i = np.where(i >= 0, rows[np.maximum(i, 0)], -1)
        else:
            d, i = nearest(base, q, search_k, "cosine", device=device)
            i = rows[i]
        out_d[s:s + len(block)], out_i[s:s + len(block)] = _drop_self(
            d, i, block, k, None if all_plain else rows)
    return out_d, out_i, src


class _Source:
    """The plain rows of a store as float32, minus ``mean`` when given: a source that
    ``nearest`` streams chunk by chunk (positions 0..len(rows)-1)."""

    def __init__(self, store: Any, rows: np.ndarray, mean: np.ndarray | None):
        self.store, self.rows, self.mean = store, rows, mean
        self.contiguous = len(rows) == len(store.keys)
        self.features = _Shape((len(rows), store.features.shape[1]))

    def take(self, start: int, n: int) -> np.ndarray:
        f = self.store.features
        x = np.asarray(f[start:start + n] if self.contiguous
                       else f[self.rows[start:start + n]], dtype=np.float32)
        return x if self.mean is None else x - self.mean

    def iter_chunks(self, rows: int = 65536):
        for s in range(0, len(self.rows), rows):
            yield s, self.take(s, min(rows, len(self.rows) - s))


@dataclass
class _Shape:
    shape: tuple[int, int]


def _drop_self(d: np.ndarray, i: np.ndarray, block: np.ndarray, k: int,
               plain: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The first k hits of each query that are not the query itself (nor another view);
    inf / -1 where fewer remain."""
    keep = (i != block[:, None]) & (i >= 0)
    if plain is not None:
        keep &= np.isin(i, plain)
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # kept hits first, in order
    sel = np.take_along_axis(keep, order, 1)
    out_d = np.where(sel, np.take_along_axis(d, order, 1), np.inf).astype(np.float32)
    out_i = np.where(sel, np.take_along_axis(i, order, 1), -1)
    if out_d.shape[1] < k:  # an index returned fewer columns than asked
        pad = k - out_d.shape[1]
        out_d = np.pad(out_d, ((0, 0), (0, pad)), constant_values=np.inf)
        out_i = np.pad(out_i, ((0, 0), (0, pad)), constant_values=-1)
    return out_d, out_i


def _fresh_index(store: Any, rows: np.ndarray, mean: np.ndarray | None,
                 notes: list[str] | None) -> StoreIndex | None:
    """The store's saved cosine index when fresh and the features are not centred (it
    holds raw vectors); else, for more than ``AUTO_INDEX_ROWS`` rows with faiss installed,
    an IVF index of the (centred) plain rows built in memory for this run; else None
    (exact search)."""
    index = None
    if mean is None:
        try:
            index = load_index(store, "cosine")
        except StoreError as exc:
            if notes is not None:
                notes.append(f"the store's FAISS index is stale "
                             f"({' '.join(str(exc).split())})")
    if index is not None or len(rows) <= AUTO_INDEX_ROWS:
        return index
    try:
        import faiss
    except ImportError:
        if notes is not None:
            notes.append("exact search over every row (slow for a large store): pip install "
                         "\"transferlab[faiss]\" for an approximate index")
        return None
    index = memory_index(faiss, _Source(store, rows, mean))
    if notes is not None:
        notes.append(f"neighbours from an IVF index built for this run (approximate: "
                     f"{index.record['params']['nprobe']} of {index.record['params']['nlist']}"
                     " lists probed); --exact scans every row")
    return index


def memory_index(faiss: Any, source: _Source, seed: int = 0) -> StoreIndex:
    """An IVF-flat cosine index of a source's rows (positions 0..N-1), in memory only
    (nothing written into the store): 2 sqrt(N) lists, ``IVF_NPROBE`` probed, k-means of
    10 iterations on 39 rows per list (faiss's minimum): training is the costly part on
    two cores, and a near-copy falls in its source's list or a probed neighbour."""
    rows, dim = source.features.shape
    nlist = max(1, min(2 * round(np.sqrt(rows)), rows // 39))
    params = {"nlist": nlist, "nprobe": min(nlist, IVF_NPROBE),
              "train_rows": min(rows, 39 * nlist)}
    index = _new_index(faiss, "ivf", dim, "cosine", params)
    index.cp.niter = 10
    sample = np.sort(np.random.default_rng(seed).choice(rows, params["train_rows"],
                                                        replace=False))
    feats = source.store.features
    train = np.asarray(feats[source.rows[sample]], dtype=np.float32)
    index.train(prepare_vectors(train if source.mean is None else train - source.mean,
                                "cosine"))
    for _, chunk in source.iter_chunks(rows=65536):
        index.add(prepare_vectors(chunk, "cosine"))
    index.nprobe = params["nprobe"]
    return StoreIndex(index, {"kind": "in-memory ivf", "metric": "cosine", "rows": rows,
                              "dim": dim, "params": params})


# ---------------------------------------------------------------------------------------
# Near-duplicates
# ---------------------------------------------------------------------------------------


def duplicate_groups(store: Any, rows: np.ndarray, idx: np.ndarray, sim: np.ndarray,
                     threshold: float, mean: np.ndarray | None = None) -> list[DuplicateGroup]:
    """Connected components of the pairs with similarity >= threshold, each with the row
    kept (largest file, else first key) and the byte-identical members marked."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(store.keys)
    src = np.repeat(rows, idx.shape[1])
    dst = idx.ravel()
    hit = (dst >= 0) & (sim.ravel() >= threshold)
    if not hit.any():
        return []
    graph = coo_matrix((np.ones(int(hit.sum()), np.int8), (src[hit], dst[hit])), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    members = np.unique(np.concatenate([src[hit], dst[hit]]))
    by_comp: dict[int, list[int]] = {}
    for r in members.tolist():
        by_comp.setdefault(int(comp[r]), []).append(r)
    root = data_root(store.meta)
    groups = []
    for group in sorted(by_comp.values(), key=lambda g: g[0]):
        files = {r: key_path(root, store.keys[r]) for r in group}
        sizes = {r: _size(p) for r, p in files.items()}
        sizes = {r: s for r, s in sizes.items() if s is not None}
        keep = max(group, key=lambda r: (sizes.get(r, -1), -r))
        others = [r for r in group if r != keep]
        vecs = np.asarray(store.features[np.asarray(group)], dtype=np.float32)
        vecs = vecs if mean is None else vecs - mean
        vecs /= np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-30)
        kv = vecs[group.index(keep)]
        sims = [float(vecs[group.index(r)] @ kv) for r in others]
        same_size = [r for r in group if list(sizes.values()).count(sizes.get(r, -1)) > 1]
        digest = {r: _sha256(files[r]) for r in same_size}  # only files that can be equal
        copies = [d for d in digest.values() if d is not None]
        exact = [digest.get(r) is not None and copies.count(digest[r]) > 1 for r in others]
        groups.append(DuplicateGroup(keep, others, sims, exact, sizes))
    return groups


def _size(path: Path | None) -> int | None:
    try:
        return os.stat(path).st_size if path is not None and path.is_file() else None
    except OSError:
        return None


def _sha256(path: Path | None) -> str | None:
    if path is None:
        return None
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError:
        return None
    return h.hexdigest()


# ---------------------------------------------------------------------------------------
# Label issues
# ---------------------------------------------------------------------------------------


def out_of_fold_probabilities(x: Any, y: np.ndarray, folds: int = DEFAULT_FOLDS,
                              l2: float = DEFAULT_L2, seed: int = 0,
                              device: str | None = None,
                              probe_rows: int = PROBE_ROWS) -> np.ndarray:
    """(N, C) probabilities of classes 0..C-1 (``y`` must be those), each row predicted by
    a probe that did not see it: ``folds`` seeded folds. ``x`` is an (N, D) array or
    anything that gives float rows for a sorted index array (``x[idx]``: a memory-mapped
    store's rows): each fold's probe trains on at most ``probe_rows`` rows of the other
    folds (a seeded sample; all of them in a smaller store) and predicts its own rows
    ``PREDICT_BLOCK`` at a time, so the features are never all in memory."""
    n, c = len(y), int(y.max()) + 1
    folds = min(folds, n)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    probs = np.zeros((n, c), dtype=np.float64)
    for f in range(folds):
        test = np.sort(order[f::folds])
        train = np.setdiff1d(order, test)  # sorted
        if len(train) > probe_rows:
            train = np.sort(rng.choice(train, probe_rows, replace=False))
        if len(np.unique(y[train])) < 2:
            probs[test] = 1.0 / c
            continue
        fit = fit_logistic(np.asarray(x[train], dtype=np.float32), y[train], (l2,),
                           device=device)
        cols = fit.classes.cpu().numpy()
        for s in range(0, len(test), PREDICT_BLOCK):
            block = test[s:s + PREDICT_BLOCK]
            logits = fit.logits(np.asarray(x[block], dtype=np.float32))
            probs[np.ix_(block, cols)] = torch.softmax(logits, 1).double().cpu().numpy()
    return probs


class _Rows:
    """Rows ``rows`` of a store's features, read on demand: ``view[idx]`` is
    ``features[rows[idx]]`` (sorted ``idx``: a forward pass over the memory map)."""

    def __init__(self, store: Any, rows: np.ndarray):
        self.features, self.rows = store.features, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, idx: np.ndarray) -> np.ndarray:
        return np.asarray(self.features[self.rows[idx]], dtype=np.float32)


def label_issues(store: Any, rows: np.ndarray, folds: int = DEFAULT_FOLDS,
                 l2: float = DEFAULT_L2, seed: int = 0, device: str | None = None,
                 notes: list[str] | None = None, use_cleanlab: bool = True,
                 probe_rows: int = PROBE_ROWS) -> tuple[list[LabelIssue], str]:
    """Suspected wrong labels among ``rows``, most suspicious first, and the method used
    (cleanlab when installed and ``use_cleanlab``, else the built-in rule)."""
    given_raw = np.asarray(store.labels, dtype=np.int64)[rows]
    classes, y = np.unique(given_raw, return_inverse=True)
    if len(rows) - len(rows) // folds > probe_rows and notes is not None:
        notes.append(f"label issues: each fold's probe trained on a sample of {probe_rows:,} "
                     "rows (every row is still predicted out of fold)")
    probs = out_of_fold_probabilities(_Rows(store, rows), y, folds, l2, seed, device,
                                      probe_rows)
    if use_cleanlab:
        flagged, method = _find_issues(y, probs, notes)
    else:
        flagged, method = confident_issues(y, probs), BUILTIN_METHOD
    self_conf = probs[np.arange(len(y)), y]
    flagged = flagged[np.argsort(self_conf[flagged], kind="stable")]
    suggested = probs.argmax(1)
    return [LabelIssue(int(rows[i]), int(classes[y[i]]), int(classes[suggested[i]]),
                       float(self_conf[i]), float(probs[i, suggested[i]]))
            for i in flagged.tolist()], method


def _find_issues(y: np.ndarray, probs: np.ndarray,
                 notes: list[str] | None) -> tuple[np.ndarray, str]:
    try:
        from cleanlab.filter import find_label_issues
    except ImportError:
        if notes is not None:
            notes.append("label issues by confident learning's rule written out (cleanlab "
                         "is not installed: pip install \"transferlab[curate]\")")
        return confident_issues(y, probs), BUILTIN_METHOD
    try:
        mask = find_label_issues(y, probs)
    except (ValueError, AssertionError) as exc:  # too few images of a class, say
        if notes is not None:
            notes.append(f"cleanlab refused ({' '.join(str(exc).split())[:200]}); used the "
                         "built-in confident-learning rule")
        return confident_issues(y, probs), BUILTIN_METHOD
    return np.flatnonzero(mask), "cleanlab find_label_issues"


def confident_issues(y: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Rows off the confident joint's diagonal: per-class thresholds t_j (mean p_j over rows
    labelled j); a row's confident class is its most probable class with p_j >= t_j; an
    issue when that class exists and is not its label."""
    c = probs.shape[1]
    t = np.array([probs[y == j, j].mean() if (y == j).any() else 1.0 for j in range(c)])
    above = probs >= t[None, :] - 1e-12
    masked = np.where(above, probs, -1.0)
    conf = masked.argmax(1)
    has = above.any(1)
    return np.flatnonzero(has & (conf != y))


# ---------------------------------------------------------------------------------------
# Leakage between two stores
# ---------------------------------------------------------------------------------------


def leakage(store: Any, rows: np.ndarray, other: Any, threshold: float,
            index: StoreIndex | None = None, mean: np.ndarray | None = None,
            device: str | None = None) -> list[tuple[int, str, float, bool]]:
    """(row here, key there, similarity, byte-identical) for each plain image of ``other``
    whose nearest plain image here has similarity >= threshold (both minus this store's
    ``mean`` when given); most similar first."""
    if other.features.shape[1] != store.features.shape[1]:
        raise DataError(f"the stores have {store.features.shape[1]} and "
                        f"{other.features.shape[1]} dimensions; compare stores extracted with "
                        "the same backbone and cut")
    orows = plain_rows(other)
    saved = index is not None and not index.kind.startswith("in-memory")
    index = None if saved and len(rows) < len(store.keys) else index
    base = _Source(store, rows, mean)
    there = _Source(other, orows, mean)
    here_root, there_root = data_root(store.meta), data_root(other.meta)
    out = []
    for s in range(0, len(orows), QUERY_BLOCK):
        block = orows[s:s + QUERY_BLOCK]
        q = there.take(s, len(block))
        if index is not None:
            d, i = index.search(q, 1)
            if not saved:
                i = np.where(i >= 0, rows[np.maximum(i, 0)], -1)
        else:
            d, i = nearest(base, q, 1, "cosine", device=device)
            i = rows[i]
        for j in np.flatnonzero((i[:, 0] >= 0) & (1.0 - d[:, 0] >= threshold)).tolist():
            here, there = int(i[j, 0]), other.keys[int(block[j])]
            a = key_path(here_root, store.keys[here])
            b = key_path(there_root, there)
            same = (_size(a) is not None and _size(a) == _size(b)
                    and _sha256(a) == _sha256(b))
            out.append((here, there, float(1.0 - d[j, 0]), same))
    out.sort(key=lambda t: (-t[2], t[0], t[1]))
    return out


# ---------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------


def prepare_out_dir(out: str | os.PathLike, overwrite: bool = False) -> tuple[Path, bool]:
    """The output folder and whether curate's own files in it may be replaced: yes in a
    folder curate created (it holds ``MARKER``) or with ``overwrite``; a new folder gets
    the marker. Existing files elsewhere are refused (``runtime.userfiles``)."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise SettingError("out", f"{path} is a file; name a folder for the curation files")
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    if created:
        (path / MARKER).write_text("files written by transferlab curate\n", encoding="utf-8")
    return path, overwrite or (path / MARKER).is_file()


def write_report(report: CurationReport, out: str | os.PathLike,
                 overwrite: bool = False, parquet: bool = True) -> list[Path]:
    """duplicates.csv, outliers.csv, label_issues.csv, leakage.csv (a header only when not
    computed) and summary.json in ``out``, and each table as ``.parquet`` beside its CSV
    (typed columns: numbers as numbers, ``exact`` as a boolean, missing sizes null) when
    ``parquet`` and pyarrow is installed (else a note in the report and summary.json);
    returns the paths."""
    path, replace = prepare_out_dir(out, overwrite)
    pa = None
    if parquet:
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            note = ("no Parquet copies of the CSV files (pyarrow is not installed): pip "
                    "install \"transferlab[parquet]\"")
            if note not in report.notes:
                report.notes.append(note)
    written = []
    for name, (columns, body) in report_tables(report).items():
        def write(f: Any, body: list = body) -> None:
            w = csv.writer(f)
            w.writerow([c for c, _ in columns])
            w.writerows([[_csv_cell(v) for v in row] for row in body])
        written.append(write_output(path / f"{name}.csv", write, overwrite=replace,
                                    what="curate"))
        if pa is not None:
            types = {"int": pa.int64(), "str": pa.string(), "float": pa.float64(),
                     "bool": pa.bool_()}
            table = pa.table({c: pa.array([row[j] for row in body], type=types[t])
                              for j, (c, t) in enumerate(columns)})
            written.append(write_output(path / f"{name}.parquet",
                                        lambda f, table=table: pq.write_table(table, f),
                                        mode="wb", overwrite=replace, what="curate"))
    summary = json.dumps(summary_dict(report), indent=1)
    written.append(write_output(path / "summary.json", lambda f: f.write(summary),
                                overwrite=replace, what="curate"))
    return written


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:.6f}" if isinstance(value, float) else value


def report_tables(report: CurationReport) -> dict[str, tuple[list[tuple[str, str]], list]]:
    """Each output table: its columns as (name, type: int | str | float | bool) and its
    rows of Python values (None where unknown: a size of a missing file, an exact flag of a
    kept image)."""
    keys, labels = report.keys, report.labels

    def lab(r: int) -> str:
        return "" if labels[r] < 0 else report.label_name(int(labels[r]))

    dup: list[list[Any]] = []
    for g, grp in enumerate(report.duplicates):
        dup.append([g, "keep", keys[grp.keep], lab(grp.keep), 1.0, None,
                    grp.sizes.get(grp.keep)])
        for r, s, e in zip(grp.others, grp.similarity, grp.exact):
            dup.append([g, "duplicate", keys[r], lab(r), float(s), bool(e), grp.sizes.get(r)])
    return {
        "duplicates": ([("group", "int"), ("role", "str"), ("key", "str"), ("label", "str"),
                        ("similarity_to_kept", "float"), ("exact", "bool"), ("bytes", "int")],
                       dup),
        "outliers": ([("rank", "int"), ("key", "str"), ("label", "str"), ("score", "float")],
                     [[n + 1, keys[r], lab(r), float(report.outlier_scores[r])]
                      for n, r in enumerate(report.outliers)]),
        "label_issues": ([("rank", "int"), ("key", "str"), ("given", "str"),
                          ("suggested", "str"), ("given_probability", "float"),
                          ("suggested_probability", "float")],
                         [[n + 1, keys[i.row], report.label_name(i.given),
                           report.label_name(i.suggested), float(i.self_confidence),
                           float(i.suggested_probability)]
                          for n, i in enumerate(report.label_issues or [])]),
        "leakage": ([("key", "str"), ("other_key", "str"), ("similarity", "float"),
                     ("exact", "bool")],
                    [[keys[r], k2, float(s), bool(e)] for r, k2, s, e in report.leakage or []]),
    }


def summary_dict(report: CurationReport) -> dict:
    """Counts and settings (summary.json; the data a viewer starts from)."""
    dups = report.duplicates
    return {
        "images": int(np.isfinite(report.outlier_scores).sum()),
        "threshold": report.threshold, "k": report.k, "neighbours": report.neighbours_from,
        "duplicate_groups": len(dups),
        "duplicates_to_remove": sum(len(g.others) for g in dups),
        "exact_duplicates": sum(sum(g.exact) for g in dups),
        "outliers_listed": len(report.outliers),
        "label_issues": None if report.label_issues is None else len(report.label_issues),
        "label_method": report.label_method,
        "leaked": None if report.leakage is None else len(report.leakage),
        "notes": report.notes,
    }


def summary_table(report: CurationReport) -> str:
    """The one short table the command prints."""
    s = summary_dict(report)
    rows = [
        ("images", str(s["images"])),
        ("near-duplicate groups", f"{s['duplicate_groups']} (similarity >= {report.threshold})"),
        ("duplicates to remove", f"{s['duplicates_to_remove']} ({s['exact_duplicates']} "
                                 "byte-identical)"),
        ("top outliers listed", f"{s['outliers_listed']} (k={report.k})"),
        ("label issues", "not computed" if s["label_issues"] is None
         else f"{s['label_issues']} ({s['label_method']})"),
        ("leaked into --against", "not computed" if s["leaked"] is None else str(s["leaked"])),
        ("neighbours from", report.neighbours_from),
    ]
    width = max(len(a) for a, _ in rows)
    lines = [f"{a:<{width}}  {b}" for a, b in rows]
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines)


def gallery_items(report: CurationReport, store: Any,
                  limit: int = 20, width: int = 8) -> dict[str, list[Sequence[Any]]]:
    """(path or None, caption) lists per gallery: duplicate groups (the first ``width``
    members), outliers, label issues; ``limit`` rows each. Captions end with the key."""
    root = data_root(store.meta)
    keys = report.keys

    def item(r: int, caption: str) -> tuple[Path | None, str]:
        key = keys[r] if len(keys[r]) <= 22 else "..." + keys[r][-19:]
        return key_path(root, keys[r]), f"{caption}\n{key}"

    dup = [[item(g.keep, "keep")] + [item(r, f"{s:.3f}" + (" exact" if e else ""))
                                      for r, s, e in list(zip(g.others, g.similarity,
                                                              g.exact))[:width - 1]]
           for g in report.duplicates[:limit]]
    out = [[item(r, f"{report.outlier_scores[r]:.3f}")] for r in report.outliers[:limit]]
    lab = [[item(i.row, f"{report.label_name(i.given)} -> {report.label_name(i.suggested)}")]
           for i in (report.label_issues or [])[:limit]]
    return {"duplicates": dup, "outliers": out, "label_issues": lab}


GALLERY_FILES = {"duplicates": "duplicates.png", "outliers": "outliers.png",
                 "label_issues": "label_issues.png"}
_GALLERY_TITLES = {"duplicates": "near-duplicate groups (kept image first)",
                   "outliers": "top outliers (mean cosine distance to k nearest)",
                   "label_issues": "suspected label errors (given -> suggested)"}


def write_galleries(report: CurationReport, store: Any, out: str | os.PathLike,
                    overwrite: bool = False, limit: int = 20) -> list[Path]:
    """PNG sheets of each non-empty finding (``limit`` rows each) into ``out``; images gone
    from the data root are drawn as placeholders (matplotlib: ``transferlab[plots]``)."""
    from .plots import plot_gallery

    path, replace = prepare_out_dir(out, overwrite)
    written = []
    for name, rows in gallery_items(report, store, limit).items():
        if not rows:
            continue
        target = path / GALLERY_FILES[name]
        if not replace and target.exists():
            raise SettingError("overwrite", f"is not set and {target} already exists; choose "
                               "another --out, or set it to replace the file")
        written.append(plot_gallery(rows, target, _GALLERY_TITLES[name]))
    return written

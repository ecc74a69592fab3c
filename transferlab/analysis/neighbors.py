"""Exact nearest-neighbour search over feature stores (or plain arrays).

The database is streamed chunk by chunk (``store.iter_chunks``) and a running top-k is
merged after each chunk, so a store larger than RAM can be searched with many queries at
once. Results are exact and deterministic: equal distances are ordered by lower row index.

``store_search`` / ``store_nearest`` use the store's FAISS index (``python -m
transferlab.index``) when this user built one for the metric and the store has not changed
since; a stale index is refused (StoreError), one that came with the store is ignored (one
logged line, then the exact scan: ``store.faiss_index``), and ``exact=True`` always scans.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataError, SettingError
from ..extract.queries import embed_images, embed_texts
from ..runtime.device import exact_fp32, resolve_device
from ..store.faiss_index import load_index

_log = logging.getLogger(__name__)
METRICS = ("cosine", "euclidean")
# Elements of one (queries x rows) distance block; bounds memory of a search step.
_BLOCK_ELEMENTS = 1 << 23
# Bytes of one float32 database chunk (the default chunk_rows): small enough for the cache.
_CHUNK_BYTES = 8 << 20


def nearest(source: Any, queries: np.ndarray, k: int, metric: str = "cosine",
            chunk_rows: int | None = None, device: str | torch.device | None = None,
            dtype: torch.dtype = torch.float32) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest rows of ``source`` for each query.

    ``source`` is a FeatureStore (anything with ``iter_chunks``), an (N, D) array/tensor, or
    an iterable of ``(start_row, chunk)`` pairs, read ``chunk_rows`` rows at a time (default:
    8 MiB of float32). Returns ``(distances, indices)``, both
    (Q, min(k, N)), sorted by distance then row index. Cosine distance is ``1 - cos``
    (0 for a zero vector's similarity); euclidean is the L2 distance.
    """
    metric = _check_metric(metric)
    check_k(k)
    dev = resolve_device("auto" if device is None else str(device))
    q = _as_queries(queries, dtype, dev)
    best_d = torch.empty(q.shape[0], 0, dtype=dtype, device=dev)
    best_i = torch.empty(q.shape[0], 0, dtype=torch.int64, device=dev)
    seen = 0
    for start, chunk in _chunks(source, chunk_rows or _default_chunk_rows(source)):
        x = _to_tensor(chunk, dtype, dev)
        if x.ndim != 2 or x.shape[1] != q.shape[1]:
            raise DataError(f"stored features have shape {tuple(x.shape)} but queries have "
                            f"{q.shape[1]} dimensions; embed queries with the store's backbone")
        d, i = _chunk_topk(q, x, k, metric)
        best_d, best_i = _merge(best_d, best_i, d, i + start, k)
        seen += x.shape[0]
    if seen == 0:
        raise DataError("the feature store is empty; extract features into it first")
    return best_d.cpu().numpy(), best_i.cpu().numpy()


def pairwise_distances(q: torch.Tensor, x: torch.Tensor, metric: str) -> torch.Tensor:
    """(Q, M) distances; computed row-wise so identical rows give identical distances."""
    dots = q @ x.T
    if metric == "cosine":
        qn = q.norm(dim=1).clamp_min(1e-30)
        xn = x.norm(dim=1).clamp_min(1e-30)
        return 1.0 - dots / qn[:, None] / xn[None, :]
    sq = (q * q).sum(1)[:, None] - 2.0 * dots + (x * x).sum(1)[None, :]
    return sq.clamp_min(0.0).sqrt()


def _chunk_topk(q: torch.Tensor, x: torch.Tensor, k: int,
                metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of one database chunk, processed in query blocks to bound memory."""
    rows = max(1, _BLOCK_ELEMENTS // max(1, x.shape[0]))
    ds, idx = [], []
    for s in range(0, q.shape[0], rows):
        dist = pairwise_distances(q[s:s + rows], x, metric)
        dist = torch.nan_to_num(dist, nan=float("inf"))
        d, i = _topk_exact(dist, min(k, x.shape[0]))
        ds.append(d)
        idx.append(i)
    return torch.cat(ds), torch.cat(idx)


def _topk_exact(dist: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Smallest k per row sorted by (distance, column); ties at the boundary go to the lowest
    column index. ``topk`` picks the right set unless the k-th value has copies left out of
    it; only such rows take the slower tie-exact path (about 10x the cost)."""
    vals, cols = torch.topk(dist, k, dim=1, largest=False, sorted=True)
    tied = (dist <= vals[:, -1:]).sum(1) > k
    if bool(tied.any()):
        rows = tied.nonzero()[:, 0]
        vals[rows], cols[rows] = _topk_ties(dist[rows], k)
    by_col = torch.sort(cols, dim=1).indices  # equal distances in column order
    vals, cols = vals.gather(1, by_col), cols.gather(1, by_col)
    order = torch.sort(vals, dim=1, stable=True).indices
    return vals.gather(1, order), cols.gather(1, order)


def _topk_ties(dist: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Smallest k per row; of equal values at the boundary, the lowest columns."""
    kth = torch.kthvalue(dist, k, dim=1, keepdim=True).values
    less = dist < kth
    equal = dist == kth
    need = k - less.sum(1, keepdim=True)
    take = less | (equal & (equal.cumsum(1) <= need))
    cols = take.nonzero()[:, 1].view(dist.shape[0], k)  # ascending column per row
    vals = dist.gather(1, cols)
    order = torch.sort(vals, dim=1, stable=True).indices
    return vals.gather(1, order), cols.gather(1, order)


def _merge(d1: torch.Tensor, i1: torch.Tensor, d2: torch.Tensor, i2: torch.Tensor,
           k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two sorted candidate lists; every index of the first is lower than the second's."""
    d = torch.cat([d1, d2], 1)
    i = torch.cat([i1, i2], 1)
    order = torch.sort(d, dim=1, stable=True).indices[:, :k]
    return d.gather(1, order), i.gather(1, order)


def _default_chunk_rows(source: Any) -> int:
    """Rows whose float32 copy is about ``_CHUNK_BYTES``: the conversion, norms and product
    then run in cache (measured: 65536-row chunks made one query 2.5x slower)."""
    shape = getattr(getattr(source, "features", source), "shape", None)
    dim = int(shape[1]) if shape is not None and len(shape) == 2 and shape[1] else 256
    return max(256, _CHUNK_BYTES // (4 * dim))


def _chunks(source: Any, chunk_rows: int) -> Iterator[tuple[int, Any]]:
    if hasattr(source, "iter_chunks"):
        yield from source.iter_chunks(rows=chunk_rows)
    elif isinstance(source, (np.ndarray, torch.Tensor)):
        if source.ndim != 2:
            raise DataError(f"features must be a 2-D (rows, dims) array, got shape "
                            f"{tuple(source.shape)}")
        for s in range(0, source.shape[0], chunk_rows):
            yield s, source[s:s + chunk_rows]
    else:
        yield from source


def _as_queries(queries: Any, dtype: torch.dtype, dev: torch.device) -> torch.Tensor:
    q = _to_tensor(queries, dtype, dev)
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2 or q.shape[0] == 0:
        raise DataError(f"queries must be a non-empty (Q, D) array, got shape {tuple(q.shape)}")
    return q


def _to_tensor(x: Any, dtype: torch.dtype, dev: torch.device) -> torch.Tensor:
    """Arrays, memory maps and tensors (any device) as a tensor on ``dev``."""
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    return t.to(dev, dtype)


def check_k(k: int) -> int:
    if k < 1:
        raise SettingError("k", f"must be at least 1, got {k}")
    return k


def _check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise DataError(f"unknown metric '{metric}'; use one of {', '.join(METRICS)}")
    return metric


def store_nearest(store: Any, vectors_or_paths: np.ndarray | Sequence[str], k: int = 5,
                  metric: str = "cosine", trust_code: bool = False, exact: bool = False
                  ) -> list[list[tuple[str, float]]]:
    """Nearest stored items for each query, as ``[(key, distance), ...]`` per query.

    Queries are feature vectors, keys of the store (their stored vectors are used), or image
    files (embedded with the store's own backbone, cut and preprocessing; ``trust_code`` lets a
    trusted store's metadata name code to run). A key stored with several views appears once,
    at its closest view. The store's fresh FAISS index is used unless ``exact``.
    """
    hits = store_search(store, query_vectors(store, vectors_or_paths, trust_code), k, metric,
                        exact=exact)
    keys = store.keys
    return [[(keys[row], dist) for row, dist in q] for q in hits]


def store_nearest_text(store: Any, texts: Sequence[str] | str, k: int = 5,
                       metric: str = "cosine", trust_code: bool = False, exact: bool = False
                       ) -> list[list[tuple[str, float]]]:
    """Nearest stored items of each text query, as ``[(key, distance), ...]`` per text, in a
    CLIP-family store (the text tower its metadata records embeds the texts)."""
    hits = store_search(store, text_vectors(store, texts, trust_code), k, metric, exact=exact)
    keys = store.keys
    return [[(keys[row], dist) for row, dist in q] for q in hits]


def text_vectors(store: Any, texts: Sequence[str] | str, trust_code: bool = False
                 ) -> np.ndarray:
    """(Q, D) text embeddings in the store's space (``embed_texts``)."""
    return embed_texts(store.meta, _as_list(texts), root=getattr(store, "dir", None),
                       trust_code=trust_code)


def store_search(store: Any, vectors: np.ndarray, k: int, metric: str = "cosine",
                 device: str | torch.device | None = None,
                 exact: bool = False) -> list[list[tuple[int, float]]]:
    """``[(row, distance), ...]`` per query: the k closest distinct keys of a store, through
    its fresh FAISS index for ``metric`` when there is one (unless ``exact``)."""
    _check_metric(metric)
    check_k(k)
    views = getattr(store, "views", None)
    per_key = int(np.max(views)) + 1 if views is not None and len(views) else 1
    index = None if exact else load_index(store, metric)
    if index is not None:
        _log.info("searching through the store's %s FAISS index (%s; an exact search scans "
                  "every row instead)", index.kind, index.metric)
        dist, idx = index.search(vectors, k * per_key)
    else:
        dist, idx = nearest(store, vectors, k * per_key, metric, device=device)
    keys = store.keys
    out = []
    for rows, dists in zip(idx.tolist(), dist.tolist()):
        seen: set[str] = set()
        hits = []
        for row, d in zip(rows, dists):
            if row >= 0 and keys[row] not in seen and len(hits) < k:
                seen.add(keys[row])
                hits.append((row, d))
        out.append(hits)
    return out


def query_vectors(store: Any, vectors_or_paths: np.ndarray | Sequence[str],
                  trust_code: bool = False) -> np.ndarray:
    """Turn vectors, store keys or image paths into a (Q, D) float32 array."""
    if isinstance(vectors_or_paths, (np.ndarray, torch.Tensor)):
        return np.atleast_2d(np.asarray(vectors_or_paths, dtype=np.float32))
    items = [str(p) for p in _as_list(vectors_or_paths)]
    if not items:
        raise DataError("no queries given; pass feature vectors, store keys or image paths")
    position: dict[str, int] = {}
    for row, key in enumerate(store.keys):
        position.setdefault(key, row)  # the first row of a key is its plain view
    out: list[np.ndarray | None] = [None] * len(items)
    files = [p for p in items if p not in position]
    for p in files:
        if not Path(p).is_file():
            example = f" such as '{store.keys[0]}'" if len(store.keys) else ""
            raise DataError(f"query '{p}' is neither an image file nor a key of the store; "
                            f"pass an existing image path or a stored key{example}")
    if files:
        embedded = iter(embed_query_images(store, files, trust_code))
    for n, item in enumerate(items):
        row = position.get(item)
        vec = store.features[row] if row is not None else next(embedded)
        out[n] = np.asarray(vec, dtype=np.float32).reshape(-1)
    return np.stack(out)  # type: ignore[arg-type]


def embed_query_images(store: Any, paths: list[str], trust_code: bool = False) -> np.ndarray:
    """Embed image files through the extractor described by a store's metadata."""
    root = getattr(store, "dir", None)
    return np.asarray(embed_images(store.meta, list(paths), root=root, trust_code=trust_code),
                      dtype=np.float32)


def _as_list(items: Iterable[Any] | str) -> list[Any]:
    return [items] if isinstance(items, str) else list(items)


# ---------------------------------------------------------------------------------------
# kNN classification (the kNN probe)
# ---------------------------------------------------------------------------------------


@exact_fp32()
def knn_predict(train_features: Any, train_labels: Any, query_features: Any, k: int = 5,
                device: str | torch.device | None = None) -> np.ndarray:
    """Cosine k-nearest-neighbour majority vote.

    A tied vote goes to the tied class whose closest member ranks first (neighbours are
    ordered by distance, then by training row).
    """
    _, idx = nearest(train_features, query_features, k, "cosine", device=device)
    votes = _numpy(train_labels)[idx]  # (Q, k) in rank order
    classes, inv = np.unique(votes, return_inverse=True)
    inv = inv.reshape(votes.shape)
    q, kk = inv.shape
    rows = np.repeat(np.arange(q), kk)
    counts = np.zeros((q, len(classes)), dtype=np.int64)
    np.add.at(counts, (rows, inv.ravel()), 1)
    first = np.full((q, len(classes)), kk, dtype=np.int64)
    np.minimum.at(first, (rows, inv.ravel()), np.tile(np.arange(kk), q))
    return classes[(counts * (kk + 1) - first).argmax(1)]


def knn_accuracy(train_features: Any, train_labels: Any, query_features: Any,
                 query_labels: Any, k: int = 5, device: str | torch.device | None = None) -> float:
    """Accuracy of ``knn_predict`` on labelled queries."""
    pred = knn_predict(train_features, train_labels, query_features, k, device)
    return float((pred == _numpy(query_labels)).mean())


def _numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)

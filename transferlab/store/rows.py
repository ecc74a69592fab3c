"""Which rows of a store the downstream tools read, and reading them as float32.

Works on a ``FeatureStore`` and on any store-like object with ``keys``, ``features``
(indexable, with ``iter_chunks`` on the store) and optionally ``views``.
"""
from __future__ import annotations

from typing import Any

import numpy as np


def views_of(store: Any) -> np.ndarray:
    """Each row's view number (0: the un-augmented image); all 0 without views."""
    views = getattr(store, "views", None)
    return np.zeros(len(store.keys), np.int64) if views is None else np.asarray(views)


def plain_rows(store: Any) -> np.ndarray:
    """Rows holding view 0 (the un-augmented image) of each key."""
    return np.flatnonzero(views_of(store) == 0)


def load_features(store: Any, rows: np.ndarray | None = None) -> np.ndarray:
    """Rows of a store (default: all, filled chunk by chunk) as one float32 array."""
    if rows is not None and len(rows) < store.features.shape[0]:
        return np.asarray(store.features[np.asarray(rows)], dtype=np.float32)
    n, d = store.features.shape
    out = np.empty((n, d), dtype=np.float32)
    for start, chunk in store.iter_chunks():
        out[start:start + len(chunk)] = chunk
    return out

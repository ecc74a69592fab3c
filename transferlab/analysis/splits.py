"""Seeded, stratified (train, validation) splits of labelled rows, for the probes and
fine-tuning."""
from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import SettingError


def check_fraction(val_fraction: float, setting: str = "val_fraction") -> float:
    """The validation share must leave rows on both sides."""
    if not 0.0 < val_fraction < 1.0:
        raise SettingError(setting, f"must be between 0 and 1 (exclusive), got {val_fraction}; "
                           "try 0.2")
    return val_fraction


def stratified_split(labels: Any, val_fraction: float = 0.2, seed: int = 0, *,
                     setting: str = "val_fraction") -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class split into (train rows, validation rows), both sorted.

    Each class with at least two items puts ``round(n * val_fraction)`` of them (at least
    one, never all) into validation; single-item classes stay in training. ``setting``
    names the fraction in the error message (the caller's config key).
    """
    check_fraction(val_fraction, setting)
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        if len(rows) < 2:
            continue
        n_val = min(max(int(round(len(rows) * val_fraction)), 1), len(rows) - 1)
        val.append(rng.permutation(rows)[:n_val])
    val_rows = np.sort(np.concatenate(val)) if val else np.zeros(0, dtype=np.int64)
    train_rows = np.setdiff1d(np.arange(len(labels)), val_rows)
    return train_rows, val_rows


def split_by_key(labels: np.ndarray, keys: np.ndarray, views: np.ndarray,
                 val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split over keys: training gets every view of its keys, validation only
    the plain view, so augmented copies of a validation image never leak into training."""
    plain = np.flatnonzero(views == 0)
    _, val = stratified_split(labels[plain], val_fraction, seed)
    val_keys = set(keys[plain[val]].tolist())
    in_val = np.fromiter((k in val_keys for k in keys), dtype=bool, count=len(keys))
    return np.flatnonzero(~in_val), plain[val]

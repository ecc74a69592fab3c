"""A store's probe: the linear sweep and kNN accuracy on a validation split or a test store,
its table and its plots."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataError, StoreError
from ..store.rows import load_features, views_of
from .linear_probe import DEFAULT_L2, ProbeResult, fit_logistic
from .neighbors import knn_accuracy
from .splits import split_by_key

log = logging.getLogger(__name__)


@dataclass
class ProbeReport:
    """Outcome of ``run_probe``: linear sweep plus kNN, on a validation split or test store."""

    l2s: list[float]
    train_acc: list[float]
    test_acc: list[float]
    best: int
    knn_k: int
    knn_acc: float | None
    n_train: int
    n_test: int
    n_classes: int
    test_source: str  # "validation split" or the test store's directory
    result: ProbeResult


def load_labelled(store: Any, plain_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Labelled rows of a store as (float32 features, int64 labels).

    ``plain_only`` keeps only view 0 (the un-augmented image) of each key.
    """
    x, y, _, _ = _labelled(store, plain_only)
    return x, y


def _labelled(store: Any, plain_only: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                     np.ndarray]:
    labels = np.asarray(store.labels, dtype=np.int64)
    keep = labels >= 0
    if not keep.any():
        raise DataError(f"store {_store_name(store)} has no labels (every label is -1); the "
                        "probe needs labelled features: extract from class sub-folders "
                        "(data.source=folder), a list file with data.label_column, or a "
                        "labelled torchvision/mnist-5k dataset")
    if not keep.all():
        log.info("probe: ignoring %d unlabelled rows of %d", int((~keep).sum()), len(labels))
    views = views_of(store)
    if plain_only:
        keep &= views == 0
    rows = np.flatnonzero(keep)
    keys = np.asarray(store.keys, dtype=object)[rows]
    return load_features(store, rows), labels[rows], keys, views[rows]


def run_probe(store: Any, test_store: Any = None, *, val_fraction: float = 0.2,
              l2s: Sequence[float] = DEFAULT_L2, knn: int = 5, seed: int = 0,
              device: str | torch.device | None = None, max_iter: int = 500) -> ProbeReport:
    """Linear-probe sweep and kNN accuracy of a store (``knn=0`` skips kNN).

    Without ``test_store`` a seeded stratified validation split is held out. Training uses
    every view of its images; testing uses plain views only.
    """
    x, y, keys, views = _labelled(store, plain_only=False)
    if test_store is not None:
        tx, ty = load_labelled(test_store, plain_only=True)
        if tx.shape[1] != x.shape[1]:
            raise StoreError(f"test store {_store_name(test_store)} has {tx.shape[1]}-d features "
                             f"but {_store_name(store)} has {x.shape[1]}; use stores extracted "
                             "with the same backbone and cut")
        source = _store_name(test_store)
    else:
        tr, va = split_by_key(y, keys, views, val_fraction, seed)
        if len(va) == 0:
            raise DataError("too few labelled rows for a validation split (every class has one "
                            "item); pass a test store or extract more images")
        x, tx, y, ty = x[tr], x[va], y[tr], y[va]
        source = "validation split"
    res = fit_logistic(x, y, l2s, val_features=tx, val_labels=ty, device=device,
                       max_iter=max_iter)
    knn_acc = knn_accuracy(x, y, tx, ty, knn, device) if knn > 0 else None
    return ProbeReport(res.l2s, res.train_acc, res.val_acc or [], res.best, knn, knn_acc,
                       len(y), len(ty), len(res.classes), source, res)


def probe_report(report: ProbeReport) -> str:
    """The probe command's table: one line per strength, best marked, kNN line last."""
    lines = [(f"train {report.n_train} rows, test {report.n_test} rows "
              f"({report.test_source}), {report.n_classes} classes"),
             f"{'l2':>10}  {'train acc':>9}  {'test acc':>8}"]
    for i, l2 in enumerate(report.l2s):
        mark = "  <- best" if i == report.best else ""
        lines.append(f"{l2:>10.3g}  {report.train_acc[i]:>9.4f}  {report.test_acc[i]:>8.4f}{mark}")
    if report.knn_acc is not None:
        lines.append(f"kNN (k={report.knn_k}, cosine) test acc {report.knn_acc:.4f}")
    return "\n".join(lines)


def plot_probe(store: Any, report: ProbeReport, out_dir: Path, method: str = "pca") -> list[Path]:
    """A 2-D map (pca, tsne, umap), class columns and the accuracy-vs-L2 sweep of a store."""
    from . import plots

    x, y = load_labelled(store, plain_only=True)
    names = getattr(store, "class_names", None)
    sweep = [{"l2": l2, "train_acc": a, "test_acc": b}
             for l2, a, b in zip(report.l2s, report.train_acc, report.test_acc)]
    map_png, columns_png, sweep_png = probe_plot_paths(out_dir, method)
    return [plots.plot_map(x, y, map_png, method, class_names=names),
            plots.plot_class_columns(x, y, columns_png, class_names=names),
            plots.plot_training_curves(sweep, sweep_png, x="l2", logx=True)]


def probe_plot_paths(out_dir: Path, method: str) -> list[Path]:
    """The PNGs ``plot_probe`` writes (the command checks them before the probe runs)."""
    return [Path(out_dir) / name for name in (f"{method}.png", "class_columns.png",
                                              "l2_sweep.png")]


def _store_name(store: Any) -> str:
    return str(getattr(store, "dir", None) or getattr(store, "path", None) or "<store>")

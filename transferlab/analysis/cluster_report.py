"""A store's clustering: k-means of every stored image, purity and NMI over the labelled
ones, the assignments as CSV, and maps by cluster and by label."""
from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..runtime.userfiles import write_output
from ..store.rows import load_features, plain_rows
from .kmeans import KMeansResult, kmeans, nmi, purity


@dataclass
class ClusterReport:
    keys: list[str]  # one per clustered image
    rows: np.ndarray  # the store row of each key
    clusters: np.ndarray  # cluster of each key
    inertia: float
    sizes: list[int]
    purity: float | None  # over labelled rows; None for an unlabelled store
    nmi: float | None
    n_labelled: int
    result: KMeansResult


def run_cluster(store: Any, k: int, n_init: int = 4, seed: int = 0, normalize: bool = False,
                max_iter: int = 300, device: str | torch.device | None = None) -> ClusterReport:
    """k-means on every stored image (plain view only); purity and NMI over labelled ones.

    ``normalize`` L2-normalises rows first (spherical k-means, close to cosine similarity).
    """
    rows = plain_rows(store)
    x = load_features(store, rows)
    if normalize:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    res = kmeans(x, k, n_init=n_init, max_iter=max_iter, seed=seed, device=device)
    labels = np.asarray(store.labels, dtype=np.int64)[rows]
    known = labels >= 0
    pur = purity(labels[known], res.labels[known]) if known.any() else None
    score = nmi(labels[known], res.labels[known]) if known.any() else None
    sizes = np.bincount(res.labels, minlength=k).tolist()
    keys = [store.keys[r] for r in rows]
    return ClusterReport(keys, rows, res.labels, res.inertia, sizes, pur, score,
                         int(known.sum()), res)


def write_assignments(path: str | Path, keys: Sequence[str], clusters: Sequence[int],
                      overwrite: bool = False) -> Path:
    """CSV with header ``key,cluster``, one stored item per line; an existing file is
    refused unless ``overwrite`` (``runtime.userfiles``: written whole, never onto a FIFO)."""
    def write(f: Any) -> None:
        w = csv.writer(f)
        w.writerow(["key", "cluster"])
        w.writerows(zip(keys, (int(c) for c in clusters)))

    return write_output(path, write, overwrite=overwrite, what="--out")


def cluster_report(report: ClusterReport, k: int) -> str:
    """The cluster command's summary lines."""
    lines = [f"k-means: k={k}, {len(report.clusters)} rows, inertia {report.inertia:.6g}",
             f"cluster sizes: {report.sizes}"]
    if report.purity is not None:
        lines.append(f"purity {report.purity:.4f}  NMI {report.nmi:.4f} "
                     f"(over {report.n_labelled} labelled rows)")
    else:
        lines.append("purity/NMI: n/a (store has no labels)")
    return "\n".join(lines)


def plot_clusters(store: Any, report: ClusterReport, out_dir: Path,
                  method: str = "pca") -> list[Path]:
    """A 2-D map (``method``: pca, tsne, umap) coloured by cluster, and by label when the
    store has labels."""
    from . import plots

    x = load_features(store, report.rows)
    names = [f"cluster {c}" for c in range(len(report.sizes))]
    paths = cluster_plot_paths(out_dir, method, report.purity is not None)
    out = [plots.plot_map(x, report.clusters, paths[0], method, class_names=names,
                          title="k-means clusters")]
    if report.purity is not None:
        labels = np.asarray(store.labels)[report.rows]
        out.append(plots.plot_map(x, labels, paths[1], method, class_names=store.class_names,
                                  title="labels"))
    return out


def cluster_plot_paths(out_dir: Path, method: str, labelled: bool) -> list[Path]:
    """The PNGs ``plot_clusters`` writes (the command checks them before k-means runs)."""
    names = [f"clusters_{method}.png"] + ([f"labels_{method}.png"] if labelled else [])
    return [Path(out_dir) / name for name in names]

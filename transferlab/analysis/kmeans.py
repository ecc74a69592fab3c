"""k-means clustering of (N, D) features, with purity and NMI against known labels.

k-means runs in torch (GPU when present): greedy k-means++ seeding, ``n_init`` seeded
restarts (the lowest inertia wins), Lloyd iterations with distances computed in row blocks
so memory stays bounded. Empty clusters are re-seeded with the points farthest from their
centre. A store's clustering is ``cluster_report``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import DataError, SettingError
from ..runtime.device import exact_fp32, resolve_device

_BLOCK_ELEMENTS = 1 << 24  # (rows x centres) distances computed at once


@dataclass
class KMeansResult:
    labels: np.ndarray  # (N,) cluster of each row
    centers: np.ndarray  # (k, D)
    inertia: float  # sum of squared distances of rows to their centre
    n_iter: int  # Lloyd iterations of the winning restart


@exact_fp32()  # distances decide the clusters: no TF32 on a GPU
def kmeans(features: Any, k: int, n_init: int = 4, max_iter: int = 300, tol: float = 1e-4,
           seed: int = 0, device: str | torch.device | None = None) -> KMeansResult:
    """Cluster (N, D) features into ``k`` groups; seeded, so runs are repeatable.

    ``tol`` is relative to the mean feature variance (as in scikit-learn): Lloyd stops when
    the centres move less than that in squared distance.
    """
    dev = resolve_device("auto" if device is None else str(device))
    x = torch.as_tensor(np.asarray(features) if not isinstance(features, torch.Tensor)
                        else features).to(dev, torch.float32)
    _check(x, k, n_init, max_iter)
    gen = torch.Generator().manual_seed(seed)
    x_sq = (x * x).sum(1)
    tol_abs = tol * float(x.var(0, unbiased=False).mean()) if len(x) > 1 else 0.0
    best: KMeansResult | None = None
    for _ in range(n_init):
        centers = kmeans_plus_plus(x, x_sq, k, gen)
        labels, d2, centers, n_iter = _lloyd(x, x_sq, centers, max_iter, tol_abs)
        inertia = float(d2.double().sum())
        if best is None or inertia < best.inertia:
            best = KMeansResult(labels.cpu().numpy(), centers.cpu().numpy(), inertia, n_iter)
    assert best is not None
    return best


def kmeans_plus_plus(x: torch.Tensor, x_sq: torch.Tensor, k: int,
                     gen: torch.Generator) -> torch.Tensor:
    """Greedy k-means++: each new centre is the best of 2 + log(k) D^2-weighted draws."""
    n_trials = 2 + int(math.log(k))
    first = int(torch.randint(len(x), (1,), generator=gen))
    centers = [x[first]]
    closest = _sq_dist(x, x_sq, x[first:first + 1]).squeeze(1)
    for _ in range(1, k):
        weights = closest.double().cpu()
        if float(weights.sum()) <= 0:  # fewer distinct points than k
            weights = torch.ones_like(weights)
        cand = torch.multinomial(weights, n_trials, replacement=True, generator=gen).to(x.device)
        trial = torch.minimum(closest[:, None], _sq_dist(x, x_sq, x[cand]))
        pick = int(trial.double().sum(0).argmin())
        centers.append(x[cand[pick]])
        closest = trial[:, pick]
    return torch.stack(centers)


def _lloyd(x: torch.Tensor, x_sq: torch.Tensor, centers: torch.Tensor, max_iter: int,
           tol_abs: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    k = len(centers)
    n_iter = 0
    for n_iter in range(1, max_iter + 1):
        labels, d2 = assign(x, centers, x_sq)
        counts = torch.bincount(labels, minlength=k)
        sums = torch.zeros_like(centers).index_add_(0, labels, x)
        new = sums / counts.clamp_min(1)[:, None].to(x.dtype)
        empty = (counts == 0).nonzero().squeeze(1)
        if len(empty):
            far = d2.topk(len(empty)).indices  # farthest points re-seed empty clusters
            new[empty] = x[far]
        shift = float(((new - centers) ** 2).sum())
        centers = new
        if shift <= tol_abs:
            break
    labels, d2 = assign(x, centers, x_sq)
    return labels, d2, centers, n_iter


def assign(x: torch.Tensor, centers: torch.Tensor,
           x_sq: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centre of every row and its squared distance, in row blocks."""
    x_sq = (x * x).sum(1) if x_sq is None else x_sq
    rows = max(1, _BLOCK_ELEMENTS // max(1, len(centers)))
    labels, dists = [], []
    for s in range(0, len(x), rows):
        d2 = _sq_dist(x[s:s + rows], x_sq[s:s + rows], centers)
        d, i = d2.min(1)
        labels.append(i)
        dists.append(d)
    return torch.cat(labels), torch.cat(dists)


def _sq_dist(x: torch.Tensor, x_sq: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return (x_sq[:, None] - 2.0 * (x @ c.T) + (c * c).sum(1)[None, :]).clamp_min(0.0)


# ---------------------------------------------------------------------------------------
# Agreement with known labels
# ---------------------------------------------------------------------------------------


def contingency(labels_true: Any, labels_pred: Any) -> np.ndarray:
    """(n_true_classes, n_clusters) count table."""
    a, b = np.asarray(labels_true), np.asarray(labels_pred)
    if a.shape != b.shape or a.ndim != 1:
        raise DataError(f"label arrays must be 1-D and equally long, got {a.shape} and {b.shape}")
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    table = np.zeros((ai.max(initial=-1) + 1, bi.max(initial=-1) + 1), dtype=np.int64)
    np.add.at(table, (ai.ravel(), bi.ravel()), 1)
    return table


def purity(labels_true: Any, labels_pred: Any) -> float:
    """Share of items whose cluster's majority class is their own class."""
    table = contingency(labels_true, labels_pred)
    return float(table.max(0).sum() / max(1, table.sum()))


def nmi(labels_true: Any, labels_pred: Any) -> float:
    """Normalised mutual information, MI / mean(H(true), H(pred)) (scikit-learn's default).

    Two single-cluster labelings score 1.0; labelings sharing no information score 0.0.
    """
    table = contingency(labels_true, labels_pred).astype(np.float64)
    if table.shape[0] == table.shape[1] <= 1:
        return 1.0
    n = table.sum()
    rows, cols = table.sum(1), table.sum(0)
    nz = table > 0
    mi = float((table[nz] / n * np.log(n * table[nz] / np.outer(rows, cols)[nz])).sum())
    if mi <= 0:
        return 0.0
    return mi / ((_entropy(rows) + _entropy(cols)) / 2)


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def _check(x: torch.Tensor, k: int, n_init: int, max_iter: int = 300) -> None:
    if x.ndim != 2 or len(x) == 0:
        raise DataError(f"features must be a non-empty (N, D) array, got {tuple(x.shape)}")
    if not 1 <= k <= len(x):
        raise SettingError("k", f"must be between 1 and the number of rows ({len(x)}), got {k}")
    if n_init < 1:
        raise SettingError("n_init", f"must be at least 1, got {n_init}")
    if max_iter < 1:
        raise SettingError("max_iter", f"must be at least 1, got {max_iter}; try 300")
    if not bool(torch.isfinite(x).all()):
        raise DataError("features contain NaN or infinity; re-extract them (check fp16 overflow)")

"""Features on a 2-D plane: PCA (exact, in torch), t-SNE (scikit-learn) and UMAP (umap-learn),
on a seeded sample of large sets. Coordinates only; ``plots`` draws them.

scikit-learn and umap-learn are optional extras, imported only when their method is asked for.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import DataError, MissingDependencyError

MAP_METHODS = ("pca", "tsne", "umap")
METHOD_NAMES = {"pca": "PCA", "tsne": "t-SNE", "umap": "UMAP"}
# Points embedded and drawn per method: t-SNE costs O(N log N) with a large constant, so it
# gets a smaller sample than PCA and UMAP.
MAP_MAX_POINTS = {"pca": 20000, "tsne": 5000, "umap": 20000}
_EXACT_PCA_MAX_DIMS = 4096


def check_method(method: str) -> str:
    if method not in MAP_METHODS:
        raise DataError(f"unknown map method {method!r}; use one of {', '.join(MAP_METHODS)}")
    return method


def pca_2d(features: Any) -> np.ndarray:
    """Projection of (N, D) features on their first two principal components, (N, 2).

    Deterministic: exact covariance eigenvectors (seeded randomized PCA above 4096 dims),
    each component's sign fixed so its largest loading is positive.
    """
    x = torch.as_tensor(np.asarray(features, dtype=np.float64))
    if x.ndim != 2 or len(x) < 2:
        raise DataError(f"PCA needs at least two (N, D) feature rows, got {tuple(x.shape)}")
    xc = x - x.mean(0)
    if x.shape[1] <= _EXACT_PCA_MAX_DIMS:
        _, vecs = torch.linalg.eigh(xc.T @ xc)
        comps = vecs[:, -2:].flip(1) if x.shape[1] >= 2 else vecs
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            comps = torch.pca_lowrank(xc, q=min(10, *x.shape), center=False, niter=4)[2][:, :2]
    signs = torch.sign(comps.gather(0, comps.abs().argmax(0, keepdim=True)))
    proj = xc @ (comps * signs)
    if proj.shape[1] == 1:
        proj = torch.cat([proj, torch.zeros_like(proj)], 1)
    return proj.numpy()


def embed_2d(features: Any, method: str = "pca", seed: int = 0) -> np.ndarray:
    """(N, 2) coordinates of (N, D) features by ``method`` (pca, tsne, umap); seeded."""
    x = np.asarray(features, dtype=np.float32)
    check_method(method)
    if x.ndim != 2 or len(x) < 3:
        raise DataError(f"a {METHOD_NAMES[method]} map needs at least three (N, D) feature "
                        f"rows, got {tuple(x.shape)}")
    if method == "pca":
        return pca_2d(x)
    if method == "tsne":
        try:
            from sklearn.manifold import TSNE
        except ImportError:
            raise MissingDependencyError("t-SNE maps need scikit-learn: pip install "
                                         "scikit-learn") from None
        perplexity = float(min(30.0, (len(x) - 1) / 3))
        return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
    try:
        import umap
    except ImportError:
        raise MissingDependencyError('UMAP maps need umap-learn: pip install '
                                     '"transferlab[umap]"') from None
    # a seed makes UMAP single-threaded anyway; saying so keeps it from warning
    reducer = umap.UMAP(n_components=2, n_neighbors=min(15, len(x) - 1), random_state=seed,
                        n_jobs=1)
    return np.asarray(reducer.fit_transform(x))


def sample_rows(n: int, max_points: int, seed: int = 0) -> np.ndarray:
    """Sorted row numbers: all ``n`` rows, or a seeded random ``max_points`` of them."""
    if n <= max_points:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False))

"""Pictures of features and results, written as PNG files.

matplotlib is an optional extra (``pip install transferlab[plots]``), as are scikit-learn
(t-SNE maps) and umap-learn (UMAP maps, ``transferlab[umap]``, both through ``projection``);
each is imported only when a plot needs it, and figures are rendered with the Agg canvas
directly, so pyplot's global backend (a notebook's, say) is never touched. Every function
returns the PNG path.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError, MissingDependencyError
from ..runtime.userfiles import write_output
from .projection import MAP_MAX_POINTS, METHOD_NAMES, check_method, embed_2d, pca_2d, sample_rows


def _figure(width: float, height: float) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingDependencyError("plotting needs matplotlib: pip install transferlab[plots] "
                                     "(or pip install matplotlib)") from None
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def png_path(out: str | Path) -> Path:
    """The file a plot named ``out`` is written to (``.png`` added to a bare name)."""
    path = Path(out)
    return path if path.suffix else path.with_suffix(".png")


def _save(fig: Any, out: str | Path) -> Path:
    """Written whole through a temporary sibling (``runtime.userfiles``; never onto a FIFO or
    device). The library replaces an existing PNG; commands refuse one unless --overwrite,
    before they start (``check_output``)."""
    return write_output(png_path(out),
                        lambda f: fig.savefig(f, format="png", bbox_inches="tight"), "wb",
                        overwrite=True, what="the plot")


def _label_name(label: int, class_names: Sequence[str] | None) -> str:
    if label < 0:
        return "unlabelled"
    if class_names is not None and label < len(class_names):
        return str(class_names[label])
    return str(label)


# ---------------------------------------------------------------------------------------
# (a) feature vectors as image columns, grouped by class
# ---------------------------------------------------------------------------------------


def plot_class_columns(features: Any, labels: Any, out: str | Path,
                       class_names: Sequence[str] | None = None, max_per_class: int = 64,
                       per_row: int = 10) -> Path:
    """For each class, an image whose columns are that class's feature vectors.

    Rows are feature dimensions, so dimensions a class switches on show as bright bands.
    Colours share one scale (1st-99th percentile) across classes.
    """
    x, y = _xy(features, labels)
    classes = [int(c) for c in np.unique(y)]
    groups = [x[y == c][:max_per_class].T for c in classes]
    lo, hi = np.percentile(np.concatenate([g.ravel() for g in groups]), [1, 99])
    n_rows = -(-len(classes) // per_row)
    n_cols = min(per_row, len(classes))
    fig = _figure(1.6 * n_cols + 1, 3.0 * n_rows)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for n, (c, g) in enumerate(zip(classes, groups)):
        ax = axes.ravel()[n]
        im = ax.imshow(g, aspect="auto", interpolation="nearest", cmap="viridis",
                       vmin=lo, vmax=hi if hi > lo else lo + 1)
        ax.set_title(_label_name(c, class_names), fontsize=9)
    fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.02)
    fig.suptitle(f"feature vectors (columns) by class; {x.shape[1]} dims")
    return _save(fig, out)


# ---------------------------------------------------------------------------------------
# (b) 2-D PCA scatter
# ---------------------------------------------------------------------------------------


def plot_pca(features: Any, labels: Any = None, out: str | Path = "pca.png",
             class_names: Sequence[str] | None = None, title: str | None = None) -> Path:
    """2-D PCA scatter, coloured by label (grey for unlabelled, -1)."""
    x = np.asarray(features, dtype=np.float32)
    y = np.full(len(x), -1) if labels is None else np.asarray(labels, dtype=np.int64)
    pts = pca_2d(x)
    keep = _subsample(len(x))
    return _scatter(pts[keep], y[keep], out, class_names,
                    title or f"PCA of {len(x)} feature vectors", ("PC 1", "PC 2"))


def _scatter(pts: np.ndarray, y: np.ndarray, out: str | Path,
             class_names: Sequence[str] | None, title: str, axes: tuple[str, str]) -> Path:
    """Points coloured by class (grey for unlabelled), a legend up to 20 classes."""
    fig = _figure(7, 6)
    ax = fig.subplots()
    classes = [int(c) for c in np.unique(y)]
    cmap = _colormap(len([c for c in classes if c >= 0]))
    for n, c in enumerate(c for c in classes if c >= 0):
        sel = y == c
        ax.scatter(pts[sel, 0], pts[sel, 1], s=6, color=cmap(n), label=_label_name(c, class_names))
    if (y < 0).any():
        ax.scatter(pts[y < 0, 0], pts[y < 0, 1], s=6, color="0.6", label="unlabelled")
    if len(classes) <= 20:
        ax.legend(markerscale=2, fontsize=8, loc="best")
    ax.set_xlabel(axes[0])
    ax.set_ylabel(axes[1])
    ax.set_title(title)
    return _save(fig, out)


def _subsample(n: int) -> np.ndarray:
    """A PCA scatter draws at most as many points as a PCA map samples."""
    return sample_rows(n, MAP_MAX_POINTS["pca"])


def _colormap(n: int) -> Any:
    from matplotlib import colormaps

    name = "tab10" if n <= 10 else "tab20" if n <= 20 else "turbo"
    cmap = colormaps[name]
    return cmap if n <= 20 else (lambda i: cmap(i / max(1, n - 1)))


# ---------------------------------------------------------------------------------------
# (b2) 2-D maps (coordinates from ``projection``), on a sample of large sets
# ---------------------------------------------------------------------------------------


def plot_map(features: Any, labels: Any = None, out: str | Path = "map.png",
             method: str = "pca", class_names: Sequence[str] | None = None,
             max_points: int | None = None, title: str | None = None, seed: int = 0) -> Path:
    """2-D map of features by ``method`` coloured by class. Above ``max_points`` rows
    (per-method default ``MAP_MAX_POINTS``) a seeded random sample is embedded and drawn,
    and the title says how many of how many."""
    x = features if hasattr(features, "shape") else np.asarray(features, dtype=np.float32)
    n = len(x)
    y = np.full(n, -1) if labels is None else np.asarray(labels, dtype=np.int64)
    check_method(method)
    keep = sample_rows(n, max_points or MAP_MAX_POINTS[method], seed)
    pts = embed_2d(np.asarray(x[keep] if len(keep) < n else x, dtype=np.float32), method, seed)
    name = METHOD_NAMES[method]
    shown = f"a random sample of {len(keep)} of {n}" if len(keep) < n else f"{n}"
    return _scatter(pts, y[keep], out, class_names,
                    title or f"{name} of {shown} feature vectors", (f"{name} 1", f"{name} 2"))


def plot_store_map(store: Any, out: str | Path = "map.png", method: str = "pca",
                   view: int = 0, max_points: int | None = None, seed: int = 0) -> Path:
    """``plot_map`` of a store's rows of ``view``; only the sampled rows are read from the
    memory-mapped shards, so a store larger than RAM is fine."""
    rows = np.flatnonzero(np.asarray(store.views) == view)
    if len(rows) < 3:
        have = sorted(set(np.asarray(store.views).tolist()))
        raise DataError(f"the store has {len(rows)} rows of view {view}, a map needs at least "
                        f"three; pick a view from {have}")
    check_method(method)
    keep = rows[sample_rows(len(rows), max_points or MAP_MAX_POINTS[method], seed)]
    name = METHOD_NAMES[method]
    shown = f"a random sample of {len(keep)} of {len(rows)}" if len(keep) < len(rows) else (
        f"{len(rows)}")
    return plot_map(store.features[keep], np.asarray(store.labels)[keep], out, method,
                    store.class_names, max_points=len(keep) or 1, seed=seed,
                    title=f"{name} of {shown} feature vectors ({Path(store.dir).name})")


# ---------------------------------------------------------------------------------------
# (c) query image and its nearest neighbours
# ---------------------------------------------------------------------------------------


def plot_neighbors(queries: Sequence[str | Path], neighbors: Sequence[Sequence[str | Path]],
                   distances: Sequence[Sequence[float]], out: str | Path,
                   names: Sequence[Sequence[str]] | None = None) -> Path:
    """One row per query: the query image, then its neighbours titled with distances.

    ``names`` (per neighbour, e.g. store keys) are shown under the distance; images that
    cannot be read are drawn as an 'unreadable' placeholder.
    """
    if not (len(queries) == len(neighbors) == len(distances)) or not queries:
        raise DataError("plot_neighbors needs one neighbour list and one distance list per query")
    n_cols = 1 + max(len(row) for row in neighbors)
    fig = _figure(2.0 * n_cols, 2.3 * len(queries))
    axes = fig.subplots(len(queries), n_cols, squeeze=False)
    for r, query in enumerate(queries):
        _show_image(axes[r, 0], query, f"query\n{_short(Path(query).name)}")
        for c in range(1, n_cols):
            if c - 1 >= len(neighbors[r]):
                axes[r, c].axis("off")
                continue
            label = f"{distances[r][c - 1]:.4f}"
            if names is not None:
                label += f"\n{_short(str(names[r][c - 1]))}"
            _show_image(axes[r, c], neighbors[r][c - 1], label)
    return _save(fig, out)


def plot_gallery(rows: Sequence[Sequence[tuple[str | Path | None, str]]], out: str | Path,
                 title: str = "", names: Sequence[Sequence[str]] | None = None) -> Path:
    """A sheet of image rows (a duplicate group per row, or one image per cell of a grid
    when every row holds one), each image titled with its caption (and ``names``, e.g.
    keys); a missing or unreadable image is drawn as a placeholder, a ``None`` path too."""
    if not rows:
        raise DataError("plot_gallery needs at least one row of images")
    single = all(len(r) == 1 for r in rows)
    if single:
        n_cols = min(5, len(rows))
        n_rows = -(-len(rows) // n_cols)
    else:
        n_cols, n_rows = max(len(r) for r in rows), len(rows)
    fig = _figure(2.0 * n_cols, 2.4 * n_rows + (0.4 if title else 0))
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for r, row in enumerate(rows):
        for c, (path, caption) in enumerate(row):
            ax = axes[r // n_cols, r % n_cols] if single else axes[r, c]
            label = caption
            if names is not None:
                label += f"\n{_short(str(names[r][c]))}"
            _show_image(ax, path, label)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, out)


def _show_image(ax: Any, path: str | Path, title: str) -> None:
    ax.axis("off")
    ax.set_title(title, fontsize=8)
    img = _load_thumbnail(path)
    if img is None:
        ax.imshow(np.full((96, 96), 0.85), cmap="gray", vmin=0, vmax=1)
        ax.text(0.5, 0.5, "unreadable", ha="center", va="center", transform=ax.transAxes)
    else:
        # grey on a fixed 0-255 scale: a blank white frame must not show as black
        ax.imshow(img, cmap="gray", vmin=0, vmax=255) if img.ndim == 2 else ax.imshow(img)


def _load_thumbnail(path: str | Path | None, size: int = 256) -> np.ndarray | None:
    from PIL import Image, ImageOps

    if path is None:  # a path the caller refused to open (outside the data root)
        return None
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            im = im.convert("L" if im.mode in ("1", "L", "I;16", "I", "F") else "RGB")
            im.thumbnail((size, size))
            return np.asarray(im)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def _short(text: str, width: int = 22) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3):]


# ---------------------------------------------------------------------------------------
# (d) training curves
# ---------------------------------------------------------------------------------------


def read_history(path: str | Path) -> list[dict]:
    """Per-epoch metric dicts from a JSON-lines file (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"metrics file not found: {path}; pass the metrics.jsonl a run wrote")
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{n} is not valid JSON ({exc.msg}); each line must be one "
                            "JSON object such as {\"epoch\": 1, \"train_loss\": 0.5}") from None
        if not isinstance(rec, dict):
            raise DataError(f"{path}:{n} must be a JSON object, got {type(rec).__name__}")
        records.append(rec)
    return records


def plot_training_curves(history: Sequence[dict] | str | Path, out: str | Path,
                         x: str = "epoch", logx: bool = False) -> Path:
    """Metric curves against ``x``: losses in one panel, everything else in another."""
    records = read_history(history) if isinstance(history, (str, Path)) else list(history)
    keys = [k for k in dict.fromkeys(k for r in records for k in r)
            if k != x and any(_is_number(r.get(k)) for r in records)]
    if not keys:
        raise DataError("no numeric metrics to plot; records should look like "
                        "{\"epoch\": 1, \"train_loss\": 0.5, \"val_acc\": 0.9}")
    groups = [g for g in ([k for k in keys if "loss" in k], [k for k in keys if "loss" not in k])
              if g]
    fig = _figure(6 * len(groups), 4)
    axes = fig.subplots(1, len(groups), squeeze=False)[0]
    for ax, group in zip(axes, groups):
        for key in group:
            pts = [(r.get(x, i + 1), r[key]) for i, r in enumerate(records)
                   if _is_number(r.get(key))]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=key)
        ax.set_xlabel(x)
        if logx:
            ax.set_xscale("log")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return _save(fig, out)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)


def _xy(features: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(features, dtype=np.float32)
    y = np.asarray(labels, dtype=np.int64)
    if x.ndim != 2 or y.shape != (len(x),) or len(x) == 0:
        raise DataError(f"features must be (N, D) with N labels, got {x.shape} and {y.shape}")
    return x, y


# ---------------------------------------------------------------------------------------
# (e) representation similarity and layer sweeps
# ---------------------------------------------------------------------------------------


def plot_similarity(matrix: Any, names_a: Sequence[str], names_b: Sequence[str],
                    out: str | Path, title: str = "linear CKA") -> Path:
    """A heatmap of a (len(names_a), len(names_b)) similarity matrix (CKA in [0, 1]):
    layers of A down the rows, layers of B along the columns, values in the cells when few."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (len(names_a), len(names_b)):
        raise DataError(f"matrix of shape {m.shape} for {len(names_a)} x {len(names_b)} names")
    fig = _figure(2.5 + 0.55 * len(names_b), 1.5 + 0.45 * len(names_a))
    ax = fig.subplots()
    image = ax.imshow(m, vmin=0.0, vmax=1.0, cmap="magma", origin="lower", aspect="auto")
    ax.set_xticks(range(len(names_b)), [_short(n) for n in names_b], rotation=60, ha="right",
                  fontsize=8)
    ax.set_yticks(range(len(names_a)), [_short(n) for n in names_a], fontsize=8)
    if m.size <= 400:
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, "nan" if not np.isfinite(v) else f"{v:.2f}", ha="center",
                    va="center", fontsize=6, color="white" if v < 0.6 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title(title, fontsize=9)
    return _save(fig, out)


def plot_depth_curves(rows: Sequence[dict], out: str | Path,
                      metrics: Sequence[str] = ("probe_acc", "knn_acc")) -> Path:
    """Accuracy by relative depth (0: the first cut, 1: the last), one line per backbone, one
    panel per metric; rows are a sweep's leaderboard records (``backbone``,
    ``relative_depth`` and the metrics)."""
    metrics = [k for k in metrics if any(_is_number(r.get(k)) for r in rows)]
    if not metrics:
        raise DataError("no accuracy to plot: the leaderboard rows hold no probe_acc or knn_acc")
    fig = _figure(5.5 * len(metrics), 4)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, key in zip(axes, metrics):
        for name in dict.fromkeys(r["backbone"] for r in rows):
            pts = sorted((r["relative_depth"], r[key]) for r in rows
                         if r["backbone"] == name and _is_number(r.get(key)))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=4, label=name)
        ax.set_xlabel("relative depth of the cut")
        ax.set_ylabel(key)
        ax.set_xlim(-0.05, 1.05)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return _save(fig, out)


def plot_accuracy_throughput(rows: Sequence[dict], out: str | Path,
                             metric: str = "probe_acc") -> Path:
    """Accuracy against extraction speed (images/s, log scale), a colour per backbone, each
    point labelled with its cut: the cost of each choice beside what it buys."""
    pts = [r for r in rows if _is_number(r.get(metric)) and _is_number(r.get("images_per_second"))
           and r["images_per_second"] > 0]
    if not pts:
        raise DataError(f"no rows with both {metric} and images_per_second to plot")
    fig = _figure(6.5, 4.5)
    ax = fig.add_subplot()
    for name in dict.fromkeys(r["backbone"] for r in pts):
        mine = [r for r in pts if r["backbone"] == name]
        ax.scatter([r["images_per_second"] for r in mine], [r[metric] for r in mine], s=24,
                   label=name)
        for r in mine:
            ax.annotate(_short(str(r["cut"]), 14), (r["images_per_second"], r[metric]),
                        fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("extraction speed (images/s, all cuts of one pass)")
    ax.set_ylabel(metric)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, out)

"""A search's results shown: each query's table of neighbours, and a picture of the query
images beside the stored images they found (keys resolved inside the store's data root).

The search itself is ``neighbors.store_search``.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..models.recorded import escapes


def data_root(meta: dict) -> Path | None:
    """The data root that a store's keys are relative to, if its metadata records one."""
    root = meta.get("data_root") or (meta.get("config") or {}).get("data", {}).get("root")
    return Path(root) if root else None


def format_hits(store: Any, query: str, hits: list[tuple[int, float]]) -> str:
    """One query's table: rank, distance, key (and class when known)."""
    labels = np.asarray(store.labels)
    names = getattr(store, "class_names", None)
    lines = [f"query: {query}", f"{'rank':>6}  {'distance':>10}  key"]
    for rank, (row, dist) in enumerate(hits, 1):
        label = int(labels[row])
        cls = "" if label < 0 else f"  [{names[label] if names and label < len(names) else label}]"
        lines.append(f"{rank:>6}  {dist:>10.5f}  {store.keys[row]}{cls}")
    return "\n".join(lines)


def plot_search(store: Any, queries: Sequence[str], hits: list[list[tuple[int, float]]],
                out: str | Path) -> Path:
    """Grid of each query and its neighbours; keys are resolved inside the data root."""
    from .plots import plot_neighbors

    root = data_root(store.meta)
    keys = store.keys
    query_paths = [Path(q) if Path(q).is_file() else key_path(root, q) for q in queries]
    return plot_neighbors(query_paths, [[key_path(root, keys[r]) for r, _ in h] for h in hits],
                          [[d for _, d in h] for h in hits], out,
                          names=[[keys[r] for r, _ in h] for h in hits])


def key_path(root: Path | None, key: str) -> Path | None:
    """The file of a store key, or None when the key (read from the store, so written by
    anyone) would leave the data root: absolute, a drive, '..', or a link out of it."""
    base = (root if root is not None else Path.cwd()).resolve()
    if escapes(key):
        return None
    path = base / key
    return path if path.resolve().is_relative_to(base) else None

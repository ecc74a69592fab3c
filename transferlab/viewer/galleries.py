"""What the page shows beside the map, read back from files other commands wrote: cluster
assignments (``transferlab cluster --out CSV``) and the curation findings (``transferlab
curate``: ``STORE/curation/*.csv``). Files inside a store may be written by anyone: each is
read bounded, through ``runtime.untrusted``, and a key that is not in the store is skipped.
"""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import MAX_KEY_CHARS
from ..errors import DataError
from ..runtime.untrusted import read_bounded

GALLERY_LIMIT = 400  # entries of one gallery sent to the page
MAX_GROUPS = 1_000_000  # class or cluster numbers counted by the page: [0, MAX_GROUPS)
CURATION_GALLERIES = {  # name -> (file, title)
    "duplicates": ("duplicates.csv", "near-duplicate groups (kept image first)"),
    "outliers": ("outliers.csv", "top outliers (mean cosine distance to k nearest)"),
    "label_issues": ("label_issues.csv", "suspected label errors (given -> suggested)"),
    "leakage": ("leakage.csv", "images also in the --against store"),
}


@dataclass
class GalleryItem:
    row: int
    key: str
    caption: str
    group: int = 0  # duplicate group; 0 elsewhere


@dataclass
class Gallery:
    name: str
    title: str
    items: list[GalleryItem] = field(default_factory=list)
    total: int = 0  # entries in the file (items holds the first GALLERY_LIMIT)


def _read_csv(path: Path, store: Any, what: str) -> list[dict[str, str]]:
    limit = (len(store) + 16) * (MAX_KEY_CHARS + 256)
    text = read_bounded(path, limit, what, DataError, path.parent).decode("utf-8", "replace")
    return list(csv.DictReader(io.StringIO(text, newline="")))


def _first_rows(store: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for r, k in enumerate(store.keys):
        out.setdefault(k, r)
    return out


def read_clusters(store: Any, path: str | os.PathLike) -> np.ndarray:
    """(N,) int32 cluster of each row from a ``key,cluster`` CSV (-1: not assigned)."""
    path = Path(path)
    rows = _read_csv(path, store, "the cluster assignments")
    if rows and not {"key", "cluster"} <= set(rows[0]):
        raise DataError(f"{path} is not a key,cluster CSV (transferlab cluster --out writes "
                        "one)")
    by_key: dict[str, int] = {}
    for rec in rows:
        try:
            cluster = int(rec["cluster"])
        except (TypeError, ValueError):
            raise DataError(f"{path}: cluster {rec.get('cluster')!r} of {rec.get('key')!r} is "
                            "not a whole number") from None
        if not -1 <= cluster < MAX_GROUPS:
            raise DataError(f"{path}: cluster {cluster} of {rec.get('key')!r} is outside "
                            f"[-1, {MAX_GROUPS:,})")
        by_key[rec["key"]] = cluster
    return np.array([by_key.get(k, -1) for k in store.keys], np.int32)


def read_curation(store: Any, folder: str | os.PathLike) -> dict[str, Gallery]:
    """The non-empty curation galleries found in ``folder`` (files that are absent are
    skipped), in the order of ``CURATION_GALLERIES``."""
    folder = Path(folder)
    first = _first_rows(store)
    out: dict[str, Gallery] = {}
    for name, (file, title) in CURATION_GALLERIES.items():
        path = folder / file
        if not path.is_file():
            continue
        records = _read_csv(path, store, f"the curation file {file}")
        gallery = Gallery(name, title, total=len(records))
        for rec in records:
            if len(gallery.items) >= GALLERY_LIMIT:
                break
            key = rec.get("key") or ""
            if key not in first:
                continue
            gallery.items.append(GalleryItem(first[key], key, _caption(name, rec),
                                             _group(rec)))
        if gallery.items:
            out[name] = gallery
    return out


def _group(rec: dict[str, str]) -> int:
    try:
        return int(rec.get("group") or 0)
    except ValueError:
        return 0


def _caption(name: str, rec: dict[str, str]) -> str:
    if name == "duplicates":
        if rec.get("role") == "keep":
            return f"group {rec.get('group')}: keep"
        exact = " exact" if rec.get("exact") == "yes" else ""
        return f"group {rec.get('group')}: {rec.get('similarity_to_kept')}{exact}"
    if name == "outliers":
        return f"#{rec.get('rank')} score {rec.get('score')}"
    if name == "label_issues":
        return f"{rec.get('given')} -> {rec.get('suggested')}"
    return f"= {rec.get('other_key')} ({rec.get('similarity')})"


def read_confusion(path: str | os.PathLike, limit: int = 1000) -> dict:
    """``{classes, matrix}`` of a confusion.json (``transferlab finetune`` writes one: rows
    are the true class), checked: square, whole non-negative counts, at most ``limit``
    classes."""
    path = Path(path)
    raw = read_bounded(path, 64 << 20, "the confusion matrix", DataError, path.parent)
    try:
        data = json.loads(raw)
        classes = [str(c) for c in data["classes"]]
        matrix = np.asarray(data["matrix"])
    except (ValueError, KeyError, TypeError):
        raise DataError(f"{path} is not a confusion.json ({{classes, matrix}}, as transferlab "
                        "finetune writes it)") from None
    n = len(classes)
    if not 0 < n <= limit or matrix.shape != (n, n) or matrix.dtype.kind not in "iu" \
            or (matrix < 0).any():
        raise DataError(f"{path}: the matrix must be {n} x {n} whole non-negative counts "
                        f"for {n} classes (at most {limit})")
    return {"classes": classes, "matrix": matrix.tolist(),
            "held_out": str(data.get("held_out", ""))}

"""A store's own files, each read (and checked before it is trusted) and written in one place.

A store may come from anyone: every field read here is checked, and a damaged or crafted
file is one StoreError naming the file and the problem, never a traceback, a huge
allocation or a read outside the store.
"""
from __future__ import annotations

import csv
import hashlib
import io
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import StoreError
from ..runtime.atomicfile import atomic_write
from ..yamlsafe import shown
from .format import (
    DTYPES,
    FORMAT,
    META,
    RESERVED_META,
    SHARDS,
    VERSION,
    _read_json,
)

INDEX_HEADER = ["key", "label", "row", "view"]
INDEX_SIDECAR = "index.npz"  # a binary copy of index.csv, checked against it
RANKS = "ranks"  # torchrun parts: ranks/world-N/rank-R, each a store of its own
_DAMAGED = "the store is damaged; rerun the extract with output.overwrite=true"


# ---- writing ------------------------------------------------------------------------------
# csv's default dialect ends lines with "\r\n" (RFC 4180), so a key holding "\r" or "\n" is
# quoted; with lineterminator="\n" a "\r" would be written bare and split the row on reading.


def write_index(path: Path, rows: Iterable[tuple[str, int, int]], fsync: bool = True) -> None:
    """``index.csv`` from ``(key, label, view)`` in row order, and beside it its binary copy
    ``index.npz`` (what makes a million-row store open at once), which records the CSV's
    SHA-256: it is used only while ``index.csv`` is byte for byte what was written with it."""
    keys: list[str] = []
    labels: list[int] = []
    views: list[int] = []
    digest = hashlib.sha256()

    def write(f: Any) -> None:
        text = io.StringIO()
        out = csv.writer(text)
        out.writerow(INDEX_HEADER)
        for row, (key, label, view) in enumerate(rows):
            out.writerow([key, label, row, view])
            keys.append(key)
            labels.append(label)
            views.append(view)
            if text.tell() > 1 << 20:
                _drain(text, f, digest)
        _drain(text, f, digest)

    atomic_write(path, write, "wb", fsync)
    sidecar = path.with_name(INDEX_SIDECAR)
    if any("\0" in key for key in keys):  # cannot be joined with NUL: the CSV alone serves
        sidecar.unlink(missing_ok=True)
        return
    blob = np.frombuffer("\0".join(keys).encode("utf-8"), np.uint8)
    atomic_write(sidecar, lambda f: np.savez(
        f, keys=blob, labels=np.asarray(labels, np.int64), views=np.asarray(views, np.int64),
        csv_sha256=np.array(digest.hexdigest())), "wb", fsync)


def _drain(text: io.StringIO, f: Any, digest: Any) -> None:
    data = text.getvalue().encode("utf-8")
    digest.update(data)
    f.write(data)
    text.seek(0)
    text.truncate()


def write_failures(path: Path, items: Iterable[tuple[str, str]], fsync: bool = True) -> None:
    def write(f: Any) -> None:
        out = csv.writer(f)
        out.writerow(["key", "reason"])
        out.writerows(items)
    atomic_write(path, write, fsync=fsync)


def finished_meta(caller: dict, own: dict) -> dict:
    """``meta.json``: the caller's metadata, then the store's own fields (which win)."""
    stamp = {"format": FORMAT, "version": VERSION,
             "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    return {**{k: v for k, v in caller.items() if k not in RESERVED_META}, **stamp, **own}


# ---- reading ------------------------------------------------------------------------------


def read_store_meta(directory: Path) -> dict:
    """``meta.json`` of a finished store, every field the reader relies on checked."""
    if not directory.is_dir():
        raise StoreError(f"no feature store at {directory}; check the path or run "
                         "`python -m transferlab.extract CONFIG` to create it")
    path = directory / META
    if not path.is_file():
        if (directory / SHARDS).is_dir() or (directory / RANKS).is_dir():
            raise StoreError(f"the store {directory} is unfinished (the run was interrupted); "
                             "rerun the same extract command to resume it")
        raise StoreError(f"{directory} is not a feature store (no {META}); check the path")
    meta = _read_json(path)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise StoreError(f"{path} is not a transferlab store's metadata; check the path")
    version = meta.get("version")
    if type(version) is not int:
        raise StoreError(f"{path}: format version {version!r} is not a number; {_DAMAGED}")
    if version > VERSION:
        raise StoreError(f"{directory} was written by a newer transferlab (format version "
                         f"{version}); upgrade transferlab")
    _check_fields(path, meta)
    return meta


def _check_fields(path: Path, meta: dict) -> None:
    def bad(field: str, want: str) -> StoreError:
        return StoreError(f"{path}: {field} must be {want}, got {shown(meta.get(field))}; "
                          f"{_DAMAGED}")
    if meta.get("dtype") not in DTYPES:
        raise bad("dtype", " or ".join(DTYPES))
    for field in ("rows", "dim"):
        if not _count(meta.get(field), allow_none=field == "dim"):
            raise bad(field, "a whole number >= 0")
    shards = meta.get("shards")
    if not isinstance(shards, list) or not all(
            isinstance(s, dict) and isinstance(s.get("file"), str) and _count(s.get("rows"))
            for s in shards):
        raise bad("shards", 'a list of {"file": ..., "rows": ...}')
    if sum(s["rows"] for s in shards) != meta["rows"]:
        raise StoreError(f"{path}: the shards hold {sum(s['rows'] for s in shards)} rows but "
                         f"rows says {meta['rows']}; {_DAMAGED}")


def shard_files(directory: Path, meta: dict) -> list[Path]:
    """The shard files, each checked: inside the store, a regular .npy whose header matches
    the rows, width and dtype meta.json gives it (so no read goes past its end)."""
    root = directory.resolve()
    files = []
    for shard in meta["shards"]:
        path = directory / shard["file"]
        inside = not os.path.isabs(shard["file"]) and path.resolve().is_relative_to(root)
        if not inside:
            raise StoreError(f"{directory / META} names the shard {shown(shard['file'])}, "
                             "outside the store; a store reads only its own files")
        if not path.is_file():
            raise StoreError(f"{path} is missing; {_DAMAGED}")
        _check_header(path, int(shard["rows"]), meta)
        files.append(path)
    return files


def _check_header(path: Path, rows: int, meta: dict) -> None:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)  # checks the file's length
    except (OSError, ValueError, EOFError) as exc:
        raise StoreError(f"{path} is not a complete .npy file ({shown(str(exc))}); "
                         f"{_DAMAGED}") from None
    want = (rows, meta["dim"] or 0)
    if array.shape != want or array.dtype != np.dtype(meta["dtype"]):
        raise StoreError(f"{path} holds {array.dtype} {array.shape} but meta.json says "
                         f"{meta['dtype']} {want}; {_DAMAGED}")


def read_index(path: Path, rows: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Keys, labels and views of ``index.csv``: from its binary copy when that matches the
    CSV's bytes, else parsed, each line's ``row`` checked against its position."""
    if not path.is_file():
        raise StoreError(f"{path} is missing; {_DAMAGED}")
    return _read_sidecar(path, rows) or _parse_index(path, rows)


def _read_sidecar(path: Path, rows: int) -> tuple[list[str], np.ndarray, np.ndarray] | None:
    """None unless ``index.npz`` is well formed, has ``rows`` rows and records the SHA-256
    of ``index.csv`` as it is now."""
    try:
        with np.load(path.with_name(INDEX_SIDECAR), allow_pickle=False) as data:
            blob, labels, views = data["keys"], data["labels"], data["views"]
            recorded = str(data["csv_sha256"])
    except (OSError, ValueError, KeyError, EOFError):
        return None
    if labels.shape != (rows,) or views.shape != (rows,) or blob.dtype != np.uint8 or \
            labels.dtype != np.int64 or views.dtype != np.int64 or recorded != file_sha256(path):
        return None
    try:
        keys = blob.tobytes().decode("utf-8").split("\0") if rows else []
    except UnicodeDecodeError:
        return None
    return (keys, labels, views) if len(keys) == rows else None


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _parse_index(path: Path, rows: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    keys, labels, views = [], [], []
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        reader = csv.reader(f)
        if next(reader, None) != INDEX_HEADER:
            raise StoreError(f"{path} does not start with {','.join(INDEX_HEADER)}; {_DAMAGED}")
        for position, record in enumerate(reader):
            if position >= rows:
                break
            key, label, view = _index_record(path, position, record)
            keys.append(key)
            labels.append(label)
            views.append(view)
        extra = sum(1 for _ in reader)
    if len(keys) != rows or extra:
        raise StoreError(f"{path} lists {len(keys) + extra} rows but meta.json says {rows}; "
                         f"{_DAMAGED}")
    return keys, np.array(labels, np.int64), np.array(views, np.int64)


def _index_record(path: Path, position: int, record: list[str]) -> tuple[str, int, int]:
    try:
        key, label, row, view = record
        label_, row_, view_ = int(label), int(row), int(view)
    except ValueError:
        raise StoreError(f"{path} line {position + 2} is not key,label,row,view "
                         f"({shown(record)}); {_DAMAGED}") from None
    if row_ != position:
        raise StoreError(f"{path} line {position + 2} says row {row_} but is row {position} "
                         f"(was the file re-sorted?); {_DAMAGED}")
    return key, label_, view_


def read_failures(path: Path) -> list[tuple[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.reader(f)
        next(reader, None)
        return [(r[0], r[1] if len(r) > 1 else "") for r in reader if r]


def _count(value: Any, allow_none: bool = False) -> bool:
    return (value is None and allow_none) or (type(value) is int and value >= 0)

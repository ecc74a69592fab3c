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

from ..config import MAX_KEY_CHARS
from ..errors import StoreError
from ..runtime.atomicfile import atomic_write
from ..runtime.untrusted import file_size, open_untrusted
from ..yamlsafe import shown
from .format import (
    DTYPES,
    FAILURES_LIMIT,
    FORMAT,
    META,
    RESERVED_META,
    SHARDS,
    VERSION,
    _read_json,
    load_npz,
    npy_data_bytes,
    read_npy_header,
)

INDEX_HEADER = ["key", "label", "row", "view"]
_HEADER_BYTES = b"key,label,row,view\r\n"
# the longest line write_index writes for a key of MAX_KEY_CHARS (UTF-8, quotes doubled)
_MAX_LINE = 2 * 4 * MAX_KEY_CHARS + 3 * 21 + 7
INDEX_SIDECAR = "index.npz"  # a binary copy of index.csv, checked against it
RANKS = "ranks"  # torchrun parts: ranks/world-N/rank-R, each a store of its own
_DAMAGED = "the store is damaged; rerun the extract with output.overwrite=true"


# ---- writing ------------------------------------------------------------------------------
# csv's default dialect ends lines with "\r\n" (RFC 4180), so a key holding "\r" or "\n" is
# quoted; with lineterminator="\n" a "\r" would be written bare and split the row on reading.


def write_index(path: Path, rows: Iterable[tuple[str, int, int]], fsync: bool = True) -> None:
    """``index.csv`` from ``(key, label, view)`` in row order, and beside it its binary copy
    ``index.npz`` (what makes a million-row store open at once), which records the CSV's
    SHA-256: it is used only while ``index.csv`` is byte for byte the CSV its own rows
    make (``_read_sidecar``)."""
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

    atomic_write(path, write, "wb", fsync, root=path.parent, error=StoreError)
    sidecar = path.with_name(INDEX_SIDECAR)
    if any("\0" in key for key in keys):  # cannot be joined with NUL: the CSV alone serves
        sidecar.unlink(missing_ok=True)
        return
    blob = np.frombuffer("\0".join(keys).encode("utf-8"), np.uint8)
    atomic_write(sidecar, lambda f: np.savez(
        f, keys=blob, labels=np.asarray(labels, np.int64), views=np.asarray(views, np.int64),
        csv_sha256=np.array(digest.hexdigest())), "wb", fsync, root=path.parent,
        error=StoreError)


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
    atomic_write(path, write, fsync=fsync, root=path.parent, error=StoreError)


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
    if not os.path.lexists(path):  # a FIFO or link there: _read_json says what it is
        if (directory / SHARDS).is_dir() or (directory / RANKS).is_dir():
            raise StoreError(f"the store {directory} is unfinished (the run was interrupted); "
                             "rerun the same extract command to resume it")
        raise StoreError(f"{directory} is not a feature store (no {META}); check the path")
    meta = _read_json(path, directory)
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
        if not os.path.lexists(path):
            raise StoreError(f"{path} is missing; {_DAMAGED}")
        _check_header(path, int(shard["rows"]), meta, directory)
        files.append(path)
    return files


def _check_header(path: Path, rows: int, meta: dict, root: Path) -> None:
    with open_untrusted(path, "the shard", StoreError, root) as f:
        try:
            shape, dtype, offset = read_npy_header(f)
        except (ValueError, EOFError, SyntaxError, OSError) as exc:
            raise StoreError(f"{path} is not a complete .npy file ({shown(str(exc))}); "
                             f"{_DAMAGED}") from None
        size = file_size(f)
    want = (rows, meta["dim"] or 0)
    if shape != want or dtype != np.dtype(meta["dtype"]):
        raise StoreError(f"{path} holds {dtype} {shape} but meta.json says "
                         f"{meta['dtype']} {want}; {_DAMAGED}")
    if size < offset + npy_data_bytes(shape, dtype):
        raise StoreError(f"{path} is not a complete .npy file ({size:,} bytes for {shape}); "
                         f"{_DAMAGED}")


def read_index(path: Path, rows: int, root: Path | None = None
               ) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Keys, labels and views of ``index.csv`` (a regular file inside the store ``root``):
    from its binary copy when that makes exactly the CSV's bytes, else parsed, each line's
    ``row`` checked against its position."""
    root = path.parent if root is None else root
    if not os.path.lexists(path):
        raise StoreError(f"{path} is missing; {_DAMAGED}")
    return _read_sidecar(path, rows, root) or _parse_index(path, rows, root)


def _index_limit(rows: int) -> int:
    return len(_HEADER_BYTES) + rows * _MAX_LINE


def _read_sidecar(path: Path, rows: int, root: Path | None = None
                  ) -> tuple[list[str], np.ndarray, np.ndarray] | None:
    """None unless ``index.npz`` is well formed (each member's declared size checked before
    it is read), has ``rows`` rows, and its keys, labels and views written as a CSV are
    byte for byte ``index.csv`` as it is now (so it can never serve other rows than the
    CSV, whatever digest it records)."""
    root = path.parent if root is None else root
    sidecar = path.with_name(INDEX_SIDECAR)
    if not os.path.lexists(sidecar):
        return None
    with open_untrusted(path, "the index", StoreError, root) as f:
        csv_size = file_size(f)
    if csv_size > _index_limit(rows) or rows * 8 > csv_size:
        return None  # parsing says what is wrong
    want = {"keys": lambda shape, dtype: dtype == np.uint8 and len(shape) == 1
            and shape[0] <= csv_size,
            "labels": lambda shape, dtype: dtype == np.int64 and shape == (rows,),
            "views": lambda shape, dtype: dtype == np.int64 and shape == (rows,),
            "csv_sha256": lambda shape, dtype: dtype.kind == "U" and shape == ()
            and dtype.itemsize <= 4 * 64}
    try:
        data = load_npz(sidecar, root, want, "the binary index", 3 * csv_size + (1 << 16))
    except StoreError:
        return None  # the CSV serves
    blob, labels, views = data["keys"], data["labels"], data["views"]
    try:
        keys = blob.tobytes().decode("utf-8").split("\0") if rows else []
    except UnicodeDecodeError:
        return None
    if len(keys) != rows or (not rows and blob.size):
        return None
    expected = index_csv_bytes(keys, blob, labels, views)
    if expected is None or len(expected) != csv_size:
        return None
    with open_untrusted(path, "the index", StoreError, root) as f:
        written = f.read(csv_size + 1)
    if written != expected:
        return None
    return keys, labels, views


def index_csv_bytes(keys: list[str], blob: np.ndarray, labels: np.ndarray,
                    views: np.ndarray) -> bytes | None:
    """The bytes ``write_index`` writes for these rows (``blob``: the keys' UTF-8 joined by
    NUL), built with numpy, not row by row; None when a number is out of int64's safe range.
    Keys csv quotes (holding , " CR or LF) are quoted here as csv does."""
    rows = len(keys)
    if rows == 0:
        return _HEADER_BYTES
    if (labels.min() <= -(1 << 62)) or (views.min() <= -(1 << 62)):
        return None
    special = np.isin(blob, np.frombuffer(b',"\r\n', np.uint8))
    if special.any():  # rare: re-encode the keys csv quotes
        starts = np.flatnonzero(blob == 0) + 1
        quoted = set(np.searchsorted(starts, np.flatnonzero(special), side="right").tolist())
        keys = _quote_some(keys, quoted)
        blob = np.frombuffer("\0".join(keys).encode("utf-8"), np.uint8)
    seps = np.flatnonzero(blob == 0)
    starts = np.concatenate([[0], seps + 1])
    klen = np.concatenate([seps, [len(blob)]]) - starts
    out = [_HEADER_BYTES]
    for a in range(0, rows, 1 << 15):
        b = min(rows, a + (1 << 15))
        out.append(_csv_lines(blob, starts, klen, labels, views, a, b).tobytes())
    return b"".join(out)


def _quote_some(keys: list[str], quoted: set[int]) -> list[str]:
    keys = list(keys)
    for i in quoted:
        keys[i] = '"' + keys[i].replace('"', '""') + '"'
    return keys


def _digits(values: np.ndarray) -> np.ndarray:
    """Characters of each int64 in decimal (a '-' included)."""
    mag = np.abs(values)
    count = np.ones(len(values), np.int64)
    top = int(mag.max()) if len(mag) else 0
    power = 10
    while power <= top:
        count += mag >= power
        power *= 10
    return count + (values < 0)


def _put_ints(out: np.ndarray, pos: np.ndarray, values: np.ndarray, width: np.ndarray) -> None:
    """Write ``values`` in decimal at ``pos`` (``width`` characters each, from ``_digits``)."""
    negative = values < 0
    if negative.any():
        out[pos[negative]] = ord("-")
    count = width - negative  # digits
    end = pos + width - 1
    place = np.abs(values)
    shortest, longest = int(count.min()), int(count.max())
    for k in range(longest):
        place, digit = np.divmod(place, 10)
        digit += ord("0")
        if k < shortest:  # every value has this digit
            out[end - k] = digit
        else:
            has = count > k
            out[end[has] - k] = digit[has]


def _csv_lines(blob: np.ndarray, starts: np.ndarray, klen: np.ndarray, labels: np.ndarray,
               views: np.ndarray, a: int, b: int) -> np.ndarray:
    kl = klen[a:b]
    rows = np.arange(a, b, dtype=np.int64)
    lab, view = labels[a:b], views[a:b]
    ll, rl, vl = _digits(lab), _digits(rows), _digits(view)
    line = kl + ll + rl + vl + 5
    offs = np.concatenate([[0], np.cumsum(line)[:-1]])
    out = np.empty(int(line.sum()), np.uint8)
    first = int(starts[a])
    part = blob[first:int(starts[b - 1] + kl[-1])]
    # each key's bytes, and the NUL after it (where its comma goes), move by one shift a row
    shift = np.repeat(offs - (starts[a:b] - first), kl + 1)[:len(part)]
    out[np.arange(len(part)) + shift] = part
    pos = offs + kl
    for values, width in ((lab, ll), (rows, rl), (view, vl)):
        out[pos] = ord(",")
        _put_ints(out, pos + 1, values, width)
        pos = pos + 1 + width
    out[pos] = ord("\r")
    out[pos + 1] = ord("\n")
    return out


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _parse_index(path: Path, rows: int, root: Path | None = None
                 ) -> tuple[list[str], np.ndarray, np.ndarray]:
    keys, labels, views = [], [], []
    root = path.parent if root is None else root
    with open_untrusted(path, "the index", StoreError, root) as handle:
        size = file_size(handle)
        if size > _index_limit(rows):
            raise StoreError(f"{path} is {size:,} bytes, more than {rows:,} rows can need; "
                             f"{_DAMAGED}")
        f = io.TextIOWrapper(handle, encoding="utf-8", errors="surrogateescape", newline="")
        reader = csv.reader(f)
        try:
            if next(reader, None) != INDEX_HEADER:
                raise StoreError(f"{path} does not start with {','.join(INDEX_HEADER)}; "
                                 f"{_DAMAGED}")
            for position, record in enumerate(reader):
                if position >= rows:
                    break
                key, label, view = _index_record(path, position, record)
                keys.append(key)
                labels.append(label)
                views.append(view)
            extra = sum(1 for _ in reader)
        except csv.Error as exc:
            raise StoreError(f"{path} line {reader.line_num}: {exc} (a key longer than a "
                             f"store holds?); {_DAMAGED}") from None
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


def read_failures(path: Path, root: Path | None = None,
                  count: int | None = None) -> list[tuple[str, str]]:
    """``failures.csv``: (key, reason) of the items that could not be read. A regular file
    inside ``root`` of at most ``FAILURES_LIMIT`` bytes, with no more lines than ``count``
    (meta.json's ``num_failures``) when given; else one StoreError."""
    if not os.path.lexists(path):
        return []
    root = path.parent if root is None else root
    out = []
    with open_untrusted(path, "the failures list", StoreError, root) as handle:
        size = file_size(handle)
        if size > FAILURES_LIMIT:
            raise StoreError(f"{path} is {size:,} bytes, more than the {FAILURES_LIMIT:,} a "
                             f"failures list can need; {_DAMAGED}")
        f = io.TextIOWrapper(handle, encoding="utf-8", errors="replace", newline="")
        reader = csv.reader(f)
        try:
            next(reader, None)
            for r in reader:
                if not r:
                    continue
                if count is not None and len(out) >= count:
                    raise StoreError(f"{path} lists more failures than the {count:,} "
                                     f"meta.json records; {_DAMAGED}")
                out.append((r[0], r[1] if len(r) > 1 else ""))
        except csv.Error as exc:
            raise StoreError(f"{path} line {reader.line_num}: {exc} (a key longer than a "
                             f"store holds?); {_DAMAGED}") from None
    return out


def _count(value: Any, allow_none: bool = False) -> bool:
    return (value is None and allow_none) or (type(value) is int and value >= 0)

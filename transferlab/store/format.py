"""Feature store: a directory of .npy shards plus a CSV index, readable with numpy alone.

Layout::

    <store>/
      meta.json              written last by a finished run (its presence = complete store):
                             caller's metadata (backbone, cut, preprocessing, versions, config,
                             elapsed time ...) plus format, version, fingerprint, dtype, dim,
                             rows, num_keys, num_failures, shard_size and
                             shards = [{"file": "shards/shard-00000.npy", "rows": 4096}, ...]
      index.csv              key,label,row,view - one line per feature row, in row order
                             (key: path relative to the data root; label -1 when unknown);
                             RFC 4180 CSV ("\r\n" line ends, odd keys quoted)
      index.npz              a binary copy of index.csv (keys, labels, views) recording the
                             CSV's SHA-256: read instead of parsing while the CSV matches
      failures.csv           key,reason - items that could not be read
      fingerprint.json       the format marker, then what the features depend on (backbone,
                             cut, preprocessing, compute settings, class names, dtype, views);
                             a run with another fingerprint is refused. Its marker is what
                             lets transferlab delete files here: only its own names, never
                             through a link, and no directory without it is written into
                             unless empty
      shards/shard-00000.npy float16/float32 array (rows, dim); every shard but the last of a
                             run holds exactly shard_size rows; never rewritten once finished
      shards/shard-00000.json  the shard's keys/labels/views; written after the .npy, so its
                             presence marks the shard finished (used to resume)
      shards/failures.jsonl  failures as they happen, one JSON [key, reason] per line
      .lock                  held (flock) by the one process writing the store

Reading without transferlab::

    import csv, json, numpy as np
    meta = json.load(open("store/meta.json"))
    feats = np.concatenate([np.load(f"store/{s['file']}", mmap_mode="r") for s in meta["shards"]])
    rows = list(csv.DictReader(open("store/index.csv", newline="", encoding="utf-8")))

Resuming: ``StoreWriter`` reopens a store written with the same fingerprint, drops
unfinished temporary files and exposes ``done_keys``; a run that skips those keys and feeds
the rest in the same order produces a store identical, row for row, to an uninterrupted one,
because a shard is written only when it holds exactly ``shard_size`` rows. Items that failed
are not done: a rerun tries them again and lists them only if they fail again. Pickle is offered
as an export only; nothing here ever unpickles.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import platform
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import StoreError
from ..runtime.atomicfile import atomic_write
from ..runtime.untrusted import file_size, open_untrusted, read_bounded

FORMAT = "transferlab-feature-store"
VERSION = 1
DTYPES = ("float16", "float32")
META, INDEX, FAILURES, FINGERPRINT = "meta.json", "index.csv", "failures.csv", "fingerprint.json"
SHARDS, FAILURE_LOG, LOCK = "shards", "failures.jsonl", ".lock"
PCA_FILE = "reduce-pca.npz"  # output.reduce=pca:D: the fitted projection (extract/reduce.py)
# Bounds on what a store's files may hold (a store may come from anyone): a key longer than
# MAX_KEY_CHARS never enters a store (the item is listed as a failure, its key shortened),
# a failure reason is cut at MAX_REASON_CHARS, and a store's JSON files are read only up to
# JSON_LIMIT bytes (meta.json of a million shards and 100,000 classes is ~ 70 MB less).
MAX_REASON_CHARS = 1000
JSON_LIMIT = 128 << 20
FAILURES_LIMIT = 256 << 20  # failures.csv and shards/failures.jsonl: ~2M failures
NPY_HEADER_LIMIT = 10_000  # numpy's own bound on an .npy header (ast.literal_eval)
RESERVED_META = ("format", "version", "fingerprint", "dtype", "dim", "rows", "num_keys",
                 "num_failures", "shard_size", "shards", "written_at")


def shard_name(n: int) -> str:
    return f"shard-{n:05d}"


# ---------------------------------------------------------------------------------------
# Small file helpers
# ---------------------------------------------------------------------------------------


def _write_json(path: Path, data: Any, root: Path | None = None) -> None:
    """``path`` (a store's file, below ``root``) written atomically, no link followed."""
    atomic_write(path, lambda f: json.dump(data, f, indent=1, ensure_ascii=False, default=str),
                 root=root if root is not None else path.parent, error=StoreError)


def _read_json(path: Path, root: Path | None = None, limit: int = JSON_LIMIT) -> Any:
    """The JSON a store's file holds, or None when it is missing or not JSON (a crafted
    100k-deep file included). A FIFO, device or directory there, a link leading out of
    ``root`` (default: the file's folder) or a file over ``limit`` bytes is one StoreError:
    never waited on, followed or read without bound."""
    if not os.path.lexists(path):
        return None
    data = read_bounded(path, limit, "the store file", StoreError,
                        root if root is not None else path.parent)
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError):
        return None


def _normalized(data: Any) -> Any:
    """JSON round trip, so tuples/lists and numpy scalars compare the way they are stored."""
    return json.loads(json.dumps(data, sort_keys=True, default=str))


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): data}


def read_npy_header(f: Any) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, bytes of header) of the .npy stream ``f``, read with a bounded header
    (version 1.0 or 2.0, what numpy writes); ValueError if it is not one, or is Fortran
    ordered (transferlab writes C order)."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        length = f.read(2)
        size = struct.unpack("<H", length)[0] if len(length) == 2 else -1
    elif version == (2, 0):
        length = f.read(4)
        size = struct.unpack("<I", length)[0] if len(length) == 4 else -1
    else:
        raise ValueError(f"npy format version {version} is not one transferlab writes")
    if not 0 <= size <= NPY_HEADER_LIMIT:
        raise ValueError(f"npy header of {size} bytes")
    header = f.read(size)
    if len(header) != size:
        raise ValueError("npy header cut short")
    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
            else np.lib.format.read_array_header_2_0)
    shape, fortran, dtype = read(io.BytesIO(length + header))
    if fortran and len(shape) > 1:
        raise ValueError("Fortran-ordered array")
    if dtype.hasobject:
        raise ValueError("object arrays are never read")
    if any(n < 0 for n in shape):
        raise ValueError(f"negative shape {shape}")
    return tuple(int(n) for n in shape), dtype, 6 + 2 + len(length) + size


def npy_data_bytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def _npy_rows(path: Path, root: Path | None = None) -> tuple[int, int] | None:
    """(rows, dim) of a complete 2-D .npy file (its size is what its header says), or None
    if it is missing, damaged or not a regular file inside ``root``."""
    try:
        with open_untrusted(path, "the shard", StoreError,
                            root if root is not None else path.parent) as f:
            shape, dtype, offset = read_npy_header(f)
            complete = file_size(f) == offset + npy_data_bytes(shape, dtype)
    except (StoreError, OSError, ValueError, EOFError, SyntaxError):
        return None
    return (shape[0], shape[1]) if len(shape) == 2 and complete else None


# ---------------------------------------------------------------------------------------
# .npz sidecars (index.npz, reduce-pca.npz), checked before anything is decompressed
# ---------------------------------------------------------------------------------------


MemberCheck = Callable[[tuple[int, ...], np.dtype], bool]


def load_npz(path: Path, root: Path, members: dict[str, MemberCheck], what: str,
             limit: int) -> dict[str, np.ndarray]:
    """The arrays of an .npz written by ``np.savez`` (stored, not compressed), each member
    checked before a byte of its data is read: the file is regular, inside ``root`` and at
    most ``limit`` bytes; it holds exactly ``members`` (name -> check of the shape and dtype
    its header declares, against what the store's metadata allows); every member is stored
    uncompressed with a declared size equal to its header plus its shape's bytes. So nothing
    is allocated beyond what the file holds. Anything else is one StoreError."""
    def bad(why: str) -> StoreError:
        return StoreError(f"{what} {path} {why}; it was not written by transferlab or was "
                          "altered")

    with open_untrusted(path, what, StoreError, root) as f:
        size = file_size(f)
        if size > limit:
            raise bad(f"is {size:,} bytes, more than the {limit:,} it can need")
        try:
            with zipfile.ZipFile(f) as zf:
                infos = zf.infolist()
                names = sorted(i.filename for i in infos)
                if names != sorted(f"{name}.npy" for name in members):
                    raise StoreError(f"{path} is not a transferlab {what.removeprefix('the ')} "
                                     f"(it holds {len(names)} members, not "
                                     f"{', '.join(sorted(members))})")
                return {info.filename[:-4]: _member(zf, info, members[info.filename[:-4]],
                                                     size, bad) for info in infos}
        except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, OSError,
                SyntaxError, struct.error, NotImplementedError) as exc:
            raise bad(f"is not a complete .npz ({type(exc).__name__})") from None


def _member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, check: MemberCheck, size: int,
            bad: Callable[[str], StoreError]) -> np.ndarray:
    name = info.filename
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1 or \
            info.file_size != info.compress_size or info.file_size > size:
        raise bad(f"member {name} is compressed or claims {info.file_size:,} bytes")
    with zf.open(info) as member:
        shape, dtype, offset = read_npy_header(member)
        if not check(shape, dtype):
            raise bad(f"member {name} declares {dtype} {shape}, not what the store records")
        nbytes = npy_data_bytes(shape, dtype)
        if info.file_size != offset + nbytes:
            raise bad(f"member {name} declares {shape} but holds {info.file_size:,} bytes")
        data = bytearray(nbytes)
        if member.readinto(memoryview(data)) != nbytes or member.read(1):
            raise bad(f"member {name} is cut short")
    return np.frombuffer(data, dtype).reshape(shape)


def library_versions() -> dict[str, str]:
    """Versions worth recording beside features (missing libraries are left out)."""
    from .. import __version__  # the package itself first: which transferlab wrote this

    out = {"transferlab": __version__, "python": platform.python_version(),
           "numpy": np.__version__}
    for name in ("torch", "torchvision", "timm", "PIL"):
        with contextlib.suppress(Exception):
            out[name] = __import__(name).__version__
    return out

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
import json
import platform
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime.atomicfile import atomic_write

FORMAT = "transferlab-feature-store"
VERSION = 1
DTYPES = ("float16", "float32")
META, INDEX, FAILURES, FINGERPRINT = "meta.json", "index.csv", "failures.csv", "fingerprint.json"
SHARDS, FAILURE_LOG, LOCK = "shards", "failures.jsonl", ".lock"
PCA_FILE = "reduce-pca.npz"  # output.reduce=pca:D: the fitted projection (extract/reduce.py)
RESERVED_META = ("format", "version", "fingerprint", "dtype", "dim", "rows", "num_keys",
                 "num_failures", "shard_size", "shards", "written_at")


def shard_name(n: int) -> str:
    return f"shard-{n:05d}"


# ---------------------------------------------------------------------------------------
# Small file helpers
# ---------------------------------------------------------------------------------------


def _write_json(path: Path, data: Any) -> None:
    atomic_write(path, lambda f: json.dump(data, f, indent=1, ensure_ascii=False, default=str))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # a crafted 100k-deep file: unreadable
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


def _npy_rows(path: Path) -> tuple[int, int] | None:
    """(rows, dim) of a complete 2-D .npy file, or None if it is missing or damaged."""
    try:
        shape = np.load(path, mmap_mode="r", allow_pickle=False).shape  # checks the size too
    except (OSError, ValueError, EOFError):
        return None
    return (int(shape[0]), int(shape[1])) if len(shape) == 2 else None


def library_versions() -> dict[str, str]:
    """Versions worth recording beside features (missing libraries are left out)."""
    out = {"python": platform.python_version(), "numpy": np.__version__}
    for name in ("torch", "torchvision", "timm", "PIL"):
        with contextlib.suppress(Exception):
            out[name] = __import__(name).__version__
    return out

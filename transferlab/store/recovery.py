"""Reopening a store a killed run left: what is finished, what to delete, what to redo.

Pure reading plus the deletion of the store's own unfinished files: a shard counts only if
its ``.json`` (written last) and a complete ``.npy`` agree, and the shards that count are
a gap-free run from ``shard-00000``.
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..config import MAX_KEY_CHARS
from ..errors import StoreError
from ..runtime.atomicfile import atomic_write
from ..runtime.untrusted import file_size, lkind, open_untrusted
from .format import (
    FAILURE_LOG,
    FAILURES_LIMIT,
    JSON_LIMIT,
    MAX_REASON_CHARS,
    SHARDS,
    _npy_rows,
    _read_json,
    shard_name,
)
from .owner import _SHARD_FILE, CONFIG, OWN_FILES, _regular, remove_temporaries


@dataclass
class Recovered:
    parts: list[dict]  # each finished shard's keys/labels/views/rows/split_key
    dim: int | None
    done: set[str]  # keys whose rows are all on disk
    partial: dict[str, set[int]]  # the key split over the last shard: its views on disk
    failures: dict[str, str]  # logged failures still to retry


def recover(directory: Path, fsync: bool = True) -> Recovered:
    """The finished part of the store at ``directory``; its unfinished files are deleted."""
    shards = directory / SHARDS
    remove_temporaries(directory, lambda name: name in (*OWN_FILES, CONFIG))
    remove_temporaries(shards, lambda name: bool(_SHARD_FILE.fullmatch(name))
                       or name == FAILURE_LOG)
    parts, dim = finished_parts(shards, directory)
    for entry in os.scandir(shards):
        match = _SHARD_FILE.fullmatch(entry.name)
        if match and int(match["number"]) >= len(parts) and _regular(entry.path):
            os.unlink(entry.path)  # unfinished, or after a gap
    done, partial = done_keys(parts)
    logged = read_failure_log(shards / FAILURE_LOG, fsync, directory)
    # failed keys stay to do (retried); one read since then has rows: not a failure
    return Recovered(parts, dim, done, partial, {k: r for k, r in logged if k not in done})


def finished_parts(shards: Path, root: Path | None = None) -> tuple[list[dict], int | None]:
    parts: list[dict] = []
    dim = None
    root = shards.parent if root is None else root
    while True:
        base = shards / shard_name(len(parts))
        npy, part_file = base.with_suffix(".npy"), base.with_suffix(".json")
        if not (_regular(npy) and _regular(part_file)):
            return parts, dim
        header = _npy_rows(npy, root)
        if header is None:
            return parts, dim
        # a shard's keys: each at most MAX_KEY_CHARS (JSON-escaped: 6 bytes a character)
        part = _read_json(part_file, root, JSON_LIMIT + header[0] * (6 * MAX_KEY_CHARS + 64))
        if not isinstance(part, dict) or header[0] != part.get("rows") \
                or dim not in (None, header[1]):
            return parts, dim
        dim = header[1]
        parts.append(part)


def done_keys(parts: list[dict]) -> tuple[set[str], dict[str, set[int]]]:
    done = {key for part in parts for key in part["keys"]}
    partial: dict[str, set[int]] = {}
    split = parts[-1].get("split_key") if parts else None
    if split is not None:  # its remaining views were lost with the buffer
        done.discard(split)
        partial[split] = {v for p in parts for k, v in zip(p["keys"], p["views"]) if k == split}
    return done, partial


def read_failure_log(path: Path, fsync: bool = True, root: Path | None = None
                     ) -> list[tuple[str, str]]:
    """The complete lines of ``failures.jsonl``; a line cut by a kill is dropped. A regular
    file inside ``root`` (links never written through: see ``StoreWriter``) of at most
    ``FAILURES_LIMIT`` bytes, read line by line with each line bounded."""
    if not os.path.lexists(path):
        return []
    if not _regular(path):  # a link, a FIFO...: never read, and never appended to
        raise StoreError(f"the failure log {path} is {lkind(path)}, not a regular file; "
                         "transferlab never writes through it: remove it and rerun")
    root = path.parent.parent if root is None else root
    line_limit = 6 * (MAX_KEY_CHARS + MAX_REASON_CHARS) + 64
    items, clean = [], True
    with open_untrusted(path, "the failure log", StoreError, root) as handle:
        size = file_size(handle)
        if size > FAILURES_LIMIT:
            raise StoreError(f"{path} is {size:,} bytes, more than the {FAILURES_LIMIT:,} a "
                             "failure log can need; the store was altered: rerun with "
                             "output.overwrite=true")
        f = io.TextIOWrapper(handle, encoding="utf-8", errors="replace", newline="\n")
        while True:
            line = f.readline(line_limit + 1)
            if not line:
                break
            try:
                if not line.endswith("\n"):
                    raise ValueError("partial or overlong line")
                key, reason = json.loads(line)
                items.append((str(key), str(reason)))
            except (ValueError, TypeError, RecursionError):
                clean = False
                break
    if not clean:  # keep the complete ones
        atomic_write(path, lambda f: f.writelines(failure_lines(items)), fsync=fsync,
                     root=root, error=StoreError)
    return items


def failure_lines(items: list[tuple[str, str]]) -> list[str]:
    return [json.dumps([k, r], ensure_ascii=False) + "\n" for k, r in items]

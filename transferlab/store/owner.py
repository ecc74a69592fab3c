"""Which directories are transferlab's stores, and deleting only what a store wrote.

A directory is a store when its ``fingerprint.json`` (or ``meta.json``) carries the store
format marker. transferlab writes only into an empty directory or its own store, deletes
only its own file names there, never follows a link, and refuses anything else by name.
"""
from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import StoreError
from ..yamlsafe import shown
from .files import INDEX_SIDECAR, RANKS
from .format import (
    FAILURE_LOG,
    FAILURES,
    FINGERPRINT,
    FORMAT,
    INDEX,
    LOCK,
    META,
    PCA_FILE,
    SHARDS,
    _flatten,
    _normalized,
    _read_json,
    _write_json,
)

CONFIG = "config.yaml"  # the run's config, saved beside the store by extract; kept on a wipe
OWN_FILES = (META, INDEX, INDEX_SIDECAR, FAILURES, FINGERPRINT, PCA_FILE)
_SHARD_FILE = re.compile(r"shard-(?P<number>\d{5,})\.(npy|json)")
_TEMPORARY = re.compile(r"(?P<name>.+?)(\.\d+-\d+)?\.tmp")  # atomicfile.temporary_path (and older)
_RANK_DIR = re.compile(r"(world-\d+)|(rank-\d+)")


def fingerprint_record(fingerprint: dict, dtype: str) -> dict:
    """What ``fingerprint.json`` holds: the marker, then what the rows depend on."""
    return {"format": FORMAT, **_normalized({"fingerprint": fingerprint,
                                             "dtype": str(np.dtype(dtype))})}


def is_store(directory: Path) -> bool:
    """True if transferlab wrote ``directory`` (an earlier version's store included)."""
    record = _read_json(directory / FINGERPRINT)
    if isinstance(record, dict) and (record.get("format") == FORMAT
                                     or set(record) == {"fingerprint", "dtype"}):
        return True
    meta = _read_json(directory / META)
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def refuse_foreign(directory: Path) -> None:
    """StoreError unless ``directory`` is missing, empty or a store; run before anything is
    written there (the lock file included)."""
    if directory.exists() and not directory.is_dir():
        raise StoreError(f"output.dir {directory} is a file, not a directory; choose another "
                         "output.dir")
    if directory.is_dir() and _has_entries(directory) and not is_store(directory):
        raise StoreError(f"{directory} is not empty and is not a transferlab store (no "
                         f"{FINGERPRINT}); transferlab writes only into an empty directory or "
                         "its own store: choose another output.dir")
    for name in (SHARDS, RANKS):
        if (directory / name).is_symlink():
            raise StoreError(f"{directory / name} is a link, which transferlab never writes; "
                             "remove it or choose another output.dir")


def check_target(directory: str | os.PathLike, fingerprint: dict, dtype: str,
                 overwrite: bool = False) -> None:
    """StoreError for what ``prepare_store`` would refuse (a user's folder, a link, a store
    of another configuration without ``overwrite``), found without writing anything: a run
    of several stores checks them all before it creates any."""
    directory = Path(directory)
    refuse_foreign(directory)
    if overwrite or not directory.is_dir() or not is_store(directory):
        return
    wanted = fingerprint_record(fingerprint, dtype)
    stored = _read_json(directory / FINGERPRINT)
    if not (isinstance(stored, dict) and _compared(stored) == _compared(wanted)):
        raise StoreError(_refusal(directory, stored, wanted))


def prepare_store(directory: str | os.PathLike, fingerprint: dict, dtype: str,
                  overwrite: bool = False) -> None:
    """Make ``directory`` hold a store with this fingerprint: create it, keep it (a resume),
    refuse it naming the difference, or, with ``overwrite``, delete its own files first."""
    directory = Path(directory)
    check_target(directory, fingerprint, dtype, overwrite)
    wanted = fingerprint_record(fingerprint, dtype)
    if not is_store(directory):  # missing or empty
        directory.mkdir(parents=True, exist_ok=True)
        _write_json(directory / FINGERPRINT, wanted)
        return
    stored = _read_json(directory / FINGERPRINT)
    if isinstance(stored, dict) and _compared(stored) == _compared(wanted):
        if stored != wanted:  # an earlier version's file: add the marker
            _write_json(directory / FINGERPRINT, wanted)
        return
    wipe_store(directory)  # overwrite (check_target refused it otherwise)
    _write_json(directory / FINGERPRINT, wanted)


def _compared(record: dict) -> dict:
    return {"fingerprint": record.get("fingerprint"), "dtype": record.get("dtype")}


def _refusal(directory: Path, stored: Any, wanted: dict) -> str:
    if not isinstance(stored, dict):
        why = f"it has no readable {FINGERPRINT}"
    elif _weights(stored) == "pretrained" and _weights(wanted) != "pretrained":
        why = ("it records its weights only as 'pretrained' (an earlier transferlab), so its "
               "rows cannot be checked against the weights read now, which are named by "
               "content")
    elif _seed(_weights(stored)) is not None and _seed(_weights(wanted)) is None:
        why = (f"its rows come from random initial weights (seed {_seed(_weights(stored))}), "
               "this run's from weights it reads")
    else:
        old, new = _flatten(_compared(stored)), _flatten(_compared(wanted))
        changed = [f"{k}: stored {shown(old[k])}, now {shown(new.get(k))}"
                   for k in sorted(old) if old[k] != new.get(k)]
        unrecorded = sorted(set(new) - set(old))
        if changed:
            why = "; ".join(changed[:4]) + (" ..." if len(changed) > 4 else "")
        else:
            why = ("it was written by an earlier transferlab that did not record "
                   f"{', '.join(unrecorded[:4])}, so its rows cannot be checked against this run")
    return (f"the store {directory} was written with another configuration ({why}); use "
            "another output.dir, or set output.overwrite=true to replace it")


def _weights(record: dict) -> Any:
    fingerprint = record.get("fingerprint")
    return fingerprint.get("weights") if isinstance(fingerprint, dict) else None


def _seed(weights: Any) -> Any:
    return weights.get("random_init_seed") if isinstance(weights, dict) else None


def wipe_store(directory: str | os.PathLike) -> None:
    """Delete a store's own files (its names only, links never followed); other files stay,
    and a folder is removed only once empty."""
    directory = Path(directory)
    _remove_own(directory, lambda name: name in OWN_FILES)
    shards = directory / SHARDS
    if _real_dir(shards):
        _remove_own(shards, lambda name: bool(_SHARD_FILE.fullmatch(name))
                    or name == FAILURE_LOG)
        _remove_if_empty(shards)
    _wipe_ranks(directory / RANKS)


def _wipe_ranks(ranks: Path) -> None:
    """torchrun parts: ranks/world-N/rank-R, each its own store."""
    if not _real_dir(ranks):
        return
    for world in os.scandir(ranks):
        if _RANK_DIR.fullmatch(world.name) and _real_dir(Path(world.path)):
            for rank in os.scandir(world.path):
                part = Path(rank.path)
                if _RANK_DIR.fullmatch(rank.name) and _real_dir(part) and is_store(part):
                    wipe_store(part)
                    (part / LOCK).unlink(missing_ok=True)
                    _remove_if_empty(part)
            _remove_if_empty(Path(world.path))
    _remove_if_empty(ranks)


def remove_temporaries(directory: Path, own: Any) -> None:
    """Delete the temporary files a killed write of one of the ``own(name)`` files left."""
    for entry in os.scandir(directory):
        match = _TEMPORARY.fullmatch(entry.name)
        if match and own(match["name"]) and _regular(entry.path):
            os.unlink(entry.path)


def _remove_own(directory: Path, own: Any) -> None:
    remove_temporaries(directory, own)
    for entry in os.scandir(directory):
        if own(entry.name) and _regular(entry.path):
            os.unlink(entry.path)


def _has_entries(directory: Path) -> bool:
    return any(entry.name != LOCK for entry in os.scandir(directory))


def _regular(path: str | Path) -> bool:
    """A regular file itself, not a link to one."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _real_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _remove_if_empty(path: Path) -> None:
    if _real_dir(path) and not any(os.scandir(path)):
        path.rmdir()

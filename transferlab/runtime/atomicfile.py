"""Atomic file writes: a reader, or a run killed mid-write, sees the old file or the new
one, never half of either.

The temporary file is created exclusively and without following a link (``O_EXCL`` and
``O_NOFOLLOW``, through ``untrusted.open_inside``): a link planted under its name makes the
write fail instead of being written through, and with ``root`` (a store's directory) no
directory between ``root`` and the file may be a link. The rename replaces a link at the
final name by the file, never writing through it. The temporaries a killed run of this
machine left for the same file (its own names only: ``<name>.<pid>-<thread>.tmp`` of a
process that no longer runs, a regular file, never a link) are removed by the next write
of that file (``remove_stale_temporaries``; ``replaced`` always, ``atomic_write`` outside
a store: inside one, the store's recovery removes them under its lock, without a scan of
a folder of many shards per write).
"""
from __future__ import annotations

import contextlib
import os
import re
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..errors import TransferlabError
from .untrusted import open_inside

_TEMPORARY = re.compile(r"\.(?P<pid>\d+)-(?P<thread>\d+)\.tmp")


def temporary_path(path: str | os.PathLike) -> Path:
    """A sibling of ``path`` that no other process or thread writes (so concurrent writers
    of one file never rename each other's half-written file), ending in ``.tmp`` so that
    cleanups of a killed run find it."""
    path = Path(path)
    return path.with_name(f"{path.name}.{os.getpid()}-{threading.get_native_id()}.tmp")


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # someone else's process: assume it is writing
    return True


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete what killed writes of ``path`` left beside it: ``temporary_path`` names of
    ``path`` whose process no longer runs on this machine, regular files only (a link or
    anything else of that name stays). Returns the removed paths."""
    path = Path(path)
    removed = []
    prefix = path.name
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        match = _TEMPORARY.fullmatch(entry.name, len(prefix))
        if match is None or _running(int(match["pid"])):
            continue
        try:
            if stat.S_ISREG(os.lstat(entry.path).st_mode):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            pass
    return removed


def _create(tmp: Path, mode: str, root: str | os.PathLike | None,
            error: type[TransferlabError], **text: Any) -> Any:
    return open_inside(tmp, "x" + ("b" if "b" in mode else ""), root,
                       "the temporary file", error, **text)


@contextlib.contextmanager
def replaced(path: str | os.PathLike, root: str | os.PathLike | None = None,
             error: type[TransferlabError] = TransferlabError) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write (closed before the block ends); on
    success it is renamed over ``path``, on any exception deleted. The temporary exists
    (empty, created exclusively, no link followed) when the block starts: writers reopen it
    by name ('w' truncates the file made here)."""
    path = Path(path)
    remove_stale_temporaries(path)
    tmp = temporary_path(path)
    _create(tmp, "b", root, error).close()
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        _unlink_own(tmp)
        raise


def _unlink_own(tmp: Path) -> None:
    with contextlib.suppress(OSError):
        if stat.S_ISREG(os.lstat(tmp).st_mode):
            os.unlink(tmp)


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "w",
                 fsync: bool = True, root: str | os.PathLike | None = None,
                 error: type[TransferlabError] = TransferlabError) -> None:
    """Call ``write(file)`` on a temporary sibling, then rename it over ``path``. Text
    files are UTF-8 with newlines untranslated (csv writers choose their own). ``root``:
    the store (or output folder) ``path`` lies in, below which no directory may be a
    link; ``error`` the kind of one-line error a planted link or special file raises."""
    path = Path(path)
    kwargs = {"encoding": "utf-8", "newline": ""} if "b" not in mode else {}
    if root is None:  # a store's own (root given) are removed by its recovery, under its lock
        remove_stale_temporaries(path)
    tmp = temporary_path(path)
    f = _create(tmp, mode, root, error, **kwargs)  # before the try: a file never ours stays
    try:
        with f:
            write(f)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _unlink_own(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str, fsync: bool = False,
                      root: str | os.PathLike | None = None,
                      error: type[TransferlabError] = TransferlabError) -> None:
    atomic_write(path, lambda f: f.write(text), fsync=fsync, root=root, error=error)

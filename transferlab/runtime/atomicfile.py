"""Atomic file writes: a reader, or a run killed mid-write, sees the old file or the new
one, never half of either."""
from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def temporary_path(path: str | os.PathLike) -> Path:
    """A sibling of ``path`` that no other process or thread writes (so concurrent writers
    of one file never rename each other's half-written file), ending in ``.tmp`` so that
    cleanups of a killed run find it."""
    path = Path(path)
    return path.with_name(f"{path.name}.{os.getpid()}-{threading.get_native_id()}.tmp")


@contextlib.contextmanager
def replaced(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write (closed before the block ends); on
    success it is renamed over ``path``, on any exception deleted."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "w",
                 fsync: bool = True) -> None:
    """Call ``write(file)`` on a temporary sibling, then rename it over ``path``. Text
    files are UTF-8 with newlines untranslated (csv writers choose their own)."""
    kwargs = {"encoding": "utf-8", "newline": ""} if "b" not in mode else {}
    with replaced(path) as tmp, open(tmp, mode, **kwargs) as f:
        write(f)
        f.flush()
        if fsync:
            os.fsync(f.fileno())


def atomic_write_text(path: str | os.PathLike, text: str, fsync: bool = False) -> None:
    atomic_write(path, lambda f: f.write(text), fsync=fsync)

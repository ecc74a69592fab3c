"""One writer per output directory: a non-blocking ``flock`` on its ``.lock`` file."""
from __future__ import annotations

from pathlib import Path
from typing import IO

try:
    import fcntl
except ImportError:  # not on POSIX: no lock, as the store writer
    fcntl = None  # type: ignore[assignment]

from ..errors import ConfigError, TransferlabError
from .untrusted import open_inside

LOCK_FILE = ".lock"


def try_lock(directory: Path, error: type[TransferlabError] = ConfigError) -> IO[str] | None:
    """Create ``directory`` and take its ``.lock`` without waiting: the open handle (the lock
    lasts until it is closed), or None when another process holds it. A ``.lock`` that is a
    link, a FIFO, a device or a directory is ``error`` (one line), never followed or
    waited on."""
    directory.mkdir(parents=True, exist_ok=True)
    handle = open_inside(directory / LOCK_FILE, "a", directory, "the lock file", error,
                         encoding="utf-8")
    if fcntl is not None:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            return None
    return handle


def acquire_dir_lock(directory: Path, key: str = "output.dir") -> IO[str]:
    """Create ``directory`` and hold its lock (released when the returned handle closes).

    Another process holding it is a one-line error naming the directory and the fix, so two
    runs never interleave their outputs.
    """
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"{key} {directory} is a file, not a directory; choose another {key}")
    handle = try_lock(directory)
    if handle is None:
        raise ConfigError(f"another run is writing {directory}; wait for it to finish or "
                          f"set another {key}")
    return handle


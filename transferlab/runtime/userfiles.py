"""Files a user names for a command's output (``--out``, ``--plot``, export's ``OUT``, the
map's PNG): one policy for every command (issue #24).

- An existing file is refused unless the user asked to replace it (``--overwrite``); the
  refusal comes before any work, and again when the file is published: a file that
  appeared meanwhile is not replaced either (the new file is hard-linked into place, which
  fails on an existing name, where the file system allows it).
- A directory, FIFO, device or socket at the path is refused, with or without
  ``--overwrite``, without opening it (opening a FIFO for writing blocks until a reader
  comes).
- The file is written to a temporary sibling (``atomicfile.temporary_path``: the name the
  cleanup of a killed run recognises) and renamed into place when complete, so a killed
  run never leaves half a file under the final name. A link at the path is replaced, never
  written through.
"""
from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..errors import ConfigError, SettingError
from .atomicfile import remove_stale_temporaries, temporary_path
from .untrusted import file_kind


class OutputError(ConfigError):
    """An output path that cannot be written: a directory, a FIFO, a device."""


def _exists_message(path: Path) -> str:
    return (f"is not set and {path} already exists; choose another path, or set it to "
            "replace the file")


def check_output(path: str | os.PathLike, overwrite: bool = False,
                 what: str = "output") -> Path:
    """``path`` as a Path when a command may write it; else one line: a directory or a
    special file (FIFO, device, socket: never opened) is refused, an existing file (or a
    link, even a dangling one) unless ``overwrite`` (a SettingError naming ``overwrite``,
    which the command line shows as ``--overwrite``)."""
    path = Path(path)
    try:
        st = os.stat(path)  # follows a link: what a write by name would reach
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise OutputError(f"{what} {path} cannot be checked: {exc.strerror or exc}") from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise OutputError(f"{what} {path} is a directory; name a file in it")
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise OutputError(f"{what} {path} is {file_kind(st.st_mode)}, not a regular file; "
                          "transferlab writes outputs only as regular files: choose another path")
    if (st is not None or path.is_symlink()) and not overwrite:
        raise SettingError("overwrite", _exists_message(path))
    return path


@contextlib.contextmanager
def output_file(path: str | os.PathLike, overwrite: bool = False,
                what: str = "output") -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` for a writer that takes a file name (Parquet,
    HDF5); when the block ends without an exception it is published as ``path`` under
    the policy above, else deleted."""
    path = check_output(path, overwrite, what)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)  # what a killed run of this output left beside it
    tmp = temporary_path(path)
    try:
        yield tmp
        publish(tmp, path, overwrite, what)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_output(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "w",
                 overwrite: bool = False, what: str = "output", fsync: bool = False) -> Path:
    """Call ``write(file)`` on a new temporary sibling of ``path`` (text: UTF-8, newlines
    untranslated; ``mode`` 'w' or 'wb'), then publish it as ``path``; returns ``path``."""
    text = "b" not in mode
    with output_file(path, overwrite, what) as tmp:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        fd = os.open(tmp, flags, 0o666)
        kwargs = {"encoding": "utf-8", "newline": ""} if text else {}
        with os.fdopen(fd, "w" if text else "wb", **kwargs) as f:
            write(f)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
    return Path(path)


def publish(tmp: Path, path: Path, overwrite: bool = False, what: str = "output") -> None:
    """Move the complete ``tmp`` to ``path``: replacing whatever is there when
    ``overwrite`` (a link itself, not its target), else only onto a free name."""
    check_output(path, overwrite, what)
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # fails on an existing name: no replacement, even by a race
    except FileExistsError:
        raise SettingError("overwrite", _exists_message(path)) from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV,
                             errno.EMLINK, errno.ENOSYS):
            raise
        check_output(path, overwrite, what)  # no hard links here (FAT, some network shares)
        os.replace(tmp, path)
        return
    tmp.unlink()

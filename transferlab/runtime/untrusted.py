"""Files from places someone else may have written: a store, a config, a model folder.

The three rules every reader and writer of such a place goes through (issue #24):

- ``open_untrusted`` / ``read_bounded``: read a file only when it is a regular file (a FIFO,
  a device or a directory is refused without blocking), never through a link that leaves
  ``root``, and never more than a size limit that fits its kind; the size is checked on
  the open file (``fstat``), not on a name that could be swapped between check and open.
- ``open_inside``: create, truncate or append to a file without following a link, and only
  below ``root`` through real directories, so a planted link cannot redirect a write.
- ``claimed_size``: a number a file claims (rows, classes, pixels, dimensions) checked
  before anything is allocated from it.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import IO, Any

from ..errors import TransferlabError

_READ_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISLNK(mode):
        return "a link"
    return "not a regular file"


def within(path: Path, root: Path) -> bool:
    """True when ``path`` (resolved) lies inside ``root`` (resolved)."""
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def _no_link_below(path: Path, root: Path, what: str, error: type[TransferlabError]) -> None:
    """Refuse ``path`` when a component between ``root`` and it is a link."""
    try:
        rel = path.relative_to(root)
    except ValueError:
        raise error(f"{what} {path} is not inside {root}") from None
    current = root
    for part in rel.parts[:-1]:
        current = current / part
        if current.is_symlink():
            raise error(f"{what}: {current} is a link; transferlab does not follow links "
                        "inside a store (remove it)")


def open_untrusted(path: str | os.PathLike, what: str, error: type[TransferlabError],
                 root: str | os.PathLike | None = None) -> IO[bytes]:
    """``path`` opened for binary reading when it is a regular file.

    With ``root`` a link is followed only when its target stays inside ``root``; without
    it links are followed (a user's own file named on the command line). O_NONBLOCK: a
    FIFO would otherwise block the open forever."""
    path = Path(path)
    flags = _READ_FLAGS
    if root is not None:
        root = Path(root)
        if path.is_symlink() and not within(path, root):
            raise error(f"{what} {path} is a link to a file outside {root}; transferlab "
                        "does not follow it (replace the link by the file)")
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise error(f"{what} {path} cannot be opened: {exc.strerror or exc}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise error(f"{what} {path} is {_kind(mode)}, not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def file_size(handle: IO[Any]) -> int:
    return os.fstat(handle.fileno()).st_size


def read_bounded(path: str | os.PathLike, limit: int, what: str,
                 error: type[TransferlabError],
                 root: str | os.PathLike | None = None) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes, read once (``open_untrusted``)."""
    with open_untrusted(path, what, error, root) as handle:
        size = file_size(handle)
        if size > limit:
            raise error(f"{what} {path} is {size:,} bytes, more than the {limit:,} such a "
                        "file can need; it was not written by transferlab or was altered")
        data = handle.read(limit + 1)
    if len(data) > limit:  # grew while being read
        raise error(f"{what} {path} is larger than the {limit:,} bytes such a file can need")
    return data


_WRITE_MODES = {
    "w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
    "a": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
    "x": os.O_WRONLY | os.O_CREAT | os.O_EXCL,
}


def open_inside(path: str | os.PathLike, mode: str, root: str | os.PathLike, what: str,
                error: type[TransferlabError], **text: Any) -> IO[Any]:
    """``open(path, mode)`` for writing a file inside ``root`` without following a link:
    the file itself is opened with O_NOFOLLOW (a link there fails instead of being
    written through) and no directory between ``root`` and it may be a link. ``mode`` is
    'w', 'a' or 'x', with 'b' for binary; ``text`` goes to ``os.fdopen`` (encoding...)."""
    path, root = Path(path), Path(root)
    base = mode.replace("b", "").replace("t", "")
    if base not in _WRITE_MODES:
        raise ValueError(f"open_inside writes with 'w', 'a' or 'x', not {mode!r}")
    _no_link_below(path, root, what, error)
    try:
        fd = os.open(path, _WRITE_MODES[base] | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0), 0o644)
    except OSError:
        if path.is_symlink():
            raise error(f"{what} {path} is a link; transferlab does not write through links "
                        "inside a store (remove it)") from None
        raise
    try:
        st_mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(st_mode):
            raise error(f"{what} {path} is {_kind(st_mode)}, not a regular file (remove it)")
        os.set_blocking(fd, True)
        return os.fdopen(fd, mode, **text)
    except BaseException:
        os.close(fd)
        raise


def claimed_size(value: Any, limit: int, what: str, error: type[TransferlabError],
                 minimum: int = 0) -> int:
    """``value`` as an int in [minimum, limit], or one line: a size a file claims is checked
    before anything is allocated from it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise error(f"{what} must be a whole number, got {type(value).__name__}")
    if not minimum <= value <= limit:
        raise error(f"{what} is {value:,}: outside [{minimum:,}, {limit:,}]; the file was not "
                    "written by transferlab or was altered")
    return value

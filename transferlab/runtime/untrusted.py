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


def file_kind(mode: int) -> str:
    """What a non-regular ``st_mode`` is, in words for a one-line error."""
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


def lkind(path: str | os.PathLike) -> str:
    """What ``path`` itself is (a link not followed): "a link", "a FIFO", "a directory",
    "a regular file", ... for messages."""
    mode = os.lstat(path).st_mode
    return "a regular file" if stat.S_ISREG(mode) else file_kind(mode)


def within(path: Path, root: Path) -> bool:
    """True when ``path`` (resolved) lies inside ``root`` (resolved)."""
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def no_link_below(path: Path, root: Path, what: str, error: type[TransferlabError]) -> None:
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


_no_link_below = no_link_below  # its earlier private name


class NotRegularFile(Exception):
    """``open_regular`` found a FIFO, a device, a socket or a directory; ``kind`` says which
    ("a FIFO", ...)."""

    def __init__(self, path: str | os.PathLike, kind: str):
        super().__init__(f"{path} is {kind}, not a regular file")
        self.path, self.kind = path, kind


def open_regular(path: str | os.PathLike) -> IO[bytes]:
    """``path`` opened for binary reading when it is a regular file: the one opener of files
    from untrusted places. O_NONBLOCK: a FIFO would otherwise block the open forever; the
    kind is checked on the open file (``fstat``), not on a name that could be swapped.
    Raises the ``OSError`` of the open, or ``NotRegularFile``; ``open_untrusted`` (and
    ``data.imageio``) turn them into one-line errors of their own kind."""
    fd = os.open(path, _READ_FLAGS)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(path, file_kind(mode))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def open_untrusted(path: str | os.PathLike, what: str, error: type[TransferlabError],
                   root: str | os.PathLike | None = None) -> IO[bytes]:
    """``path`` opened for binary reading when it is a regular file.

    With ``root`` the file must lie inside ``root`` once every link on the way is resolved
    (a link to a file outside, or below a linked directory leading out, is refused); without
    it links are followed (a user's own file named on the command line)."""
    path = Path(path)
    if root is not None and not within(path, Path(root)):
        raise error(f"{what} {path} leads outside {root} through a link; transferlab does "
                    "not follow it (replace the link by the file)")
    try:
        return open_regular(path)
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except NotRegularFile as exc:
        raise error(f"{what} {path} is {exc.kind}, not a regular file") from None
    except OSError as exc:
        raise error(f"{what} {path} cannot be opened: {exc.strerror or exc}") from None


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


def open_inside(path: str | os.PathLike, mode: str, root: str | os.PathLike | None, what: str,
                error: type[TransferlabError], **text: Any) -> IO[Any]:
    """``open(path, mode)`` for writing a file inside ``root`` without following a link:
    the file itself is opened with O_NOFOLLOW (a link there fails instead of being
    written through) and no directory between ``root`` and it may be a link (``root``
    None: only the file itself is checked). ``mode`` is 'w', 'a' or 'x', with 'b' for
    binary; ``text`` goes to ``os.fdopen`` (encoding...). A FIFO, device or directory there
    is refused without blocking; an 'x' onto an existing regular file is FileExistsError."""
    path = Path(path)
    base = mode.replace("b", "").replace("t", "")
    if base not in _WRITE_MODES:
        raise ValueError(f"open_inside writes with 'w', 'a' or 'x', not {mode!r}")
    if root is not None:
        no_link_below(path, Path(root), what, error)
    try:
        fd = os.open(path, _WRITE_MODES[base] | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0), 0o644)
    except OSError as exc:
        try:
            st_mode = os.lstat(path).st_mode
        except OSError:
            st_mode = None
        if st_mode is not None and stat.S_ISLNK(st_mode):
            raise error(f"{what} {path} is a link; transferlab does not write through links "
                        "(remove it)") from None
        if st_mode is not None and not stat.S_ISREG(st_mode):
            raise error(f"{what} {path} is {file_kind(st_mode)}, not a regular file (remove "
                        "it)") from None
        if isinstance(exc, FileExistsError):
            raise
        raise error(f"{what} {path} cannot be written: {exc.strerror or exc}") from None
    try:
        st_mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(st_mode):
            raise error(f"{what} {path} is {file_kind(st_mode)}, not a regular file (remove it)")
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

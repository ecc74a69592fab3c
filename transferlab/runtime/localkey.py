"""A secret that only this user on this machine holds, to recognise files transferlab wrote
itself (a FAISS index, issue #24) among files that came with a store someone else wrote.

The key is 32 random bytes (``os.urandom``), hex in ``$TRANSFERLAB_INDEX_KEY_FILE``, else
``$XDG_CONFIG_HOME/transferlab/index.key``, else ``~/.config/transferlab/index.key``: never
inside a store, so it never travels with one. It is created once, atomically (a complete
file linked into place; two processes creating it at once agree on one key), mode 0600,
and used only while it is a regular file owned by this user that nobody else can read.
A file is recognised by an HMAC-SHA256 tag over its bytes (``tag`` / ``tagged``).
"""
from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import stat
from pathlib import Path

from ..errors import ConfigError
from .atomicfile import temporary_path
from .untrusted import file_size, open_untrusted

KEY_ENV = "TRANSFERLAB_INDEX_KEY_FILE"
_KEY_BYTES = 32


class LocalKeyError(ConfigError):
    """The local key cannot be created or is not safe to use."""


def index_key_path() -> Path:
    """Where the key lives (see the module's text)."""
    named = os.environ.get(KEY_ENV)
    if named:
        return Path(named).expanduser()
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"),
                                                               ".config")
    return Path(config) / "transferlab" / "index.key"


def local_key(create: bool = False) -> bytes | None:
    """The key; None when there is none and ``create`` is False. LocalKeyError (one line)
    when it cannot be created or read, or others could read or replace it."""
    path = index_key_path()
    if not os.path.lexists(path):
        if not create:
            return None
        _create(path)
    return _read(path)


def _fix() -> str:
    return f"set {KEY_ENV} to a file path only you can write"


def _create(path: Path) -> None:
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = temporary_path(path)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        fd = os.open(tmp, flags, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="ascii") as f:
                f.write(os.urandom(_KEY_BYTES).hex() + "\n")
                f.flush()
                os.fsync(f.fileno())
            with contextlib.suppress(FileExistsError):  # another process made one: use it
                os.link(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as exc:
        raise LocalKeyError(f"cannot create the index key {path}: {exc.strerror or exc}; "
                            f"{_fix()}") from None


def _read(path: Path) -> bytes:
    with open_untrusted(path, "the index key", LocalKeyError) as handle:
        st = os.fstat(handle.fileno())
        if st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise LocalKeyError(f"the index key {path} is not private (owner uid {st.st_uid}, "
                                f"mode {stat.S_IMODE(st.st_mode):o}); remove it (a new one "
                                f"is made) or chmod 600 it")
        if file_size(handle) > 4 * _KEY_BYTES:
            raise LocalKeyError(f"the index key {path} is not a transferlab key; remove it")
        text = handle.read(4 * _KEY_BYTES)
    try:
        key = bytes.fromhex(text.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        key = b""
    if len(key) != _KEY_BYTES:
        raise LocalKeyError(f"the index key {path} is not a transferlab key (or is being "
                            "written); remove it and rebuild the index")
    return key


def tag(key: bytes, payload: bytes) -> str:
    """The HMAC-SHA256 of ``payload`` under ``key``, hex."""
    return hmac.new(key, payload, hashlib.sha256).hexdigest()


def tagged(key: bytes, payload: bytes, claimed: object) -> bool:
    """Whether ``claimed`` is ``payload``'s tag under ``key`` (constant-time compare)."""
    return isinstance(claimed, str) and hmac.compare_digest(tag(key, payload), claimed)

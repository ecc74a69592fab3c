"""Reading data from object storage and web servers through fsspec, with bounded retries.

``data.root``, ``data.list_file`` and ``data.urls`` may be ``s3://``, ``gs://``,
``http(s)://`` or ``file://`` URLs. ``file://`` is a local path (read by the local code, with
its regular-file checks). The other schemes go through fsspec: s3fs and gcsfs are the extras
``transferlab[s3]`` and ``transferlab[gcs]``; a missing one is a one-line
``MissingDependencyError`` naming it.

Credentials and endpoints come from the environment only (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, ``GOOGLE_APPLICATION_CREDENTIALS``, ...), never from a
config file: configs are saved beside every output and shared, secrets must not be.

Network errors are retried ``ATTEMPTS`` times with exponential backoff (``BACKOFF_S``,
doubled each time); what still fails is a one-line ``DataError`` when listing (before the
model loads), and an item failure ``unreadable: ...`` when reading one image, so one
flaky object never ends a run.
"""
from __future__ import annotations

import io
import logging
import time
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from PIL import Image

from ..config import MAX_KEY_CHARS
from ..errors import DataError, MissingDependencyError, TransferlabError
from ..runtime.untrusted import file_size, open_untrusted
from .imageio import UNREADABLE, ImageDecodeError, decode_bytes, is_image_file

log = logging.getLogger(__name__)
T = TypeVar("T")

# scheme -> the extra that installs its fsspec implementation (http needs aiohttp only)
SCHEMES = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "http": None, "https": None}
ATTEMPTS = 4  # tries per request (the first included)
BACKOFF_S = 0.25  # sleep before the second try; doubled before each further one
MAX_TEXT_BYTES = 1 << 30  # a list file is read whole into memory (1 GiB: some 20M paths)
# Errors that retrying cannot cure: a missing object, no permission, a bad request, our own
# verdicts (a shard that is not a tar file).
PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
             ValueError, TypeError, ImportError, TransferlabError)


def scheme(path: str | Path) -> str:
    text = str(path)
    return text.split("://", 1)[0].lower() if "://" in text else ""


def is_remote(path: str | Path | None) -> bool:
    """True for URLs read through fsspec (not for local paths and ``file://``)."""
    return path is not None and scheme(path) in SCHEMES


def local_path(path: str | Path) -> Path:
    """A local path, or the path of a ``file://`` URL (``~`` expanded)."""
    text = str(path)
    if scheme(text) == "file":
        text = urllib.parse.unquote(urllib.parse.urlparse(text).path)
    return Path(text).expanduser()


def absolute(path: str | None) -> str | None:
    """``path`` as fingerprints name it: the same folder named from another working directory
    is the same data; a URL (s3://, gs://, http(s)://, file://) is already absolute and stays
    as written."""
    if path is None or "://" in str(path):
        return path
    return str(Path(path).expanduser().resolve())


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) of ``url``. Only retry and timeout settings are
    passed: credentials and endpoint are the environment's."""
    import fsspec

    kind = scheme(url)
    # listings are not cached: a notebook's second run must see objects added since
    options: dict[str, Any] = {"use_listings_cache": False} if SCHEMES.get(kind) else {}
    if SCHEMES.get(kind) == "s3":  # our retries with backoff replace botocore's own
        options["config_kwargs"] = {"connect_timeout": 5, "read_timeout": 60,
                                    "retries": {"max_attempts": 1}}
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
    except ImportError:
        raise MissingDependencyError(missing_message(kind)) from None
    if hasattr(fs, "retries"):  # ... and s3fs's (a class attribute, not an option)
        fs.retries = 1
    return fs, path


def missing_message(kind: str) -> str:
    extra = SCHEMES.get(kind)
    fix = f'pip install "transferlab[{extra}]"' if extra else "pip install aiohttp"
    return f"reading {kind}:// URLs needs an fsspec backend that is not installed; run {fix}"


def retrying(what: str, call: Callable[[], T], attempts: int | None = None) -> T:
    """``call()``, tried again after transient errors with exponential backoff; the last
    error is raised as it is (callers turn it into their one-line message)."""
    attempts = ATTEMPTS if attempts is None else attempts
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except PERMANENT:
            raise
        except Exception as exc:  # network stacks raise many kinds
            if attempt == attempts:
                raise
            delay = BACKOFF_S * 2 ** (attempt - 1)
            log.debug("%s failed (%s: %s), try %d of %d in %.2f s", what, type(exc).__name__,
                      exc, attempt + 1, attempts, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def error_line(exc: BaseException) -> str:
    """One line naming an exception (network errors can span lines)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]


def unreachable(url: str, exc: BaseException, key: str) -> DataError:
    """The one-line error for a listing request that kept failing."""
    if isinstance(exc, FileNotFoundError):
        return DataError(f"{key} {url!r} not found; fix {key}")
    if isinstance(exc, PermissionError):
        return DataError(f"{key} {url!r}: access denied ({error_line(exc)}); check the "
                         "credentials in the environment (AWS_PROFILE, AWS_ACCESS_KEY_ID, ...)")
    tries = "" if isinstance(exc, PERMANENT) else f" after {ATTEMPTS} tries"
    return DataError(f"cannot read {key} {url!r}{tries} ({error_line(exc)}); "
                     "check the network and the endpoint (AWS_ENDPOINT_URL for S3-compatible "
                     "servers)")


def call_listing(url: str, key: str, call: Callable[[], T]) -> T:
    """A request made while building the dataset: retried, then one DataError line."""
    try:
        return retrying(url, call)
    except TransferlabError:
        raise
    except Exception as exc:
        raise unreachable(url, exc, key) from None


def read_bytes(url: str, start: int | None = None, end: int | None = None,
               key: str = "data.root") -> bytes:
    """The bytes of ``url`` (``[start, end)`` when given), retried; DataError when it fails."""
    fs, path = filesystem(url)
    return call_listing(url, key, lambda: fs.cat_file(path, start=start, end=end))


def read_text(path: str | Path, key: str = "data.list_file", limit: int | None = None) -> str:
    """A text file (a list file), local or remote, of at most ``limit`` bytes, as UTF-8 (a BOM
    dropped), line ends kept as written (CSV fields may hold them); ``UnicodeDecodeError``
    when it is not UTF-8. A local file is read only when it is a regular file (a FIFO or a
    device is one line, never a hang: ``runtime.untrusted.open_untrusted``)."""
    limit = MAX_TEXT_BYTES if limit is None else limit
    if is_remote(path):
        data = read_at_most(str(path), limit, key)
    else:
        with open_untrusted(local_path(path), key, DataError) as f:
            _check_text_size(path, file_size(f), limit, key)
            data = f.read(limit + 1)
    _check_text_size(path, len(data), limit, key)  # grew while being read
    return data.decode("utf-8-sig")


def open_text(path: str | Path, key: str = "data.list_file") -> io.StringIO:
    """``read_text`` as a file object (``newline=""``, as ``csv`` wants it)."""
    return io.StringIO(read_text(path, key), newline="")


def _check_text_size(path: str | Path, size: int, limit: int, key: str) -> None:
    if size > limit:
        raise DataError(f"{key} {path} holds more than {limit:,} bytes ({size:,}); a list that "
                        "long is not read into memory: split the data into tar shards "
                        "(data.source=webdataset) or into several lists")


def read_at_most(url: str, limit: int, key: str) -> bytes:
    """At most ``limit + 1`` bytes of object ``url`` (whatever size it claims), retried."""
    fs, path = filesystem(url)

    def call() -> bytes:
        with fs.open(path, "rb") as f:
            size = getattr(f, "size", None)
            if isinstance(size, int) and size > limit:
                _check_text_size(url, size, limit, key)
            return f.read(limit + 1)

    return call_listing(url, key, call)


def object_info(url: str, key: str) -> dict:
    """fsspec ``info`` of ``url`` (``type``: file or directory, ``size``), retried."""
    fs, path = filesystem(url)
    return call_listing(url, key, lambda: fs.info(path))


def find_images(root: str, extensions: list[str]) -> list[str]:
    """Sorted keys (relative to ``root``, '/'-separated) of the image objects under ``root``;
    hidden names (a part starting with '.') are skipped as in a local folder."""
    fs, path = filesystem(root)
    info = object_info(root, "data.root")
    if info.get("type") != "directory":
        raise DataError(f"data.root {root!r} is an object, not a folder; point data.root to "
                        "the image folder (a prefix ending in /)")
    base = path.rstrip("/") + "/"
    found = call_listing(root, "data.root", lambda: fs.find(path))
    keys = sorted(k for k in (p[len(base):] for p in found if p.startswith(base))
                  if not any(part.startswith(".") for part in k.split("/"))
                  and is_image_file(k, extensions))
    longest = max(keys, key=len, default="")
    if len(longest) > MAX_KEY_CHARS:  # keys are written to a store's index
        raise DataError(f"data.root {root!r} holds an object key of {len(longest):,} characters "
                        f"(at most {MAX_KEY_CHARS:,}): {longest[:80]}...; rename it or move it "
                        "out of data.root")
    return keys


def join(base: str, key: str) -> str:
    return base.rstrip("/") + "/" + key


class UrlReader:
    """``ImageDataset`` reader of images stored as objects ``base/key`` (folder or list
    sources with a URL root): each image is one request, retried; what still fails after
    the retries is an item failure ``unreadable: ...``."""

    def __init__(self, base: str, keys: Sequence[str], max_pixels: int | None,
                 rejected: dict[str, tuple[str, str]] | None = None):
        self.base = base
        self.keys = list(keys)
        self.max_pixels = max_pixels
        self.rejected = dict(rejected or {})

    def path(self, i: int) -> None:
        return None  # no local file: readers that need one (GPU decoding) read bytes()

    def url(self, i: int) -> str:
        return join(self.base, self.keys[i])

    def bytes(self, i: int) -> bytes:
        """The encoded image of item ``i``; raises ``ImageDecodeError`` after the retries."""
        key = self.keys[i]
        if key in self.rejected:
            raise ImageDecodeError(*self.rejected[key], path=key)
        url = self.url(i)
        try:
            fs, path = filesystem(url)
            return retrying(url, lambda: fs.cat_file(path))
        except FileNotFoundError:
            raise ImageDecodeError("missing", "no such object", key) from None
        except MissingDependencyError:
            raise
        except Exception as exc:
            raise ImageDecodeError(UNREADABLE, f"after {ATTEMPTS} tries: {error_line(exc)}",
                                   key) from None

    def load(self, i: int, mode: str, draft_size: tuple[int, int] | None) -> Image.Image:
        return decode_bytes(self.bytes(i), self.keys[i], mode, draft_size, self.max_pixels)

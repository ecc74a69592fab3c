"""``data.source: webdataset``: WebDataset tar shards as a map-style dataset, read in place.

A WebDataset shard is a plain tar file whose members are grouped into samples by their
key: the member name up to the first dot of its file name (``a/0001.jpg`` and
``a/0001.cls`` are the members ``jpg`` and ``cls`` of sample ``a/0001``; consecutive members
with one key form one sample, as WebDataset reads them).

- ``data.urls``: the shards, a list or one string with brace expansion
  (``shards/train-{000000..000123}.tar``, ``{a,b}``); local paths or URLs (``remote``).
- Every sample with an image member (its extension in ``data.extensions``; the first one
  when there are several) is one item keyed ``<shard name>/<sample key>``, the shard name
  being its file name without ``.tar``. Items keep shard order, then tar order, so a killed
  run resumes on the same items and the keys are stable.
- ``data.label_key`` names the member with the label: ``cls`` (an integer, as WebDataset
  writes it), ``txt`` (a class name; names sorted give the labels) or ``json`` (its
  ``"label"`` value, integer or class name). A sample without a readable label gets -1.
  Other members are ignored.

Listing reads each shard's tar headers once (and its label members); nothing is unpacked to
disk. Items are read by offset: a local shard by seek + read, a remote one through windows
of ``WINDOW`` bytes fetched by the loader worker that needs them (at most ``KEEP_WINDOWS``
kept per worker), so neighbouring items of a batch cost one request.

Bad data are item failures with a reason, never a crash: an undecodable member is
``corrupt`` or ``not-an-image``; a member cut off by the end of a truncated shard is
``truncated`` (the members before it are read); when the tar structure itself breaks
(a damaged header, a shard cut between members) a failure ``<shard>/@<byte>`` says from
where on the shard was lost. A member name that is absolute or uses ``..`` is
``outside-root`` and never read. A missing shard, or a file that is not a tar at all, is a
one-line ``DataError`` before the model loads.

Under torchrun every rank takes whole shards, contiguous runs of them
(``runtime.distributed.part_range`` over the shards), so no shard is read by two ranks and
the merged store lists the items in the order of a single-process run.
"""
from __future__ import annotations

import json
import logging
import posixpath
import re
import tarfile
import urllib.parse
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from ..config import DataConfig
from ..errors import DataError
from .datasets import ImageDataset
from .imageio import (
    BAD_NAME,
    CORRUPT,
    OUTSIDE_ROOT,
    TRUNCATED,
    UNREADABLE,
    ImageDecodeError,
    decode_bytes,
    escape_name,
)
from .remote import (
    call_listing,
    error_line,
    filesystem,
    is_remote,
    local_path,
    object_info,
    retrying,
)

log = logging.getLogger(__name__)

WINDOW = 8 << 20  # bytes of a remote shard fetched per request (whole members)
KEEP_WINDOWS = 2  # windows kept per loader worker
SCAN_BLOCK = 1 << 20  # read-ahead while listing a remote shard's headers
MAX_LABEL_BYTES = 1 << 16  # a label member larger than this is not read
MAX_SHARDS = 1_000_000  # brace expansion bound (a typo like {0..999999999} is an error)
LABEL_KEYS = ("cls", "txt", "json")
_BRACE = re.compile(r"\{([^{}]*)\}")


# ---------------------------------------------------------------------------------------
# Shard names
# ---------------------------------------------------------------------------------------


def expand_urls(spec: str | list[str]) -> list[str]:
    """Shard URLs of ``data.urls``: each string brace-expanded (``{000..012}`` zero-padded
    ranges, ``{a,b}`` alternatives), lists flattened, order kept."""
    if isinstance(spec, (list, tuple)):
        return [url for item in spec for url in expand_urls(item)]
    match = _BRACE.search(spec)
    if match is None:
        return [spec]
    head, tail = spec[:match.start()], spec[match.end():]
    out = [url for option in _brace_options(match.group(1), spec)
           for url in expand_urls(head + option + tail)]
    if len(out) > MAX_SHARDS:
        raise DataError(f"data.urls {spec!r} names {len(out)} shards (more than {MAX_SHARDS}); "
                        "check the brace range")
    return out


def _brace_options(body: str, spec: str) -> list[str]:
    if "," in body or ".." not in body:
        return body.split(",")
    first, last = body.split("..", 1)
    if not (first.isdigit() and last.isdigit()):
        raise DataError(f"data.urls {spec!r}: the range {{{body}}} must be two integers like "
                        "{000000..000123}; fix data.urls")
    a, b = int(first), int(last)
    if abs(b - a) >= MAX_SHARDS:
        raise DataError(f"data.urls {spec!r}: the range {{{body}}} names more than "
                        f"{MAX_SHARDS} shards; check the brace range")
    width = len(first) if first.startswith("0") or len(first) == len(last) else 0
    step = 1 if b >= a else -1
    return [str(i).zfill(width) for i in range(a, b + step, step)]


def tar_shard_name(url: str) -> str:
    """The file name of a shard URL or path without ``.tar``: the first part of its keys."""
    path = urllib.parse.urlparse(url).path if "://" in url else url
    name = posixpath.basename(path.replace("\\", "/").rstrip("/"))
    return name[:-4] if name.lower().endswith(".tar") else name


def split_member(name: str) -> tuple[str, str]:
    """WebDataset's rule: ``dir/key.ext.more`` -> (``dir/key``, ``ext.more``)."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


# ---------------------------------------------------------------------------------------
# Listing a shard: tar headers only (and the small label members)
# ---------------------------------------------------------------------------------------


@dataclass
class Sample:
    key: str  # <shard name>/<sample key>
    offset: int = 0  # of the image member's data in the shard
    size: int = 0
    label: str | None = None  # the label member's text
    rejected: tuple[str, str] | None = None  # (reason, detail): never read


@dataclass
class ShardIndex:
    url: str
    name: str
    size: int
    samples: list[Sample] = field(default_factory=list)


def _image_ext(members: dict[str, tarfile.TarInfo], wanted: set[str]) -> str | None:
    return next((ext for ext in members if "." + ext.lower() in wanted), None)


def _rejection(key: str, member: tarfile.TarInfo, shard_size: int) -> tuple[str, str] | None:
    parts = key.split("/")
    if key.startswith("/") or ".." in parts:
        return OUTSIDE_ROOT, "member name leaves the shard (absolute or '..'); never read"
    if not member.isreg():
        return UNREADABLE, "not a regular file member (link or device); never read"
    end = member.offset_data + member.size
    if end > shard_size:
        return TRUNCATED, (f"member data ends at byte {end} but the shard has {shard_size} "
                           "bytes: the shard is cut short, re-copy it")
    return None


def _read_members(tar: tarfile.TarFile, label_key: str | None
                  ) -> tuple[list[tuple[str, dict[str, tarfile.TarInfo]]], dict[int, bytes],
                             str | None]:
    """Members grouped by sample key in tar order, label bytes by group, and the error that
    stopped the listing early (None at a proper end)."""
    groups: list[tuple[str, dict[str, tarfile.TarInfo]]] = []
    labels: dict[int, bytes] = {}
    while True:
        try:
            member = tar.next()
        except tarfile.TarError as exc:  # the structure breaks here: keep what came before
            return groups, labels, error_line(exc)
        if member is None:
            return groups, labels, None
        tar.members.clear()  # tarfile keeps every header; ours are in groups
        key, ext = split_member(member.name)
        if not groups or groups[-1][0] != key:
            groups.append((key, {}))
        groups[-1][1].setdefault(ext, member)
        if ext == label_key and member.isreg() and member.size <= MAX_LABEL_BYTES:
            handle = tar.extractfile(member)
            if handle is not None:
                labels[len(groups) - 1] = handle.read()


def scan_tar(fileobj: BinaryIO, size: int, url: str, extensions: list[str],
             label_key: str | None) -> ShardIndex:
    """The samples of one shard (``fileobj`` positioned at 0, ``size`` bytes long)."""
    name = tar_shard_name(url)
    try:
        tar = tarfile.open(fileobj=fileobj, mode="r:")
    except tarfile.TarError as exc:
        raise DataError(f"data.urls: {url} is not a tar file or is cut before its first "
                        f"member ({error_line(exc)}); re-copy it or drop it from data.urls"
                        ) from None
    groups, labels, stopped = _read_members(tar, label_key)
    wanted = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
    index, seen = ShardIndex(url, name, size), set()
    for g, (key, members) in enumerate(groups):
        ext = _image_ext(members, wanted)
        if ext is None or key in seen:
            if ext is not None:
                log.warning("%s: sample %r appears twice; the later one is skipped", url, key)
            continue
        seen.add(key)
        member, full = members[ext], f"{name}/{key}"
        rejected = _rejection(key, member, size)
        escaped = escape_name(full)
        if escaped is not None:
            full, rejected = escaped, (BAD_NAME, "member name is not valid UTF-8")
        raw = labels.get(g)
        text = raw.decode("utf-8", "replace").strip() if raw is not None else None
        index.samples.append(Sample(full, member.offset_data, member.size, text, rejected))
    _note_lost_tail(index, tar.offset, stopped)
    return index


def _note_lost_tail(index: ShardIndex, offset: int, stopped: str | None) -> None:
    """A failure ``<shard>/@<byte>`` when members after ``offset`` could not be listed: the
    listing stopped on an error, or the shard ends without tar's end-of-archive blocks."""
    cut_member = any(s.rejected and s.rejected[0] == TRUNCATED for s in index.samples)
    if cut_member:
        return  # the truncated member carries the reason
    if stopped is not None:
        detail = f"tar structure broken at byte {offset} ({stopped}): later members are lost"
    elif offset + 2 * tarfile.BLOCKSIZE > index.size:
        detail = (f"the shard ends at byte {index.size} without tar's end-of-archive blocks: "
                  "it is cut short, later members are lost")
    else:
        return
    index.samples.append(Sample(f"{index.name}/@{offset}", rejected=(
        TRUNCATED if stopped is None else CORRUPT, detail + "; re-copy the shard")))


def scan_shard(url: str, extensions: list[str], label_key: str | None) -> ShardIndex:
    """List one shard, local or remote (remote: retried as a whole on network errors)."""
    if not is_remote(url):
        path = local_path(url)
        try:
            with open(path, "rb") as f:
                return scan_tar(f, path.stat().st_size, url, extensions, label_key)
        except FileNotFoundError:
            raise DataError(f"data.urls: shard {url} not found; fix data.urls") from None
        except OSError as exc:
            raise DataError(f"data.urls: cannot read shard {url} ({error_line(exc)}); fix its "
                            "permissions or data.urls") from None
    fs, path = filesystem(url)

    def attempt() -> ShardIndex:
        with fs.open(path, "rb", block_size=SCAN_BLOCK, cache_type="readahead") as f:
            return scan_tar(f, int(f.size), url, extensions, label_key)

    return call_listing(url, "data.urls", attempt)


# ---------------------------------------------------------------------------------------
# Reading members by offset
# ---------------------------------------------------------------------------------------


class TarReader:
    """``ImageDataset`` reader: item ``i`` is ``size[i]`` bytes at ``offset[i]`` of shard
    ``shard[i]``. Remote shards are read in windows cached per process (loader worker)."""

    def __init__(self, shards: list[ShardIndex], max_pixels: int | None):
        samples = [(j, s) for j, shard in enumerate(shards) for s in shard.samples]
        self.urls = [s.url for s in shards]
        self.sizes = np.array([s.size for s in shards], np.int64)
        self.keys = [s.key for _, s in samples]
        self.shard = np.array([j for j, _ in samples], np.int64)
        self.offset = np.array([s.offset for _, s in samples], np.int64)
        self.size = np.array([s.size for _, s in samples], np.int64)
        self.rejected = {s.key: s.rejected for _, s in samples if s.rejected is not None}
        self.max_pixels = max_pixels
        self._windows: OrderedDict[tuple[int, int], bytes] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:  # spawned workers start with an empty cache
        return {**self.__dict__, "_windows": OrderedDict()}

    def path(self, i: int) -> None:
        return None  # members are not files

    def bytes(self, i: int) -> bytes:
        """The encoded image of item ``i``; raises ``ImageDecodeError``."""
        key = self.keys[i]
        if key in self.rejected:
            raise ImageDecodeError(*self.rejected[key], path=key)
        j, start, size = int(self.shard[i]), int(self.offset[i]), int(self.size[i])
        url = self.urls[j]
        try:
            if not is_remote(url):
                with open(local_path(url), "rb") as f:
                    f.seek(start)
                    data = f.read(size)
            else:
                data = self._remote(i, j, start, size)
        except Exception as exc:
            raise ImageDecodeError(UNREADABLE, f"shard {url}: {error_line(exc)}", key) from None
        if len(data) != size:
            raise ImageDecodeError(TRUNCATED, f"{len(data)} of {size} bytes in shard {url} "
                                   "(changed since listing?)", key)
        return data

    def _remote(self, i: int, j: int, start: int, size: int) -> bytes:
        for (shard, begin), data in self._windows.items():
            if shard == j and begin <= start and start + size <= begin + len(data):
                return data[start - begin:start - begin + size]
        end = self._window_end(i, j, start + size)
        fs, path = filesystem(self.urls[j])
        data = retrying(self.urls[j], lambda: fs.cat_file(path, start=start, end=end))
        begin = start
        if len(data) != end - start:
            if len(data) != self.sizes[j]:
                raise OSError(f"asked for bytes {start}-{end}, got {len(data)} bytes")
            begin = 0  # a server that ignores Range sent the whole shard: keep it
        self._windows[(j, begin)] = data
        while len(self._windows) > KEEP_WINDOWS:
            self._windows.popitem(last=False)
        return data[start - begin:start - begin + size]

    def _window_end(self, i: int, j: int, end: int) -> int:
        """End of the window from item ``i``: whole following members of the same shard
        while they fit in ``WINDOW`` bytes (at least item ``i`` itself)."""
        limit = int(self.offset[i]) + WINDOW
        k = i + 1
        while k < len(self.keys) and self.shard[k] == j and self.offset[k] + self.size[k] <= limit:
            end = max(end, int(self.offset[k] + self.size[k]))
            k += 1
        return min(end, int(self.sizes[j]))

    def load(self, i: int, mode: str, draft_size: tuple[int, int] | None) -> Image.Image:
        return decode_bytes(self.bytes(i), self.keys[i], mode, draft_size, self.max_pixels)


# ---------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------


def build_webdataset(cfg: DataConfig) -> ImageDataset:
    """The items of the shards ``cfg.urls`` names (see the module docstring)."""
    if not cfg.urls:
        raise DataError('data.source=webdataset needs data.urls, e.g. '
                        '"shards/train-{000000..000123}.tar" or a list of shard paths/URLs')
    if cfg.label_key is not None and cfg.label_key not in LABEL_KEYS:
        raise DataError(f"data.label_key must be one of {', '.join(LABEL_KEYS)} (or null)")
    urls = expand_urls(cfg.urls)
    _check_names(urls)
    _check_present(urls)
    with ThreadPoolExecutor(max_workers=min(8, len(urls))) as pool:  # remote: hide latency
        shards = list(pool.map(lambda u: scan_shard(u, cfg.extensions, cfg.label_key), urls))
    reader = TarReader(shards, cfg.max_image_pixels)
    if not any(s.rejected is None for shard in shards for s in shard.samples):
        raise DataError(f"no readable image members with extensions {', '.join(cfg.extensions)}"
                        f" in the {len(urls)} shards of data.urls; check data.urls or "
                        "data.extensions")
    raw = [s.label for shard in shards for s in shard.samples]
    labels, class_names = parse_labels(raw, cfg.label_key)
    return ImageDataset(reader, reader.keys, labels, class_names)


def _check_names(urls: list[str]) -> None:
    seen: dict[str, str] = {}
    for url in urls:
        name = tar_shard_name(url)
        if name in seen:
            raise DataError(f"data.urls names two shards called {name!r} ({seen[name]} and "
                            f"{url}): keys start with the shard name; rename one")
        seen[name] = url


def _check_present(urls: list[str]) -> None:
    """Every shard exists, checked before any is read: one line naming the missing ones."""
    def missing(url: str) -> bool:
        if not is_remote(url):
            return not local_path(url).is_file()
        try:
            object_info(url, "data.urls")
        except DataError as exc:
            if "not found" in str(exc):
                return True
            raise
        return False

    with ThreadPoolExecutor(max_workers=min(8, len(urls))) as pool:
        gone = [u for u, m in zip(urls, pool.map(missing, urls)) if m]
    if gone:
        raise DataError(f"data.urls: {len(gone)} of {len(urls)} shards not found (e.g. "
                        f"{gone[0]}); fix data.urls or restore the shards")


def parse_labels(raw: list[str | None], label_key: str | None
                 ) -> tuple[np.ndarray, list[str] | None]:
    """Integer labels (cls, integer json values) or class names sorted into labels (txt,
    json names); missing or unreadable labels are -1 (counted in a warning)."""
    values: list[int | str | None] = [_label_value(t, label_key) for t in raw]
    bad = sum(v is None for v, t in zip(values, raw) if t is not None)
    if label_key is not None and bad:
        log.warning("%d samples have a %s member that is not a label; their label is -1",
                    bad, label_key)
    if all(v is None or isinstance(v, int) for v in values):
        return np.array([-1 if v is None else v for v in values], np.int64), None
    names = sorted({str(v) for v in values if v is not None})
    lookup = {name: i for i, name in enumerate(names)}
    return np.array([-1 if v is None else lookup[str(v)] for v in values], np.int64), names


def _label_value(text: str | None, label_key: str | None) -> int | str | None:
    if text is None or label_key is None:
        return None
    if label_key == "cls":
        return int(text) if text.lstrip("-").isdigit() else None
    if label_key == "txt":
        return text or None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    value = value.get("label") if isinstance(value, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        return None
    return value


def item_shards(ds: ImageDataset) -> np.ndarray | None:
    """The shard number of each item of ``ds`` (non-decreasing), or None when ``ds`` is not
    read from tar shards: what the per-rank split of whole shards needs."""
    reader = ds.reader
    return reader.shard[ds.rows] if isinstance(reader, TarReader) else None


__all__ = [
    "TarReader",
    "build_webdataset",
    "expand_urls",
    "item_shards",
    "parse_labels",
    "scan_shard",
    "split_member",
    "tar_shard_name",
]

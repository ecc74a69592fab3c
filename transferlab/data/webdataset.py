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
  ``"label"`` value, integer or class name). A sample without a label member (or an empty
  one, or JSON without ``"label"``) gets -1. A label member that is not a label (not an
  integer, more than 18 digits, JSON nested deeper than ``MAX_JSON_DEPTH``, a class name
  longer than a key, more than ``MAX_LABEL_BYTES``) makes the sample a failure
  ``bad-label`` saying why. Other members are ignored.

Listing reads each shard's tar headers once (and its label members); nothing is unpacked to
disk. Items are read by offset: a local shard by seek + read, a remote one through windows
of ``WINDOW`` bytes fetched by the loader worker that needs them (at most ``KEEP_WINDOWS``
kept per worker), so neighbouring items of a batch cost one request.

Bad data are item failures with a reason, never a crash: an undecodable member is
``corrupt`` or ``not-an-image``; a member cut off by the end of a truncated shard is
``truncated`` (the members before it are read); when the tar structure itself breaks
(a damaged header, a shard cut between members) a failure ``<shard>/@<byte>`` says from
where on the shard was lost. A member name that is absolute or uses ``..`` is
``outside-root`` and never read; one longer than ``MAX_KEY_CHARS`` is ``bad-name``, keyed
``<shard>/@<byte>`` by its header. A missing shard, a FIFO or a device where a shard is
expected, or a file that is not a tar at all, is a one-line ``DataError`` before the model
loads.

Tar headers are checked before ``tarfile`` parses them (``_HeaderGuard``): an extended
header (pax, GNU long name) claiming more than ``MAX_EXTENDED_BYTES`` or more than the
shard holds, more than ``MAX_EXTENDED_CHAIN`` of them in a row, a malformed pax record, a
run of more than ``MAX_DIGIT_RUN`` digits (``tarfile``'s quadratic backtracking,
CVE-2024-6232) or a GNU sparse member ends the listing of that shard there, as a damaged
header does: listing stays linear in the shard's bytes and allocates no more than it holds.
Brace patterns are counted before they are expanded (``MAX_SHARDS``).

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
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from ..config import MAX_KEY_CHARS, DataConfig
from ..errors import DataError
from ..runtime.untrusted import file_size, open_untrusted
from ..yamlsafe import shown
from .datasets import ImageDataset, integer_label, label_problem
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
MAX_LABEL_BYTES = 1 << 16  # a label member larger than this is not read (a bad label)
MAX_JSON_DEPTH = 64  # nesting of a .json label (json.loads recurses)
MAX_SHARDS = 1_000_000  # brace expansion bound (a typo like {0..999999999} is an error)
MAX_BRACES = 64  # '{' in one data.urls string
MAX_URL_CHARS = 1 << 28  # characters of all the expanded shard URLs together
MAX_SHARD_NAME = 1024  # characters of a shard's name (the first part of its keys)
# Tar headers are checked before ``tarfile`` parses them (``_HeaderGuard``): its pax parser
# backtracks on long runs of digits (CVE-2024-6232, quadratic before Python 3.11.10/3.12.6),
# reads an extended header's claimed size into memory at once, and recurses once per
# extended header in a row.
MAX_EXTENDED_BYTES = 1 << 16  # a pax or GNU long-name header (a path is at most 4096 chars)
MAX_EXTENDED_CHAIN = 8  # extended headers in a row before a member header
MAX_GLOBAL_PAX_BYTES = 1 << 12  # pax global headers of one shard (copied for every member)
MAX_DIGIT_RUN = 128  # digits in a row inside a pax header
LABEL_KEYS = ("cls", "txt", "json")
BAD_LABEL = "bad-label"  # a label member that is not a label (the item is a failure)
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"([0-9]{1,18})\.\.([0-9]{1,18})")
_DIGITS = re.compile(rb"[0-9]+")
_EXTENDED = {tarfile.GNUTYPE_LONGNAME: "GNU long-name", tarfile.GNUTYPE_LONGLINK:
             "GNU long-link", tarfile.XHDTYPE: "pax", tarfile.SOLARIS_XHDTYPE: "pax",
             tarfile.XGLTYPE: "pax global"}
_GUARDED = {*_EXTENDED, tarfile.GNUTYPE_SPARSE}


# ---------------------------------------------------------------------------------------
# Shard names
# ---------------------------------------------------------------------------------------


def expand_urls(spec: str | list[str]) -> list[str]:
    """Shard URLs of ``data.urls``: each string brace-expanded (``{000..012}`` zero-padded
    ranges, ``{a,b}`` alternatives), lists flattened, order kept.

    The number of URLs a string names (the product of its groups' sizes) is counted before
    anything is expanded, and the expansion stops at ``MAX_SHARDS`` URLs (or
    ``MAX_URL_CHARS`` characters): one line, whatever the pattern."""
    items = spec if isinstance(spec, (list, tuple)) else [spec]
    out: list[str] = []
    chars = 0
    for item in items:
        if isinstance(item, (list, tuple)):
            raise DataError("data.urls is a string or a list of strings, not a list of lists; "
                            "fix data.urls")
        for url in _expand(str(item), _check_pattern(str(item))):
            out.append(url)
            chars += len(url)
            if len(out) > MAX_SHARDS or chars > MAX_URL_CHARS:
                raise DataError(f"data.urls names more than {MAX_SHARDS:,} shards (or "
                                f"{MAX_URL_CHARS:,} characters of URLs); check the brace "
                                "ranges")
    return out


def _check_pattern(spec: str) -> str:
    """``spec`` when its brace groups name at most ``MAX_SHARDS`` URLs, counted without
    expanding them (exact unless groups are nested; ``_expand`` bounds those)."""
    if spec.count("{") > MAX_BRACES:
        raise DataError(f"data.urls {shown(spec)} holds more than {MAX_BRACES} braces; "
                        "fix data.urls")
    count = 1
    for match in _BRACE.finditer(spec):
        count *= _option_count(match.group(1), spec)
        if count > MAX_SHARDS:
            raise DataError(f"data.urls {shown(spec)} names more than {MAX_SHARDS:,} "
                            "shards (the product of its brace groups); check the brace ranges")
    return spec


def _expand(spec: str, original: str) -> Iterator[str]:
    match = _BRACE.search(spec)
    if match is None:
        yield spec
        return
    head, tail = spec[:match.start()], spec[match.end():]
    for option in _brace_options(match.group(1), original):
        yield from _expand(head + option + tail, original)


def _option_count(body: str, spec: str) -> int:
    if "," in body or ".." not in body:
        return body.count(",") + 1
    a, b, _ = _range(body, spec)
    return abs(b - a) + 1


def _range(body: str, spec: str) -> tuple[int, int, int]:
    """(first, last, zero-padded width) of a range group ``body`` (``000..123``)."""
    match = _RANGE.fullmatch(body)
    if match is None:
        raise DataError(f"data.urls {shown(spec)}: the range {{{_cut(body)}}} "
                        "must be two integers (of at most 18 digits) like {000000..000123}; "
                        "fix data.urls")
    first, last = match.groups()
    a, b = int(first), int(last)
    if abs(b - a) >= MAX_SHARDS:
        raise DataError(f"data.urls {shown(spec)}: the range {{{_cut(body)}}} names more than "
                        f"{MAX_SHARDS:,} shards; check the brace range")
    width = len(first) if first.startswith("0") or len(first) == len(last) else 0
    return a, b, width


def _cut(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _brace_options(body: str, spec: str) -> Iterator[str]:
    if "," in body or ".." not in body:
        yield from body.split(",")
        return
    a, b, width = _range(body, spec)
    step = 1 if b >= a else -1
    for i in range(a, b + step, step):
        yield str(i).zfill(width)


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
    label_problem: str | None = None  # why the label member was not read


class UnsafeHeader(tarfile.HeaderError):
    """A tar header that is not handed to ``tarfile`` (``_HeaderGuard``)."""


def _is_header(block: bytes) -> bool:
    """True for a 512-byte block with a valid tar checksum (what ``tarfile`` reads)."""
    try:
        return block.count(0) != tarfile.BLOCKSIZE and (
            tarfile.nti(block[148:156]) in tarfile.calc_chksums(block))
    except (tarfile.HeaderError, ValueError):
        return False


class _HeaderGuard:
    """Checks the headers ``tarfile.TarFile.next()`` is about to read, from ``offset``: the
    extended headers (pax ``x``/``g``, GNU long names ``L``/``K``) up to the member header
    they describe. Each may claim at most ``MAX_EXTENDED_BYTES``, and no more than the shard
    holds after it (``tarfile`` reads the claimed size at once); at most
    ``MAX_EXTENDED_CHAIN`` in a row (``tarfile`` recurses once per header); a pax header must
    be well-formed records without runs of more than ``MAX_DIGIT_RUN`` digits (its parser
    backtracks over them) or GNU sparse keys; GNU sparse members are refused. A refused
    header raises ``UnsafeHeader``: the listing stops there, as on a damaged header. Linear
    in the bytes of the headers; the position of ``fileobj`` is restored."""

    def __init__(self, fileobj: BinaryIO, size: int):
        self.fileobj, self.size, self.global_bytes = fileobj, size, 0

    def check(self, offset: int) -> None:
        pos = offset
        try:
            for _ in range(MAX_EXTENDED_CHAIN + 1):
                self.fileobj.seek(pos)
                block = self.fileobj.read(tarfile.BLOCKSIZE)
                kind = block[156:157]
                if kind not in _GUARDED or len(block) < tarfile.BLOCKSIZE or not _is_header(
                        block):
                    return  # a member header, the end, or damage: tarfile says which
                if kind == tarfile.GNUTYPE_SPARSE:
                    raise UnsafeHeader(f"GNU sparse member at byte {pos}: sparse members are "
                                       "not read from shards (write the shard without --sparse)")
                pos = self._extended(block, kind, pos)
        finally:
            self.fileobj.seek(offset)
        raise UnsafeHeader(f"more than {MAX_EXTENDED_CHAIN} extended headers in a row at byte "
                           f"{offset}")

    def _extended(self, block: bytes, kind: bytes, pos: int) -> int:
        """The position after the extended header at ``pos`` (its data checked)."""
        what = f"{_EXTENDED[kind]} header at byte {pos}"
        try:
            size = tarfile.nti(block[124:136])
        except (tarfile.HeaderError, ValueError):
            raise UnsafeHeader(f"{what} has an unreadable size field") from None
        after = self.size - pos - tarfile.BLOCKSIZE
        if not 0 <= size <= MAX_EXTENDED_BYTES:
            raise UnsafeHeader(f"{what} claims {size:,} bytes, more than the "
                               f"{MAX_EXTENDED_BYTES:,} such a header may hold")
        if size > after:
            raise UnsafeHeader(f"{what} claims {size:,} bytes but the shard holds {after:,} "
                               "after it")
        data = self.fileobj.read(size)
        if len(data) != size:
            raise UnsafeHeader(f"{what}: the shard ends inside it")
        if kind == tarfile.XGLTYPE:
            self.global_bytes += size
            if self.global_bytes > MAX_GLOBAL_PAX_BYTES:
                raise UnsafeHeader(f"{what}: pax global headers of more than "
                                   f"{MAX_GLOBAL_PAX_BYTES:,} bytes in one shard")
        if kind in (tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.XGLTYPE):
            _check_pax(data, what)
        blocks = -(-size // tarfile.BLOCKSIZE)
        return pos + tarfile.BLOCKSIZE * (1 + blocks)


def _check_pax(data: bytes, what: str) -> None:
    """Pax records ``"<length> <keyword>=<value>\\n"`` tiling ``data`` (NUL padding allowed),
    checked in one pass before ``tarfile``'s regular expressions see them."""
    run = max((m.end() - m.start() for m in _DIGITS.finditer(data)), default=0)
    if run > MAX_DIGIT_RUN:
        raise UnsafeHeader(f"{what} holds {run:,} digits in a row (at most {MAX_DIGIT_RUN})")
    pos = 0
    while pos < len(data) and data[pos]:
        space = data.find(b" ", pos, pos + MAX_DIGIT_RUN + 1)
        end = pos + int(data[pos:space]) if space > pos and data[pos:space].isdigit() else -1
        equals = data.find(b"=", space + 1, end)
        if not (space + 1 < equals < end <= len(data)) or data[end - 1] != 0x0A:
            raise UnsafeHeader(f"{what}: malformed pax record at byte {pos} of the header")
        keyword = data[space + 1:equals]
        if keyword.startswith(b"GNU.sparse"):
            raise UnsafeHeader(f"{what}: GNU sparse member; sparse members are not read from "
                               "shards (write the shard without --sparse)")
        if keyword == b"size" and not data[equals + 1:end - 1].isdigit():
            raise UnsafeHeader(f"{what}: the member size is not a whole number")
        pos = end
    if data[pos:].strip(b"\0"):
        raise UnsafeHeader(f"{what}: malformed pax record at byte {pos} of the header")


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
    if member.size < 0:  # a base-256 size field can say so
        return CORRUPT, f"member header claims {member.size:,} bytes; never read"
    end = member.offset_data + member.size
    if end > shard_size:
        return TRUNCATED, (f"member data ends at byte {end} but the shard has {shard_size} "
                           "bytes: the shard is cut short, re-copy it")
    return None


# What ``tarfile`` raises on a damaged header besides TarError (int() of a field, a short
# sparse block): the listing stops there as on any broken structure.
_BROKEN = (tarfile.TarError, ValueError, IndexError, OverflowError, RecursionError)


def _read_members(tar: tarfile.TarFile, guard: _HeaderGuard, label_key: str | None
                  ) -> tuple[list[tuple[str, dict[str, tarfile.TarInfo]]],
                             dict[int, bytes | str], str | None]:
    """Members grouped by sample key in tar order, label bytes by group (or why the label
    member was not read), and the error that stopped the listing early (None at a proper
    end). ``tarfile`` parsed the first header when it opened the shard: ``guard`` checked
    it before; here it checks each later one."""
    groups: list[tuple[str, dict[str, tarfile.TarInfo]]] = []
    labels: dict[int, bytes | str] = {}
    while True:
        try:
            if tar.firstmember is None:  # tar.next() returns the first member it parsed
                guard.check(tar.offset)
            member = tar.next()
        except _BROKEN as exc:  # the structure breaks here: keep what came before
            return groups, labels, error_line(exc)
        if member is None:
            return groups, labels, None
        tar.members.clear()  # tarfile keeps every header; ours are in groups
        key, ext = split_member(member.name)
        if not groups or groups[-1][0] != key:
            groups.append((key, {}))
        groups[-1][1].setdefault(ext, member)
        if ext == label_key and len(groups) - 1 not in labels:
            labels[len(groups) - 1] = _label_bytes(tar, member, guard.size)


def _label_bytes(tar: tarfile.TarFile, member: tarfile.TarInfo, shard_size: int) -> bytes | str:
    """The bytes of a label member, or why they are not read."""
    if not member.isreg() or member.sparse is not None:
        return "is not a regular file member"
    if not 0 <= member.size <= MAX_LABEL_BYTES:
        return f"is {member.size:,} bytes (a label has at most {MAX_LABEL_BYTES:,})"
    if member.offset_data + member.size > shard_size:
        return "is cut off by the end of the shard"
    handle = tar.extractfile(member)
    return handle.read() if handle is not None else "is not a regular file member"


def scan_tar(fileobj: BinaryIO, size: int, url: str, extensions: list[str],
             label_key: str | None) -> ShardIndex:
    """The samples of one shard (``fileobj`` positioned at 0, ``size`` bytes long)."""
    name = tar_shard_name(url)
    index, guard = ShardIndex(url, name, size), _HeaderGuard(fileobj, size)
    try:
        guard.check(0)
    except UnsafeHeader as exc:  # a tar whose first header is refused: nothing listed
        _note_lost_tail(index, 0, error_line(exc))
        return index
    try:
        tar = tarfile.open(fileobj=fileobj, mode="r:")
    except _BROKEN as exc:
        raise DataError(f"data.urls: {url} is not a tar file or is cut before its first "
                        f"member ({error_line(exc)}); re-copy it or drop it from data.urls"
                        ) from None
    groups, labels, stopped = _read_members(tar, guard, label_key)
    wanted = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
    seen = set()
    for g, (key, members) in enumerate(groups):
        ext = _image_ext(members, wanted)
        if ext is None or key in seen:
            if ext is not None:
                log.warning("%s: sample %s appears twice; the later one is skipped", url,
                            shown(key))
            continue
        seen.add(key)
        member, full = members[ext], f"{name}/{key}"
        rejected = _rejection(key, member, size)
        escaped = escape_name(full)
        if escaped is not None:
            full, rejected = escaped, (BAD_NAME, "member name is not valid UTF-8")
        if len(full) > MAX_KEY_CHARS:  # named by where its header starts
            full, rejected = f"{name}/@{member.offset}", (
                BAD_NAME, f"member name is {len(member.name):,} characters (a key has at most "
                f"{MAX_KEY_CHARS:,})")
        raw = labels.get(g)
        sample = Sample(full, member.offset_data, member.size, None, rejected)
        if isinstance(raw, str):
            sample.label_problem = raw
        elif raw is not None:
            sample.label = raw.decode("utf-8", "replace").strip()
        index.samples.append(sample)
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
        try:  # a regular file: a FIFO or a device is one line, never a hang
            with open_untrusted(local_path(url), "data.urls: shard", DataError) as f:
                return scan_tar(f, file_size(f), url, extensions, label_key)
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
            if not is_remote(url):  # a regular file (replaced by a FIFO since: no hang)
                with open_untrusted(local_path(url), "shard", DataError) as f:
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
    if not any(s.rejected is None for shard in shards for s in shard.samples):
        raise DataError(f"no readable image members with extensions {', '.join(cfg.extensions)}"
                        f" in the {len(urls)} shards of data.urls; check data.urls or "
                        "data.extensions")
    values = [_sample_label(s, cfg.label_key) for shard in shards for s in shard.samples]
    labels, class_names = parse_labels(values)
    reader = TarReader(shards, cfg.max_image_pixels)
    return ImageDataset(reader, reader.keys, labels, class_names)


def _check_names(urls: list[str]) -> None:
    seen: dict[str, str] = {}
    for url in urls:
        name = tar_shard_name(url)
        if len(name) > MAX_SHARD_NAME:
            raise DataError(f"data.urls names a shard {shown(name)} of {len(name):,} characters "
                            f"(at most {MAX_SHARD_NAME:,}): keys start with the shard name; "
                            "rename it")
        if name in seen:
            raise DataError(f"data.urls names two shards called {name!r} ({seen[name]} and "
                            f"{url}): keys start with the shard name; rename one")
        seen[name] = url


def _check_present(urls: list[str]) -> None:
    """Every shard exists, checked before any is read: one line naming the missing ones."""
    def missing(url: str) -> bool:
        if not is_remote(url):  # a FIFO or a device: refused in one line when listed
            return not local_path(url).exists()
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


def parse_labels(values: list[int | str | None]) -> tuple[np.ndarray, list[str] | None]:
    """Integer labels (cls, integer json values) or class names sorted into labels (txt,
    json names); missing labels (None) are -1."""
    if all(v is None or isinstance(v, int) for v in values):
        return np.array([-1 if v is None else v for v in values], np.int64), None
    names = sorted({str(v) for v in values if v is not None})
    lookup = {name: i for i, name in enumerate(names)}
    return np.array([-1 if v is None else lookup[str(v)] for v in values], np.int64), names


def _sample_label(sample: Sample, label_key: str | None) -> int | str | None:
    """The label of ``sample`` (None: none). A label member that is there but is not a
    label makes the sample a failure ``bad-label`` (when nothing else failed it first)."""
    if label_key is None:
        return None
    problem = sample.label_problem
    value = None
    if problem is None and sample.label is not None:
        try:
            value = label_value(sample.label, label_key)
        except ValueError as exc:
            problem = str(exc)
    if problem is not None and sample.rejected is None:
        sample.rejected = (BAD_LABEL, f"the .{label_key} member {problem}; fix or remove it")
    return None if problem is not None else value


def label_value(text: str, label_key: str) -> int | str | None:
    """The label in the text of a ``label_key`` member: None when it names none (empty, a
    JSON object without ``"label"`` or with null); ``ValueError`` saying why when the text
    is not a label (not an integer, more than 18 digits, nested too deep, a name longer than
    a key). Bounded work whatever the text: no deep recursion, no huge integers."""
    if label_key == "cls":
        if not text:
            return None
        value = integer_label(text)
        if value is None:
            raise ValueError(label_problem(text) or f"is not an integer ({shown(text)})")
        return value
    if label_key == "txt":
        return _name_label(text) if text else None
    depth = _json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise ValueError(f"is JSON nested {depth:,} deep (at most {MAX_JSON_DEPTH})")
    try:
        value = json.loads(text)
    except ValueError:
        raise ValueError(f"is not JSON ({shown(text)})") from None
    value = value.get("label") if isinstance(value, dict) else None
    if value is None:
        return None
    if isinstance(value, str):
        return _name_label(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"has a \"label\" that is neither an integer nor a class name "
                         f"({shown(value)})")
    if integer_label(str(value)) is None:
        raise ValueError(label_problem(str(value)) or f"has the label {shown(value)}")
    return value


def _name_label(name: str) -> str:
    if len(name) > MAX_KEY_CHARS:
        raise ValueError(f"names a class of {len(name):,} characters (at most "
                         f"{MAX_KEY_CHARS:,})")
    return name


def _json_depth(text: str) -> int:
    """How deep ``[``/``{`` nest in ``text`` outside strings (an upper bound when it is not
    JSON); linear, no recursion."""
    if text.count("[") + text.count("{") <= MAX_JSON_DEPTH:
        return 0
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


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

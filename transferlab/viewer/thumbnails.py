"""Thumbnails of a store's images, made on first request and cached in the view cache.

The image of row ``r`` is ``data_root / store.keys[r]``: the row number is the only thing a
request names, and the key (written by whoever wrote the store) goes through
``search_report.key_path``, which refuses absolute keys, drives, ``..`` and links leading out
of the data root. Decoding is ``data.imageio.load_image`` (regular files only, bounded pixel
count, JPEG draft mode), as extraction decodes. An image that is gone or undecodable gives
None: the page shows a placeholder.
"""
from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

from ..analysis.search_report import data_root, key_path
from ..data.imageio import DEFAULT_MAX_PIXELS, ImageDecodeError, load_image
from ..errors import StoreError
from ..runtime.atomicfile import atomic_write
from ..runtime.untrusted import read_bounded

THUMB_PIXELS = 160  # longest side
_THUMB_LIMIT = 1 << 20  # bytes a cached thumbnail may have (a 160 px JPEG is ~10 KB)

PLACEHOLDER_SVG = (
    b'<svg xmlns="http://www.w3.org/2000/svg" width="160" height="160" viewBox="0 0 160 160">'
    b'<rect width="160" height="160" fill="#eee" stroke="#bbb"/>'
    b'<text x="80" y="84" font-family="sans-serif" font-size="14" fill="#888" '
    b'text-anchor="middle">no image</text></svg>')


class Thumbnailer:
    """Thumbnails of ``store``'s rows from ``root`` (default: the data root its metadata
    records), cached as JPEG files in ``cache_dir``/thumbs (None: made each time)."""

    def __init__(self, store: Any, cache_dir: Path | None,
                 root: str | os.PathLike | None = None):
        self.store = store
        self.root = Path(root) if root is not None else data_root(store.meta)
        self.folder = None if cache_dir is None else Path(cache_dir) / "thumbs"
        if self.folder is not None:
            if self.folder.is_symlink():
                raise StoreError(f"{self.folder} is a link; remove it")
            self.folder.mkdir(exist_ok=True)

    def source(self, row: int) -> Path | None:
        """The image file of ``row`` inside the data root, or None (no root to resolve keys
        against, or a key leading out of it)."""
        if self.root is None:
            return None
        return key_path(self.root, self.store.keys[row])

    def jpeg(self, row: int) -> bytes | None:
        """The thumbnail of ``row`` as JPEG bytes (cached), None when the image is gone,
        outside the data root or undecodable. Blocking: call it off the event loop."""
        src = self.source(row)
        if src is None:
            return None
        try:
            src_mtime = os.stat(src).st_mtime_ns
        except OSError:
            return None
        name = hashlib.sha256(self.store.keys[row].encode("utf-8", "surrogatepass")).hexdigest()
        cached = None if self.folder is None else self.folder / f"{name[:40]}.jpg"
        try:
            if cached is not None and os.lstat(cached).st_mtime_ns >= src_mtime:
                return read_bounded(cached, _THUMB_LIMIT, "a cached thumbnail", StoreError,
                                    self.folder)
        except (OSError, StoreError):
            pass
        try:
            im = load_image(src, "RGB", (THUMB_PIXELS, THUMB_PIXELS), DEFAULT_MAX_PIXELS)
        except ImageDecodeError:
            return None
        im.thumbnail((THUMB_PIXELS, THUMB_PIXELS))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=85)
        data = buf.getvalue()
        if cached is None:
            return data
        try:
            atomic_write(cached, lambda f: f.write(data), "wb", fsync=False,
                         root=self.store.dir, error=StoreError)
        except (OSError, StoreError):
            pass  # a read-only store still gets its thumbnails, uncached
        return data

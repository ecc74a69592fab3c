"""Robust image decoding: one function that turns any image file into an 8-bit RGB or L image.

Real image folders hold CMYK JPEGs, transparent PNGs, 16-bit scans, phone photos stored on
their side, files cut short by a failed copy, and things that are not images at all.
``load_image`` decodes what can be decoded and raises ``ImageDecodeError`` with a short
reason category for the rest, so a data loader can skip and count bad files instead of dying.

Conversions (documented once, here):

- EXIF orientation is applied (``ImageOps.exif_transpose``), so sizes are as displayed.
- Transparency (RGBA, LA, PA, P with a transparent colour) is composited on **white**:
  dropping the alpha channel would expose whatever colour the encoder left under transparent
  pixels (often black or noise), which is not what a person sees.
- 16-bit and 32-bit integer images are scaled to 8 bits (``I;16``: value / 257, so 65535 ->
  255; ``I``: the same when values exceed 255); float (``F``) images in [0, 1] are scaled by
  255, others clipped to [0, 255].
- CMYK, YCbCr, LAB, HSV, palette and 1-bit images are converted by Pillow to RGB or L.
- Large JPEGs are decoded at 1/2, 1/4 or 1/8 scale (``Image.draft``) when ``draft_size`` is
  given and the reduced image still covers it, which is nearly free and much faster.
- Plain JPEGs (YCbCr or greyscale, upright, not reduced by ``draft``) are decoded through
  libjpeg-turbo's TurboJPEG API when ``simplejpeg`` is installed: the same pixels as Pillow
  gives, 0.3 ms less per 500x375 image (``data.fastjpeg``; anything else, and any file
  libjpeg warns about, goes through Pillow).
- Images above ``max_pixels`` are refused before decoding (decompression bombs). Pillow's own
  limit (twice ``PIL.Image.MAX_IMAGE_PIXELS``) still applies on top of it. With
  ``draft_size`` the bound holds after the resize too: an image whose scaling to cover that
  size (``max(W_t / w, H_t / h)``, what a short-side resize does) would exceed ``max_pixels``
  is refused (a 143-byte 20000x1 PNG resized to a short side of 224 would be 4.48M x 224).
- Only regular files are read: a FIFO, socket or device named ``x.png`` is refused without
  blocking (opened non-blocking, checked with ``fstat``).
"""
from __future__ import annotations

import contextlib
import errno
import io
import math
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import DataError
from ..runtime import untrusted
from . import fastjpeg

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's default warning threshold (~ 9459 x 9459)
MODES = ("RGB", "L")

# Reason categories carried by ImageDecodeError.reason.
MISSING = "missing"
UNREADABLE = "unreadable"
EMPTY = "empty"
NOT_AN_IMAGE = "not-an-image"
TRUNCATED = "truncated"
CORRUPT = "corrupt"
TOO_LARGE = "too-large"
BAD_NAME = "bad-name"  # a file name that is not valid UTF-8 (never opened)
OUTSIDE_ROOT = "outside-root"  # a listed path that escapes the data root (never opened)
REASONS = (MISSING, UNREADABLE, EMPTY, NOT_AN_IMAGE, TRUNCATED, CORRUPT, TOO_LARGE, BAD_NAME,
           OUTSIDE_ROOT)

_FIXES = {
    MISSING: "check the path and the data root",
    UNREADABLE: "fix the file permissions or remove it (only regular files are read)",
    EMPTY: "the file has zero bytes; re-copy or remove it",
    NOT_AN_IMAGE: "remove it or narrow data.extensions",
    TRUNCATED: "the file is cut short; re-copy or remove it",
    CORRUPT: "re-copy or remove the file",
    TOO_LARGE: "raise data.max_image_pixels if the image is trusted",
    BAD_NAME: "rename the file to a UTF-8 name",
    OUTSIDE_ROOT: "list paths inside data.root, or set data.root to a folder holding them",
}

# Leading bytes of formats Pillow reads: a file starting with one of these that Pillow cannot
# open is a damaged image, not a stranger.
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00",
          b"MM\x00*", b"RIFF", b"P1", b"P2", b"P3", b"P4", b"P5", b"P6")


class ImageDecodeError(DataError):
    """A file could not be decoded. ``reason`` is one of ``REASONS``; ``detail`` says more."""

    def __init__(self, reason: str, detail: str = "", path: str | os.PathLike | None = None):
        self.reason = reason
        self.detail = detail
        self.path = None if path is None else str(path)
        where = f"{self.path}: " if self.path else ""
        super().__init__(f"{where}{self.short()} ({_FIXES.get(reason, 'remove the file')})")

    def short(self) -> str:
        """``reason: detail`` in one line, as written to a store's failures list."""
        text = f"{self.reason}: {self.detail}" if self.detail else self.reason
        return " ".join(text.split())


def load_image(path: str | os.PathLike, mode: str = "RGB",
               draft_size: tuple[int, int] | None = None,
               max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode ``path`` into a fully loaded ``mode`` ('RGB' or 'L') image, upright.

    ``draft_size`` (width, height) lets big JPEGs decode at a reduced scale that still
    covers that size. Raises ``ImageDecodeError`` for any file that cannot be used.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    handle = open_image_file(path)
    with handle:
        try:
            if os.fstat(handle.fileno()).st_size == 0:
                raise ImageDecodeError(EMPTY, "zero-byte file", path)
            return decode_image(handle, mode, draft_size, max_pixels)
        except ImageDecodeError as exc:
            raise ImageDecodeError(exc.reason, exc.detail, path) from None
        except OSError as exc:
            if exc.errno is not None:  # a read error from the OS, not from the decoder
                raise _os_error(exc, path) from None
            raise


def open_image_file(path: str | os.PathLike) -> io.BufferedReader:
    """``path`` opened for reading when it is a regular file (``runtime.untrusted``'s one
    opener: non-blocking, checked by fstat, so a FIFO never blocks), its refusals as
    ``ImageDecodeError`` reasons."""
    try:
        return untrusted.open_regular(path)  # type: ignore[return-value]
    except untrusted.NotRegularFile as exc:
        detail = "is a directory" if exc.kind == "a directory" else "not a regular file"
        raise ImageDecodeError(UNREADABLE, detail, path) from None
    except OSError as exc:
        raise _os_error(exc, path) from None


def decode_bytes(data: bytes, key: str, mode: str, draft_size: tuple[int, int] | None,
                 max_pixels: int | None) -> Image.Image:
    """``decode_image`` of an image's bytes (a tar member, an object), failures naming
    ``key`` (not a path: there is none on disk)."""
    try:
        return decode_image(io.BytesIO(data), mode, draft_size, max_pixels)
    except ImageDecodeError as exc:
        raise ImageDecodeError(exc.reason, exc.detail, key) from None


def decode_image(fp: io.BufferedIOBase | io.BytesIO, mode: str = "RGB",
                 draft_size: tuple[int, int] | None = None,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """``load_image`` for an open binary file object (e.g. ``io.BytesIO(data)``)."""
    head = fp.read(16)
    fp.seek(0)
    if not head:
        raise ImageDecodeError(EMPTY, "zero-byte file")
    try:
        # bomb, EXIF and palette warnings are handled here
        with _warnings_ignored(), Image.open(fp) as im:
            _check_size(im, max_pixels)
            check_resized(im.size, draft_size, max_pixels)
            # EXIF is read early only for JPEGs (Pillow loads a PNG to find its EXIF)
            size, orientation = im.size, _orientation(im) if im.format == "JPEG" else 1
            _apply_draft(im, mode, draft_size, orientation)
            fast = fastjpeg.decode(fp, im, mode, im.size != size, orientation)
            if fast is not None:  # libjpeg-turbo without Pillow's per-row overhead
                return fast
            im.load()
            return to_mode(_upright(im), mode)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(TOO_LARGE, str(exc).split(" could be")[0]) from None
    except UnidentifiedImageError:
        if head.startswith(_MAGIC):
            raise ImageDecodeError(CORRUPT, "damaged header") from None
        raise ImageDecodeError(NOT_AN_IMAGE, "unknown file format") from None
    except OSError as exc:
        if exc.errno is not None:
            raise
        raise _decoder_error(exc) from None
    except MemoryError:
        raise ImageDecodeError(TOO_LARGE, "out of memory while decoding") from None
    except Exception as exc:
        raise _decoder_error(exc) from None


_held_for_threads = 0  # > 0 while decoding_threads_quiet() holds the filters


@contextlib.contextmanager
def decoding_threads_quiet():
    """Ignore warnings while a pool of threads decodes: enter it once, in the thread that
    starts the pool. ``warnings.catch_warnings`` swaps process-wide state, so threads that
    each entered it would restore each other's filters (and could leave every warning of
    the process ignored); inside this block ``decode_image`` skips its own."""
    global _held_for_threads
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _held_for_threads += 1
        try:
            yield
        finally:
            _held_for_threads -= 1


@contextlib.contextmanager
def _warnings_ignored():
    if _held_for_threads:
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def to_mode(im: Image.Image, mode: str) -> Image.Image:
    """Convert any Pillow image to 8-bit ``mode`` ('RGB' or 'L'), see the module docstring."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        im = Image.fromarray(_to_uint8(im), "L")
    if _has_alpha(im):
        im = _on_white(im)
    if im.mode == mode:
        return im
    if im.mode not in ("RGB", "L"):
        im = im.convert("RGB")
    return im.convert(mode) if im.mode != mode else im


def _check_size(im: Image.Image, max_pixels: int | None) -> None:
    width, height = im.size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageDecodeError(
            TOO_LARGE, f"{width}x{height} = {width * height} pixels > max_pixels={max_pixels}")
    if width <= 0 or height <= 0:
        raise ImageDecodeError(CORRUPT, f"bad size {width}x{height}")


def check_resized(size: tuple[int, int], draft_size: tuple[int, int] | None,
                   max_pixels: int | None) -> None:
    """Refuse an image whose resize to cover ``draft_size`` would exceed ``max_pixels``
    (a tiny, very long image blows up under a short-side resize), before allocating it."""
    if draft_size is None or max_pixels is None:
        return
    (width, height), (tw, th) = size, (int(draft_size[0]), int(draft_size[1]))
    factor = max(tw / width, th / height)
    w2, h2 = math.ceil(width * factor), math.ceil(height * factor)
    if w2 * h2 > max_pixels:
        raise ImageDecodeError(
            TOO_LARGE, f"{width}x{height} resized to cover {tw}x{th} is {w2}x{h2} = "
            f"{w2 * h2} pixels > max_pixels={max_pixels}")


def _apply_draft(im: Image.Image, mode: str, draft_size: tuple[int, int] | None,
                 orientation: int | None = None) -> None:
    """Let JPEGs decode at reduced scale; Pillow keeps the result >= the requested size."""
    if draft_size is None or im.format != "JPEG":
        return
    width, height = int(draft_size[0]), int(draft_size[1])
    if orientation is None:
        orientation = _orientation(im)
    if orientation in (5, 6, 7, 8):  # stored sideways: the target is transposed too
        width, height = height, width
    im.draft(mode if im.mode == "RGB" and mode == "L" else None, (width, height))


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(0x0112, 1))
    except Exception:
        return 1


def _upright(im: Image.Image) -> Image.Image:
    """Apply EXIF orientation; broken EXIF keeps the image as stored rather than failing it."""
    try:
        return ImageOps.exif_transpose(im)
    except Exception:
        return im


def _has_alpha(im: Image.Image) -> bool:
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        return True
    return im.mode in ("P", "L", "RGB") and "transparency" in im.info


def _on_white(im: Image.Image) -> Image.Image:
    grey = im.mode in ("LA", "La", "L")
    rgba = im.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    out = Image.alpha_composite(background, rgba).convert("RGB")
    return out.convert("L") if grey else out


def _to_uint8(im: Image.Image) -> np.ndarray:
    arr = np.asarray(im)
    if im.mode == "F":
        arr = arr.astype(np.float64)
        finite = arr[np.isfinite(arr)]
        if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
            arr = arr * 255.0
        return np.clip(np.nan_to_num(arr), 0, 255).round().astype(np.uint8)
    arr = arr.astype(np.int64)
    if im.mode.startswith("I;16") or arr.max(initial=0) > 255:
        arr = (arr + 128) // 257  # 0..65535 -> 0..255 with rounding
    return np.clip(arr, 0, 255).astype(np.uint8)


def _os_error(exc: OSError, path: str | os.PathLike) -> ImageDecodeError:
    if isinstance(exc, FileNotFoundError):
        return ImageDecodeError(MISSING, "no such file", path)
    if isinstance(exc, IsADirectoryError) or exc.errno == errno.EISDIR:
        return ImageDecodeError(UNREADABLE, "is a directory", path)
    if isinstance(exc, PermissionError):
        return ImageDecodeError(UNREADABLE, "permission denied", path)
    return ImageDecodeError(UNREADABLE, exc.strerror or type(exc).__name__, path)


def _decoder_error(exc: BaseException) -> ImageDecodeError:
    text = str(exc) or type(exc).__name__
    if "truncated" in text.lower():
        return ImageDecodeError(TRUNCATED, text)
    return ImageDecodeError(CORRUPT, f"{type(exc).__name__}: {text}"[:200])


def escape_name(name: str) -> str | None:
    """None for a name that is valid UTF-8; else its lossless printable form: backslashes
    doubled, then each undecodable byte (a surrogateescape character from ``os.listdir``)
    as ``\\xNN``, so distinct names stay distinct and the bytes can be recovered."""
    try:
        name.encode("utf-8")
        return None
    except UnicodeEncodeError:
        raw = os.fsencode(name.replace("\\", "\\\\"))
        return raw.decode("utf-8", "backslashreplace")


def is_image_file(path: str | os.PathLike, extensions: list[str]) -> bool:
    """True when ``path``'s suffix is one of ``extensions`` (case-insensitive, dot optional)."""
    wanted = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
    return Path(path).suffix.lower() in wanted

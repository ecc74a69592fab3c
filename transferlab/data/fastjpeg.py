"""JPEG decoding through libjpeg-turbo's TurboJPEG API (``simplejpeg``), when it is installed.

Pillow decodes a 500x375 JPEG in about 1.1 ms on the machine of BENCHMARKS.md, simplejpeg
in about 0.8 ms: Pillow feeds libjpeg scanline by scanline and unpacks every row into its
4-byte-per-pixel storage. Both use libjpeg-turbo with the same settings (accurate integer
IDCT, fancy upsampling), so the pixels are the same: ``decode`` is used only where that
holds, and every other file goes through Pillow as before (``None`` is returned):

- baseline or progressive JPEGs in YCbCr or greyscale (CMYK, YCCK: Pillow);
- no EXIF orientation other than 1 (rotated files: Pillow's ``exif_transpose``);
- no reduction by Pillow's ``draft`` (a large JPEG decoded at 1/2, 1/4, 1/8: Pillow);
- decoded without any libjpeg warning (``strict``): a damaged file gets Pillow's verdict.

``tests/data/test_imageio.py`` checks the pixels against Pillow's on the kinds above.
"""
from __future__ import annotations

from typing import Any

from PIL import Image

try:  # optional: pip install simplejpeg
    import simplejpeg
except ImportError:  # pragma: no cover - depends on the environment
    simplejpeg = None


def available() -> bool:
    """True when simplejpeg is installed."""
    return simplejpeg is not None


def decode(fp: Any, im: Image.Image, mode: str, reduced: bool,
           orientation: int) -> Image.Image | None:
    """``im`` (a JPEG Pillow has opened and applied ``draft`` to, not loaded) decoded in
    ``mode``, or None when Pillow must decode it. ``reduced``: ``draft`` chose a smaller
    scale; ``orientation``: the EXIF orientation tag."""
    if not available() or im.format != "JPEG" or reduced or orientation != 1:
        return None
    tile = getattr(im, "tile", None)
    if not tile or len(tile) != 1 or tile[0][3][0] != im.mode or im.mode != mode:
        return None  # CMYK/YCCK files, or L wanted from RGB without draft (Pillow's weights)
    try:
        fp.seek(0)
        arr = simplejpeg.decode_jpeg(fp.read(), "GRAY" if mode == "L" else "RGB",
                                     fastdct=False, fastupsample=False, strict=True)
    except (ValueError, OSError, MemoryError):
        return None  # Pillow decodes it again and names what is wrong
    if arr.shape[:2] != (im.size[1], im.size[0]):
        return None
    return Image.fromarray(arr[..., 0] if mode == "L" else arr, mode)

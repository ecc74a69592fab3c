"""JPEGs decoded through simplejpeg give Pillow's pixels exactly; every other file (and every
damaged one) goes through Pillow as before (issue #16: a faster decoder, same features)."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tests.imagegen import random_image
from transferlab.data import fastjpeg
from transferlab.data.imageio import ImageDecodeError, decode_image

simplejpeg = pytest.importorskip("simplejpeg")


def jpeg(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", **kw)
    return buf.getvalue()


def photo(w: int = 120, h: int = 90, seed: int = 0) -> Image.Image:
    """Smooth colour with texture (random noise alone is not what JPEGs hold)."""
    base = random_image(w // 8 + 1, h // 8 + 1, seed).resize((w, h), Image.BICUBIC)
    noise = np.random.default_rng(seed).normal(0, 6, (h, w, 3))
    return Image.fromarray(np.clip(np.asarray(base, float) + noise, 0, 255).astype(np.uint8))


def rotated(data: bytes, orientation: int) -> bytes:
    im = Image.open(io.BytesIO(data))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return jpeg(im, exif=exif.tobytes(), quality=95)


def both(data: bytes, mode: str, draft, monkeypatch) -> tuple[Image.Image, Image.Image, int]:
    """(fast path result, Pillow-only result, simplejpeg calls that gave the image)."""
    calls = []
    real = simplejpeg.decode_jpeg

    def spy(*a, **k):
        out = real(*a, **k)
        calls.append(out.shape)
        return out

    monkeypatch.setattr(simplejpeg, "decode_jpeg", spy)
    fast = decode_image(io.BytesIO(data), mode, draft)
    monkeypatch.setattr(fastjpeg, "simplejpeg", None)  # as without simplejpeg installed
    plain = decode_image(io.BytesIO(data), mode, draft)
    monkeypatch.setattr(fastjpeg, "simplejpeg", simplejpeg)
    return fast, plain, len(calls)


CASES = {  # name: (bytes, mode, draft size, fast path expected)
    "420": (jpeg(photo(), quality=90), "RGB", (64, 64), True),
    "422": (jpeg(photo(seed=1), subsampling=1), "RGB", None, True),
    "444": (jpeg(photo(seed=2), subsampling=0, quality=97), "RGB", (64, 64), True),
    "progressive": (jpeg(photo(seed=3), progressive=True), "RGB", (64, 64), True),
    "odd size": (jpeg(photo(101, 77, seed=4)), "RGB", (64, 64), True),
    "grey file": (jpeg(photo(seed=5).convert("L")), "L", (64, 64), True),
    "grey file as RGB": (jpeg(photo(seed=6).convert("L")), "RGB", (64, 64), False),
    "L from colour, draft": (jpeg(photo(seed=7)), "L", (64, 64), True),
    "L from colour, no draft": (jpeg(photo(seed=8)), "L", None, False),
    "reduced by draft": (jpeg(photo(400, 300, seed=9)), "RGB", (64, 64), False),
    "EXIF rotated": (rotated(jpeg(photo(seed=10)), 6), "RGB", (64, 64), False),
    "CMYK": (jpeg(photo(seed=11).convert("CMYK")), "RGB", (64, 64), False),
}


@pytest.mark.parametrize("name", list(CASES))
def test_fast_decoding_gives_pillows_pixels(name, monkeypatch):
    data, mode, draft, expect_fast = CASES[name]
    fast, plain, calls = both(data, mode, draft, monkeypatch)
    assert fast.mode == plain.mode == mode
    assert fast.size == plain.size
    assert np.array_equal(np.asarray(fast), np.asarray(plain))
    assert calls == (1 if expect_fast else 0)


@pytest.mark.parametrize("cut", [0.5, 0.9])
def test_a_damaged_jpeg_gets_pillows_verdict(cut, monkeypatch):
    data = jpeg(photo(seed=12))
    broken = data[:int(len(data) * cut)]
    reasons = []
    for enabled in (True, False):
        monkeypatch.setattr(fastjpeg, "simplejpeg", simplejpeg if enabled else None)
        with pytest.raises(ImageDecodeError) as err:
            decode_image(io.BytesIO(broken), "RGB", (64, 64))
        reasons.append(err.value.short())
    assert reasons[0] == reasons[1] and reasons[0].startswith(("truncated", "corrupt"))


def test_without_simplejpeg_pillow_decodes(monkeypatch):
    monkeypatch.setattr(fastjpeg, "simplejpeg", None)
    assert not fastjpeg.available()
    data = jpeg(photo(seed=13))
    out = decode_image(io.BytesIO(data), "RGB", (64, 64))
    assert out.size == (120, 90) and out.mode == "RGB"

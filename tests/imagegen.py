"""Generate small image folders for tests: good trees, special-but-valid images, bad files.

Reusable by every test module::

    from tests.imagegen import make_image_tree, add_special_images, add_bad_files

All images are generated (no downloads) and tiny, so a whole tree is written in milliseconds.
Pixel content is deterministic (seeded) so features computed from it are reproducible.
"""
from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

UNICODE_NAME = "ñandú_猫 photo.jpg"


@dataclass
class Case:
    """One generated file and what decoding it should give.

    ``reason`` is the expected ``ImageDecodeError.reason`` (None: it decodes). ``size`` is the
    expected decoded (width, height) and ``pixel`` the expected RGB value of pixel (0, 0).
    """

    path: Path
    reason: str | None = None
    size: tuple[int, int] | None = None
    pixel: tuple[int, int, int] | None = None
    skip: str | None = None  # why this case cannot be tested here (e.g. running as root)


def random_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A noisy but smooth-ish image (JPEG-friendly) of the given size."""
    rng = np.random.default_rng(seed)
    channels = 3 if mode == "RGB" else 1
    base = rng.integers(0, 256, (max(height // 4, 1), max(width // 4, 1), channels), np.uint8)
    im = Image.fromarray(base.squeeze(-1) if channels == 1 else base, mode)
    return im.resize((width, height), Image.BILINEAR)


def photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    """A colour gradient with a few solid shapes and sensor noise: distinct images differ
    in layout, as photos do (near-duplicate tests)."""
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    t = (np.linspace(0, 1, width)[None, :, None] * 0.6
         + np.linspace(0, 1, height)[:, None, None] * 0.4)
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    im = Image.fromarray((c0 * (1 - t) + c1 * t).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(8, 16))):
        x0, y0 = int(rng.integers(-width // 4, width)), int(rng.integers(-height // 4, height))
        box = [x0, y0, x0 + int(rng.integers(8, width // 2)),
               y0 + int(rng.integers(8, height // 2))]
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.integers(0, 2) else draw.rectangle)(box, fill=colour)
    a = np.asarray(im).astype(np.int16) + rng.integers(-6, 7, (height, width, 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "RGB")


def save(im: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else None
    im.save(path, format=fmt, **kwargs)
    return path


def make_image_tree(root: str | os.PathLike, classes: tuple[str, ...] = ("cat", "dog"),
                    per_class: int = 3, sizes: tuple[tuple[int, int], ...] = ((32, 24), (40, 40),
                                                                             (24, 36)),
                    unicode_name: bool = True) -> list[str]:
    """Write ``root/<class>/NNNN.{jpg,png}`` images; return the sorted keys written.

    Every class folder holds ``0000.jpg``, so base names repeat across folders (keys must be
    relative paths to stay distinct). The first class also gets one unicode-named JPEG and one
    upper-case ``.PNG`` extension.
    """
    root = Path(root)
    keys = []
    for c, name in enumerate(classes):
        for i in range(per_class):
            ext = ".jpg" if i % 2 == 0 else ".png"
            if c == 0 and i == 1:
                ext = ".PNG"
            size = sizes[(c + i) % len(sizes)]
            save(random_image(*size, seed=100 * c + i), root / name / f"{i:04d}{ext}")
            keys.append(f"{name}/{i:04d}{ext}")
    if unicode_name and classes:
        save(random_image(30, 30, seed=999), root / classes[0] / UNICODE_NAME)
        keys.append(f"{classes[0]}/{UNICODE_NAME}")
    return sorted(keys)


def make_flat_folder(root: str | os.PathLike, count: int = 4) -> list[str]:
    """Images directly in ``root`` (no class folders): labels should be -1."""
    root = Path(root)
    for i in range(count):
        save(random_image(20, 20, seed=i), root / f"img{i}.png")
    return [f"img{i}.png" for i in range(count)]


def jpeg_bytes(width: int = 64, height: int = 48, seed: int = 0, **kwargs) -> bytes:
    buf = io.BytesIO()
    random_image(width, height, seed).save(buf, "JPEG", quality=90, **kwargs)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR claiming ``width`` x ``height``: tiny on disk, huge decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def add_special_images(folder: str | os.PathLike) -> dict[str, Case]:
    """Valid images in awkward formats; each Case gives the expected decoded size/pixel."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cases: dict[str, Case] = {}
    cmyk = Image.new("CMYK", (20, 10), (0, 255, 255, 0))  # pure red in CMYK
    cases["cmyk"] = Case(save(cmyk, folder / "cmyk.jpg", quality=95), size=(20, 10))
    rgba = Image.new("RGBA", (12, 8), (255, 0, 0, 0))  # fully transparent red -> white
    rgba.putpixel((1, 0), (0, 0, 255, 255))
    cases["rgba"] = Case(save(rgba, folder / "rgba.png"), size=(12, 8), pixel=(255, 255, 255))
    pal = Image.new("P", (10, 10), 2)
    pal.putpalette([0, 0, 0, 9, 9, 9, 0, 128, 0] + [0] * 759)
    cases["palette"] = Case(save(pal, folder / "palette.png"), size=(10, 10), pixel=(0, 128, 0))
    pal_t = Image.new("P", (10, 10), 1)
    pal_t.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    cases["palette_transparent"] = Case(save(pal_t, folder / "palette_t.png", transparency=1),
                                        size=(10, 10), pixel=(255, 255, 255))
    deep = np.full((6, 9), 65535, np.uint16)
    deep[0, 0] = 32896  # 32896 / 257 = 128
    cases["16bit"] = Case(save(Image.fromarray(deep), folder / "deep16.png"), size=(9, 6),
                          pixel=(128, 128, 128))
    cases["grayscale"] = Case(save(Image.new("L", (7, 5), 77), folder / "gray.png"), size=(7, 5),
                              pixel=(77, 77, 77))
    cases["grayscale_jpeg"] = Case(save(random_image(16, 16, mode="L"), folder / "gray.jpg"),
                                   size=(16, 16))
    cases["la"] = Case(save(Image.new("LA", (5, 5), (0, 0)), folder / "la.png"), size=(5, 5),
                       pixel=(255, 255, 255))
    cases["1bit"] = Case(save(Image.new("1", (8, 4), 1), folder / "onebit.png"), size=(8, 4),
                         pixel=(255, 255, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: displayed rotated 90 degrees clockwise
    cases["exif_rotated"] = Case(save(random_image(40, 20), folder / "exif6.jpg", exif=exif),
                                 size=(20, 40))
    return cases


def add_bad_files(folder: str | os.PathLike) -> dict[str, Case]:
    """Files that must fail to decode, each with the expected reason category."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cases: dict[str, Case] = {}
    good = jpeg_bytes(120, 90, seed=3)

    def write(name: str, data: bytes, reason: str) -> None:
        (folder / name).write_bytes(data)
        cases[name.rsplit(".", 1)[0]] = Case(folder / name, reason=reason)

    write("zero.jpg", b"", "empty")
    write("truncated.jpg", good[: len(good) * 6 // 10], "truncated")
    write("header_only.jpg", good[:300], "truncated")
    png = io.BytesIO()
    random_image(60, 60, seed=5).save(png, "PNG")
    data = bytearray(png.getvalue())
    data[200:1200] = np.random.default_rng(1).integers(0, 256, 1000, np.uint8).tobytes()
    write("corrupt.png", bytes(data), "corrupt")
    write("corrupt_header.jpg", good[:3] + bytes(2000), "corrupt")
    write("text.jpg", b"this is a text file, not an image\n" * 20, "not-an-image")
    write("bomb.png", png_header_only(100_000, 100_000), "too-large")  # Pillow's own limit
    write("bomb_moderate.png", png_header_only(10_000, 10_000), "too-large")  # ours
    (folder / "directory.jpg").mkdir(exist_ok=True)
    cases["directory"] = Case(folder / "directory.jpg", reason="unreadable")
    locked = folder / "locked.jpg"
    locked.write_bytes(good)
    locked.chmod(0)
    skip = "running as root: chmod 000 does not block reading" if _is_root() else None
    cases["locked"] = Case(locked, reason="unreadable", skip=skip)
    cases["missing"] = Case(folder / "missing.jpg", reason="missing")
    return cases


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def make_messy_tree(root: str | os.PathLike) -> dict:
    """A folder holding everything at once, for end-to-end tests of loaders and runners.

    ``root/good/<class>/...`` (plain images), ``root/special/`` (valid awkward images) and
    ``root/bad/`` (files that must fail). Returns ``good`` (keys), ``special`` and ``bad``
    (Case dicts) and ``failures``: {key: reason} a folder scan of ``root`` must report
    (directories and absent files are not scanned; chmod 000 is readable as root).
    """
    root = Path(root)
    good = [f"good/{k}" for k in make_image_tree(root / "good", per_class=2)]
    special = add_special_images(root / "special")
    bad = add_bad_files(root / "bad")
    failures = {c.path.relative_to(root).as_posix(): c.reason for c in bad.values()
                if c.path.is_file() and not c.skip}
    return {"good": good, "special": special, "bad": bad, "failures": failures}

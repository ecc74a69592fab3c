"""Robust decoding: special images decode right, bad files fail with the right reason."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tests.imagegen import add_bad_files, add_special_images, random_image
from transferlab.data.imageio import REASONS, ImageDecodeError, decode_image, load_image
from transferlab.errors import DataError


@pytest.fixture(scope="module")
def special(tmp_path_factory):
    return add_special_images(tmp_path_factory.mktemp("special"))


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    return add_bad_files(tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("name", ["cmyk", "rgba", "palette", "palette_transparent", "16bit",
                                  "grayscale", "grayscale_jpeg", "la", "1bit", "exif_rotated"])
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_special_images_decode_to_requested_mode(special, name, mode):
    case = special[name]
    im = load_image(case.path, mode=mode)
    assert im.mode == mode
    assert im.size == case.size
    if case.pixel is not None:
        expected = case.pixel if mode == "RGB" else round(
            (299 * case.pixel[0] + 587 * case.pixel[1] + 114 * case.pixel[2]) / 1000)
        assert im.getpixel((0, 0)) == pytest.approx(expected, abs=1)


def test_cmyk_red_becomes_rgb_red(special):
    r, g, b = load_image(special["cmyk"].path).getpixel((5, 5))
    assert r > 200 and g < 60 and b < 60


def test_rgba_keeps_opaque_pixels(special):
    assert load_image(special["rgba"].path).getpixel((1, 0)) == (0, 0, 255)


def test_exif_orientation_transposes_content(tmp_path):
    im = random_image(40, 20, seed=7)
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(tmp_path / "rot.png", exif=exif)  # PNG: lossless, so pixels can be compared
    out = np.asarray(load_image(tmp_path / "rot.png"))
    expected = np.asarray(im.transpose(Image.Transpose.ROTATE_270))
    assert out.shape == (40, 20, 3)
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("name", ["zero", "truncated", "header_only", "corrupt",
                                  "corrupt_header", "text", "bomb", "bomb_moderate",
                                  "directory", "locked", "missing"])
def test_bad_files_raise_reason(bad, name):
    case = bad[name]
    if case.skip:
        pytest.skip(case.skip)
    with pytest.raises(ImageDecodeError) as info:
        load_image(case.path)
    err = info.value
    assert err.reason == case.reason, err
    assert err.reason in REASONS
    assert isinstance(err, DataError)
    assert str(case.path) in str(err)
    assert "(" in str(err) and err.short().startswith(case.reason)


def test_max_pixels_is_configurable(special):
    with pytest.raises(ImageDecodeError, match="max_pixels=100") as info:
        load_image(special["cmyk"].path, max_pixels=100)
    assert info.value.reason == "too-large"
    assert load_image(special["cmyk"].path, max_pixels=None).size == (20, 10)


def test_draft_decodes_large_jpeg_at_reduced_scale_but_not_below_target(tmp_path):
    path = tmp_path / "big.jpg"
    random_image(800, 600).save(path, quality=90)
    assert load_image(path).size == (800, 600)
    assert load_image(path, draft_size=(200, 150)).size == (200, 150)  # 1/4 scale
    assert load_image(path, draft_size=(190, 140)).size == (200, 150)  # never below target
    assert load_image(path, draft_size=(300, 300)).size == (400, 300)  # 1/2 scale
    assert load_image(path, draft_size=(500, 500)).size == (800, 600)  # too close: full size
    assert load_image(path, mode="L", draft_size=(100, 75)).mode == "L"


def test_draft_respects_exif_orientation(tmp_path):
    path = tmp_path / "tall.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    random_image(800, 400).save(path, exif=exif)  # displayed as 400 wide x 800 tall
    im = load_image(path, draft_size=(200, 400))
    assert im.size == (200, 400)


def test_decode_image_from_bytes():
    buf = io.BytesIO()
    random_image(10, 12).save(buf, "PNG")
    assert decode_image(io.BytesIO(buf.getvalue()), "L").size == (10, 12)
    with pytest.raises(ImageDecodeError) as info:
        decode_image(io.BytesIO(b""))
    assert info.value.reason == "empty"


def test_bad_mode_is_rejected(special):
    with pytest.raises(ValueError, match="mode"):
        load_image(special["grayscale"].path, mode="CMYK")

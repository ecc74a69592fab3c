"""The centre crop resampled directly (``preprocess.window: crop``).

timm's eval transform resizes the whole image (short side to ``input / crop_pct``) and then
keeps the centre crop: for 500x375 -> 298x224 kept of 341x256, and resizing is the largest
cost of reading an image (BENCHMARKS.md 11). Here Pillow resamples only the window, with the
same filter, sample positions, pass order (horizontal, then vertical, as Pillow does for
such a resize) and rounding. Pillow takes the window's box in float32, so 1 value in 1,000
to 10,000 differs by 1 (rarely 2) from resize-then-crop (tests/data/test_cropwindow.py). The
store records the window in its preprocessing, so rows of the two never mix.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from PIL import Image

SUPPORT = {"bilinear": 1.0, "bicubic": 2.0, "lanczos": 3.0}  # Pillow's filter radii, pixels


def resized_size(width: int, height: int, short: int) -> tuple[int, int]:
    """(W, H) of torchvision's ``Resize(short)``: the short side to ``short``, the long one
    scaled and truncated as torchvision does."""
    if width <= height:
        return short, int(short * height / width)
    return int(short * width / height), short


def crop_window(width: int, height: int, short: int, crop: tuple[int, int]
                ) -> tuple[float, float, float, float] | None:
    """The box of the source image that ``Resize(short)`` + ``CenterCrop(crop)`` keeps (in
    source pixels), or None where the crop would pad (the crop larger than the image)."""
    new_w, new_h = resized_size(width, height, short)
    crop_h, crop_w = crop
    if crop_w > new_w or crop_h > new_h:
        return None
    top, left = round((new_h - crop_h) / 2.0), round((new_w - crop_w) / 2.0)  # as torchvision
    sx, sy = width / new_w, height / new_h
    return (left * sx, top * sy, (left + crop_w) * sx, (top + crop_h) * sy)


class CropWindowResize:
    """``Resize(short)`` then ``CenterCrop(crop)`` on a PIL image, resampling only the window
    the crop keeps: a horizontal pass over the rows the window needs, then a vertical one.
    Any other input, a crop that pads and a resize Pillow would run vertical pass first (an
    image over twice as tall as wide) go through the two steps themselves."""

    def __init__(self, resize: Any, center_crop: Any):
        from torchvision.transforms.functional import pil_modes_mapping

        self.resize, self.center_crop = resize, center_crop
        self.short = int(resize.size if isinstance(resize.size, int) else resize.size[0])
        self.crop = tuple(int(v) for v in center_crop.size)
        self.resample = pil_modes_mapping[resize.interpolation]
        self.support = SUPPORT.get(resize.interpolation.value)

    def __call__(self, image: Any) -> Any:
        box = crop_window(*image.size, self.short, self.crop) \
            if isinstance(image, Image.Image) and self.support else None
        new_w, new_h = resized_size(*image.size, self.short) if box else (0, 0)
        width, height = image.size if box else (0, 0)
        if box is None or height - new_h > 2 * (width - new_w):  # Pillow goes vertical first
            return self.center_crop(self.resize(image))
        if (new_w, new_h) == (width, height):  # no resize: a plain crop
            left, top = round(box[0]), round(box[1])
            return image.crop((left, top, left + self.crop[1], top + self.crop[0]))
        return self.two_passes(image, box, height / new_h)

    def two_passes(self, image: Image.Image, box: tuple[float, ...], scale_y: float
                   ) -> Image.Image:
        crop_h, crop_w = self.crop
        reach = self.support * max(scale_y, 1.0) + 2  # rows the vertical filter can touch
        first = max(0, int(box[1] - reach))
        last = min(image.size[1], int(box[3] + reach) + 1)
        rows = image.crop((0, first, image.size[0], last))
        wide = rows.resize((crop_w, last - first), self.resample,
                           box=(box[0], 0, box[2], last - first))
        return wide.resize((crop_w, crop_h), self.resample,
                           box=(0, box[1] - first, crop_w, box[3] - first))

    def __repr__(self) -> str:
        return (f"CropWindowResize(short={self.short}, crop={self.crop}, "
                f"{self.resize.interpolation})")


def resample_crop_window(transform: Callable) -> Callable:
    """timm's eval transform with its leading ``Resize(int)`` + ``CenterCrop`` replaced by a
    ``CropWindowResize``; any other transform (squash, border crop, training) as it is."""
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Resize

    steps = list(getattr(transform, "transforms", []))
    if len(steps) < 2 or not isinstance(steps[0], Resize) or not isinstance(steps[1], CenterCrop):
        return transform
    size, mode = steps[0].size, steps[0].interpolation
    single = isinstance(size, int) or (isinstance(size, (list, tuple)) and len(size) == 1)
    if not single or steps[0].max_size is not None or not isinstance(mode, InterpolationMode):
        return transform
    return Compose([CropWindowResize(steps[0], steps[1]), *steps[2:]])

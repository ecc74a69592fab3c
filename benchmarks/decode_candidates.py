"""Decode-path candidates of issue #16, measured as whole processes beside the shipped path.

``python -c "import benchmarks.decode_candidates as c; c.main('box')" CONFIG key=value ...``
runs ``python -m transferlab.extract``'s command with one candidate patched in (none of them
is shipped; ``whole_process.py --candidates`` measures them in its alternation):

- ``pil``: the Pillow decoder only (simplejpeg switched off): what the code gave before.
- ``box``: the plain transform resamples only the crop window (Pillow ``resize(box=...)``)
  instead of resizing the whole image and cropping: Pillow takes the box as float32, so
  about 1 value in 6,000 differs by 1 (a few by up to 3) from resize-then-crop.
- ``dct``: JPEGs decoded by libjpeg-turbo at the smallest M/8 scale that still covers the
  resize target (DCT-domain scaling; Pillow's ``draft`` offers only 1/2, 1/4, 1/8), then the
  usual resize: a real change of pixels (another downscaling filter).
- ``box+dct``: both.
"""
from __future__ import annotations

import sys
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

CANDIDATES = ("pil", "box", "dct", "box+dct")


def resized_size(w: int, h: int, short: int) -> tuple[int, int]:
    """torchvision ``Resize(short)``'s output (W, H)."""
    if w <= h:
        return short, int(short * h / w)
    return int(short * w / h), short


class CropResize:
    """timm's eval transform (Resize(short side) + CenterCrop + to uint8 CHW) resampling
    only the pixels the crop keeps."""

    def __init__(self, short: int, crop: tuple[int, int], resample: int, fallback: Callable):
        self.short, self.crop, self.resample, self.fallback = short, crop, resample, fallback

    def __call__(self, im: Image.Image) -> torch.Tensor:
        w, h = im.size
        nw, nh = resized_size(w, h, self.short)
        ch, cw = self.crop
        if cw > nw or ch > nh:
            return self.fallback(im)
        top, left = round((nh - ch) / 2.0), round((nw - cw) / 2.0)  # as torchvision
        if (nw, nh) == (w, h):
            out = im.crop((left, top, left + cw, top + ch))
        else:
            sx, sy = w / nw, h / nh
            out = im.resize((cw, ch), self.resample,
                            box=(left * sx, top * sy, (left + cw) * sx, (top + ch) * sy))
        arr = np.array(out)
        t = torch.from_numpy(arr)
        return t.unsqueeze(0) if arr.ndim == 2 else t.permute(2, 0, 1)


def crop_resize(transform: Callable) -> Callable:
    """A ``CropResize`` for timm's [Resize(int), CenterCrop, MaybePILToTensor], else as is."""
    from torchvision.transforms import CenterCrop, InterpolationMode, Resize
    from torchvision.transforms.functional import pil_modes_mapping

    steps = getattr(transform, "transforms", [])
    if len(steps) != 3 or not isinstance(steps[0], Resize) or not isinstance(steps[1],
                                                                             CenterCrop):
        return transform
    size = steps[0].size
    short = size if isinstance(size, int) else size[0] if len(size) == 1 else None
    mode = steps[0].interpolation
    if short is None or not isinstance(mode, InterpolationMode):
        return transform
    return CropResize(short, tuple(steps[1].size), pil_modes_mapping[mode], transform)


def patch_box() -> None:
    from transferlab.extract import batches

    init = batches.ViewsDataset.__init__

    def patched(self, *a, **k):
        init(self, *a, **k)
        self.plain = crop_resize(self.plain)
    batches.ViewsDataset.__init__ = patched


def patch_dct() -> None:
    import simplejpeg

    from transferlab.data import fastjpeg, imageio

    apply = imageio._apply_draft

    def draft(im, mode, draft_size, orientation=None):
        apply(im, mode, draft_size, orientation)
        im.candidate_draft = draft_size

    def decode(fp, im, mode, reduced, orientation):
        target = getattr(im, "candidate_draft", None)
        if target is None or reduced or orientation != 1 or im.format != "JPEG" \
                or im.tile[0][3][0] != im.mode or im.mode != mode \
                or im.size[0] < target[0] or im.size[1] < target[1]:
            return None  # Pillow's path (DCT scaling could also enlarge)
        fp.seek(0)
        try:
            arr = simplejpeg.decode_jpeg(fp.read(), "GRAY" if mode == "L" else "RGB",
                                         min_width=int(target[0]), min_height=int(target[1]))
        except ValueError:
            return None
        return Image.fromarray(arr[..., 0] if mode == "L" else arr, mode)
    imageio._apply_draft, fastjpeg.decode = draft, decode


def main(candidate: str) -> None:
    """Run the extract command (``sys.argv[1:]``) with ``candidate`` patched in."""
    from transferlab.data import fastjpeg
    from transferlab.extract.__main__ import main as extract_main

    if candidate not in CANDIDATES:
        raise SystemExit(f"unknown candidate {candidate!r}; one of {', '.join(CANDIDATES)}")
    if candidate == "pil":
        fastjpeg.ENABLED = False
    if "box" in candidate:
        patch_box()
    if "dct" in candidate:
        patch_dct()
    raise SystemExit(extract_main(sys.argv[1:]))

"""Decode-path candidates of issue #16, measured as whole processes beside the shipped path.

``python -c "import benchmarks.decode_candidates as c; c.main('image')" CONFIG key=value ...``
runs ``python -m transferlab.extract``'s command with one candidate patched in (a variant
that is not shipped; ``whole_process.py --candidates`` measures them in its alternation):

- ``pil``: the Pillow decoder only (simplejpeg switched off): what the code gave before.
- ``image``: ``preprocess.window=image``: the whole image resized, then cropped (timm's
  transform exactly), what the code did before the crop window (``data/cropwindow.py``).
- ``dct``: JPEGs decoded by libjpeg-turbo at the smallest M/8 scale that still covers the
  resize target (DCT-domain scaling; Pillow's ``draft`` offers only 1/2, 1/4, 1/8), then the
  usual resize: a real change of pixels (another downscaling filter).
"""
from __future__ import annotations

import sys

from PIL import Image

CANDIDATES = ("pil", "image", "dct")


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
    if candidate == "dct":
        patch_dct()
    extra = ["preprocess.window=image"] if candidate == "image" else []
    raise SystemExit(extract_main([*sys.argv[1:], *extra]))

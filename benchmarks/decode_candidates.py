"""Decode-path candidates of issue #16, measured as whole processes beside the shipped path.

``python -c "import benchmarks.decode_candidates as c; c.main('pil')" CONFIG key=value ...``
runs ``python -m transferlab.extract``'s command as one candidate (a variant that is not
shipped; ``whole_process.py --candidates`` measures them in its alternation):

- ``pil``: the Pillow decoder only, what the code gave before simplejpeg: the command as it
  runs where simplejpeg is not installed (``data/fastjpeg.py`` then leaves every file to
  Pillow), by making ``import simplejpeg`` fail before transferlab is imported.
- ``image``: ``preprocess.window=image``: the whole image resized, then cropped (timm's
  transform exactly), what the code did before the crop window (``data/cropwindow.py``).

Dropped: ``dct`` (JPEGs decoded by libjpeg-turbo at the smallest M/8 scale covering the
resize target, a change of pixels) could only be measured by patching private decode
functions of the shipped code; its numbers in BENCHMARKS.md (section 11) were taken that way
and are not reproducible with this script.
"""
from __future__ import annotations

import sys

CANDIDATES = ("pil", "image")


def main(candidate: str) -> None:
    """Run the extract command (``sys.argv[1:]``) as ``candidate``."""
    if candidate not in CANDIDATES:
        raise SystemExit(f"unknown candidate {candidate!r}; one of {', '.join(CANDIDATES)}")
    if candidate == "pil":  # Python's import system: a None entry makes the import fail
        sys.modules["simplejpeg"] = None  # type: ignore[assignment]
    from transferlab.data import fastjpeg
    from transferlab.extract.__main__ import main as extract_main

    if candidate == "pil" and fastjpeg.available():
        raise SystemExit("simplejpeg was imported before the pil candidate could block it")
    extra = ["preprocess.window=image"] if candidate == "image" else []
    raise SystemExit(extract_main([*sys.argv[1:], *extra]))

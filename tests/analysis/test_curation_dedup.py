"""The recommended near-duplicate setup end to end: features of the built-in ``dedup``
config, ``transferlab curate`` at its default threshold; photo-like images with planted
copies (JPEG q35, 50% downscale, 90% crop, +10% brightness, mirror) are grouped with their
sources and nothing else is."""
from __future__ import annotations

import contextlib
import csv
import io

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from tests.imagegen import photo_like
from transferlab.analysis.curation import DEFAULT_THRESHOLD
from transferlab.commands import main
from transferlab.store.reader import FeatureStore


def cli(*argv: str) -> tuple[int, str, str]:
    """``transferlab ARGV`` in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def jpeg(im: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


COPIES = {
    "jpeg": lambda im: jpeg(im, 35),
    "half": lambda im: im.resize((im.width // 2, im.height // 2), Image.BILINEAR),
    "crop": lambda im: im.crop((im.width // 20, im.height // 20, im.width - im.width // 20,
                                im.height - im.height // 20)),
    "bright": lambda im: ImageEnhance.Brightness(im).enhance(1.1),
    "mirror": ImageOps.mirror,
}


def test_dedup_config_and_default_threshold_find_the_planted_copies(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    planted = []
    for i in range(30):
        im = photo_like(160, 120, seed=i)
        im.save(root / f"p{i:02d}.jpg", quality=92)
        if i < len(COPIES):
            kind = list(COPIES)[i]
            COPIES[kind](im).save(root / f"p{i:02d}_{kind}.png")
            planted.append(sorted([f"p{i:02d}.jpg", f"p{i:02d}_{kind}.png"]))
    out = tmp_path / "store"
    code, _, err = cli("extract", "dedup", f"data.root={root}", f"output.dir={out}",
                       "runtime.device=cpu", "runtime.precision=fp32", "runtime.threads=1",
                       "runtime.num_workers=0", "runtime.batch_size=16",
                       "runtime.progress=false")
    assert code == 0, err
    store = FeatureStore.open(out)
    assert store.features.shape[1] == 64 * 16  # stage:1 of ResNet-18, 4x4 grid
    code, text, err = cli("curate", str(out), "--no-labels", "-k", "3")
    assert code == 0, err
    assert f"similarity >= {DEFAULT_THRESHOLD}" in text
    with open(out / "curation" / "duplicates.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    groups: dict[str, list[str]] = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(r["key"])
    assert sorted(sorted(g) for g in groups.values()) == sorted(planted)
    # the kept image is the larger file: the JPEG source, except where the copy is a PNG
    kept = {r["key"] for r in rows if r["role"] == "keep"}
    sizes = {k: (root / k).stat().st_size for g in planted for k in g}
    assert kept == {max(g, key=lambda k: (sizes[k], -g.index(k))) for g in planted}
    assert np.isfinite(np.asarray(store.features, np.float32)).all()

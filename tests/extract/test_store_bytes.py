"""Stores stay byte for byte what the code before the one-engine reshaping (#23) wrote.

``store_bytes.json`` holds, per case, the SHA-256 of every file of the store (tmp paths replaced,
``.npz`` files by their arrays: the zip members carry a time stamp) and of every
``meta.json`` field but the time and library versions, as written by the previous runner
(``run_extract`` / ``run_multi_extract``). Regenerate with the old code on the path::

    PYTHONPATH=/path/to/old/checkout python tests/extract/test_store_bytes.py \
        > tests/extract/store_bytes.json

The digests hold for the machine arithmetic they were taken on: ``CANARY`` digests
test_resnet's plain forward pass and a PIL resize, outside transferlab; where they differ,
this machine rounds otherwise and the store digests cannot be compared (skip, not fail).
"""
from __future__ import annotations

import hashlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

if __name__ == "__main__":  # run as a script: the checkout on PYTHONPATH is the one recorded
    sys.path.append(str(Path(__file__).resolve().parents[2]))

from tests.imagegen import random_image, save
from transferlab.config import ExtractConfig, load_config
from transferlab.extract.runner import run_extract

CUTS = "model.cut=[stage:0, stage:2, head]"
CASES = {
    "head": [],  # BatchNorm folded
    "stage1-srp-views": ["model.cut=stage:1", "output.reduce=srp:8", "output.views=1"],
    "head-list": ["model.cut=[head]"],
    "cuts3": [CUTS],
    "cuts3-pca": [CUTS, "output.reduce=pca:4"],
    "cuts2-srp-mean": ["model.cut=[stage:0, head]", "output.reduce=srp:16", "output.views=1",
                       "output.view_mode=mean"],
}
BASE = ["model.name=test_resnet", "model.pretrained=false", "preprocess.input_size=[32, 32]",
        "runtime.batch_size=4", "runtime.num_workers=0", "runtime.threads=1",
        "runtime.progress=false", "runtime.precision=fp32", "runtime.device=cpu",
        "output.shard_size=8"]
SKIPPED_META = {"elapsed_seconds", "versions", "written_at"}


def make_data(root: Path) -> None:
    """PNG only (lossless: no JPEG codec version in the digests), one unreadable file."""
    for c, name in enumerate(("cat", "dog")):
        for i, (w, h) in enumerate([(32, 24), (40, 40), (24, 36), (36, 30), (30, 33)]):
            save(random_image(w, h, seed=10 * c + i), root / name / f"{i:04d}.png")
    (root / "dog" / "broken.png").write_bytes(b"not a png")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def npz_bytes(path: Path) -> bytes:
    with np.load(path, allow_pickle=False) as z:
        return b"".join(k.encode() + str(z[k].dtype).encode() + repr(z[k].shape).encode()
                        + z[k].tobytes() for k in sorted(z.files))


def store_digests(out: Path, tmp: Path) -> dict[str, str]:
    """Every file of the store(s) under ``out`` and every recorded meta field, digested."""
    tmp_text = str(tmp.resolve())
    digests = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file() and p.name != ".lock"):
        rel = path.relative_to(out).as_posix()
        if path.name == "meta.json":
            meta = json.loads(path.read_text(encoding="utf-8"))
            for field in sorted(set(meta) - SKIPPED_META):
                text = json.dumps(meta[field], sort_keys=True).replace(tmp_text, "<tmp>")
                digests[f"{rel}:{field}"] = sha(text.encode())
        elif path.suffix == ".npz":
            digests[rel] = sha(npz_bytes(path))
        else:
            digests[rel] = sha(path.read_bytes().replace(tmp_text.encode(), b"<tmp>"))
    return digests


def canary() -> str:
    """test_resnet's fp32 channels_last forward (seed 0, one thread) and a PIL resize."""
    import timm

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = timm.create_model("test_resnet", pretrained=False).eval()
        model = model.to(memory_format=torch.channels_last)
        x = torch.linspace(-2, 2, 2 * 3 * 32 * 32).reshape(2, 3, 32, 32)
        with torch.inference_mode():
            out = model(x.contiguous(memory_format=torch.channels_last)).numpy().tobytes()
    finally:
        torch.set_num_threads(threads)
    png = io.BytesIO()
    random_image(40, 36, seed=3).save(png, format="PNG")
    resized = Image.open(io.BytesIO(png.getvalue())).convert("RGB").resize((33, 30),
                                                                          Image.BILINEAR)
    return sha(out + resized.tobytes())


def run_case(tmp: Path, name: str) -> dict[str, str]:
    data, out = tmp / "data", tmp / name
    if not data.exists():
        make_data(data)
    run_extract(load_config(None, [*BASE, f"data.root={data}", f"output.dir={out}",
                                   *CASES[name]], ExtractConfig))
    return store_digests(out, tmp)


# recorded with the previous runner (see the module docstring), one JSON file beside this one
RECORDED = json.loads((Path(__file__).with_name("store_bytes.json")).read_text(encoding="utf-8"))
CANARY: str = RECORDED["canary"]
EXPECTED: dict[str, dict[str, str]] = RECORDED["expected"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_stores_are_byte_identical_to_the_previous_runner(tmp_path, name):
    if canary() != CANARY:
        pytest.skip("this machine computes test_resnet or PIL resizes with other rounding "
                    "than the machine the digests were recorded on")
    got = run_case(tmp_path, name)
    want = EXPECTED[name]
    assert sorted(got) == sorted(want)  # the same files and meta fields
    assert {k: v for k, v in got.items() if want[k] != v} == {}


# what the previous code recorded for the "head" case (tmp paths as <tmp>)
OLD_HEAD_FINGERPRINT = {
    "backbone": "test_resnet", "source": "timm", "weights": {"random_init_seed": 0},
    "kwargs": {}, "num_classes": None, "in_chans": None, "cut": "head", "pool": None,
    "pool_after_cut": "none",
    "preprocess": {"crop_mode": "center", "crop_pct": 0.95, "input_size": [3, 32, 32],
                   "interpolation": "bilinear", "mean": [0.5, 0.5, 0.5],
                   "resize": "center_crop", "std": [0.5, 0.5, 0.5], "window": "crop"},
    "views": 0, "view_mode": None, "decode": "pil",
    "compute": {"channels_last": True, "device": "cpu", "fold_bn": True, "precision": "fp32"},
    "data": {"dataset": None, "list_file": None, "root": "<tmp>/data", "source": "folder",
             "split": "train"},
    "labels": {"class_names": ["cat", "dog"], "label_column": None}}


def test_a_store_the_previous_code_began_resumes(tmp_path):
    """A killed store with the fingerprint the previous code recorded (its first shard
    finished): the new runner accepts it and continues after that shard."""
    from transferlab.models.extractor import build_extractor
    from transferlab.store.writer import StoreWriter

    make_data(tmp_path / "data")
    out = tmp_path / "head"
    prints = json.loads(json.dumps(OLD_HEAD_FINGERPRINT).replace("<tmp>",
                                                                 str(tmp_path.resolve())))
    keys = sorted(p.relative_to(tmp_path / "data").as_posix()
                  for p in (tmp_path / "data").rglob("*.png"))
    dim = build_extractor("test_resnet", preprocess={"input_size": [32, 32]}).extractor.feature_dim
    writer = StoreWriter(out, prints, "float16", 8)
    writer.add(keys[:8], np.array([k.startswith("dog") for k in keys[:8]], np.int64),
               np.zeros((8, dim), np.float32))  # one whole shard, then killed
    writer.abort()
    result = run_extract(load_config(None, [*BASE, f"data.root={tmp_path / 'data'}",
                                            f"output.dir={out}"], ExtractConfig))
    assert (result.skipped, result.written, result.failed) == (8, 2, 1)
    assert result.store.meta["fingerprint"] == prints


def test_the_fine_tune_cache_fingerprint_is_the_one_the_previous_code_recorded():
    from transferlab.config import DataConfig
    from transferlab.data.fingerprint import data_fingerprint
    from transferlab.runtime.record import rows_fingerprint

    digest = {"base": "abc", "cut": "head", "pool": "none", "preprocess": {"input_size": [3]}}
    data = DataConfig(root="/data")
    compute = {"precision": "fp32", "fold_bn": True, "channels_last": True, "device": "cpu"}
    stages_part = {**digest, "data": data_fingerprint(data)}  # finetune/stages.py before
    previous = {**stages_part, "compute": compute}  # training/cache.py before
    assert rows_fingerprint(digest, data, compute) == previous


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        recorded = {name: run_case(Path(tmp), name) for name in CASES}
    print(json.dumps({"canary": canary(), "expected": recorded}, indent=1, sort_keys=True))

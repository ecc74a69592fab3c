"""``runtime.precision: int8`` (issue #30 item 4): ONNX Runtime's statically quantised graph,
calibrated on the run's first images; rows close to eager fp32's, the calibration recorded
in the fingerprint and in the graph cache key, the quantised graph cached and reused, search
queries of an int8 store run that graph."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from tests.helpers import make_cfg
from tests.imagegen import photo_like, save
from transferlab.config import ExtractConfig, load_config
from transferlab.errors import ConfigError, StoreError
from transferlab.extract.runner import run_extract
from transferlab.models import backends
from transferlab.models.engine import FeatureComputer
from transferlab.models.extractor import build_extractor
from transferlab.runtime import graphcache
from transferlab.runtime.device import Runtime, resolve_precision
from transferlab.runtime.record import compute_record

CPU = Runtime(torch.device("cpu"), "fp32", False, 0, 1)
INT8 = ("runtime.precision=int8", "runtime.backend=onnxruntime",
        "runtime.calibration_images=8", "output.dtype=float32")


def need_onnxruntime() -> None:
    if not backends.backend_available("onnxruntime"):
        pytest.skip('onnxruntime is not installed: pip install "transferlab[onnx]"')


def photo_tree(root, count: int = 12) -> list[str]:
    keys = [f"{'ab'[i % 2]}/{i:03d}.jpg" for i in range(count)]
    for i, key in enumerate(keys):
        save(photo_like(48, 40, seed=i), root / key)
    return keys


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def counting_quantizer(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = backends.quantize_int8
    monkeypatch.setattr(backends, "quantize_int8",
                        lambda data, images: calls.append(len(images)) or real(data, images))
    return calls


def test_int8_extraction_agrees_with_fp32_records_and_reuses_its_graph(tmp_path, monkeypatch):
    need_onnxruntime()
    monkeypatch.setenv(graphcache.CACHE_ENV, str(tmp_path / "graphs"))
    quantized = counting_quantizer(monkeypatch)
    root, out = tmp_path / "data", tmp_path / "int8"
    keys = photo_tree(root)
    result = run_extract(make_cfg(root, out, *INT8))
    assert quantized == [8]  # calibrated on the first 8 images of the run
    assert "int8" in result.summary() and "exported and quantised" in result.summary()
    compute = result.store.meta["fingerprint"]["compute"]
    assert compute["precision"] == "int8" and compute["backend"] == "onnxruntime"
    assert compute["calibration"]["images"] == 8
    assert len(compute["calibration"]["sha256"]) == 64
    assert result.store.meta["compute"] == compute
    # the cache holds the fp32 graph and its int8 graph, keyed by the calibration digest
    records = sorted((tmp_path / "graphs").glob("*.json"))
    assert len(records) == 2
    assert sum(compute["calibration"]["sha256"] in r.read_text() for r in records) == 1

    eager = run_extract(make_cfg(root, tmp_path / "fp32", "output.dtype=float32"))
    order = [list(eager.store.keys).index(k) for k in result.store.keys]
    got = result.store.features[:].astype(np.float32)
    want = eager.store.features[:].astype(np.float32)[order]
    cos = cosines(got, want)
    assert float(np.median(cos)) >= 0.99 and float(cos.min()) >= 0.95
    assert not np.array_equal(got, want)  # int8 arithmetic, not the fp32 graph

    # a resume with fp32 (or another calibration) is refused like any compute setting
    with pytest.raises(StoreError):
        run_extract(make_cfg(root, out, "runtime.precision=fp32", "output.dtype=float32"))
    with pytest.raises(StoreError):
        run_extract(make_cfg(root, out, *INT8, "runtime.calibration_images=4"))
    assert quantized == [8, 4]  # (that refused run quantised on its 4 images first)
    # the same config again: calibrates alike, finds the graph, does not quantise again
    again = run_extract(make_cfg(root, out, *INT8))
    assert again.skipped == len(keys) and quantized == [8, 4]
    assert "from the cache" in again.summary()

    # search queries of the int8 store run its quantised graph from the cache
    from transferlab.extract.queries import embed_images

    store = again.store
    i = list(store.keys).index(keys[0])
    query = embed_images(store.meta, [root / keys[0]], root=out)[0]
    row = store.features[i]
    np.testing.assert_allclose(query, row, rtol=0, atol=1e-4 * float(np.abs(row).max()))
    assert quantized == [8, 4]
    for f in (tmp_path / "graphs").iterdir():  # a cache emptied since: how to rebuild it
        f.unlink()
    with pytest.raises(StoreError, match="re-run the extract config") as err:
        embed_images(store.meta, [root / keys[0]], root=out)
    assert "\n" not in str(err.value)


def test_the_calibration_digest_depends_on_the_images_only():
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(0))
    assert backends.calibration_digest(x) == backends.calibration_digest(x.clone())
    y = x.clone()
    y[3, 0, 0, 0] ^= 1
    assert backends.calibration_digest(y) != backends.calibration_digest(x)
    assert backends.calibration_digest(x[:3]) != backends.calibration_digest(x)
    # recorded only for int8: fingerprints of other precisions are as before
    assert "calibration" not in compute_record(CPU, True, "onnxruntime")
    record = {"images": 4, "sha256": "ab" * 32}
    assert compute_record(replace(CPU, precision="int8"), True, "onnxruntime",
                          record)["calibration"] == record


def test_int8_settings_that_cannot_run_are_one_line():
    torch.manual_seed(0)
    b = build_extractor("test_resnet", cut="head", preprocess={"input_size": [32, 32]})
    rt = replace(CPU, precision="int8")
    for backend in ("eager", "compile", "openvino"):
        with pytest.raises(ConfigError, match="set runtime.backend=onnxruntime") as err:
            backends.resolve_backend(backend, b.extractor, replace(rt, backend=backend))
        assert "\n" not in str(err.value)
    if backends.backend_available("onnxruntime"):  # int8 only exists there
        assert backends.resolve_backend("auto", b.extractor, rt) == "onnxruntime"
        # a frozen forward without calibration images (fine-tune caching, predict)
        with pytest.raises(ConfigError, match="set runtime.precision=fp32"):
            FeatureComputer(b.extractor, b.spec, replace(rt, backend="onnxruntime"))
    with pytest.raises(ConfigError, match="runtime.device=cpu"):
        resolve_precision("int8", torch.device("cuda"))
    from transferlab.config import FinetuneConfig
    from transferlab.finetune.run import run_finetune

    with pytest.raises(ConfigError, match="int8 is for extraction only"):
        run_finetune(load_config(None, ["runtime.precision=int8"], FinetuneConfig))
    with pytest.raises(ConfigError, match="calibration_images.*between 1 and 1024"):
        load_config(None, ["runtime.calibration_images=0"], ExtractConfig)

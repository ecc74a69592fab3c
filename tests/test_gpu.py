"""GPU-only checks (issue #17): each takes the ``cuda`` fixture, so it is skipped with a
reason on a machine without CUDA and run by ``benchmarks/gpu_suite.sh`` on one with it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers import make_cfg
from tests.imagegen import make_image_tree, random_image, save
from transferlab.extract.runner import run_extract
from transferlab.models.engine import FeatureComputer
from transferlab.models.extractor import build_extractor
from transferlab.runtime.device import Runtime, apply_runtime
from transferlab.store.reader import FeatureStore

pytestmark = pytest.mark.gpu


def gpu_runtime(precision: str) -> Runtime:
    rt = Runtime(torch.device("cuda"), precision, channels_last=True, num_workers=0, threads=1)
    apply_runtime(rt)
    return rt


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_pipelined_rows_equal_serial_rows(cuda, precision):
    """Batch i + 1 started before batch i is finished: the rows of i are intact."""
    built = build_extractor("test_resnet", cut="head")
    computer = FeatureComputer(built.extractor, built.spec, gpu_runtime(precision))
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (8, 3, *built.spec.input_size[1:]), dtype=torch.uint8,
                             generator=gen) for _ in range(6)]
    serial = [computer(b) for b in batches]
    pending = [computer.start(batches[0])]
    piped = []
    for batch in batches[1:]:
        pending.append(computer.start(batch))
        piped.append(computer.finish(pending.pop(0)))
    piped.append(computer.finish(pending.pop(0)))
    for a, b in zip(serial, piped):
        np.testing.assert_array_equal(a, b)


def jpeg_kinds(tmp_path) -> dict[str, tuple[str, torch.Tensor]]:
    """name -> (path, bytes) of baseline, progressive, 4:4:4 and greyscale JPEGs."""
    out = {}
    image = random_image(320, 240, seed=3)
    for name, kwargs in {"baseline": {}, "progressive": {"progressive": True},
                         "444": {"subsampling": 0}, "gray": {}}.items():
        im = image.convert("L") if name == "gray" else image
        path = save(im, tmp_path / f"{name}.jpg", quality=90, **kwargs)
        out[name] = (str(path), torch.frombuffer(bytearray(path.read_bytes()),
                                                 dtype=torch.uint8))
    return out


def test_nvjpeg_equals_the_cpu_decoder_and_never_corrupts_rows(cuda, tmp_path):
    from transferlab.config import PreprocessConfig
    from transferlab.data.gpudecode import BatchDecoder
    from transferlab.data.preprocess import resolve_preprocess

    spec = resolve_preprocess({}, PreprocessConfig(input_size=[64, 64]))
    gpu, cpu = BatchDecoder(spec, cuda, None), BatchDecoder(spec, "cpu", None)
    kinds = jpeg_kinds(tmp_path)
    data = [raw for _, raw in kinds.values()]
    first = [im.float().cpu() for im in gpu.decode_resized(data)]
    for want in ([im.float() for im in cpu.decode_resized(data)],  # libjpeg-turbo, tensors
                 [gpu.pil_fallback(path).float().cpu() for path, _ in kinds.values()]):  # PIL
        for a, b in zip(want, first):
            if a.shape[0] != b.shape[0]:  # gray decoded to 1 or 3 channels alike
                a = a.expand_as(b)
            assert (a - b).abs().mean() < 3.0  # IDCTs and resize kernels differ slightly
    busy = torch.randn(4096, 4096, device=cuda)
    for _ in range(20):  # decode while the compute stream is busy: identical every time
        busy = busy @ busy.T / 4096
        again = gpu({"items": data, "raw": [True] * len(data), "path": [None] * len(data),
                     "key": [str(i) for i in range(len(data))],
                     "label": torch.zeros(len(data), dtype=torch.int64), "failures": []})
        torch.cuda.synchronize()
        for a, b in zip(first, again["image"][:, 0].cpu().float()):
            assert torch.equal(a.expand_as(b) if a.shape != b.shape else a, b)


@pytest.mark.parametrize("precision, tf32, tol", [("fp32", "ieee", 1e-4),
                                                  ("bf16", "tf32", 5e-2),
                                                  ("fp16", "tf32", 2e-2)])
def test_gpu_extraction_matches_a_cpu_fp32_reference(cuda, tmp_path, precision, tf32, tol):
    """fp32 runs with TF32 off (full fp32: close to the CPU); bf16/fp16 with TF32 on."""
    make_image_tree(tmp_path / "data", per_class=4)
    ref = run_extract(make_cfg(tmp_path / "data", tmp_path / "cpu", "runtime.device=cpu",
                               "runtime.precision=fp32")).store
    got = run_extract(make_cfg(tmp_path / "data", tmp_path / "gpu", "runtime.device=cuda",
                               f"runtime.precision={precision}")).store
    assert torch.backends.cuda.matmul.fp32_precision == tf32
    assert torch.backends.cudnn.conv.fp32_precision == tf32
    assert got.keys == ref.keys and got.meta["compute"]["device"] == "cuda"
    a, b = np.asarray(ref.features, np.float32), np.asarray(got.features, np.float32)
    assert np.abs(a - b).max() <= tol * np.abs(a).max()


@pytest.mark.parametrize("cut", ["head", "stage:1", "layer:layer1.0"])
def test_compiled_extraction_matches_eager(cuda, tmp_path, cut):
    make_image_tree(tmp_path / "data", per_class=3)
    args = ("runtime.device=cuda", "runtime.precision=fp32", f"model.cut={cut}")
    eager = run_extract(make_cfg(tmp_path / "data", tmp_path / "eager", *args)).store
    compiled = run_extract(make_cfg(tmp_path / "data", tmp_path / "compiled", *args,
                                    "runtime.compile=true")).store
    a, b = np.asarray(eager.features, np.float32), np.asarray(compiled.features, np.float32)
    assert np.abs(a - b).max() <= 1e-3 * max(np.abs(a).max(), 1e-6)


def test_interrupted_gpu_extraction_resumes_identically(cuda, tmp_path):
    make_image_tree(tmp_path / "data", per_class=10)
    args = ("runtime.device=cuda", "runtime.batch_size=4", "output.shard_size=4")
    whole = run_extract(make_cfg(tmp_path / "data", tmp_path / "whole", *args)).store

    def stop(done: int) -> None:
        if done >= 8:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_extract(make_cfg(tmp_path / "data", tmp_path / "part", *args), on_batch=stop)
    resumed = run_extract(make_cfg(tmp_path / "data", tmp_path / "part", *args)).store
    assert resumed.keys == whole.keys
    np.testing.assert_array_equal(np.asarray(resumed.features), np.asarray(whole.features))
    assert FeatureStore.open(tmp_path / "part").meta["rows"] == whole.meta["rows"]


@pytest.mark.parametrize("cache, budget, where", [
    ("memory", None, "device"), ("memory", 1e-9, "cpu"), ("disk", None, "disk"),
    ("off", None, "off")])
def test_finetune_on_gpu_with_every_cache_kind_and_fp16(cuda, tmp_path, monkeypatch, cache,
                                                        budget, where):
    from tests.helpers import tiny
    from transferlab.finetune.run import run_finetune

    extra = [f"train.cache_max_gb={budget}"] if budget else []
    scalers = []
    real_scaler = torch.amp.GradScaler

    def spy(*args, **kwargs):  # fp16 trains through an enabled gradient scaler
        scalers.append(real_scaler(*args, **kwargs))
        return scalers[-1]

    monkeypatch.setattr(torch.amp, "GradScaler", spy)
    result = run_finetune(tiny(tmp_path, "runtime.device=cuda", "runtime.precision=fp16",
                               f"train.cache={cache}", "train.epochs=3", *extra))
    stage = result.stage("head-only")
    assert stage.details["cache"] == where  # cpu: host rows, gathered into pinned batches
    assert scalers and all(scaler.is_enabled() for scaler in scalers)
    assert np.isfinite(result.history[-1]["train_loss"])
    assert stage.accuracy > 0.5

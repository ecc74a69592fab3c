"""``runtime.backend`` (issue #30): every backend gives eager's features within
``backends.TOLERANCE`` (one cut, several cuts, hook cuts), the fingerprint records the
backend, exported graphs are cached by what they depend on and only trusted when ours."""
from __future__ import annotations

import json
import threading
from dataclasses import replace

import numpy as np
import pytest
import torch

from tests.helpers import make_cfg, make_tree
from transferlab.config import ExtractConfig, RuntimeConfig, load_config
from transferlab.errors import ConfigError, MissingDependencyError, StoreError
from transferlab.extract.runner import run_extract
from transferlab.models import backends
from transferlab.models.engine import FeatureComputer, engine_batch_size
from transferlab.models.extractor import build_extractor
from transferlab.runtime import graphcache
from transferlab.runtime.device import Runtime, resolve_runtime
from transferlab.runtime.record import compute_record

CPU = Runtime(torch.device("cpu"), "fp32", False, 0, 1)
NEEDS = {"onnxruntime": "onnxruntime", "openvino": "openvino"}


def need(backend: str) -> None:
    if not backends.backend_available(backend):
        pytest.skip(f'{backend} is not installed: pip install "transferlab[{backend}]"')


def built(cut, seed: int = 0):
    torch.manual_seed(seed)  # 64x64 inputs: exports and runs stay quick
    return build_extractor("test_resnet", cut=cut, preprocess={"input_size": [64, 64]})


def images(spec, n: int = 3) -> torch.Tensor:
    return torch.randint(0, 256, (n, *spec.input_size), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(0))


def rows(b, backend: str, x: torch.Tensor, precision: str = "fp32") -> list[np.ndarray]:
    rt = replace(CPU, backend=backend, precision=precision)
    return FeatureComputer(b.extractor, b.spec, rt, fold_bn=True)(x)


def assert_within(got: list[np.ndarray], want: list[np.ndarray], precision: str = "fp32"):
    tol = backends.TOLERANCE[precision]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        scale = float(np.abs(w).max())
        assert float(np.abs(g - w).max()) <= tol["max_abs_rel"] * scale
        cos = (g * w).sum(1) / (np.linalg.norm(g, axis=1) * np.linalg.norm(w, axis=1))
        assert float(cos.min()) >= tol["min_cosine"]


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("cut", ["stage:2", ["stage:1", "layer:layer2.0.conv1", "head"]],
                         ids=["one-cut", "three-cuts"])
def test_exported_backends_give_eagers_features(backend, cut, tmp_path, monkeypatch):
    need(backend)
    monkeypatch.setenv(graphcache.CACHE_ENV, str(tmp_path))
    b = built(cut)
    x = images(b.spec)
    want = rows(b, "eager", x)
    got = rows(b, backend, x)
    assert_within(got, want)
    # another batch size runs the same graph (dynamic batch), from the cache
    assert_within(rows(b, backend, x[:1]), [w[:1] for w in want])



@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_exported_backends_apply_output_hflip(backend, tmp_path, monkeypatch):
    """output.hflip (each row the mean of the image's and its mirror's) holds on a graph too:
    the rows equal eager's hflip rows, and a mirrored batch gives the same rows."""
    need(backend)
    monkeypatch.setenv(graphcache.CACHE_ENV, str(tmp_path))
    b = built("stage:2")
    x = images(b.spec)

    def flipped_rows(name: str, batch: torch.Tensor) -> list[np.ndarray]:
        compute = FeatureComputer(b.extractor, b.spec, replace(CPU, backend=name), fold_bn=True)
        compute.hflip = True
        return compute(batch)

    want = flipped_rows("eager", x)
    got = flipped_rows(backend, x)
    assert_within(got, want)
    assert_within(flipped_rows(backend, x.flip(-1)), want)
    plain = rows(b, backend, x)[0]
    assert float(np.abs(plain - want[0]).max()) > 1e-3 * float(np.abs(want[0]).max())

@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_exported_graphs_run_while_the_caller_goes_on(backend, tmp_path, monkeypatch):
    """``start`` hands an exported graph its batch and returns (the runner decodes the next
    batch meanwhile); ``finish`` gives the rows ``__call__`` gives, batch by batch in order,
    and a failure inside the runtime comes out of ``finish``."""
    need(backend)
    monkeypatch.setenv(graphcache.CACHE_ENV, str(tmp_path))
    b = built("stage:2")
    compute = FeatureComputer(b.extractor, b.spec, replace(CPU, backend=backend), fold_bn=True)
    batches = [images(b.spec, n) for n in (3, 2, 4)]
    want = [compute(x)[0] for x in batches]
    release = threading.Event()
    inner = compute.graph

    def slow(x):  # held until the caller has started every batch
        if not release.wait(10):
            raise AssertionError("start waited for the graph")
        return inner(x)

    compute.graph = slow
    pending = [compute.start(x) for x in batches]  # returns although the graph is held
    release.set()
    for p, w in zip(pending, want):
        np.testing.assert_array_equal(compute.finish(p)[0], w)

    def broken(x):
        raise RuntimeError("the runtime failed")

    compute.graph = broken
    with pytest.raises(RuntimeError, match="the runtime failed"):
        compute.finish(compute.start(batches[0]))


def test_openvino_bf16_is_within_the_bf16_tolerance(tmp_path, monkeypatch):
    need("openvino")
    monkeypatch.setenv(graphcache.CACHE_ENV, str(tmp_path))
    b = built("head")
    x = images(b.spec)
    assert_within(rows(b, "openvino", x, "bf16"), rows(b, "eager", x), "bf16")


def test_compile_backend_gives_eagers_features():
    torch.manual_seed(0)  # a tiny conv net: inductor's compile time grows with the graph
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8),
                              torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten()).eval()
    b = built("head")
    tiny = replace(b, extractor=net)
    x = images(b.spec, 2)[:, :, :32, :32]
    assert_within(rows(tiny, "compile", x), rows(tiny, "eager", x))


def exported(b, tmp_path):
    engine = FeatureComputer(b.extractor, b.spec, replace(CPU, backend="onnxruntime"),
                             fold_bn=True)
    return engine.prepared, sorted(tmp_path.glob("*.onnx"))


def test_a_graph_is_exported_once_then_read_from_the_cache(tmp_path, monkeypatch):
    need("onnxruntime")
    monkeypatch.setenv(graphcache.CACHE_ENV, str(tmp_path))
    first, files = exported(built("head"), tmp_path)
    assert not first.cached and first.seconds > 0 and len(files) == 1
    again, files_again = exported(built("head"), tmp_path)
    assert again.cached and files_again == files
    assert "exported" in first.summary() and "from the cache" in again.summary()


def test_a_graph_is_rebuilt_when_the_weights_or_versions_change(tmp_path, monkeypatch):
    need("onnxruntime")
    monkeypatch.setenv(graphcache.CACHE_ENV, str(tmp_path))
    exported(built("head", seed=0), tmp_path)
    other, files = exported(built("head", seed=1), tmp_path)  # other weights
    assert not other.cached and len(files) == 2
    b = built("head", seed=1)
    x = images(b.spec)
    assert_within(rows(b, "onnxruntime", x), rows(b, "eager", x))  # the new weights' graph
    monkeypatch.setattr(backends, "_own_version", lambda: "999.0")  # a new version
    newer, files = exported(built("head", seed=0), tmp_path)
    assert not newer.cached and len(files) == 3


@pytest.mark.parametrize("tamper", ["graph", "record", "foreign-key"])
def test_a_tampered_or_foreign_cache_entry_is_never_loaded(tamper, tmp_path, monkeypatch):
    need("onnxruntime")
    monkeypatch.setenv(graphcache.CACHE_ENV, str(tmp_path))
    b = built("head")
    exported(b, tmp_path)
    graph = next(tmp_path.glob("*.onnx"))
    record = graph.with_suffix(".json")
    if tamper == "graph":  # same size, other bytes: a planted graph
        data = bytearray(graph.read_bytes())
        data[-8:] = b"\x00" * 8
        graph.write_bytes(bytes(data))
    elif tamper == "record":  # the record rewritten to vouch for other bytes
        meta = json.loads(record.read_text())
        meta["sha256"] = "0" * 64
        record.write_text(json.dumps(meta))
    else:  # written by someone else's transferlab (another key)
        monkeypatch.setenv("TRANSFERLAB_INDEX_KEY_FILE", str(tmp_path / "other.key"))
    loads = []
    real = backends.export_onnx
    monkeypatch.setattr(backends, "export_onnx", lambda *a: loads.append(1) or real(*a))
    again, _ = exported(b, tmp_path)
    assert not again.cached and loads == [1]  # exported again, the entry replaced
    x = images(b.spec)
    assert_within(rows(b, "onnxruntime", x), rows(b, "eager", x))


def test_a_missing_runtime_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setattr(backends, "backend_available", lambda name: name not in NEEDS)
    b = built("head")
    for backend in NEEDS:
        with pytest.raises(MissingDependencyError) as err:
            rows(b, backend, images(b.spec))
        assert f'pip install "transferlab[{"onnx" if backend == "onnxruntime" else backend}]"' \
            in str(err.value) and "\n" not in str(err.value)
    # auto never asks for an install: eager where the runtime it would pick is missing
    monkeypatch.setattr(backends, "AUTO_TABLE", {(backends.cpu_kind(), "fp32", "resnet"):
                                                 "onnxruntime"})
    engine = FeatureComputer(b.extractor, b.spec, replace(CPU, backend="auto"))
    assert engine.backend == "eager"


def test_auto_picks_the_table_entry_for_this_cpu_and_family(monkeypatch):
    need("onnxruntime")
    b = built("head")
    rt = replace(CPU, backend="auto")
    assert backends.model_family(b.extractor) == "resnet"
    monkeypatch.setattr(backends, "AUTO_TABLE", {})
    assert backends.resolve_backend("auto", b.extractor, rt) == "eager"
    monkeypatch.setattr(backends, "AUTO_TABLE", {(backends.cpu_kind(), "fp32", "resnet"):
                                                 "onnxruntime"})
    assert backends.resolve_backend("auto", b.extractor, rt) == "onnxruntime"
    assert backends.resolve_backend("auto", b.extractor, replace(rt, precision="bf16")) == "eager"
    # the engine folds BatchNorm first (a torch.fx GraphModule, no ResNet class left): the
    # family still comes from the model as built, and the automatic batch is the graph's
    engine = FeatureComputer(b.extractor, b.spec, rt, fold_bn=True)
    assert engine.folded and engine.backend == "onnxruntime"
    assert engine_batch_size(b.extractor, b.spec.input_size, rt) == 8


def test_settings_a_backend_cannot_run_are_one_line():
    b = built("head")
    with pytest.raises(ConfigError, match="computes in fp32 or int8; set runtime.precision=fp32"):
        backends.resolve_backend("onnxruntime", b.extractor, replace(CPU, precision="bf16"))
    # precision auto with onnxruntime resolves to fp32 (its only precision)
    rt = resolve_runtime(RuntimeConfig(device="cpu", precision="auto", backend="onnxruntime"))
    assert rt.precision == "fp32" and rt.backend == "onnxruntime"
    with pytest.raises(ConfigError, match="runtime.backend.*choose one of: auto, eager"):
        load_config(None, ["runtime.backend=tensorrt"], ExtractConfig)
    with pytest.raises(ConfigError, match="runtime.backend must be one of"):
        backends.resolve_backend("tensorrt", b.extractor, CPU)  # a store's meta.json


def test_the_fingerprint_records_the_backend_and_eager_stores_keep_theirs():
    assert "backend" not in compute_record(CPU, True)  # stores written before #30 resume
    assert compute_record(CPU, True, "onnxruntime")["backend"] == "onnxruntime"


def test_a_resume_with_another_backend_is_refused(tmp_path, monkeypatch):
    need("onnxruntime")
    monkeypatch.setenv(graphcache.CACHE_ENV, str(tmp_path / "graphs"))
    root, out = tmp_path / "data", tmp_path / "store"
    keys = make_tree(root, 4)
    cfg = make_cfg(root, out, "runtime.backend=onnxruntime")
    result = run_extract(cfg)
    assert result.store.meta["compute"]["backend"] == "onnxruntime"
    assert "graph exported in" in result.summary()
    with pytest.raises(StoreError):
        run_extract(make_cfg(root, out, "runtime.backend=eager"))
    again = run_extract(make_cfg(root, out, "runtime.backend=onnxruntime"))  # a resume
    assert again.skipped == 4 and "from the cache" in again.summary()
    eager = run_extract(make_cfg(root, tmp_path / "eager"))
    assert_within([again.store.features[:].astype(np.float32)],
                  [eager.store.features[:].astype(np.float32)])
    # search queries are embedded as the store's rows were: by its recorded backend
    from transferlab.extract.queries import embed_images

    calls = []
    real = backends.OnnxRuntimeGraph.__call__
    monkeypatch.setattr(backends.OnnxRuntimeGraph, "__call__",
                        lambda self, x: calls.append(len(x)) or real(self, x))
    store = again.store
    row = store.features[list(store.keys).index(keys[0])].astype(np.float32)
    query = embed_images(store.meta, [root / keys[0]], root=out)[0]
    assert calls == [1]  # one batch, through the store's backend
    np.testing.assert_allclose(query, row, atol=2e-3 * float(np.abs(row).max()))


def test_the_fine_tune_caching_pass_runs_the_backend_and_records_it(tmp_path, monkeypatch):
    need("onnxruntime")
    from tests.imagegen import random_image
    from transferlab.config import DataConfig
    from transferlab.data.preprocess import build_transform, resolve_preprocess
    from transferlab.data.sources import build_dataset
    from transferlab.models.classifier import Classifier
    from transferlab.store.reader import FeatureStore
    from transferlab.training.cache import cache_features
    from transferlab.training.feeds import LoaderSource

    monkeypatch.setenv(graphcache.CACHE_ENV, str(tmp_path / "graphs"))
    for i in range(6):
        (tmp_path / "data" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        random_image(40, 30, seed=i).save(tmp_path / "data" / f"c{i % 2}" / f"{i}.jpg")
    spec = resolve_preprocess({"input_size": (3, 32, 32)})
    ds = build_dataset(DataConfig(source="folder", root=str(tmp_path / "data")))
    ds.transform = build_transform(spec, normalize=False)
    ds.image_mode, ds.draft_size = spec.image_mode, spec.scale_size()
    src = LoaderSource(ds, np.maximum(ds.labels, 0), torch.device("cpu"))
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8),
                               torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten()).eval()
    net = Classifier(base, torch.nn.Identity(), ["c0", "c1"], spec)
    keys = list(ds.keys)
    out = {}
    for backend in ("eager", "onnxruntime"):
        cache_features(net, src, "disk", replace(CPU, backend=backend), 4, (8,), keys,
                       tmp_path / backend, {"x": 1}, fold_bn=True)
        store = FeatureStore.open(tmp_path / backend)
        out[backend] = store.features[:].astype(np.float32)
        assert store.meta["fingerprint"]["compute"].get("backend", "eager") == backend
    assert_within([out["onnxruntime"]], [out["eager"]])

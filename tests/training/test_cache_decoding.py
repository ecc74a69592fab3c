"""The fine-tune caching pass decodes like extraction (issue #16 item 4): each batch by
``runtime.threads`` threads without loader workers, in order, failures kept, same pixels."""
from __future__ import annotations

import threading

import numpy as np
import torch

from tests.imagegen import random_image
from transferlab.config import DataConfig
from transferlab.data.datasets import ImageDataset
from transferlab.data.preprocess import build_transform, resolve_preprocess
from transferlab.data.sources import build_dataset
from transferlab.models.classifier import Classifier
from transferlab.runtime.device import Runtime
from transferlab.training.cache import frozen_features
from transferlab.training.feeds import LoaderSource


def folder(tmp_path, n: int = 7, bad: int = 3):
    root = tmp_path / "data"
    for i in range(n):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        path = root / f"c{i % 2}" / f"{i:03d}.jpg"
        if i == bad:
            path.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
        else:
            random_image(40 + 3 * i, 30 + 2 * i, seed=i).save(path, quality=90)
    return root


def image_source(tmp_path) -> LoaderSource:
    spec = resolve_preprocess({"input_size": (3, 32, 32)})
    ds: ImageDataset = build_dataset(DataConfig(source="folder", root=str(folder(tmp_path))))
    ds.transform = build_transform(spec, normalize=False)
    ds.image_mode, ds.draft_size = spec.image_mode, spec.scale_size()
    return LoaderSource(ds, np.maximum(ds.labels, 0), torch.device("cpu"))


def test_threaded_batches_equal_plain_ones_and_failures_are_shared(tmp_path):
    src = image_source(tmp_path)
    order = torch.arange(len(src))
    plain = list(src.batches(order, 3))
    threaded_src = src.with_decode_threads(2)
    threaded = list(threaded_src.batches(order, 3))
    assert len(plain) == len(threaded) == 3
    for (x1, y1, p1), (x2, y2, p2) in zip(plain, threaded):
        assert x1.dtype == torch.uint8 and torch.equal(x1, x2)
        assert torch.equal(y1, y2) and torch.equal(p1, p2)
    assert list(src.failures) == ["c1/003.jpg"]  # the copy wrote into the same dict
    assert src.failures["c1/003.jpg"].startswith(("corrupt", "truncated"))
    assert threaded_src.failures is src.failures


def test_the_caching_pass_decodes_with_the_runtime_threads(tmp_path, monkeypatch):
    seen: set[str] = set()
    real = ImageDataset.__getitem__

    def spy(self, i):
        seen.add(threading.current_thread().name)
        return real(self, i)

    monkeypatch.setattr(ImageDataset, "__getitem__", spy)
    src = image_source(tmp_path)
    spec = resolve_preprocess({"input_size": (3, 32, 32)})
    net = Classifier(None, torch.nn.Identity(), ["c0", "c1"], spec)
    rt = Runtime(torch.device("cpu"), "fp32", False, 0, 2)
    feats = list(frozen_features(net.base_engine(rt), src, torch.arange(len(src)), 4))
    assert [len(p) for _, p in feats] == [4, 2]  # 7 items, c1/003 bad, batches of 4
    assert seen and all(name.startswith("decode") for name in seen)
    assert src.decode_threads == 1  # the caller's source is not changed


def conv_bn_base() -> torch.nn.Module:
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8),
                               torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten())
    bn = base[1]
    bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.data.uniform_()
    return base.eval()


def test_the_caching_pass_runs_a_folded_copy_of_the_base_with_the_same_features(tmp_path):
    from transferlab.training.cache import cache_features

    src = image_source(tmp_path)
    spec = resolve_preprocess({"input_size": (3, 32, 32)})
    net = Classifier(conv_bn_base(), torch.nn.Identity(), ["c0", "c1"], spec)
    rt = Runtime(torch.device("cpu"), "fp32", False, 0, 1)
    calls = []
    net.base.register_forward_hook(lambda *_: calls.append(1))
    folded = cache_features(net, src, "cpu", rt, 4, (8,), fold_bn=True)
    assert calls == [1]  # once, to check the copy; the two batches ran the folded copy
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.base.modules())  # kept
    plain = cache_features(net, src, "cpu", rt, 4, (8,), fold_bn=False)
    assert calls == [1, 1, 1]  # and now the two batches through the base itself
    a, b = folded.x, plain.x
    assert a.shape == b.shape == (6, 8) and not torch.equal(a, b)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_the_disk_cache_records_whether_its_rows_come_from_a_folded_base(tmp_path):
    from transferlab.store.reader import FeatureStore
    from transferlab.training.cache import cache_features

    src = image_source(tmp_path)
    spec = resolve_preprocess({"input_size": (3, 32, 32)})
    net = Classifier(conv_bn_base(), torch.nn.Identity(), ["c0", "c1"], spec)
    rt = Runtime(torch.device("cpu"), "fp32", False, 0, 1)
    keys = list(src.dataset.keys)
    for fold in (True, False):
        cache_features(net, src, "disk", rt, 4, (8,), keys, tmp_path / f"c{fold}", {"x": 1},
                       fold_bn=fold)
        meta = FeatureStore.open(tmp_path / f"c{fold}").meta
        assert meta["fingerprint"]["compute"]["fold_bn"] is fold

"""Feature store: round trip, numpy-only reading, resume after a kill, fingerprints, exports."""
from __future__ import annotations

import csv
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from transferlab.errors import StoreError
from transferlab.store.reader import FeatureStore
from transferlab.store.writer import StoreWriter

FP = {"backbone": "resnet18", "cut": "head", "preprocess": {"size": [224, 224]}, "views": 0}
DIM = 5


def items(n: int = 23, seed: int = 0) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Keys with repeated base names in two folders, labels and features."""
    keys = [f"{'ab'[i % 2]}/{i // 2:04d}.jpg" for i in range(n)]
    labels = np.arange(n, dtype=np.int64) % 3
    feats = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return keys, labels, feats


FAILED = {3: "corrupt: bad data", 11: "truncated: image file is truncated", 22: "empty"}


def run(directory: Path, keys, labels, feats, batch: int = 4, shard_size: int = 5,
        dtype: str = "float32", stop_after: int | None = None, **kwargs) -> StoreWriter:
    """What the extract runner does: skip done keys, feed the rest in order, in batches."""
    writer = StoreWriter(directory, FP, dtype=dtype, shard_size=shard_size, **kwargs)
    todo = [i for i, k in enumerate(keys) if k not in writer.done_keys]
    if stop_after is not None:
        todo = todo[:stop_after]
    for start in range(0, len(todo), batch):
        idx = todo[start:start + batch]
        good = [i for i in idx if i not in FAILED]
        writer.add([keys[i] for i in good], labels[good], feats[good])
        writer.add_failures([(keys[i], FAILED[i]) for i in idx if i in FAILED])
    return writer


def store_files(directory: Path) -> dict[str, bytes]:
    """Every file that defines the store's content (meta.json has timestamps: left out)."""
    names = ["index.csv", "failures.csv"] + sorted(
        f"shards/{p.name}" for p in (directory / "shards").glob("shard-*.npy"))
    return {name: (directory / name).read_bytes() for name in names}


@pytest.fixture
def data():
    return items()


@pytest.fixture
def reference(tmp_path, data) -> Path:
    out = tmp_path / "reference"
    run(out, *data).close({"backbone": "resnet18"})
    return out


# ---- round trip ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip(tmp_path, data, dtype):
    keys, labels, feats = data
    writer = run(tmp_path / "s", keys, labels, feats, dtype=dtype)
    store = writer.close({"backbone": "resnet18", "class_names": ["x", "y", "z"],
                          "elapsed_s": 1.5, "shards": "caller cannot clobber this"})
    good = [i for i in range(len(keys)) if i not in FAILED]
    assert len(store) == len(good) and store.features.shape == (len(good), DIM)
    assert store.features.dtype == np.dtype(dtype) and store.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(store.features[:], feats[good].astype(dtype))
    assert store.keys == [keys[i] for i in good]
    np.testing.assert_array_equal(store.labels, labels[good])
    assert store.labels.dtype == np.int64 and (store.views == 0).all()
    assert store.failures == [(keys[i], FAILED[i]) for i in sorted(FAILED)]
    assert store.class_names == ["x", "y", "z"]
    meta = store.meta
    assert meta["fingerprint"] == json.loads(json.dumps(FP)) and meta["elapsed_s"] == 1.5
    assert meta["dtype"] == dtype and meta["rows"] == len(good) and meta["dim"] == DIM
    assert meta["num_failures"] == 3 and meta["num_keys"] == len(good)
    assert [s["rows"] for s in meta["shards"]] == [5, 5, 5, 5]
    reopened = FeatureStore.open(tmp_path / "s")
    np.testing.assert_array_equal(reopened.get("b/0002.jpg"), feats[5].astype(dtype))
    assert "rows=20" in repr(reopened)


def test_numpy_only_reading(reference, data):
    keys, labels, feats = data
    meta = json.loads((reference / "meta.json").read_text())
    shards = [np.load(reference / s["file"], mmap_mode="r") for s in meta["shards"]]
    assert all(isinstance(s, np.memmap) for s in shards)
    assert [len(s) for s in shards] == [5, 5, 5, 5]  # every shard exactly shard_size
    with open(reference / "index.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["key", "label", "row", "view"]
    full = np.concatenate(shards)
    for r in rows:
        i = keys.index(r["key"])
        assert int(r["label"]) == labels[i] and r["view"] == "0"
        np.testing.assert_array_equal(full[int(r["row"])], feats[i])
    with open(reference / "failures.csv", newline="", encoding="utf-8") as f:
        assert [tuple(r.values()) for r in csv.DictReader(f)][0] == (keys[3], FAILED[3])


def test_lazy_indexing(reference, data):
    keys, _, feats = data
    store = FeatureStore.open(reference)
    expected = feats[[i for i in range(len(keys)) if i not in FAILED]]
    f = store.features
    assert len(f) == 20 and f.shape == (20, DIM) and f.ndim == 2
    np.testing.assert_array_equal(f[7], expected[7])
    np.testing.assert_array_equal(f[-1], expected[-1])
    np.testing.assert_array_equal(f[3:13], expected[3:13])  # spans three shards
    np.testing.assert_array_equal(f[18:3:-4], expected[18:3:-4])
    idx = np.array([19, 0, 7, 7, -2])
    np.testing.assert_array_equal(f[idx], expected[idx])
    np.testing.assert_array_equal(f[[1, 2]], expected[[1, 2]])
    mask = np.arange(20) % 3 == 0
    np.testing.assert_array_equal(f[mask], expected[mask])
    np.testing.assert_array_equal(f[2:6, 1:3], expected[2:6, 1:3])
    assert f[4, 2] == expected[4, 2]
    assert f[5:5].shape == (0, DIM)
    with pytest.raises(IndexError):
        f[20]
    with pytest.raises(IndexError):
        f[np.array([0, 25])]
    assert isinstance(f[0:2], np.ndarray) and not isinstance(f[0:2], np.memmap)


def test_reading_maps_only_needed_shards(reference):
    store = FeatureStore.open(reference)
    store.features[12]
    assert list(store.features._maps) == [2]  # one shard mapped, nothing else loaded


def test_iter_chunks_and_to_torch(reference):
    store = FeatureStore.open(reference)
    chunks = list(store.iter_chunks(rows=7))
    assert [start for start, _ in chunks] == [0, 7, 14]
    assert [len(c) for _, c in chunks] == [7, 7, 6]
    np.testing.assert_array_equal(np.concatenate([c for _, c in chunks]), store.features[:])
    tensor = store.to_torch()
    assert tensor.dtype == torch.float32 and tuple(tensor.shape) == (20, DIM)
    assert store.to_torch(torch.float64).dtype == torch.float64


def test_row_lookup_by_key(reference, data):
    keys, _, feats = data
    store = FeatureStore.open(reference)
    assert store.keys[store.row("a/0000.jpg")] == "a/0000.jpg"
    assert store.row("b/0000.jpg") == 1  # same base name, other folder: distinct row
    with pytest.raises(KeyError, match=r"did you mean 'a/0004.jpg'"):
        store.row("0004.jpg")
    with pytest.raises(KeyError, match="not in the store"):
        store.get("zzz/nothing-like-it.png")
    with pytest.raises(KeyError, match="no view 1"):
        store.row("a/0000.jpg", view=1)


def test_exports(reference, tmp_path):
    store = FeatureStore.open(reference)
    npz = store.export_npz(tmp_path / "feats.npz")
    with np.load(npz, allow_pickle=False) as data:
        np.testing.assert_array_equal(data["features"], store.features[:])
        assert data["paths"].tolist() == store.keys
        np.testing.assert_array_equal(data["labels"], store.labels)
    path = store.export_pickle(tmp_path / "feats.pkl")
    with open(path, "rb") as f:
        exported = pickle.load(f)  # the test reads the export; the library never unpickles
    assert list(exported) == store.keys
    np.testing.assert_array_equal(exported["b/0002.jpg"], store.get("b/0002.jpg"))


# ---- resume ----------------------------------------------------------------------------------


def test_abandoned_run_with_leftovers_resumes_identically(tmp_path, data, reference):
    keys, labels, feats = data
    out = tmp_path / "killed"
    run(out, keys, labels, feats, stop_after=14).abort()  # 2 shards finished, 1 row buffered
    shards = out / "shards"
    assert sorted(p.name for p in shards.glob("*.npy")) == ["shard-00000.npy", "shard-00001.npy"]
    np.save(shards / "shard-00002.npy", np.ones((5, DIM), np.float32))  # orphan: no .json
    (shards / "shard-00003.npy.tmp").write_bytes(b"\x93NUMPY half written")
    (out / "index.csv.tmp").write_text("key,la")
    with open(shards / "failures.jsonl", "a", encoding="utf-8") as f:
        f.write('["a/0009.jpg", "corr')  # killed in the middle of a line
    with pytest.raises(StoreError, match="unfinished.*rerun the same extract command"):
        FeatureStore.open(out)
    writer = StoreWriter(out, FP, dtype="float32", shard_size=5)
    assert not list(shards.glob("*.tmp")) and not (shards / "shard-00002.npy").exists()
    first_ten = {keys[i] for i in range(12) if i not in FAILED}  # failed ones: retried
    assert writer.done_keys == first_ten
    writer.abort()
    run(out, keys, labels, feats).close({"backbone": "resnet18"})
    assert store_files(out) == store_files(reference)


def test_resume_with_views_split_across_shards(tmp_path):
    keys = [f"k{i}" for i in range(7)]
    feats = np.random.default_rng(1).standard_normal((7, 3, DIM)).astype(np.float32)

    def feed(out: Path, stop: int | None = None) -> StoreWriter:
        writer = StoreWriter(out, FP, dtype="float32", shard_size=4)
        todo = [k for k in keys if k not in writer.done_keys][:stop]
        for k in todo:  # one add per key with all of its 3 views
            writer.add([k] * 3, [1, 1, 1], feats[keys.index(k)], views=[0, 1, 2])
        return writer

    feed(tmp_path / "ref").close()
    killed = feed(tmp_path / "cut", stop=3)  # 9 rows: shards of 4 + 4, 1 buffered
    assert killed.done_keys == frozenset()  # the snapshot taken at open
    killed.abort()  # queued shards are written, the buffered row dropped
    on_disk = [json.loads(p.read_text())["keys"]
               for p in sorted((tmp_path / "cut" / "shards").glob("shard-*.json"))]
    assert on_disk == [["k0"] * 3 + ["k1"], ["k1"] * 2 + ["k2"] * 2]  # k2: 2 views on disk
    reopened = StoreWriter(tmp_path / "cut", FP, dtype="float32", shard_size=4)
    assert reopened.done_keys == {"k0", "k1"}  # k2's third view was lost with the buffer
    reopened.abort()
    resumed = feed(tmp_path / "cut")
    store = resumed.close()
    assert store_files(tmp_path / "cut") == store_files(tmp_path / "ref")
    assert store.views.tolist()[:6] == [0, 1, 2, 0, 1, 2]
    np.testing.assert_array_equal(store.get("k2", view=2), feats[2, 2])


KILL_CHILD = textwrap.dedent("""
    import sys, time
    import numpy as np
    sys.path.insert(0, sys.argv[2])
    import tests.store.test_store as t
    keys, labels, feats = t.items()
    orig_add = t.StoreWriter.add
    def slow_add(self, *a, **k):
        orig_add(self, *a, **k)
        time.sleep(0.05)
    t.StoreWriter.add = slow_add
    t.run(sys.argv[1], keys, labels, feats, batch=1)
    time.sleep(60)  # never closes: the parent kills it
""")


def test_sigkill_then_resume_is_identical(tmp_path, data, reference):
    out = tmp_path / "sigkill"
    root = Path(__file__).resolve().parents[2]
    child = subprocess.Popen([sys.executable, "-c", KILL_CHILD, str(out), str(root)],
                             env={**os.environ, "PYTHONPATH": str(root)})
    try:
        deadline = time.time() + 40
        while not (out / "shards" / "shard-00001.json").exists():
            assert time.time() < deadline and child.poll() is None, "child did not write"
            time.sleep(0.01)
        time.sleep(0.07)  # land somewhere in the middle of the next shard
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert not (out / "meta.json").exists()
    writer = StoreWriter(out, FP, dtype="float32", shard_size=5)
    assert 10 <= len(writer.done_keys) < 23
    writer.abort()
    keys, labels, feats = data
    run(out, keys, labels, feats).close({"backbone": "resnet18"})
    assert store_files(out) == store_files(reference)


def test_reopening_a_finished_store(reference, data):
    writer = StoreWriter(reference, FP, dtype="float32", shard_size=5)
    assert writer.done_keys == {k for i, k in enumerate(data[0]) if i not in FAILED}
    before = store_files(reference)
    writer.add(data[0][:2], data[1][:2], data[2][:2])  # already stored: ignored
    assert writer.close({}).meta["rows"] == 20
    assert store_files(reference) == before


# ---- refusals and errors ---------------------------------------------------------------------


def test_other_fingerprint_is_refused_then_overwritten(reference, data):
    (reference / "config.yaml").write_text("kept: true\n")
    other = {**FP, "cut": "stage:3"}
    with pytest.raises(StoreError, match=r"cut: stored 'head', now 'stage:3'.*output.overwrite"):
        StoreWriter(reference, other, dtype="float32", shard_size=5)
    with pytest.raises(StoreError, match="dtype: stored 'float32', now 'float16'"):
        StoreWriter(reference, FP, dtype="float16", shard_size=5)
    writer = StoreWriter(reference, other, dtype="float32", shard_size=5, overwrite=True)
    assert writer.done_keys == set() and not (reference / "meta.json").exists()
    assert not list((reference / "shards").iterdir())
    assert (reference / "config.yaml").exists()  # not a store file: kept
    writer.add(data[0][:3], data[1][:3], data[2][:3])
    store = writer.close({})
    assert len(store) == 3 and store.meta["fingerprint"]["cut"] == "stage:3"


def test_second_writer_is_refused(tmp_path):
    first = StoreWriter(tmp_path / "s", FP)
    with pytest.raises(StoreError, match="another run is writing"):
        StoreWriter(tmp_path / "s", FP)
    first.abort()
    StoreWriter(tmp_path / "s", FP).abort()


def test_writer_thread_errors_surface(tmp_path, data, monkeypatch):
    def broken(self, n, shard, part):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(StoreWriter, "_write_shard", broken)
    writer = StoreWriter(tmp_path / "s", FP, shard_size=2)
    keys, labels, feats = data
    with pytest.raises(StoreError, match="No space left on device.*rerun to resume"):
        for i in range(0, 20, 2):
            writer.add(keys[i:i + 2], labels[i:i + 2], feats[i:i + 2])
            time.sleep(0.01)
    writer.abort()  # never raises
    with pytest.raises(StoreError, match="closed"):
        writer.add(keys[:1], labels[:1], feats[:1])


def test_bad_inputs(tmp_path, data):
    keys, labels, feats = data
    with pytest.raises(StoreError, match="dtype"):
        StoreWriter(tmp_path / "a", FP, dtype="int8")
    with StoreWriter(tmp_path / "b", FP) as writer:
        with pytest.raises(StoreError, match="3 keys, 2 labels"):
            writer.add(keys[:3], labels[:2], feats[:3])
        with pytest.raises(StoreError, match="2-D"):
            writer.add(keys[:1], labels[:1], feats[0])
        writer.add(keys[:1], labels[:1], feats[:1])
        with pytest.raises(StoreError, match="6 columns but the store .* holds 5"):
            writer.add(keys[1:2], labels[1:2], np.zeros((1, 6)))


def test_torch_features_are_accepted(tmp_path):
    with StoreWriter(tmp_path / "t", FP) as writer:
        writer.add(["x"], [0], torch.ones(1, 4, dtype=torch.bfloat16))
        store = writer.close()
    assert store.get("x").tolist() == [1.0] * 4 and store.labels.tolist() == [0]


def test_open_errors(tmp_path):
    with pytest.raises(StoreError, match="no feature store at .*transferlab.extract"):
        FeatureStore.open(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(StoreError, match="not a feature store"):
        FeatureStore.open(tmp_path / "plain")


def test_failed_keys_are_retried_and_dropped_once_read(tmp_path, data):
    keys, labels, feats = data
    out = tmp_path / "s"
    run(out, keys, labels, feats).close()  # keys 3, 11 and 22 fail
    writer = StoreWriter(out, FP, dtype="float32", shard_size=5)
    assert {keys[i] for i in FAILED}.isdisjoint(writer.done_keys)
    writer.add([keys[3]], labels[[3]], feats[[3]])  # fixed since
    writer.add_failures([(keys[11], FAILED[11]), (keys[22], "corrupt: other")])
    store = writer.close()
    assert store.failures == [(keys[11], FAILED[11]), (keys[22], "corrupt: other")]
    assert store.get(keys[3]).tolist() == feats[3].tolist()
    log = (out / "shards" / "failures.jsonl").read_text().splitlines()
    assert len(log) == 4  # the unchanged failure of key 11 is not logged twice
    with StoreWriter(out, FP, dtype="float32", shard_size=5) as again:  # the log agrees
        assert keys[3] in again.done_keys and keys[11] not in again.done_keys
        assert again.close().failures == store.failures


def test_empty_store(tmp_path):
    with StoreWriter(tmp_path / "e", FP) as writer:
        writer.add_failures([("a.jpg", "empty: zero-byte file")])
        store = writer.close()
    assert len(store) == 0 and store.features.shape == (0, 0)
    assert store.failures == [("a.jpg", "empty: zero-byte file")]

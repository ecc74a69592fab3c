"""Parquet / HDF5 / npz / pickle exports read back equal to the store, in bounded chunks."""
from __future__ import annotations

import json
import pickle
import sys

import numpy as np
import pytest

from transferlab.commands.export import main
from transferlab.store.export_formats import export_store, store_to_pandas
from transferlab.store.reader import FeatureStore
from transferlab.store.writer import StoreWriter

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def multi_store(path, dtype="float16", n=23, dim=5):
    """Several shards, a second view for every third key, unlabelled rows and failures."""
    rng = np.random.default_rng(0)
    keys, labels, views = [], [], []
    for i in range(n):
        for v in range(2 if i % 3 == 0 else 1):
            keys.append(f"{'ab'[i % 2]}/ü{i:03d}.png")
            labels.append(-1 if i % 5 == 4 else i % 2)
            views.append(v)
    feats = rng.normal(size=(len(keys), dim)).astype(dtype)
    with StoreWriter(path, {"t": "export"}, dtype=dtype, shard_size=7) as writer:
        writer.add(keys, labels, feats, views=views)
        writer.add_failures([("bad/1.png", "cannot identify image"), ("bad/2.png", "truncated")])
        store = writer.close({"class_names": ["a", "b"], "backbone": {"name": "lenet"}})
    return store, feats


def test_parquet_round_trip_in_row_groups(tmp_path):
    store, feats = multi_store(tmp_path / "s")
    assert len(store.features.files) > 2 and len(store.failures) == 2
    out = export_store(store, tmp_path / "f.parquet", rows_per_chunk=8)
    meta = pq.ParquetFile(out).metadata
    assert meta.num_rows == len(store) == 31 and meta.num_row_groups == 4  # bounded chunks
    table = pq.read_table(out)
    assert table.schema.field("embedding").type == pa.list_(pa.float16(), 5)
    emb = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    assert emb.dtype == np.float16 and np.array_equal(emb, feats)  # exact, same dtype
    assert table.column("key").to_pylist() == store.keys
    assert table.column("label").to_pylist() == store.labels.tolist()
    assert table.column("view").to_pylist() == store.views.tolist()
    names = table.column("class_name").to_pylist()
    assert names[:3] == ["a", "a", "b"] and names[store.labels.tolist().index(-1)] is None
    assert json.loads(table.schema.metadata[b"transferlab"])["backbone"] == {"name": "lenet"}
    pd = pytest.importorskip("pandas")
    df = pd.read_parquet(out)
    assert df["key"].tolist() == store.keys
    assert np.array_equal(np.stack(df["embedding"].to_numpy()), feats)


def test_hdf5_round_trip(tmp_path):
    h5py = pytest.importorskip("h5py")
    store, feats = multi_store(tmp_path / "s", dtype="float32")
    out = export_store(store, tmp_path / "f.h5", rows_per_chunk=8)
    with h5py.File(out, "r") as f:
        assert f["features"].chunks == (8, 5) and f["features"].dtype == np.float32
        assert np.array_equal(f["features"][:], feats)
        assert [k.decode() for k in f["keys"][:]] == store.keys
        assert np.array_equal(f["labels"][:], store.labels)
        assert np.array_equal(f["views"][:], store.views)
        assert [c.decode() for c in f["class_names"][:]] == ["a", "b"]
        assert f.attrs["rows"] == 31 and f.attrs["dtype"] == "float32"
        assert json.loads(f.attrs["backbone"]) == {"name": "lenet"}


def test_npz_and_pickle_through_the_cli(tmp_path, capsys):
    store, feats = multi_store(tmp_path / "s", dtype="float32")
    assert main([str(tmp_path / "s"), str(tmp_path / "f.npz")]) == 0
    assert "wrote 31 rows" in capsys.readouterr().out
    with np.load(tmp_path / "f.npz") as z:
        assert np.array_equal(z["features"], feats) and z["paths"].tolist() == store.keys
    assert main([str(tmp_path / "s"), str(tmp_path / "dump.bin"), "--format", "pickle"]) == 0
    with open(tmp_path / "dump.bin", "rb") as f:
        data = pickle.load(f)  # the test reads its own export; transferlab never does
    assert len(data) == 23 and np.array_equal(data[store.keys[0]], feats[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dump.bin", "f.npz", "s"]


def test_existing_output_refused_unless_overwrite(tmp_path, capsys):
    multi_store(tmp_path / "s")
    out = tmp_path / "f.parquet"
    out.write_bytes(b"keep me")
    assert main([str(tmp_path / "s"), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists" in err and "--overwrite" in err
    assert out.read_bytes() == b"keep me"
    assert main([str(tmp_path / "s"), str(out), "--overwrite"]) == 0
    assert pq.ParquetFile(out).metadata.num_rows == 31


def test_unknown_suffix_and_missing_store(tmp_path, capsys):
    multi_store(tmp_path / "s")
    assert main([str(tmp_path / "s"), str(tmp_path / "f.csv")]) == 2
    err = capsys.readouterr().err
    assert "--format is not given" in err and "name one of parquet|hdf5|npz|pickle" in err
    assert main([str(tmp_path / "nope"), str(tmp_path / "f.parquet")]) == 2
    assert "no feature store" in capsys.readouterr().err
    assert not (tmp_path / "f.parquet").exists()


def test_killed_export_leaves_no_file(tmp_path, monkeypatch):
    store, _ = multi_store(tmp_path / "s")
    chunks = store.iter_chunks

    def dying(rows=65536):
        for n, item in enumerate(chunks(rows)):
            if n == 2:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(store, "iter_chunks", dying)
    with pytest.raises(KeyboardInterrupt):
        export_store(store, tmp_path / "out" / "f.parquet", rows_per_chunk=4)
    assert list((tmp_path / "out").iterdir()) == []  # neither the file nor its temporary


@pytest.mark.parametrize("module, out, extra", [("pyarrow", "f.parquet", "parquet"),
                                                ("h5py", "f.h5", "hdf5")])
def test_missing_dependency_names_the_extra(tmp_path, monkeypatch, capsys, module, out, extra):
    multi_store(tmp_path / "s")
    monkeypatch.setitem(sys.modules, module, None)
    assert main([str(tmp_path / "s"), str(tmp_path / out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f'pip install "transferlab[{extra}]"' in err
    assert not (tmp_path / out).exists()


def test_to_pandas_and_empty_store(tmp_path):
    pytest.importorskip("pandas")
    store, feats = multi_store(tmp_path / "s")
    df = store_to_pandas(store)
    assert df["key"].tolist() == store.keys and np.array_equal(np.stack(df["embedding"]), feats)
    with pytest.raises(Exception, match="export it with"):
        store_to_pandas(store, max_bytes=10)
    with StoreWriter(tmp_path / "e", {"t": 1}, dtype="float32") as writer:
        writer.add_failures([("x.png", "broken")])
        empty = writer.close({})
    out = export_store(FeatureStore.open(tmp_path / "e"), tmp_path / "e.parquet")
    assert pq.read_table(out).num_rows == 0
    assert empty.features.shape[0] == 0


def test_directory_output_refused(tmp_path, capsys):
    multi_store(tmp_path / "s")
    (tmp_path / "d").mkdir()
    assert main([str(tmp_path / "s"), str(tmp_path / "d"), "--format", "hdf5", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "is a directory" in err and f"{tmp_path / 'd' / 'store'}.h5" in err


def test_the_store_methods_are_the_library_functions(tmp_path):
    from transferlab.analysis.neighbors import store_nearest

    store, _ = multi_store(tmp_path / "s")
    out = store.export(tmp_path / "m.parquet")
    table = pq.read_table(out)
    assert table.column("key").to_pylist() == store.keys
    assert store.to_pandas()["key"].tolist() == store.keys
    queries = store.keys[:3]
    assert store.nearest(queries, k=4) == store_nearest(store, queries, k=4)
    assert store.nearest(queries, k=1)[0][0][0] == queries[0]  # a stored key finds itself


# ---------------------------------------------------------------------------------------
# The embedding-reader layout (#29)
# ---------------------------------------------------------------------------------------

META_COLUMNS = ["key", "label", "class_name", "view"]


def reference_read(embeddings, metadata):
    """What embedding-reader's parquet_npy does, written out: both folders' files sorted by
    name and zipped, the header taken from the .npy's first line, rows read at its offset."""
    import re

    npys, parquets = sorted(embeddings.glob("*.npy")), sorted(metadata.glob("*.parquet"))
    assert [p.stem for p in npys] == [p.stem for p in parquets]
    feats, tables = [], []
    for npy, parquet in zip(npys, parquets):
        raw = npy.read_bytes()
        first = raw[:300].split(b"\n")[0]
        rows, dim = map(int, re.search(rb"'shape': \(([0-9]+), ([0-9]+)\)", first).groups())
        descr = re.search(rb"'descr': '([<f0-9]+)'", first).group(1).decode()
        feats.append(np.frombuffer(raw[len(first) + 1:], descr).reshape(rows, dim))
        tables.append(pq.read_table(parquet).select(META_COLUMNS))
        assert tables[-1].num_rows == rows
    return np.concatenate(feats), pa.concat_tables(tables).to_pydict()


def embedding_reader_read(out):
    """The export read by embedding-reader itself (batches of 6 across shard ends)."""
    import pandas as pd
    from embedding_reader import EmbeddingReader

    reader = EmbeddingReader(str(out / "embeddings"), file_format="parquet_npy",
                             metadata_folder=str(out / "metadata"), meta_columns=META_COLUMNS)
    feats, frames = [], []
    for emb, meta in reader(batch_size=6, start=0, end=reader.count, show_progress=False):
        feats.append(emb)
        frames.append(meta)
    df = pd.concat(frames)
    return np.concatenate(feats), {c: df[c].tolist() for c in META_COLUMNS}


def assert_same_as_store(store, feats, out, read=None):
    got, meta = (read or (lambda o: reference_read(o / "embeddings", o / "metadata")))(out)
    # every row, exact (embedding-reader hands out float32 batches: float16 widens exactly)
    assert got.dtype in (feats.dtype, np.float32) and np.array_equal(got, feats.astype(got.dtype))
    assert meta["key"] == store.keys
    assert meta["label"] == store.labels.tolist()
    assert meta["view"] == store.views.tolist()
    names = store.class_names
    assert meta["class_name"] == [names[y] if y >= 0 else None for y in store.labels.tolist()]


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_embedding_reader_layout_links_the_shards_and_reads_back_equal(tmp_path, dtype):
    from transferlab.store.export_formats import export_embedding_reader

    store, feats = multi_store(tmp_path / "s", dtype=dtype)
    done = export_embedding_reader(store, tmp_path / "er")
    assert (done.shards, done.rows, done.linked, done.copied) == (5, 31, 5, 0)
    npys = sorted(done.embeddings.glob("*.npy"))
    assert [p.name for p in npys] == [f"shard-{i:05d}.npy" for i in range(5)]
    for npy, shard in zip(npys, store.features.files):  # the same bytes, no copy
        assert npy.stat().st_ino == shard.stat().st_ino
    assert_same_as_store(store, feats, tmp_path / "er")
    marker = json.loads((tmp_path / "er" / "transferlab-export.json").read_text())
    assert marker["rows"] == 31 and marker["linked"] == 5
    assert not list(tmp_path.glob(".er*"))  # no temporaries left


def test_embedding_reader_layout_copies_when_asked_or_when_links_fail(tmp_path, monkeypatch):
    import errno
    import os

    from transferlab.store.export_formats import export_embedding_reader

    store, feats = multi_store(tmp_path / "s")
    done = export_embedding_reader(store, tmp_path / "copied", link=False)
    assert (done.linked, done.copied) == (0, 5)
    first = sorted(done.embeddings.glob("*.npy"))[0]
    assert first.stat().st_ino != store.features.files[0].stat().st_ino
    assert_same_as_store(store, feats, tmp_path / "copied")

    def cross_device(*args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)  # another file system
    done = export_embedding_reader(store, tmp_path / "other_fs")
    assert (done.linked, done.copied) == (0, 5)
    assert_same_as_store(store, feats, tmp_path / "other_fs")


def test_embedding_reader_layout_refuses_what_is_not_its_own(tmp_path, capsys):
    store, _ = multi_store(tmp_path / "s")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    code = main([str(tmp_path / "s"), str(mine), "--layout", "embedding-reader", "--overwrite"])
    err = capsys.readouterr().err
    assert code == 2 and "is not an export of this kind" in err and err.count("\n") == 1
    assert (mine / "notes.txt").read_text() == "keep me" and len(list(mine.iterdir())) == 1

    out = tmp_path / "er"
    assert main([str(tmp_path / "s"), str(out), "--layout", "embedding-reader"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 31 rows in 5 shards" in printed and "5 hard-linked, 0 copied" in printed
    assert "file_format='parquet_npy'" in printed
    assert main([str(tmp_path / "s"), str(out), "--layout", "embedding-reader"]) == 2
    assert "--overwrite is not set" in capsys.readouterr().err
    (out / "embeddings" / "shard-00000.npy").unlink()  # replaced whole, not patched
    assert main([str(tmp_path / "s"), str(out), "--layout", "embedding-reader", "--copy",
                 "--overwrite"]) == 0
    assert "0 hard-linked, 5 copied" in capsys.readouterr().out
    assert len(list((out / "embeddings").glob("*.npy"))) == 5
    assert main([str(tmp_path / "s"), str(tmp_path / "x.npz"), "--copy"]) == 2
    assert "--copy applies only with --layout" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_embedding_reader_reads_the_export(tmp_path, dtype):
    pytest.importorskip("embedding_reader", reason="pip install embedding-reader (in the "
                        "[test] extra; it pins pandas<3)")
    from transferlab.store.export_formats import export_embedding_reader

    store, feats = multi_store(tmp_path / "s", dtype=dtype)
    export_embedding_reader(store, tmp_path / "er")
    assert_same_as_store(store, feats, tmp_path / "er", embedding_reader_read)

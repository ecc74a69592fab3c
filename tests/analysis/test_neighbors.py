"""Exact nearest-neighbour search against a brute-force numpy reference."""
from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest
import torch

import transferlab
from transferlab.analysis.neighbors import nearest, store_nearest
from transferlab.errors import DataError


def brute_force(x: np.ndarray, q: np.ndarray, k: int, metric: str):
    x = x.astype(np.float64)
    q = q.astype(np.float64)
    if metric == "cosine":
        sim = (q @ x.T) / np.linalg.norm(q, axis=1)[:, None] / np.linalg.norm(x, axis=1)[None]
        d = 1.0 - sim
    else:
        d = np.sqrt(((q[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    order = np.argsort(d, axis=1, kind="stable")[:, :k]  # stable: ties -> lower index
    return np.take_along_axis(d, order, 1), order


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_matches_brute_force_with_chunk_merge(metric):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 16))
    q = rng.normal(size=(37, 16))
    ref_d, ref_i = brute_force(x, q, 7, metric)
    d, i = nearest(x, q, 7, metric, chunk_rows=64, dtype=torch.float64)
    np.testing.assert_array_equal(i, ref_i)
    np.testing.assert_allclose(d, ref_d, atol=1e-9)
    # default float32 path agrees too on well-separated data
    d32, i32 = nearest(x.astype(np.float32), q, 7, metric, chunk_rows=100)
    np.testing.assert_array_equal(i32, ref_i)
    np.testing.assert_allclose(d32, ref_d, atol=1e-4)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_ties_go_to_lower_index_across_chunks(metric):
    rng = np.random.default_rng(1)
    base = rng.integers(-3, 4, size=(10, 5)).astype(np.float64)
    # every base row appears 6 times, spread so duplicates fall into different chunks
    x = np.concatenate([base] * 6)
    q = rng.integers(-3, 4, size=(8, 5)).astype(np.float64)
    q[0] = x[3]  # exact match with six tied copies
    ref_d, ref_i = brute_force(x, q, 9, metric)
    for chunk in (7, 10, 13, 60):
        d, i = nearest(x, q, 9, metric, chunk_rows=chunk, dtype=torch.float64)
        np.testing.assert_array_equal(i, ref_i)
        np.testing.assert_allclose(d, ref_d, atol=1e-12)
    assert list(i[0][:6]) == [3, 13, 23, 33, 43, 53]


def test_all_equal_rows_keep_index_order():
    x = np.ones((50, 3))
    d, i = nearest(x, np.ones((2, 3)), 5, "euclidean", chunk_rows=8)
    assert i.tolist() == [[0, 1, 2, 3, 4]] * 2
    np.testing.assert_allclose(d, 0.0, atol=1e-6)


def test_chunk_iterable_and_store_like_source():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(90, 4)).astype(np.float16)
    q = rng.normal(size=(3, 4))
    ref_d, ref_i = brute_force(x.astype(np.float32), q, 4, "cosine")

    class FakeStore:
        keys: ClassVar[list[str]] = [f"dir/{n}.png" for n in range(90)]
        features = x
        meta: ClassVar[dict] = {}

        def iter_chunks(self, rows=65536):
            for s in range(0, len(x), rows):
                yield s, x[s:s + rows]

    chunks = [(s, x[s:s + 25]) for s in range(0, 90, 25)]
    _, i = nearest(chunks, q, 4)
    np.testing.assert_array_equal(i, ref_i)
    _, i = nearest(FakeStore(), q, 4, chunk_rows=16)
    np.testing.assert_array_equal(i, ref_i)
    hits = store_nearest(FakeStore(), q, k=4)
    assert [[key for key, _ in row] for row in hits] == [
        [f"dir/{j}.png" for j in row] for row in ref_i]
    np.testing.assert_allclose([[dist for _, dist in row] for row in hits], ref_d, atol=1e-3)
    # a store key as query uses the stored vector: itself comes first at distance ~0
    (first, dist0), *_ = store_nearest(FakeStore(), ["dir/5.png"], k=2)[0]
    assert first == "dir/5.png" and abs(dist0) < 1e-3


def test_k_larger_than_rows_and_errors():
    x = np.eye(3)
    _, i = nearest(x, x, 10, "euclidean", chunk_rows=2)
    assert i.shape == (3, 3) and i[:, 0].tolist() == [0, 1, 2]
    with pytest.raises(DataError, match="dimensions"):
        nearest(x, np.ones((1, 4)), 1)
    with pytest.raises(DataError, match="metric"):
        nearest(x, x, 1, metric="manhattan")
    with pytest.raises(DataError, match="empty"):
        nearest(np.zeros((0, 3)), x, 1)


# ---------------------------------------------------------------------------------------
# Store level and the search command line
# ---------------------------------------------------------------------------------------


def image_store(tmp_path, n=12, d=8, views=None):
    """A store whose keys are real image files under a data root recorded in its meta."""
    from PIL import Image

    from transferlab.store.writer import StoreWriter

    rng = np.random.default_rng(5)
    root = tmp_path / "data"
    keys = [f"{'cat' if i % 2 else 'dog'}/{i:02d}.png" for i in range(n)]
    for i, key in enumerate(keys):
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (24, 20), (20 * i, 100, 200 - 10 * i)).save(root / key)
    x = rng.normal(size=(n, d)).astype(np.float32)
    writer = StoreWriter(tmp_path / "store", fingerprint={"t": 1}, dtype="float32", shard_size=5)
    writer.add(keys, [i % 2 for i in range(n)], x)
    store = writer.close({"class_names": ["dog", "cat"], "config": {"data": {"root": str(root)}}})
    return store, x


def fake_embedder(monkeypatch, table):
    calls = []

    def embed(store, paths, trust_code=False):
        calls.append(list(paths))
        assert store.meta["config"]["data"]["root"]  # the store's own metadata is passed on
        return np.stack([table[p] for p in paths])

    monkeypatch.setattr("transferlab.analysis.neighbors.embed_query_images", embed)
    return calls


def test_search_cli_prints_neighbours_and_plots(tmp_path, monkeypatch, capsys):
    from PIL import Image

    from transferlab.commands.search import main

    store, x = image_store(tmp_path)
    queries = [tmp_path / "q1.png", tmp_path / "q2.png"]
    for q in queries:
        Image.new("RGB", (30, 30), (255, 0, 0)).save(q)
    qv = np.random.default_rng(8).normal(size=(2, x.shape[1]))
    calls = fake_embedder(monkeypatch, {str(q): v for q, v in zip(queries, qv)})
    assert main([str(tmp_path / "store"), *map(str, queries), "-k", "3", "--metric", "euclidean",
                 "--plot", str(tmp_path / "grid.png")]) == 0
    out = capsys.readouterr().out
    assert calls == [[str(q) for q in queries]]
    ref_d, ref_i = brute_force(x, qv, 3, "euclidean")
    blocks = out.split("\n\n")
    for b, (q, dists, rows) in enumerate(zip(queries, ref_d, ref_i)):
        lines = blocks[b].splitlines()
        assert lines[0] == f"query: {q}"
        for rank, (dist, row) in enumerate(zip(dists, rows), 1):
            cls = "cat" if row % 2 else "dog"
            assert lines[1 + rank].split() == [str(rank), f"{dist:.5f}", store.keys[row],
                                               f"[{cls}]"]
    assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"


def test_search_by_store_key_and_errors(tmp_path, monkeypatch, capsys):
    from transferlab.commands.search import main

    image_store(tmp_path)
    calls = fake_embedder(monkeypatch, {})
    assert main([str(tmp_path / "store"), "cat/03.png", "-k", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert calls == []  # a stored key uses its stored vector
    assert out[2].split()[:3] == ["1", "0.00000", "cat/03.png"]
    assert main([str(tmp_path / "store"), "missing.jpg"]) == 2
    err = capsys.readouterr().err
    assert "'missing.jpg' is neither an image file nor a key of the store" in err
    assert main([str(tmp_path / "store"), "cat/03.png", "-k", "0"]) == 2
    assert "k must be at least 1" in capsys.readouterr().err


def test_store_nearest_dedupes_views(tmp_path):
    from transferlab.store.writer import StoreWriter

    x = np.array([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]], dtype=np.float32)
    keys = ["a.png", "b.png", "c.png"]
    writer = StoreWriter(tmp_path / "v", fingerprint={"t": 2}, dtype="float32", shard_size=2)
    # views of a.png sit closest to the query; each key must still appear once
    writer.add(keys + ["a.png", "a.png"], [-1] * 5,
               np.concatenate([x, [[0.99, 0.01], [0.98, 0.02]]]), views=[0, 0, 0, 1, 2])
    store = writer.close({})
    hits = store_nearest(store, np.array([[1.0, 0.0]]), k=3)
    assert [key for key, _ in hits[0]] == ["a.png", "c.png", "b.png"]
    assert hits[0][0][1] == pytest.approx(0.0, abs=1e-6)
    assert transferlab.store_nearest(store, np.array([[1.0, 0.0]]), k=3) == hits  # public API


def test_search_end_to_end_embeds_with_the_stores_backbone(tmp_path, capsys):
    """Extract a tiny store with the built-in LeNet, then query with its own image files."""
    from tests.imagegen import make_image_tree
    from transferlab.commands.search import main
    from transferlab.config import ExtractConfig, load_config
    from transferlab.extract.runner import run_extract

    keys = make_image_tree(tmp_path / "data", per_class=3)
    cfg = load_config(None, [f"data.root={tmp_path / 'data'}", "model.name=lenet",
                             f"output.dir={tmp_path / 'store'}", "runtime.num_workers=0",
                             "runtime.progress=false", "output.dtype=float32"], ExtractConfig)
    store = run_extract(cfg).store
    queries = [str(tmp_path / "data" / keys[1]), str(tmp_path / "data" / keys[4])]
    assert main([str(tmp_path / "store"), *queries, "-k", "2"]) == 0
    blocks = capsys.readouterr().out.split("\n\n")
    for block, key in zip(blocks, (keys[1], keys[4])):
        rank1 = block.splitlines()[2].split()
        assert rank1[2] == key and float(rank1[1]) < 1e-5  # the image finds itself first
    got = store_nearest(store, queries, k=1)
    assert [hits[0][0] for hits in got] == [keys[1], keys[4]]


def test_store_nearest_matches_brute_force(tmp_path):
    from transferlab.store.writer import StoreWriter

    rng = np.random.default_rng(3)
    feats = rng.normal(size=(40, 6)).astype(np.float32)
    keys = [f"img/{i:03d}.jpg" for i in range(40)]
    with StoreWriter(tmp_path / "s", {"t": 1}, dtype="float32", shard_size=7) as writer:
        writer.add(keys, np.zeros(40), feats)
        store = writer.close({})
    query = rng.normal(size=(2, 6)).astype(np.float32)
    d = np.linalg.norm(query[:, None] - feats[None], axis=2)
    hits = transferlab.store_nearest(store, query, k=3, metric="euclidean")
    for q in range(2):
        order = np.argsort(d[q], kind="stable")[:3]
        assert [key for key, _ in hits[q]] == [keys[i] for i in order]
        assert np.allclose([dist for _, dist in hits[q]], d[q][order], atol=1e-5)
    assert store_nearest(store, ["img/005.jpg"], k=1)[0][0][0] == "img/005.jpg"


def test_fast_topk_orders_ties_inside_the_set_and_matches_the_tie_path():
    from transferlab.analysis.neighbors import _topk_exact, _topk_ties

    # three equal nearest rows fill k exactly (fast path): still in row order
    x = np.array([[5.0, 5.0], [1.0, 0.0], [9.0, 9.0], [1.0, 0.0], [1.0, 0.0]])
    _, i = nearest(x, np.array([[1.0, 0.0]]), 3, "euclidean", chunk_rows=5)
    assert i.tolist() == [[1, 3, 4]]
    rng = np.random.default_rng(9)
    dist = torch.as_tensor(rng.integers(0, 6, size=(50, 40)).astype(np.float32))
    dist[::3] = torch.as_tensor(rng.random(size=(17, 40)).astype(np.float32))  # no ties
    for k in (1, 5, 40):
        fast, slow = _topk_exact(dist, k), _topk_ties(dist, k)
        assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])


def test_default_chunk_is_a_few_mib_of_float32():
    from transferlab.analysis.neighbors import _default_chunk_rows

    assert _default_chunk_rows(np.zeros((10, 256))) == 8192
    assert _default_chunk_rows(np.zeros((10, 1 << 16))) == 256

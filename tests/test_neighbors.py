"""Exact nearest-neighbour search against a brute-force numpy reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from transferlab.errors import DataError
from transferlab.neighbors import nearest, store_nearest


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
        paths = [f"dir/{n}.png" for n in range(90)]
        features = x
        meta: dict = {}

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
    d, i = nearest(x, x, 10, "euclidean", chunk_rows=2)
    assert i.shape == (3, 3) and i[:, 0].tolist() == [0, 1, 2]
    with pytest.raises(DataError, match="dimensions"):
        nearest(x, np.ones((1, 4)), 1)
    with pytest.raises(DataError, match="metric"):
        nearest(x, x, 1, metric="manhattan")
    with pytest.raises(DataError, match="empty"):
        nearest(np.zeros((0, 3)), x, 1)

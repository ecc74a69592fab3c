"""The viewer's map: PCA as projection.pca_2d computes it, cached in the store with what it
was computed from, recomputed when the store changes, sampled above the documented size."""
from __future__ import annotations

import os

import numpy as np
import pytest

from tests.helpers import blobs, make_store
from transferlab.analysis.projection import pca_2d
from transferlab.errors import StoreError
from transferlab.viewer.mapcache import store_map, streamed_pca


def test_streamed_pca_is_pca_2d():
    x = np.random.default_rng(0).normal(size=(500, 24)).astype(np.float32) * np.arange(1, 25)
    rows = np.arange(500)
    got = streamed_pca(x, rows, chunk_rows=64)
    np.testing.assert_allclose(got, pca_2d(x), rtol=1e-4, atol=1e-4)
    sub = np.array([3, 10, 99, 250, 499])
    np.testing.assert_allclose(streamed_pca(x, sub), pca_2d(x[sub]), rtol=1e-4, atol=1e-4)


def test_the_map_is_cached_and_recomputed_when_the_store_changes(tmp_path):
    x, y = blobs(n_per=40, k=3, d=6)
    store = make_store(tmp_path / "s", x, y)
    first = store_map(store)
    assert not first.cached and len(first.rows) == 120 and not first.sampled
    again = store_map(store)
    assert again.cached and np.array_equal(again.xy, first.xy)
    assert np.array_equal(again.rows, first.rows)
    assert (store.dir / "view-cache" / "map-pca.npz").is_file()
    # the store rewritten with other rows: the cache no longer matches it
    x2 = x.copy()
    x2[:, 0] *= 5
    store2 = make_store(tmp_path / "s2", x2, y)
    for name in os.listdir(store2.dir / "shards"):
        os.replace(store2.dir / "shards" / name, store.dir / "shards" / name)
    from transferlab.store.reader import FeatureStore
    changed = store_map(FeatureStore.open(store.dir))
    assert not changed.cached
    np.testing.assert_allclose(changed.xy, pca_2d(np.asarray(x2, np.float16)), atol=2e-2)


def test_a_damaged_cache_is_computed_again(tmp_path):
    x, y = blobs(n_per=10, k=2, d=4)
    store = make_store(tmp_path / "s", x, y)
    first = store_map(store)
    (store.dir / "view-cache" / "map-pca.npz").write_bytes(b"garbage")
    again = store_map(store)
    assert not again.cached and np.array_equal(again.xy, first.xy)


def test_large_stores_are_drawn_as_a_documented_sample(tmp_path):
    x, y = blobs(n_per=100, k=2, d=4)
    store = make_store(tmp_path / "s", x, y)
    m = store_map(store, max_points=50)
    assert m.sampled and len(m.rows) == 50 and m.total == 200
    assert np.all(np.diff(m.rows) > 0)
    np.testing.assert_allclose(m.xy, pca_2d(np.asarray(store.features[m.rows], np.float32)),
                               rtol=1e-4, atol=1e-4)


def test_a_linked_cache_folder_is_refused(tmp_path):
    x, y = blobs(n_per=10, k=2, d=4)
    store = make_store(tmp_path / "s", x, y)
    (tmp_path / "elsewhere").mkdir()
    (store.dir / "view-cache").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(StoreError, match="link"):
        store_map(store)
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_other_methods_are_cached_apart(tmp_path):
    pytest.importorskip("sklearn")
    x, y = blobs(n_per=10, k=3, d=5)
    store = make_store(tmp_path / "s", x, y)
    tsne = store_map(store, "tsne")
    assert tsne.method == "tsne" and tsne.xy.shape == (30, 2) and not tsne.cached
    assert store_map(store, "tsne").cached and not store_map(store, "pca").cached
    assert sorted(p.name for p in (store.dir / "view-cache").iterdir()) == [
        "map-pca.npz", "map-tsne.npz"]

"""The viewer's server through Starlette's test client: what each route answers, and the
safety rules (no path from a URL, the token, the Host check, bounded uploads, writes only
into the view cache)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import make_store
from tests.imagegen import jpeg_bytes, random_image, save
from transferlab.analysis.neighbors import store_search
from transferlab.extract.queries import embed_images
from transferlab.viewer.webapp import build_app, viewer_data

pytest.importorskip("starlette", reason='the viewer needs pip install "transferlab[view]"')
pytest.importorskip("httpx", reason="Starlette's test client needs httpx")
from starlette.testclient import TestClient

BASE = "http://127.0.0.1"


def client(data, **kwargs) -> TestClient:
    return TestClient(build_app(data, allowed_hosts=["127.0.0.1"], **kwargs), base_url=BASE)


def images_of(store) -> Path:
    return store.dir.parent / "images"


def files_under(*folders: Path) -> dict[str, int]:
    out = {}
    for folder in folders:
        for dirpath, _, names in os.walk(folder):
            for n in names:
                p = Path(dirpath) / n
                out[str(p)] = p.lstat().st_mtime_ns
    return out


def test_info_and_map_describe_the_store(view_store):
    data = viewer_data(view_store, root=images_of(view_store))
    c = client(data)
    info = c.get("/api/info").json()
    labels = np.asarray(view_store.labels)
    assert info["rows"] == info["shown"] == len(view_store) == 24 and not info["sampled"]
    assert info["class_names"] == ["cat", "dog", "fox"]
    assert info["class_counts"] == np.bincount(labels).tolist() == [8, 8, 8]
    assert sum(info["cluster_counts"]) == 24 and len(info["cluster_counts"]) == 3
    assert set(info["galleries"]) >= {"outliers", "label_issues"}
    assert info["confusion"]["matrix"] == [[5, 2, 1], [0, 8, 0], [1, 1, 6]]
    body = c.get("/api/map.bin").content
    m = info["shown"]
    assert len(body) == 20 * m
    x, y = np.frombuffer(body, "<f4", m), np.frombuffer(body, "<f4", m, 4 * m)
    rows = np.frombuffer(body, "<i4", m, 8 * m)
    got_labels = np.frombuffer(body, "<i4", m, 12 * m)
    clusters = np.frombuffer(body, "<i4", m, 16 * m)
    assert np.array_equal(rows, data.map.rows)
    assert np.array_equal(np.stack([x, y], 1), data.map.xy)
    assert np.array_equal(got_labels, labels[rows])
    assert np.array_equal(clusters, data.clusters[rows]) and clusters.min() >= 0


def test_neighbours_of_a_point_are_the_stores_search_without_itself(view_store):
    data = viewer_data(view_store)
    r = client(data).get("/api/neighbours/5?k=4").json()
    want = store_search(view_store, np.asarray(view_store.features[5], np.float32)[None], 5)[0]
    want = [row for row, _ in want if row != 5][:4]
    assert r["query"]["key"] == view_store.keys[5]
    assert [h["row"] for h in r["hits"]] == want
    assert [h["key"] for h in r["hits"]] == [view_store.keys[w] for w in want]


def test_an_uploaded_image_finds_itself_first(view_store, monkeypatch):
    """A stored image sent as a query is embedded as the store embedded it: its own row
    comes first at distance ~0."""
    data = viewer_data(view_store, root=images_of(view_store))
    key = view_store.keys[7]
    body = (images_of(view_store) / key).read_bytes()
    import transferlab.viewer.webapp as webapp

    built = []
    real = webapp.query_embedder
    monkeypatch.setattr(webapp, "query_embedder", lambda *a: built.append(a) or real(*a))
    c = client(data)
    r = c.post("/api/query?k=3", content=body)
    assert r.status_code == 200, r.text
    hits = r.json()["hits"]
    assert hits[0]["key"] == key and abs(hits[0]["distance"]) < 1e-3 and len(hits) == 3
    # the same as transferlab search's query embedding, and the model is built once
    want = embed_images(view_store.meta, [images_of(view_store) / key], root=view_store.dir)
    other = view_store.keys[11]
    again = c.post("/api/query?k=1", content=(images_of(view_store) / other).read_bytes())
    assert again.json()["hits"][0]["key"] == other and len(built) == 1
    np.testing.assert_allclose(want[0], np.asarray(view_store.features[7], np.float32),
                               atol=2e-2)


def test_uploads_are_bounded_and_decoded_safely(view_store):
    data = viewer_data(view_store)
    c = client(data, max_upload=1000)
    assert c.post("/api/query", content=b"x" * 1001).status_code == 413
    bad = c.post("/api/query", content=b"not an image at all")
    assert bad.status_code == 400 and "not-an-image" in bad.json()["error"]
    assert str(data.cache_dir) not in bad.text  # no server path in the answer
    assert c.post("/api/query", content=b"").status_code == 400
    assert list((data.cache_dir / "uploads").iterdir()) == []  # the upload is deleted


def test_thumbnails_are_made_once_cached_and_a_placeholder_when_gone(view_store):
    data = viewer_data(view_store, root=images_of(view_store))
    c = client(data)
    first = c.get("/thumb/3")
    assert first.status_code == 200 and first.headers["content-type"] == "image/jpeg"
    cached = list((data.cache_dir / "thumbs").iterdir())
    assert len(cached) == 1 and cached[0].read_bytes() == first.content
    (images_of(view_store) / view_store.keys[4]).unlink()
    gone = c.get("/thumb/4")
    assert gone.headers["x-transferlab-thumb"] == "missing"
    assert gone.headers["content-type"].startswith("image/svg")


@pytest.mark.parametrize("url", [
    "/static/../meta.json", "/static/..%2fmeta.json", "/static/%2e%2e/%2e%2e/etc/passwd",
    "/static/index.html", "/thumb/../../etc/passwd", "/thumb/-1", "/thumb/24", "/thumb/1e3",
    "/thumb/%2fetc%2fpasswd", "/api/point/999999", "/api/gallery/..%2f..%2fmeta.json",
    "/meta.json", "/index.csv", "//etc/passwd", "/api/neighbours/abc", "/view-cache/map-pca.npz"])
def test_no_url_reaches_a_file(view_store, url):
    c = client(viewer_data(view_store))
    r = c.get(url)
    assert r.status_code in (400, 404), (url, r.status_code)
    assert b"root:" not in r.content and b'"format"' not in r.content


def test_keys_leading_out_of_the_data_root_get_the_placeholder(tmp_path):
    """A store's keys are written by anyone: '..', absolute keys and links out of the data
    root are never opened."""
    root = tmp_path / "root"
    outside = tmp_path / "secret"
    save(random_image(20, 20), outside / "s.png")
    save(random_image(20, 20), root / "ok.png")
    (root / "link.png").symlink_to(outside / "s.png")
    (root / "dir").symlink_to(outside)
    keys = ["ok.png", "../secret/s.png", str(outside / "s.png"), "link.png", "dir/s.png"]
    store = make_store(tmp_path / "store", np.random.default_rng(0).normal(size=(5, 4)),
                       np.zeros(5, int), keys=keys)
    c = client(viewer_data(store, root=root))
    assert c.get("/thumb/0").headers["content-type"] == "image/jpeg"
    for row in range(1, 5):
        r = c.get(f"/thumb/{row}")
        assert r.headers.get("x-transferlab-thumb") == "missing", keys[row]


def test_a_token_is_required_on_every_route_when_set(view_store):
    c = client(viewer_data(view_store), token="s3cret-token")
    for url in ["/", "/api/info", "/api/map.bin", "/thumb/0", "/static/viewer.js"]:
        assert c.get(url).status_code == 403
        assert c.get(url + "?token=wrong").status_code == 403
        assert c.get(url + "?token=s3cret-token").status_code == 200
        assert c.get(url, headers={"X-Transferlab-Token": "s3cret-token"}).status_code == 200
    assert c.post("/api/query", content=b"x").status_code == 403


def test_every_answer_carries_the_security_headers(view_store):
    c = client(viewer_data(view_store), token="t")
    for r in [c.get("/?token=t"), c.get("/thumb/0?token=t"), c.get("/api/info"),
              c.get("/nothing?token=t")]:
        assert "script-src 'self'" in r.headers["content-security-policy"]
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["referrer-policy"] == "no-referrer"


def test_another_host_name_is_refused(view_store):
    """DNS rebinding: a page whose name resolves to 127.0.0.1 sends its own Host header."""
    c = client(viewer_data(view_store))
    assert c.get("/api/info", headers={"Host": "evil.example"}).status_code == 400
    assert c.get("/api/info").status_code == 200


def test_the_server_writes_only_into_its_cache(view_store):
    images = images_of(view_store)
    outside = files_under(view_store.dir.parent)
    data = viewer_data(view_store, root=images)
    c = client(data)
    for url in ["/", "/api/info", "/api/map.bin", "/thumb/0", "/thumb/1", "/api/neighbours/2",
                "/api/gallery/outliers", "/api/prefix.bin?prefix=cat/"]:
        assert c.get(url).status_code == 200, url
    assert c.post("/api/query", content=jpeg_bytes()).status_code == 200
    after = files_under(view_store.dir.parent)
    cache = str(view_store.dir / "view-cache")
    changed = {p for p in after if outside.get(p) != after[p]} | set(outside) - set(after)
    assert changed and all(p.startswith(cache + os.sep) for p in changed), changed


def test_prefix_filter_and_galleries(view_store):
    data = viewer_data(view_store)
    c = client(data)
    mask = np.frombuffer(c.get("/api/prefix.bin?prefix=dog/").content, np.uint8)
    want = [view_store.keys[r].startswith("dog/") for r in data.map.rows]
    assert mask.tolist() == want and sum(want) == 8
    g = c.get("/api/gallery/outliers").json()
    import csv
    with open(view_store.dir / "curation" / "outliers.csv", newline="") as f:
        listed = [rec["key"] for rec in csv.DictReader(f)]
    assert [i["key"] for i in g["items"]] == listed and len(listed) == 5
    assert c.get("/api/gallery/nothing").status_code == 404


def test_slow_thumbnails_do_not_block_the_map(view_store, monkeypatch):
    """Thumbnails are made in the thread pool: while six take 0.5 s each, the map answers."""
    import asyncio
    import time

    import httpx

    data = viewer_data(view_store)
    monkeypatch.setattr(data.thumbs, "jpeg", lambda row: time.sleep(0.5))
    app = build_app(data)

    async def run() -> tuple[float, list[int]]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url=BASE) as c:
            thumbs = [asyncio.create_task(c.get(f"/thumb/{i}")) for i in range(6)]
            await asyncio.sleep(0.05)
            start = time.perf_counter()
            r = await c.get("/api/map.bin")
            took = time.perf_counter() - start
            assert r.status_code == 200 and len(r.content) == 20 * len(view_store)
            return took, [t.status_code for t in await asyncio.gather(*thumbs)]

    took, codes = asyncio.run(run())
    assert took < 0.4 and codes == [200] * 6


@pytest.mark.parametrize("text", ['{"classes": ["a", "b"], "matrix": [[1, 2]]}',
                                  '{"classes": ["a"], "matrix": [[-1]]}',
                                  '{"classes": ["a"], "matrix": [[0.5]]}', "[1, 2]", "{"])
def test_a_bad_confusion_file_is_one_line(tmp_path, text):
    from transferlab.errors import DataError
    from transferlab.viewer.galleries import read_confusion

    (tmp_path / "confusion.json").write_text(text)
    with pytest.raises(DataError, match="confusion"):
        read_confusion(tmp_path / "confusion.json")


def test_a_bad_clusters_file_is_one_line(view_store, tmp_path):
    from transferlab.errors import DataError
    from transferlab.viewer.galleries import read_clusters

    (tmp_path / "c.csv").write_text("key,cluster\ncat/0000.jpg,x\n")
    with pytest.raises(DataError, match="not a whole number"):
        read_clusters(view_store, tmp_path / "c.csv")
    (tmp_path / "e.csv").write_text(f"key,cluster\n{view_store.keys[0]},99999999999\n")
    with pytest.raises(DataError, match="outside"):
        read_clusters(view_store, tmp_path / "e.csv")
    (tmp_path / "d.csv").write_text("name,group\na,1\n")
    with pytest.raises(DataError, match="key,cluster"):
        read_clusters(view_store, tmp_path / "d.csv")


def test_a_read_only_store_is_shown_with_nothing_cached(view_store, monkeypatch):
    """(Root ignores permissions, so the refusal is simulated where the folder is made.)"""
    import transferlab.viewer.webapp as webapp

    def refuse(store):
        raise PermissionError(13, "Permission denied", str(store.dir / "view-cache"))

    monkeypatch.setattr(webapp, "cache_folder", refuse)
    data = viewer_data(view_store, root=images_of(view_store))
    c = client(data)
    info = c.get("/api/info").json()
    assert info["cache"] is False and info["can_query"] is False and info["shown"] == 24
    assert c.get("/thumb/0").headers["content-type"] == "image/jpeg"
    r = c.post("/api/query", content=jpeg_bytes())
    assert r.status_code == 400 and "read-only" in r.json()["error"]
    assert not (view_store.dir / "view-cache").exists()


def test_a_huge_label_is_refused_before_anything_is_counted(tmp_path):
    from transferlab.errors import StoreError

    x = np.random.default_rng(0).normal(size=(4, 3))
    store = make_store(tmp_path / "s", x, np.array([0, 1, 2, 1 << 40]), class_names=["a"])
    with pytest.raises(StoreError, match="label 1,099,511,627,776"):
        viewer_data(store)

"""Object storage through fsspec: a folder and a tar set uploaded to a local S3 server give
the features of the same data on disk; transient errors are retried with backoff, what keeps
failing is a failure (items) or one line (listing); a missing backend names its extra."""
from __future__ import annotations

import importlib
import sys
import time

import numpy as np
import pytest
import yaml

from tests.helpers import CONFIG, extract, make_shards, make_tree
from tests.s3server import BUCKET, closed_port, isolated_env, s3_server
from transferlab.config import DataConfig
from transferlab.data import remote, webdataset
from transferlab.data.imageio import ImageDecodeError
from transferlab.data.webdataset import Sample, ShardIndex, TarReader
from transferlab.errors import DataError, MissingDependencyError


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """The server, with 21 images uploaded as a folder and as 3 shards; the disk stores."""
    tmp = tmp_path_factory.mktemp("s3")
    keys = sorted(make_tree(tmp / "imgs", 21))
    make_shards(tmp / "imgs", keys, tmp / "shards", 8)
    disk = {"folder": extract(tmp, "disk-folder", {"root": str(tmp / "imgs")}),
            "tars": extract(tmp, "disk-tars", tar_data(str(tmp / "shards")))}
    with s3_server() as endpoint:
        import s3fs

        fs = s3fs.S3FileSystem()
        fs.put(str(tmp / "imgs"), f"{BUCKET}/imgs", recursive=True)
        fs.put(str(tmp / "shards"), f"{BUCKET}/shards", recursive=True)
        yield {"tmp": tmp, "endpoint": endpoint, "disk": disk}


def tar_data(base: str) -> dict:
    return {"source": "webdataset", "urls": base + "/train-{000000..000002}.tar",
            "label_key": "txt"}


def same(a, b) -> None:
    assert a.keys == b.keys and a.failures == b.failures
    assert np.array_equal(a.labels, b.labels)
    assert np.array_equal(np.asarray(a.features), np.asarray(b.features))


def test_tar_set_from_s3_equals_disk(s3):
    got = extract(s3["tmp"], "s3-tars", tar_data(f"s3://{BUCKET}/shards"))
    same(got, s3["disk"]["tars"])
    workers = extract(s3["tmp"], "s3-tars-w2", tar_data(f"s3://{BUCKET}/shards"),
                      "runtime.num_workers=2")  # forked workers open their own clients
    same(workers, s3["disk"]["tars"])


def test_folder_from_s3_equals_disk(s3):
    got = extract(s3["tmp"], "s3-folder", {"root": f"s3://{BUCKET}/imgs"})
    same(got, s3["disk"]["folder"])
    assert got.meta["class_names"] == ["a", "b", "c"]


def test_list_file_on_s3_equals_the_local_list(s3):
    tmp = s3["tmp"]
    rows = ["path,label"] + [f"{k},{k[0]}" for k in sorted(
        p.relative_to(tmp / "imgs").as_posix() for p in (tmp / "imgs").rglob("*.*"))[::2]]
    (tmp / "imgs" / "list.csv").write_text("\n".join([*rows, "../outside.jpg,a"]) + "\n")
    import s3fs

    s3fs.S3FileSystem().put(str(tmp / "imgs" / "list.csv"), f"{BUCKET}/imgs/list.csv")
    data = {"source": "list", "label_column": "label"}
    disk = extract(tmp, "disk-list", {**data, "list_file": str(tmp / "imgs" / "list.csv")})
    got = extract(tmp, "s3-list", {**data, "list_file": f"s3://{BUCKET}/imgs/list.csv"})
    assert got.keys == disk.keys and len(got) == 11
    assert np.array_equal(np.asarray(got.features), np.asarray(disk.features))
    assert [(k, r.split(":")[0]) for k, r in got.failures] == [("../outside.jpg",
                                                                "outside-root")]
    assert [k for k, _ in disk.failures] == ["../outside.jpg"]


def test_missing_shard_on_s3_is_one_line(s3):
    cfg = DataConfig(source="webdataset", urls=f"s3://{BUCKET}/shards/train-{{000000..000005}}.tar")
    with pytest.raises(DataError, match=r"3 of 6 shards not found \(e.g. s3://.*000003.tar\)"):
        webdataset.build_webdataset(cfg)


def test_unreachable_endpoint_is_one_line_after_bounded_retries(tmp_path, monkeypatch, capsys):
    pytest.importorskip("s3fs", reason="needs s3fs (pip install -e '.[test]')")
    from transferlab.extract.__main__ import main

    isolated_env(monkeypatch, f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setattr(remote, "BACKOFF_S", 0.01)
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump({**CONFIG, "data": tar_data("s3://bucket/shards"),
                                      "output": {"dir": str(tmp_path / "out")}}))
    started = time.monotonic()
    assert main([str(config)]) == 2
    assert time.monotonic() - started < 30
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert f"after {remote.ATTEMPTS} tries" in err and "EndpointConnectionError" in err
    assert "AWS_ENDPOINT_URL" in err and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------
# Retries, item failures, missing backends (no server)
# ---------------------------------------------------------------------------------------


class FlakyFs:
    """An fsspec stand-in whose first ``fail`` requests raise ConnectionError."""

    def __init__(self, data: bytes, fail: int):
        self.data, self.fail, self.calls = data, fail, 0

    def cat_file(self, path, start=None, end=None):
        self.calls += 1
        if self.calls <= self.fail:
            raise ConnectionError("connection reset by peer")
        return self.data[start:end]


def remote_reader(monkeypatch, fs: FlakyFs, members: list[tuple[int, int]]) -> TarReader:
    monkeypatch.setattr(webdataset, "filesystem", lambda url: (fs, url))
    monkeypatch.setattr(remote, "BACKOFF_S", 0.001)
    shard = ShardIndex("s3://b/x.tar", "x", len(fs.data),
                       [Sample(f"x/{i}", off, size) for i, (off, size) in enumerate(members)])
    return TarReader([shard], None)


def test_transient_errors_are_retried_and_neighbours_come_in_one_window(monkeypatch):
    fs = FlakyFs(bytes(range(200)), fail=2)
    reader = remote_reader(monkeypatch, fs, [(10, 5), (20, 5), (30, 5)])
    assert reader.bytes(0) == bytes(range(10, 15)) and fs.calls == 3  # 2 failures, 1 success
    assert reader.bytes(2) == bytes(range(30, 35)) and reader.bytes(1) == bytes(range(20, 25))
    assert fs.calls == 3  # items 1 and 2 came with item 0's window


def test_what_still_fails_after_the_retries_is_an_item_failure(monkeypatch):
    fs = FlakyFs(bytes(100), fail=100)
    reader = remote_reader(monkeypatch, fs, [(0, 10)])
    with pytest.raises(ImageDecodeError) as info:
        reader.load(0, "RGB", None)
    assert fs.calls == remote.ATTEMPTS
    assert info.value.short() == ("unreadable: shard s3://b/x.tar: ConnectionError: "
                                  "connection reset by peer")


def test_url_reader_retries_then_fails_the_item(monkeypatch):
    fs = FlakyFs(b"not an image at all", fail=1)
    monkeypatch.setattr(remote, "filesystem", lambda url: (fs, url))
    monkeypatch.setattr(remote, "BACKOFF_S", 0.001)
    reader = remote.UrlReader("s3://b/imgs", ["a/x.jpg"], None)
    with pytest.raises(ImageDecodeError, match="not-an-image"):
        reader.load(0, "RGB", None)
    assert fs.calls == 2
    fs.fail = 100
    with pytest.raises(ImageDecodeError, match=f"unreadable: after {remote.ATTEMPTS} tries"):
        reader.load(0, "RGB", None)


def test_a_missing_backend_names_its_extra(monkeypatch):
    registry = importlib.import_module("fsspec.registry")._registry  # fsspec.registry: a view
    monkeypatch.delitem(registry, "s3", raising=False)
    monkeypatch.setitem(sys.modules, "s3fs", None)
    with pytest.raises(MissingDependencyError, match=r'pip install "transferlab\[s3\]"$'):
        remote.read_bytes("s3://bucket/list.txt")
    monkeypatch.delitem(registry, "gs", raising=False)
    monkeypatch.setitem(sys.modules, "gcsfs", None)
    with pytest.raises(MissingDependencyError, match=r'pip install "transferlab\[gcs\]"$'):
        webdataset.build_webdataset(DataConfig(source="webdataset", urls="gs://b/t-{0..1}.tar"))


def test_file_urls_are_local_paths(tmp_path):
    assert remote.local_path("file:///data/my%20imgs") == remote.local_path("/data/my imgs")
    assert not remote.is_remote("file:///x") and remote.is_remote("S3://b/x")
    assert not remote.is_remote("relative/dir") and remote.is_remote("https://h/x.tar")


def test_shards_over_http_from_a_server_without_range_requests(tmp_path):
    """Python's http.server ignores Range and sends whole files: the reader keeps the
    shard it was sent instead of serving wrong bytes."""
    pytest.importorskip("aiohttp", reason="fsspec's http:// needs aiohttp")
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    keys = sorted(make_tree(tmp_path / "imgs", 6))
    make_shards(tmp_path / "imgs", keys, tmp_path / "shards", 3)
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path / "shards"))
    handler.log_message = lambda *a: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        got = webdataset.build_webdataset(DataConfig(
            source="webdataset", urls=base + "/train-{000000..000001}.tar", label_key="cls"))
        disk = webdataset.build_webdataset(DataConfig(
            source="webdataset", urls=str(tmp_path / "shards/train-{000000..000001}.tar"),
            label_key="cls"))
        assert got.keys == disk.keys and got.labels.tolist() == disk.labels.tolist()
        for i in range(len(got)):
            assert got.reader.bytes(i) == disk.reader.bytes(i)
    finally:
        server.shutdown()
        server.server_close()

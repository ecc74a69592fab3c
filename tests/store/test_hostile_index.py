"""FAISS indexes that came with a store someone else wrote (issue #24): never parsed by FAISS.

Each crafted index comes with an ``index.json`` as convincing as its sender can make it: the
store's exact state, the index file's true size and digest, and a tag computed exactly as
transferlab computes it, under the sender's key. Only this user's key makes a tag transferlab
accepts; without one the index is ignored (one logged line) and the search scans exactly.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

import transferlab.store.faiss_index as fi
from transferlab.analysis.neighbors import store_nearest
from transferlab.commands.index import main as index_main
from transferlab.commands.search import main as search_main
from transferlab.errors import StoreError, TransferlabError
from transferlab.runtime import localkey
from transferlab.store.reader import FeatureStore
from transferlab.store.writer import StoreWriter

faiss = pytest.importorskip("faiss")
REPO = Path(__file__).resolve().parents[2]
SENDER_KEY = bytes(range(32))  # the key of the machine that built (or crafted) the index


def write_store(path: Path, n: int = 40, dim: int = 4, seed: int = 0) -> FeatureStore:
    feats = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    keys = [f"k/{i:03d}.png" for i in range(n)]
    with StoreWriter(path, {"t": "hostile-index"}, dtype="float32", shard_size=16) as writer:
        writer.add(keys, [i % 3 for i in range(n)], feats)
        return writer.close({"class_names": ["a", "b", "c"]})


def forge(store: FeatureStore, data: bytes, kind: str = "flat", metric: str = "l2",
          key: bytes | None = SENDER_KEY, **changed) -> dict:
    """Put ``data`` in the store as its index, with the record a sender would write: true
    store state, size and digest, tagged under ``key`` (no tag when None). This machine has
    a key of its own (it has built indexes before)."""
    our_key()
    path, meta_path = fi.index_paths(store)
    path.parent.mkdir(exist_ok=True)
    if data is not None:
        path.write_bytes(data)
    params = {"ivf": {"nlist": 2, "nprobe": 2, "train_rows": 40},
              "hnsw": {"m": 32, "ef_construction": 80, "ef_search": 128}}.get(kind, {})
    rows, dim = store.features.shape
    record = {"format": fi.INDEX_FORMAT, "version": fi.INDEX_VERSION, "kind": kind,
              "metric": metric, "rows": rows, "dim": dim, "params": params,
              "store": fi.store_state(store), "faiss_version": faiss.__version__,
              "build_seconds": 0.1, "built_at": "2024-01-01T00:00:00+0000",
              "index_bytes": len(data or b""),
              "index_sha256": hashlib.sha256(data or b"").hexdigest(), **changed}
    if key is not None:
        record["tag"] = localkey.tag(key, fi._tag_payload(record))
    meta_path.write_text(json.dumps(record), encoding="utf-8")
    fi._LOADED.clear()
    return record


def our_key() -> bytes:
    return localkey.local_key(create=True)


@pytest.fixture
def no_faiss_parse(monkeypatch):
    """Fail the test if anything hands bytes or a path to FAISS's readers."""
    def refuse(*args, **kwargs):
        raise AssertionError("FAISS was asked to parse an untrusted index")

    for name in ("read_index", "deserialize_index"):
        monkeypatch.setattr(faiss, name, refuse)


@pytest.fixture
def no_hang():
    def alarm(*_):
        raise TimeoutError("blocked on a special file")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def assert_exact(store: FeatureStore, caplog, reason: str | None = None) -> None:
    """The index is ignored with one logged line; the answer is the exact scan's."""
    caplog.clear()
    assert fi.load_index(store, "euclidean") is None
    assert len(caplog.records) == 1, caplog.text
    assert "searching exactly" in caplog.text and "python -m transferlab.index" in caplog.text
    if reason:
        assert reason in caplog.text, caplog.text
    got = store_nearest(store, store.keys[:3], k=4, metric="euclidean")
    ref = store_nearest(store, store.keys[:3], k=4, metric="euclidean", exact=True)
    assert got == ref


def ondisk_ivf(tmp_path: Path, lists: Path, d: int = 4) -> bytes:
    """A real IVF index whose inverted lists live in ``lists``, a path written in the file."""
    x = np.random.default_rng(0).normal(size=(40, d)).astype(np.float32)
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, 2)
    ivf.cp.min_points_per_centroid = 1
    ivf.train(x)
    inv = faiss.OnDiskInvertedLists(2, ivf.code_size, str(lists))
    ivf.replace_invlists(inv, False)
    ivf.add(x)
    data = bytes(faiss.serialize_index(ivf))
    del ivf, inv
    return data


def test_ondisk_lists_path_is_never_followed(tmp_path, caplog, no_faiss_parse, capfd):
    store = write_store(tmp_path / "s")
    lists = tmp_path / "outside.lists"
    crafted = ondisk_ivf(tmp_path, lists)
    assert str(lists).encode() in crafted and crafted[:4] == b"IwFl"
    capfd.readouterr()  # faiss prints its resizing
    # control: FAISS itself follows the path (a subprocess: a short file there is SIGBUS)
    (tmp_path / "control.index").write_bytes(crafted)
    probe = ("import faiss, sys; i = faiss.read_index(sys.argv[1]); "
             "print(type(faiss.downcast_InvertedLists(i.invlists)).__name__, i.ntotal)")
    out = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "control.index")],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert "OnDiskInvertedLists 40" in out
    lists.write_bytes(b"the user's own file\n")  # what the path names on the victim's disk
    before = lists.stat()
    forge(store, crafted, kind="ivf", metric="l2")
    assert_exact(store, caplog, "not built by this user")
    assert lists.read_bytes() == b"the user's own file\n"
    assert lists.stat().st_mtime_ns == before.st_mtime_ns
    forge(store, crafted, kind="ivf", metric="l2", key=None)  # no tag at all
    assert_exact(store, caplog, "tag is None")


def test_size_claim_allocates_nothing(tmp_path):
    """The 109-byte flat index claiming 1e9 floats: FAISS allocates 4 GB for it; transferlab
    never hands it over, so a search under a 1 GiB address-space margin answers exactly."""
    store = write_store(tmp_path / "s", n=30, dim=1)
    n = 10 ** 9
    crafted = (b"IxF2" + struct.pack("<iqqqBi", 1, n, 1 << 20, 1 << 20, 1, 1)
               + struct.pack("<Q", n) + b"\0" * 64)
    assert len(crafted) == 109
    forge(store, crafted, kind="flat", metric="l2")
    script = f"""
import json, resource, sys
import faiss
from transferlab.analysis.neighbors import store_nearest
from transferlab.store.reader import FeatureStore
store = FeatureStore.open({str(tmp_path / "s")!r})
vm = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.RLIM_INFINITY))
got = store_nearest(store, store.keys[:2], k=3, metric="euclidean")
exact = store_nearest(store, store.keys[:2], k=3, metric="euclidean", exact=True)
try:  # control: FAISS given the file allocates what it claims
    faiss.read_index({str(tmp_path / "s" / "index" / "faiss.index")!r})
    control = "read"
except MemoryError:
    control = "MemoryError"
print(json.dumps({{"same": got == exact, "control": control}}))
"""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == {"same": True, "control": "MemoryError"}
    assert proc.stderr.count("ignoring the FAISS index") == 1


def test_random_bytes(tmp_path, caplog, no_faiss_parse):
    store = write_store(tmp_path / "s")
    rng = np.random.default_rng(1)
    forge(store, rng.bytes(5000))
    assert_exact(store, caplog, "not built by this user")
    forge(store, rng.bytes(5000), key=None)
    assert_exact(store, caplog, "tag is None")
    forge(store, rng.bytes(5000), key=our_key())  # even under our tag: not a flat index
    assert_exact(store, caplog, "does not hold a flat index")


def test_our_index_truncated_or_swapped_is_ignored(tmp_path, caplog):
    store = write_store(tmp_path / "s")
    fi.build_index(store, "flat", "l2")
    path, _ = fi.index_paths(store)
    whole = path.read_bytes()
    path.write_bytes(whole[:-7])  # truncated after the build: size no longer the recorded one
    fi._LOADED.clear()
    assert_exact(store, caplog, "is not the file its index.json describes")
    path.write_bytes(whole[:-4] + b"\0\0\0\0")  # same size, other bytes
    assert_exact(store, caplog, "truncated or replaced")
    path.write_bytes(whole)
    assert fi.load_index(store, "l2") is not None


def test_tagged_bytes_faiss_cannot_read_are_one_line(tmp_path, caplog):
    """Bytes under a valid tag that FAISS refuses (a key leaked, a FAISS too old): ignored,
    never FAISS's RuntimeError."""
    store = write_store(tmp_path / "s")
    forge(store, b"IxF2" + np.random.default_rng(2).bytes(300), key=our_key())
    assert_exact(store, caplog, "faiss cannot read")


def idmap_index(store: FeatureStore, offset: int) -> bytes:
    m = faiss.IndexIDMap(faiss.IndexFlatL2(store.features.shape[1]))
    x = np.asarray(store.features, dtype=np.float32)
    m.add_with_ids(x, np.arange(len(x), dtype=np.int64) + offset)
    return bytes(faiss.serialize_index(m))


def test_idmap_with_rows_outside_the_store(tmp_path, caplog, no_faiss_parse):
    store = write_store(tmp_path / "s")
    crafted = idmap_index(store, 10 ** 6)
    forge(store, crafted)  # the sender's tag
    assert_exact(store, caplog, "not built by this user")
    forge(store, crafted, key=our_key())  # even under our tag: not a type transferlab builds
    assert_exact(store, caplog, "does not hold a flat index")


def test_rows_outside_the_store_are_refused_by_search(tmp_path, monkeypatch):
    """Defence in depth: whatever index answers, its rows must lie in the store."""
    store = write_store(tmp_path / "s")
    record = fi.build_index(store, "flat", "l2")
    mapped = faiss.deserialize_index(np.frombuffer(idmap_index(store, 10 ** 6), np.uint8))
    index = fi.StoreIndex(mapped, record)
    with pytest.raises(StoreError, match="outside the store's 40 rows"):
        index.search(np.zeros((1, 4), np.float32), 3)
    monkeypatch.setattr(fi, "load_index", lambda *a, **k: index)
    monkeypatch.setattr("transferlab.analysis.neighbors.load_index", lambda *a, **k: index)
    with pytest.raises(StoreError, match="outside the store"):
        store.nearest(store.keys[:1], k=2, metric="euclidean")


def test_faiss_errors_are_transferlab_errors(tmp_path, monkeypatch):
    store = write_store(tmp_path / "s")
    fi.build_index(store, "flat", "l2")
    loaded = fi.load_index(store, "l2")

    class Broken:
        def search(self, *a):
            raise RuntimeError("Error in faiss::IndexFlat::search at line 1: something\nmore")

    monkeypatch.setattr(loaded, "index", Broken())
    with pytest.raises(TransferlabError, match="the FAISS index failed") as info:
        store.nearest(store.keys[:1], k=2, metric="euclidean")
    assert isinstance(info.value, StoreError) and "\n" not in str(info.value)


BAD_RECORDS = [
    ("rows as text", {"rows": "40"}, "rows must be a whole number"),
    ("rows huge", {"rows": 10 ** 30}, "rows is"),
    ("rows a float", {"rows": 1e9}, "rows must be a whole number"),
    ("dim negative", {"dim": -4}, "dim is"),
    ("params a list", {"params": [1, 2]}, "params is"),
    ("kind a list", {"kind": ["flat"]}, "kind is"),
    ("kind unknown", {"kind": "pq"}, "kind is"),
    ("index_bytes huge", {"index_bytes": 10 ** 18}, "index_bytes is"),
    ("tag a number", {"tag": 5}, "tag is 5"),
    ("store a string", {"store": "fresh"}, "store is"),
    ("version 1", {"version": 1}, "format version 1"),
]


@pytest.mark.parametrize("name, changed, reason", BAD_RECORDS, ids=[b[0] for b in BAD_RECORDS])
def test_index_json_with_wrong_types(tmp_path, caplog, no_faiss_parse, name, changed, reason):
    store = write_store(tmp_path / "s")
    record = forge(store, b"IxF2", key=our_key())
    _, meta_path = fi.index_paths(store)
    meta_path.write_text(json.dumps({**record, **changed}), encoding="utf-8")
    assert_exact(store, caplog, reason)


def test_kind_that_does_not_match_the_file(tmp_path, caplog):
    store = write_store(tmp_path / "s")
    flat = fi.build_index(store, "flat", "l2")
    path, meta_path = fi.index_paths(store)
    forge(store, path.read_bytes(), kind="hnsw", metric="l2", key=our_key())
    assert_exact(store, caplog, "does not hold a hnsw index")
    data = path.read_bytes()
    forge(store, data, kind="flat", metric="l2", key=our_key(), rows=39)  # rows it lacks
    caplog.clear()
    with pytest.raises(StoreError, match="stale"):  # ours, but not for this store
        fi.load_index(store, "l2")
    forge(store, data, kind="flat", metric="cosine", key=our_key())  # an l2 file
    assert fi.load_index(store, "cosine") is None and "does not hold a flat index" in caplog.text
    assert flat["kind"] == "flat"


@pytest.mark.parametrize("what", ["deep", "large", "binary", "fifo", "dev-zero", "directory",
                                  "outside-link"])
def test_index_json_special_files(tmp_path, caplog, no_hang, no_faiss_parse, monkeypatch,
                                  what):
    store = write_store(tmp_path / "s")
    forge(store, b"IxF2", key=our_key())
    _, meta_path = fi.index_paths(store)
    meta_path.unlink()
    if what == "deep":
        meta_path.write_text("[" * 100_000 + "]" * 100_000)
    elif what == "large":
        meta_path.write_text('{"format": "' + "x" * (2 << 20) + '"}')
    elif what == "binary":
        meta_path.write_bytes(b"\xff\xfe" * 100)
    elif what == "fifo":
        os.mkfifo(meta_path)
    elif what == "dev-zero":
        meta_path.symlink_to("/dev/zero")
    elif what == "directory":
        meta_path.mkdir()
    else:
        outside = tmp_path / "record.json"
        outside.write_text("{}")
        meta_path.symlink_to(outside)
    assert_exact(store, caplog)
    monkeypatch.undo()  # FAISS reads what transferlab builds
    if what != "directory":
        assert index_main([str(tmp_path / "s"), "--kind", "flat", "--metric", "l2"]) == 0
        assert fi.load_index(store, "l2") is not None  # the index command replaced it
    if what == "outside-link":
        assert (tmp_path / "record.json").read_text() == "{}"  # replaced the link, not this


def test_index_file_special_files(tmp_path, caplog, no_hang, no_faiss_parse):
    store = write_store(tmp_path / "s")
    record = forge(store, b"IxF2" + bytes(100), key=our_key())
    path, _ = fi.index_paths(store)
    path.unlink()
    os.mkfifo(path)
    assert_exact(store, caplog, "FIFO")
    path.unlink()
    path.symlink_to("/dev/zero")
    assert_exact(store, caplog, "outside")
    path.unlink()
    path.write_bytes(b"IxF2" + bytes(100) + bytes(10 ** 6))  # larger than recorded
    assert_exact(store, caplog, f"more than the {record['index_bytes']:,}")


def test_index_from_another_machine_inside_a_tar(tmp_path, monkeypatch, capsys, caplog):
    """A store with its index, packed, unpacked on another machine (another key): the index
    is ignored there, the search is exact, and the index command builds a trusted one."""
    store = write_store(tmp_path / "s")
    fi.build_index(store, "hnsw", "l2")
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        tar.add(tmp_path / "s", arcname="s")
    other = tmp_path / "elsewhere"
    other.mkdir()
    with tarfile.open(tmp_path / "s.tar") as tar:
        tar.extractall(other, filter="tar")
    monkeypatch.setenv(localkey.KEY_ENV, str(tmp_path / "other-home" / "index.key"))
    fi._LOADED.clear()
    moved = FeatureStore.open(other / "s")
    assert_exact(moved, caplog, "no index was built on this machine")
    caplog.clear()
    assert search_main([str(other / "s"), moved.keys[0], "-k", "2", "--metric", "euclidean"]) == 0
    assert len(caplog.records) == 1 and "ignoring the FAISS index" in caplog.text
    assert capsys.readouterr().out.splitlines()[2].split()[2] == moved.keys[0]
    assert index_main([str(other / "s"), "--kind", "flat", "--metric", "l2"]) == 0
    assert fi.load_index(moved, "l2") is not None
    assert (tmp_path / "other-home" / "index.key").exists()


def test_key_is_private_and_outside_the_store(tmp_path, monkeypatch, capsys, caplog):
    key_file = tmp_path / "home" / "cfg" / "index.key"
    monkeypatch.setenv(localkey.KEY_ENV, str(key_file))
    store = write_store(tmp_path / "s")
    assert index_main([str(tmp_path / "s"), "--kind", "flat"]) == 0
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert len(bytes.fromhex(key_file.read_text().strip())) == 32
    assert not list((tmp_path / "s").rglob("*.key"))
    assert fi.load_index(store) is not None
    capsys.readouterr()
    key_file.chmod(0o644)  # others could read it, so forge tags: not used
    fi._LOADED.clear()
    caplog.clear()
    assert fi.load_index(store) is None and "not private" in caplog.text
    assert index_main([str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not private" in err and "chmod 600" in err
    key_file.unlink()
    key_file.parent.chmod(0o500)  # cannot be created: the build says so before working
    try:
        if os.geteuid() != 0:
            assert index_main([str(tmp_path / "s")]) == 2
            err = capsys.readouterr().err
            assert "cannot create the index key" in err and localkey.KEY_ENV in err
    finally:
        key_file.parent.chmod(0o700)


def test_concurrent_key_creation_agrees(tmp_path, monkeypatch):
    monkeypatch.setenv(localkey.KEY_ENV, str(tmp_path / "k" / "index.key"))
    script = ("import sys; from transferlab.runtime.localkey import local_key; "
              "print(local_key(create=True).hex())")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                              text=True, env=env) for _ in range(4)]
    keys = {p.communicate(timeout=120)[0].strip() for p in procs}
    assert len(keys) == 1 and len(keys.pop()) == 64
    assert [p.name for p in (tmp_path / "k").iterdir()] == ["index.key"]


@pytest.mark.parametrize("planted", ["folder-link", "folder-file", "index-link", "index-fifo"])
def test_planted_index_names_are_replaced_not_followed(tmp_path, caplog, no_hang, planted):
    store = write_store(tmp_path / "s")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "faiss.index").write_bytes(b"keep me")
    folder = tmp_path / "s" / "index"
    if planted == "folder-link":
        folder.symlink_to(outside, target_is_directory=True)
    elif planted == "folder-file":
        folder.write_bytes(b"not a folder")
    else:
        folder.mkdir()
        if planted == "index-link":
            (folder / "faiss.index").symlink_to(outside / "faiss.index")
        else:
            os.mkfifo(folder / "faiss.index")
        forge(store, None, key=None)
    assert fi.load_index(store, "l2") is None
    assert index_main([str(tmp_path / "s"), "--kind", "flat", "--metric", "l2"]) == 0
    assert (outside / "faiss.index").read_bytes() == b"keep me"
    assert sorted(p.name for p in outside.iterdir()) == ["faiss.index"]
    assert folder.is_dir() and not folder.is_symlink()
    assert not (folder / "faiss.index").is_symlink()
    assert fi.load_index(store, "l2") is not None

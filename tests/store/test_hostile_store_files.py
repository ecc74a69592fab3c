"""Issue #24, a store's own files: no write through a planted link, no read of a FIFO, a
device or a link leaving the store, no .npz decompressed before its members are checked,
no key a store cannot read back, no stale temporaries, no half-created stores of several
cuts. Each crafted file (inside a tar unpacked elsewhere where links matter) gives one
line, leaves the file outside unchanged and keeps memory bounded."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import REPO, cli, write_config
from tests.imagegen import make_image_tree
from transferlab.config import MAX_KEY_CHARS
from transferlab.errors import StoreError
from transferlab.runtime.atomicfile import atomic_write_text, remove_stale_temporaries
from transferlab.store.files import _read_sidecar
from transferlab.store.reader import FeatureStore
from transferlab.store.writer import StoreWriter

FP = {"backbone": "b", "cut": "head"}
DEAD_PID = 4_194_305  # above the largest pid_max Linux allows: never a running process


def small_store(directory: Path, keys=("a/0.png", "a/1.png", "b/2.png"), shard_size=2,
                failures=()) -> FeatureStore:
    feats = np.arange(len(keys) * 3, dtype=np.float32).reshape(len(keys), 3)
    with StoreWriter(directory, FP, "float32", shard_size) as writer:
        writer.add(list(keys), [i % 2 for i in range(len(keys))], feats)
        writer.add_failures(list(failures))
        return writer.close({"class_names": ["a", "b"]})


def one_line(text: str) -> str:
    text = text.strip()
    assert len(text.splitlines()) == 1, text
    return text


def run_python(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter (a hang is a timeout, not a stuck test run)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OPENBLAS_NUM_THREADS": "1",
           "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


# Memory bound: after its imports the child may map at most 256 MiB more (RLIMIT_AS).
BOUNDED = """
import resource
pages = int(open("/proc/self/statm").read().split()[0])
limit = pages * resource.getpagesize() + (256 << 20)
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
"""


def tar_and_unpack(store: Path, where: Path) -> Path:
    """``store`` packed in a tar (links kept as links) and unpacked under ``where``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(store, arcname=store.name)
    buf.seek(0)
    where.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=buf) as tar:
        kwargs = {"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}
        tar.extractall(where, **kwargs)
    return where / store.name


# ---- 1. a write through a planted link (critical) --------------------------------------------


def test_a_resume_never_appends_through_a_linked_failure_log(tmp_path, monkeypatch):
    """failures.jsonl a relative link to a file outside the store, inside a tar unpacked
    elsewhere: the resume with list names like ``$(touch X).jpg`` refuses, the file
    outside keeps its bytes and no marker file appears."""
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "data"
    keys = make_image_tree(root, unicode_name=False)
    hostile = ["$(touch X).jpg", "`touch X`.jpg"]
    (root / "list.txt").write_text("\n".join([*keys, *hostile]) + "\n", encoding="utf-8")
    sent = tmp_path / "sent" / "store"
    args = [write_config(tmp_path / "cfg.yaml"), f"data.root={root}", "data.source=list",
            f"data.list_file={root / 'list.txt'}"]
    assert cli(*args, f"output.dir={sent}")[0] == 0
    log = sent / "shards" / "failures.jsonl"
    log.unlink()
    log.symlink_to(Path("..", "..", "victim.txt"))
    (sent / "meta.json").unlink()  # an unfinished store: the run resumes it
    store = tar_and_unpack(sent, tmp_path / "unpacked")
    victim = tmp_path / "unpacked" / "victim.txt"
    victim.write_text("precious\n", encoding="utf-8")
    code, _, err = cli(*args, f"output.dir={store}")
    assert code == 2
    assert "is a link" in one_line(err) and "failure log" in err
    assert victim.read_text(encoding="utf-8") == "precious\n"
    assert not (tmp_path / "X").exists() and not (REPO / "X").exists()


def test_a_lock_file_that_is_a_link_creates_nothing_outside(tmp_path):
    store = small_store(tmp_path / "s").dir
    (store / ".lock").unlink()
    target = tmp_path / "outside" / "created-by-transferlab"
    target.parent.mkdir()
    (store / ".lock").symlink_to(target)
    with pytest.raises(StoreError) as err:
        StoreWriter(store, FP, "float32", 2)
    assert "is a link" in one_line(str(err.value))
    assert not target.exists() and not target.is_symlink()


@pytest.mark.parametrize("name", ["meta.json", "index.csv", "index.npz", "failures.csv"])
def test_atomic_writes_never_follow_a_link_at_their_temporary_name(tmp_path, name):
    """A link planted at the temporary name this thread uses for a file the close writes:
    the write refuses, the file outside keeps its bytes."""
    from transferlab.runtime.atomicfile import temporary_path

    store = small_store(tmp_path / "s").dir
    victim = tmp_path / "victim.txt"
    victim.write_text("precious", encoding="utf-8")
    tmp = temporary_path(store / name)
    tmp.symlink_to(victim)
    with pytest.raises(StoreError) as err:
        small_store(store, keys=("a/0.png", "a/1.png", "b/2.png", "c/3.png"))
    assert "is a link" in one_line(str(err.value))
    assert victim.read_text(encoding="utf-8") == "precious"


def test_no_store_file_is_written_below_a_linked_folder(tmp_path):
    from transferlab.store.format import _write_json

    store = small_store(tmp_path / "s").dir
    _write_json(store / "shards" / "x.json", {}, store)  # a real folder: written
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for entry in list((store / "shards").iterdir()):
        entry.unlink()
    (store / "shards").rmdir()
    (store / "shards").symlink_to(elsewhere)
    with pytest.raises(StoreError) as err:
        _write_json(store / "shards" / "shard-00000.json", {}, store)
    assert "is a link" in one_line(str(err.value))
    assert list(elsewhere.iterdir()) == []


# ---- 2. FIFOs, devices and links where a store file is expected -------------------------------

FIFO_CASES = {  # file -> (what is done, what the one line says)
    "fingerprint.json": ("resume", "a FIFO"),
    "meta.json": ("open", "a FIFO"),
    "index.csv": ("open", "a FIFO"),
    "index.npz": ("open-ok", ""),  # the CSV serves
    "failures.csv": ("failures", "a FIFO"),
    ".lock": ("resume", "a FIFO"),
    "shards/shard-00000.npy": ("open", "a FIFO"),
    "shards/failures.jsonl": ("fail", "a FIFO"),
}


def test_fifos_and_devices_in_a_store_are_refused_without_blocking(tmp_path):
    cases = {}
    for i, (name, (action, _)) in enumerate({**FIFO_CASES, "dev-zero": ("resume", "")}.items()):
        store = small_store(tmp_path / f"s{i}").dir
        if name == "dev-zero":  # fingerprint.json a link to /dev/zero: 4.4 GB, then MemoryError
            (store / "fingerprint.json").unlink()
            (store / "fingerprint.json").symlink_to("/dev/zero")
        else:
            (store / name).unlink(missing_ok=True)
            os.mkfifo(store / name)
        cases[name] = (str(store), action)
    done = run_python(BOUNDED + f"""
import signal
from transferlab.errors import StoreError
from transferlab.store.reader import FeatureStore
from transferlab.store.writer import StoreWriter
signal.alarm(60)
for name, (store, action) in {cases!r}.items():
    try:
        if action == "resume":
            StoreWriter(store, {FP!r}, "float32", 2).abort()
        elif action == "fail":
            w = StoreWriter(store, {FP!r}, "float32", 2)
            w.add_failures([("x.png", "missing")])
            w.close()
        elif action == "failures":
            FeatureStore.open(store).failures
        else:
            FeatureStore.open(store)
        print(name, "|OK")
    except StoreError as exc:
        print(name, "|" + str(exc).replace(chr(10), " "))
""")
    assert done.returncode == 0, done.stderr
    lines = dict(line.split(" |", 1) for line in done.stdout.splitlines())
    for name, (action, said) in FIFO_CASES.items():
        if action == "open-ok":
            assert lines[name] == "OK"
        else:
            assert said in lines[name] and "not a regular file" in lines[name], (name, lines)
    assert "outside" in lines["dev-zero"] and "fingerprint.json" in lines["dev-zero"]


def test_an_index_csv_linked_outside_is_refused_one_inside_is_read(tmp_path):
    store = small_store(tmp_path / "s").dir
    outside = tmp_path / "index.csv"
    outside.write_bytes((store / "index.csv").read_bytes())
    (store / "index.npz").unlink()
    (store / "index.csv").unlink()
    (store / "index.csv").symlink_to(outside)
    with pytest.raises(StoreError) as err:
        FeatureStore.open(store)
    assert "outside" in one_line(str(err.value))
    (store / "index.csv").unlink()
    (store / "real-index.csv").write_bytes(outside.read_bytes())
    (store / "index.csv").symlink_to("real-index.csv")
    assert FeatureStore.open(store).keys == ["a/0.png", "a/1.png", "b/2.png"]


# ---- 3. compressed bombs and size claims in .npz files ----------------------------------------


def npz(path: Path, members: dict[str, tuple[tuple[int, ...], str, bytes | int]],
        compress: bool = False) -> Path:
    """An .npz whose members declare ``shape`` and ``dtype`` in their .npy header and hold
    ``data`` (bytes, or a count of zero bytes streamed: a compressed bomb)."""
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", method, compresslevel=9 if compress else None) as zf:
        for name, (shape, dtype, data) in members.items():
            header = io.BytesIO()
            np.lib.format.write_array_header_1_0(
                header, {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": shape})
            with zf.open(f"{name}.npy", "w", force_zip64=True) as m:
                m.write(header.getvalue())
                if isinstance(data, int):
                    block = bytes(1 << 22)
                    for start in range(0, data, len(block)):
                        m.write(block[:min(len(block), data - start)])
                else:
                    m.write(data)
    return path


def sidecar_members(store: FeatureStore) -> dict:
    blob = "\0".join(store.keys).encode()
    return {"keys": ((len(blob),), "u1", blob),
            "labels": ((len(store),), "<i8", store.labels.astype("<i8").tobytes()),
            "views": ((len(store),), "<i8", store.views.astype("<i8").tobytes()),
            "csv_sha256": ((), "<U64", np.array("0" * 64).tobytes())}


def test_index_npz_bombs_are_never_decompressed_and_the_csv_serves(tmp_path):
    """A 200-byte member claiming 1e11 int64, a deflated member of 300 MB zeros, an extra
    member: each is refused before reading (memory bounded), the CSV serves."""
    stores = []
    for i, change in enumerate([
            {"labels": ((10 ** 11,), "<i8", b"\0" * 64)},
            {"labels": ((3,), "<i8", 300 << 20)},
            {"extra": ((10 ** 9,), "<f8", b"")}]):
        store = small_store(tmp_path / f"s{i}")
        members = {**sidecar_members(store), **change}
        npz(store.dir / "index.npz", members, compress=i == 1)
        assert (store.dir / "index.npz").stat().st_size < 1 << 20
        stores.append(str(store.dir))
    done = run_python(f"""
from transferlab.store.reader import FeatureStore
{BOUNDED}
for store in {stores!r}:
    print(FeatureStore.open(store).keys)
""")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["['a/0.png', 'a/1.png', 'b/2.png']"] * 3


def test_a_sidecar_with_the_true_digest_but_other_keys_is_not_served(tmp_path):
    store = small_store(tmp_path / "s")
    csv_sha = __import__("hashlib").sha256((store.dir / "index.csv").read_bytes()).hexdigest()
    blob = "\0".join(["a/0.png", "evil/1.png", "b/2.png"]).encode()
    np.savez(store.dir / "index.npz", keys=np.frombuffer(blob, np.uint8),
             labels=store.labels, views=store.views, csv_sha256=np.array(csv_sha))
    assert _read_sidecar(store.dir / "index.csv", 3) is None
    assert FeatureStore.open(store.dir).keys == ["a/0.png", "a/1.png", "b/2.png"]


def test_an_honest_sidecar_is_served(tmp_path):
    keys = ["a/0.png", 'q/"x",y.png', "l/line\nbreak.png", "", "é/ü.png", "-1,2"]
    store = small_store(tmp_path / "s", keys=keys)
    fast = _read_sidecar(store.dir / "index.csv", len(keys))
    assert fast is not None and fast[0] == keys
    assert FeatureStore.open(store.dir).keys == keys


def test_pca_file_bombs_are_one_line_in_bounded_memory(tmp_path):
    """reduce-pca.npz: components claiming 96 x 5e8 floats in 300 bytes, a deflated member
    of 300 MB zeros, shapes other than the store records, a FIFO: one StoreError each."""
    from transferlab.extract.reduce import fit_pca

    good = tmp_path / "good.npz"
    fit_pca(__import__("torch").randn(40, 8), 3).save(good)
    with np.load(good) as z:
        honest = {k: (z[k].shape, z[k].dtype.str, z[k].tobytes()) for k in z.files}
    files = {}
    for name, change, compress in [
            ("claim", {"components": ((3, 5 * 10 ** 8), "<f4", b"")}, False),
            ("bomb", {"components": ((3, 8), "<f4", 300 << 20)}, True),
            ("shape", {"mean": ((9,), "<f4", bytes(36))}, False),
            ("object", {"format": ((), "|O", b"")}, False)]:
        files[name] = str(npz(tmp_path / f"{name}.npz", {**honest, **change}, compress))
        assert Path(files[name]).stat().st_size < 1 << 20
    os.mkfifo(tmp_path / "fifo.npz")
    files["fifo"] = str(tmp_path / "fifo.npz")
    files["honest"] = str(good)
    done = run_python(f"""
import signal
from transferlab.errors import StoreError
from transferlab.extract.reduce import PCAProjection
{BOUNDED}
signal.alarm(60)
for name, path in {files!r}.items():
    try:
        pca = PCAProjection.load(path, (8, 3))
        print(name, "|OK", pca.d_in, pca.dim)
    except StoreError as exc:
        print(name, "|" + str(exc).replace(chr(10), " "))
""")
    assert done.returncode == 0, done.stderr
    lines = dict(line.split(" |", 1) for line in done.stdout.splitlines())
    assert lines.pop("honest") == "OK 8 3"
    assert "a FIFO" in lines.pop("fifo")
    for name, line in lines.items():
        assert "output.overwrite=true" in line and "PCA" in line, (name, line)


# ---- 4. keys, failure lists, stale temporaries, several cuts ---------------------------------


def test_a_200000_character_list_line_is_one_line_and_no_store_is_begun(tmp_path):
    """The list source refuses the line where it reads it (naming the line); the store writer's
    own key limit (next test) is the second fence for sources that do not."""
    root = tmp_path / "data"
    keys = make_image_tree(root, unicode_name=False)
    long_key = "d/" + "x" * 200_000 + ".png"
    (root / "list.txt").write_text("\n".join([*keys, long_key]) + "\n", encoding="utf-8")
    out = tmp_path / "s"
    args = [write_config(tmp_path / "cfg.yaml"), f"data.root={root}", "data.source=list",
            f"data.list_file={root / 'list.txt'}", f"output.dir={out}"]
    code, _, err = cli(*args)
    assert code == 2
    assert err.count("\n") == 1 and f"line {len(keys) + 1}" in err and "4,096" in err
    assert len(err) < 400 and not out.exists()


def test_a_long_key_added_is_listed_as_a_failure(tmp_path):
    long_key = "k" * (MAX_KEY_CHARS + 1)
    store = small_store(tmp_path / "s", keys=("a/0.png", long_key, "b/2.png"))
    assert store.keys == ["a/0.png", "b/2.png"]
    [(key, reason)] = store.failures
    assert key.startswith("kkk") and len(key) < MAX_KEY_CHARS and "bad-name" in reason


def test_an_existing_store_with_an_overlong_field_is_one_line(tmp_path):
    store = small_store(tmp_path / "s", failures=[("bad.png", "missing")]).dir
    (store / "failures.csv").write_text(f"key,reason\r\n{'y' * 200_000},missing\r\n",
                                        encoding="utf-8")
    opened = FeatureStore.open(store)  # the failures are read when asked for
    with pytest.raises(StoreError) as err:
        opened.failures
    assert "field larger" in one_line(str(err.value))
    (store / "index.npz").unlink()
    text = (store / "index.csv").read_text(encoding="utf-8")
    (store / "index.csv").write_text(text.replace("a/1.png", "z" * 200_000), encoding="utf-8")
    with pytest.raises(StoreError) as err:
        FeatureStore.open(store)
    assert "index.csv" in one_line(str(err.value))


def test_a_huge_failures_list_costs_nothing_on_open_and_is_bounded(tmp_path):
    store = small_store(tmp_path / "s", failures=[("bad.png", "missing")]).dir
    with open(store / "failures.csv", "r+b") as f:  # sparse: 300 MB that hold no bytes
        f.truncate(300 << 20)
    opened = FeatureStore.open(store)
    assert "failures=1" in repr(opened)
    with pytest.raises(StoreError) as err:
        opened.failures
    assert "more than the" in one_line(str(err.value))
    (store / "failures.csv").write_text("key,reason\r\n" + "a,b\r\n" * 1000, encoding="utf-8")
    with pytest.raises(StoreError) as err:
        FeatureStore.open(store).failures
    assert "more failures than the 1" in one_line(str(err.value))


def test_stale_temporaries_of_dead_writers_are_removed_others_kept(tmp_path):
    """A SIGKILL during an export or an index build leaves ``<name>.<pid>-<tid>.tmp``: the
    next write of that file removes it; a live process's, a link and others' files stay."""
    target = tmp_path / "export.parquet"
    stale = tmp_path / f"export.parquet.{DEAD_PID}-7.tmp"
    stale.write_bytes(b"x" * 1000)
    live = tmp_path / f"export.parquet.{os.getppid()}-7.tmp"
    live.write_bytes(b"writing")
    victim = tmp_path / "victim"
    victim.write_text("keep", encoding="utf-8")
    link = tmp_path / f"export.parquet.{DEAD_PID + 1}-7.tmp"
    link.symlink_to(victim)
    mine = tmp_path / f"other.parquet.{DEAD_PID}-7.tmp"
    mine.write_text("not this file's", encoding="utf-8")
    atomic_write_text(target, "new")
    assert target.read_text(encoding="utf-8") == "new"
    assert not stale.exists() and live.exists() and link.is_symlink() and mine.exists()
    assert victim.read_text(encoding="utf-8") == "keep"
    assert remove_stale_temporaries(tmp_path / "other.parquet") == [mine]


def test_a_killed_export_leaves_nothing_after_the_next_one(tmp_path):
    store = small_store(tmp_path / "s")
    out = tmp_path / "rows.npz"
    (tmp_path / f"rows.npz.{DEAD_PID}-1.tmp").write_bytes(b"half an export")
    store.export(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.npz", "s"]


def test_several_cuts_check_every_folder_before_creating_any(tmp_path):
    root = tmp_path / "data"
    make_image_tree(root, per_class=2, unicode_name=False)
    out = tmp_path / "mine"
    (out / "stage-2").mkdir(parents=True)
    (out / "stage-2" / "notes.txt").write_text("mine", encoding="utf-8")
    code, _, err = cli(write_config(tmp_path / "cfg.yaml"), f"data.root={root}",
                       f"output.dir={out}", "model.cut=[stage:0, stage:2, head]")
    assert code == 2 and "not a transferlab store" in one_line(err)
    assert sorted(p.name for p in out.iterdir()) == ["stage-2"]
    assert [p.name for p in (out / "stage-2").iterdir()] == ["notes.txt"]


def test_a_store_file_over_its_size_limit_is_one_line(tmp_path):
    store = small_store(tmp_path / "s").dir
    with open(store / "meta.json", "r+b") as f:
        f.truncate(1 << 30)  # sparse
    with pytest.raises(StoreError) as err:
        FeatureStore.open(store)
    assert "more than the" in one_line(str(err.value))
    json.loads((store / "fingerprint.json").read_text(encoding="utf-8"))

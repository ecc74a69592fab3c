"""Hostile data sources (#24): tar headers that make ``tarfile`` backtrack, recurse or
allocate what the shard does not hold, brace patterns naming billions of shards, labels too
deep or too wide, list files with endless lines, FIFOs where a list or a shard is expected.

Every hostile file is crafted here in a few KB; what is checked: one line (a DataError) or a
failure with a reason, the listing's time (no hang) and its memory (a subprocess under
``RLIMIT_AS``), and that honest shards and lists list exactly as before.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest

from tests.helpers import REPO, add_member, env, extract
from tests.imagegen import jpeg_bytes
from transferlab.config import DataConfig
from transferlab.data import remote, sources, webdataset
from transferlab.data.sources import build_dataset
from transferlab.data.webdataset import build_webdataset, expand_urls, scan_shard
from transferlab.errors import DataError

IMAGE = jpeg_bytes(20, 20, seed=1)
END = b"\0" * 1024  # tar's end-of-archive blocks


# ---------------------------------------------------------------------------------------
# Crafting tar files block by block
# ---------------------------------------------------------------------------------------


def header(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> bytes:
    """One 512-byte header with a valid checksum claiming ``size`` bytes (base-256 when
    octal cannot hold it, as GNU tar writes)."""
    info = tarfile.TarInfo(name)
    info.size, info.type = size, kind
    return info.tobuf(tarfile.GNU_FORMAT)


def padded(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 512)


def member(name: str, data: bytes, kind: bytes = tarfile.REGTYPE) -> bytes:
    return header(name, len(data), kind) + padded(data)


def pax(*records: tuple[str, str | bytes]) -> bytes:
    """A pax 'x' header holding ``records`` (well-formed: each length counts itself)."""
    body = b""
    for key, value in records:
        text = key.encode() + b"=" + (value if isinstance(value, bytes) else value.encode())
        size = len(text) + 2
        while len(str(size).encode()) + len(text) + 2 != size:
            size += 1
        body += str(size).encode() + b" " + text + b"\n"
    return member("PaxHeader", body, tarfile.XHDTYPE)


def negative_size(name: str) -> bytes:
    """A member header whose base-256 size field says -1 (checksum fixed)."""
    block = bytearray(header(name, 0))
    block[124:136] = b"\xff" * 12
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % tarfile.calc_chksums(bytes(block))[0]
    return bytes(block)


GOOD = member("good.jpg", IMAGE)  # the hostile header starts after it, at byte AT
LATER = member("later.jpg", IMAGE)
AT = len(GOOD)

HOSTILE_HEADERS = {
    # a pax header of 1 MB of digits: tarfile's hdrcharset regex backtracks (CVE-2024-6232)
    "digits-1mb": (GOOD + member("p", b"1" * 1_000_000, tarfile.XHDTYPE) + LATER + END,
                   f"pax header at byte {AT} claims 1,000,000 bytes, more than the 65,536"),
    # the same attack under the size limit: 4 s of backtracking in 60 KB before the fix
    "digits-60kb": (GOOD + member("p", b"1" * 60_000, tarfile.XHDTYPE) + LATER + END,
                    "holds 60,000 digits in a row (at most 128)"),
    # GNU long name and pax headers claiming 64 GiB in a file of a few KB: MemoryError
    "longname-64g": (GOOD + header("././@LongLink", 64 << 30, tarfile.GNUTYPE_LONGNAME)
                     + b"a" * 512 + END,
                     f"GNU long-name header at byte {AT} claims 68,719,476,736 bytes"),
    "pax-64g": (GOOD + header("p", 64 << 30, tarfile.XHDTYPE) + b"a" * 512 + END,
                f"pax header at byte {AT} claims 68,719,476,736 bytes"),
    # small enough for the limit, more than the shard holds
    "pax-past-end": (GOOD + header("p", 40_000, tarfile.XHDTYPE) + b"1 " * 256 + END,
                     "claims 40,000 bytes but the shard holds 1,536 after it"),
    # 3000 long-name headers in a row: tarfile recurses once each (RecursionError)
    "chain": (GOOD + b"".join(member("././@LongLink", b"a.jpg\0", tarfile.GNUTYPE_LONGNAME)
                              for _ in range(3000)) + LATER + END,
              f"more than 8 extended headers in a row at byte {AT}"),
    # a record whose length runs past the header; a GNU sparse map read from the data
    "bad-record": (GOOD + member("p", b"99 path=a.jpg\n", tarfile.XHDTYPE) + LATER + END,
                   "malformed pax record at byte 0 of the header"),
    "sparse": (GOOD + pax(("GNU.sparse.major", "1"), ("GNU.sparse.minor", "0")) + LATER + END,
               "GNU sparse member; sparse members are not read from shards"),
    "pax-size": (GOOD + pax(("size", "-5")) + LATER + END,
                 "the member size is not a whole number"),
}
FIRST_HEADER = {  # nothing before the hostile header: the shard is one failure at byte 0
    "first-pax-64g": (header("p", 64 << 30, tarfile.XHDTYPE) + b"a" * 512 + END,
                      "pax header at byte 0 claims 68,719,476,736 bytes"),
}

PROBE = r"""
import json, resource, sys, time
from transferlab.data.webdataset import expand_urls, scan_shard
from transferlab.errors import DataError

def address_space():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmSize:"))

limit = address_space() + (384 << 20)  # what is mapped now (torch...) + 384 MiB
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
out = []
for kind, arg in json.loads(sys.argv[1]):
    start = time.perf_counter()
    try:
        if kind == "shard":
            index = scan_shard(arg, [".jpg"], "cls")
            result = [[s.key, list(s.rejected) if s.rejected else None] for s in index.samples]
        else:
            result = len(expand_urls(arg))
    except DataError as exc:
        result = "DataError: " + str(exc)
    out.append({"result": result, "seconds": time.perf_counter() - start})
print(json.dumps(out))
"""


def probe(cases: list[tuple[str, str]]) -> list[dict]:
    """Each (``shard``, path) listed or (``urls``, pattern) expanded in one subprocess under
    ``RLIMIT_AS`` (384 MiB above what is mapped after the imports), with a timeout."""
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(cases)], env=env(),
                          cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


# ---------------------------------------------------------------------------------------
# 1. Tar headers
# ---------------------------------------------------------------------------------------


def test_hostile_tar_headers_are_one_failure_fast_and_in_bounded_memory(tmp_path):
    cases = {**HOSTILE_HEADERS, **FIRST_HEADER}
    for name, (data, _) in cases.items():
        (tmp_path / f"{name}.tar").write_bytes(data)
    results = probe([("shard", str(tmp_path / f"{name}.tar")) for name in cases])
    for (name, (_, expected)), got in zip(cases.items(), results):
        assert got["seconds"] < 2, (name, got["seconds"])
        at = 0 if name in FIRST_HEADER else AT
        listed = got["result"]
        assert [key for key, _ in listed] == ([] if at == 0 else [f"{name}/good"]) + [
            f"{name}/@{at}"], (name, listed)
        reason, detail = listed[-1][1]
        assert reason == "corrupt" and expected in detail, (name, detail)
        assert detail.startswith(f"tar structure broken at byte {at} (UnsafeHeader: ")
        assert detail.endswith("later members are lost; re-copy the shard")
        assert "\n" not in detail


def test_a_hostile_shard_among_good_ones_is_a_failure_and_the_rest_is_written(tmp_path):
    (tmp_path / "s-0.tar").write_bytes(GOOD + member("good.cls", b"1") + LATER + END)
    (tmp_path / "s-1.tar").write_bytes(HOSTILE_HEADERS["longname-64g"][0])
    (tmp_path / "s-2.tar").write_bytes(FIRST_HEADER["first-pax-64g"][0])
    store = extract(tmp_path, "out", {"source": "webdataset", "label_key": "cls",
                                      "urls": str(tmp_path / "s-{0..2}.tar")})
    assert store.keys == ["s-0/good", "s-0/later", "s-1/good"]
    assert store.labels.tolist() == [1, -1, -1]
    assert [(key, reason.split(":")[0]) for key, reason in store.failures] == [
        (f"s-1/@{AT}", "corrupt"), ("s-2/@0", "corrupt")]


def test_a_member_name_longer_than_a_key_is_a_bad_name_at_its_offset(tmp_path):
    long_name = "n" * 5000 + ".jpg"
    shard = tmp_path / "s.tar"
    by_pax = pax(("path", long_name)) + member("x.jpg", IMAGE)
    other = "m" * 5000 + ".jpg"  # as a GNU long name
    shard.write_bytes(GOOD + by_pax + member("././@LongLink", other.encode() + b"\0",
                                             tarfile.GNUTYPE_LONGNAME)
                      + member("y.jpg", IMAGE) + END)
    ds = build_webdataset(DataConfig(source="webdataset", urls=str(shard)))
    assert ds.keys == ["s/good", f"s/@{AT}", f"s/@{AT + len(by_pax)}"]  # their first headers
    assert ds[1]["error"] == ("bad-name: member name is 5,004 characters (a key has at most "
                              "4,096)")
    assert ds[2]["error"] == ds[1]["error"] and ds[0]["error"] is None


def test_a_member_claiming_a_negative_size_is_never_read(tmp_path):
    shard = tmp_path / "neg.tar"
    shard.write_bytes(GOOD + negative_size("neg.jpg") + negative_size("neg.cls") + END)
    ds = build_webdataset(DataConfig(source="webdataset", urls=str(shard), label_key="cls"))
    assert ds.keys[:2] == ["neg/good", "neg/neg"]
    assert ds[1]["error"] == "corrupt: member header claims -1 bytes; never read"


def test_honest_pax_and_gnu_shards_list_as_before(tmp_path):
    names = ["a/" + "d" * 150 + "/x.jpg", "a/ñandú_猫.jpg", "b/short.jpg"]
    made = []
    for fmt, label in ((tarfile.PAX_FORMAT, "pax"), (tarfile.GNU_FORMAT, "gnu")):
        path = tmp_path / f"{label}.tar"
        with tarfile.open(path, "w", format=fmt,
                          pax_headers={"comment": "made by a test"}) as tar:
            for name in names:
                add_member(tar, name, IMAGE)
                add_member(tar, name.replace(".jpg", ".cls"), b"7")
        made.append(path)
    if shutil.which("tar"):  # GNU tar's own pax headers (atime, ctime with nanoseconds)
        folder = tmp_path / "files"
        for name in names:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(IMAGE)
            (folder / name.replace(".jpg", ".cls")).write_bytes(b"7")
        for label in ("pax", "gnu"):
            path = tmp_path / f"tar-{label}.tar"
            subprocess.run(["tar", f"--format={label}", "-cf", str(path), "-C", str(folder),
                            *sorted(n for p in names for n in (p, p.replace(".jpg", ".cls")))],
                           check=True)
            made.append(path)
    for path in made:
        index = scan_shard(str(path), [".jpg"], "cls")
        with tarfile.open(path) as tar:
            want = [(m.name.rsplit(".", 1)[0], m.offset_data) for m in tar.getmembers()
                    if m.name.endswith(".jpg")]
        got = [(s.key.split("/", 1)[1], s.offset) for s in index.samples]
        assert sorted(got) == sorted(want), path.name
        assert all(s.rejected is None and s.label == "7" for s in index.samples), path.name


# ---------------------------------------------------------------------------------------
# 2. Brace patterns
# ---------------------------------------------------------------------------------------


def test_brace_patterns_are_counted_before_they_are_expanded():
    big = "x-{0..9999}-{0..9999}.tar"  # 1e8 names: 4.9 GB, then MemoryError, before the fix
    results = probe([("urls", big), ("urls", "s/t-{000000..000009}.tar")])
    assert results[0]["result"].startswith(f"DataError: data.urls '{big}' names more than "
                                           "1,000,000 shards")
    assert results[0]["seconds"] < 1
    assert results[1]["result"] == 10
    for spec, message in (
            ("t-{0..%s}.tar" % ("9" * 5000), "must be two integers"),  # int() of 5000 digits
            ("t-{0..٣}.tar", "must be two integers"),  # a digit int() does not take
            ("{a}" * 65, "more than 64 braces"),
            ("t-{0..999}{0..999}{0..9}.tar", "more than 1,000,000 shards")):
        with pytest.raises(DataError, match=message):
            expand_urls(spec)
    with pytest.raises(DataError, match="not a list of lists"):
        expand_urls([["a.tar"]])


def test_nested_braces_stop_at_the_limit_while_expanding(monkeypatch):
    monkeypatch.setattr(webdataset, "MAX_SHARDS", 1000)
    assert len(expand_urls("{a{0..9},b}-{0..9}")) == 200  # 10 x 2 alternatives x 10
    with pytest.raises(DataError, match="names more than 1,000 shards"):  # counted 100 x 10,
        expand_urls("{a{0..99},b}-{0..9}")  # the nested group doubles it while expanding
    assert expand_urls(["a-{0..1}.tar", "b.tar"]) == ["a-0.tar", "a-1.tar", "b.tar"]


# ---------------------------------------------------------------------------------------
# 3. Tar labels
# ---------------------------------------------------------------------------------------


def labelled_shard(path: Path, ext: str, labels: list[bytes | None]) -> None:
    with tarfile.open(path, "w") as tar:
        for i, label in enumerate(labels):
            add_member(tar, f"{i:02d}.jpg", IMAGE)
            if label is not None:
                add_member(tar, f"{i:02d}.{ext}", label)


def test_bad_cls_labels_are_failures_with_a_reason(tmp_path):
    labelled_shard(tmp_path / "c.tar", "cls", [
        b"2", b"9" * 5000, b"1" + b"0" * 23, b"1e23", b"abc", None, b"-1", b"\xff" * 70_000])
    ds = build_webdataset(DataConfig(source="webdataset", urls=str(tmp_path / "c.tar"),
                                     label_key="cls"))
    assert len(ds) == 8 and ds.class_names is None
    assert ds.labels.tolist() == [2, -1, -1, -1, -1, -1, -1, -1]
    errors = [ds[i]["error"] for i in range(8)]
    assert errors[0] is None and errors[5] is None and errors[6] is None
    bad = "bad-label: the .cls member "
    assert errors[1] == bad + ("is an integer of 5,000 digits (a label has at most 18); fix "
                               "or remove it")
    assert errors[2] == bad + ("is an integer of 24 digits (a label has at most 18); fix or "
                               "remove it")
    assert errors[3] == bad + "is not an integer ('1e23'); fix or remove it"
    assert errors[4].startswith(bad + "is not an integer")
    assert errors[7] == bad + "is 70,000 bytes (a label has at most 65,536); fix or remove it"


def test_bad_json_labels_are_failures_with_a_reason(tmp_path):
    labelled_shard(tmp_path / "j.tar", "json", [
        b'{"label": "cat"}', b"[" * 60_000, b'{"label": ' + b"[" * 30_000 + b"]" * 30_000 + b"}",
        b'{"label": 100000000000000000000000}', b'{"label": 3.5}', b'{"other": 1}',
        b"not json", b'{"label": "dog", "text": "[[[[' + b"[" * 100 + b'"}',
        b'{"label": "' + b"n" * 5000 + b'"}'])
    ds = build_webdataset(DataConfig(source="webdataset", urls=str(tmp_path / "j.tar"),
                                     label_key="json"))
    assert ds.class_names == ["cat", "dog"]
    assert ds.labels.tolist() == [0, -1, -1, -1, -1, -1, -1, 1, -1]
    errors = [ds[i]["error"] for i in range(9)]
    assert [i for i, e in enumerate(errors) if e is None] == [0, 5, 7]
    bad = "bad-label: the .json member "
    assert errors[1] == bad + "is JSON nested 60,000 deep (at most 64); fix or remove it"
    assert errors[2] == bad + "is JSON nested 30,001 deep (at most 64); fix or remove it"
    assert errors[3] == bad + ("is an integer of 24 digits (a label has at most 18); fix or "
                               "remove it")
    assert errors[4] == bad + ('has a "label" that is neither an integer nor a class name '
                               "(3.5); fix or remove it")
    assert errors[6] == bad + "is not JSON ('not json'); fix or remove it"
    assert errors[8] == bad + ("names a class of 5,000 characters (at most 4,096); fix or "
                               "remove it")


def test_bad_labels_of_a_run_are_failures_and_the_store_reopens(tmp_path):
    labelled_shard(tmp_path / "l.tar", "cls", [b"1", b"9" * 5000, b"3"])
    data = {"source": "webdataset", "urls": str(tmp_path / "l.tar"), "label_key": "cls"}
    store = extract(tmp_path, "run", data)
    assert store.keys == ["l/00", "l/02"] and store.labels.tolist() == [1, 3]
    assert store.failures == [("l/01", "bad-label: the .cls member is an integer of 5,000 "
                                       "digits (a label has at most 18); fix or remove it")]
    again = extract(tmp_path, "run", data)  # the rerun tries the failure again, same store
    assert again.keys == store.keys and again.failures == store.failures


def test_list_labels_of_too_many_digits_are_one_line_naming_the_line(tmp_path):
    (tmp_path / "a.jpg").write_bytes(IMAGE)
    (tmp_path / "b.jpg").write_bytes(IMAGE)
    for label, shown in (("9" * 5000, "5,000"), ("1" + "0" * 23, "24")):
        csv_file = tmp_path / "l.csv"
        csv_file.write_text(f"path,label\na.jpg,1\nb.jpg,{label}\n")
        with pytest.raises(DataError, match=rf"l.csv line 3: the label is an integer of "
                                            rf"{shown} digits .*fix that line$"):
            build_dataset(DataConfig(source="list", list_file=str(csv_file),
                                     label_column="label"))
    csv_file.write_text("path,label\na.jpg,--3\nb.jpg,4\n")  # int('--3') raised ValueError
    ds = build_dataset(DataConfig(source="list", list_file=str(csv_file), label_column="label"))
    assert ds.class_names == ["--3", "4"]


# ---------------------------------------------------------------------------------------
# 4. Long lines and names, list files and shards that are not regular files
# ---------------------------------------------------------------------------------------


def test_long_list_lines_are_one_line_naming_the_line(tmp_path):
    (tmp_path / "a.jpg").write_bytes(IMAGE)
    plain = tmp_path / "l.txt"
    plain.write_text("a.jpg\n# comment\n" + "x" * 200_000 + ".jpg\n")
    with pytest.raises(DataError, match=r"l.txt line 3: the path is 200,004 characters long, "
                                        r"more than 4,096; fix that line$"):
        build_dataset(DataConfig(source="list", list_file=str(plain)))
    csv_file = tmp_path / "l.csv"
    for length, message in ((200_000, r"line 3: field larger than field limit \(131072\)"),
                            (5000, "line 3: the path is 5,004 characters long")):
        csv_file.write_text("path,label\na.jpg,1\n" + "x" * length + ".jpg,2\n")
        with pytest.raises(DataError, match=message):
            build_dataset(DataConfig(source="list", list_file=str(csv_file),
                                     label_column="label"))
    plain.write_text("a.jpg\r\nb.jpg\rc.jpg\n\n")  # \r\n, \r and \n end lines, as before
    ds = build_dataset(DataConfig(source="list", list_file=str(plain)))
    assert ds.keys == ["a.jpg", "b.jpg", "c.jpg"]


def test_list_files_are_bounded_in_bytes_and_lines(tmp_path, monkeypatch):
    (tmp_path / "a.jpg").write_bytes(IMAGE)
    listed = tmp_path / "l.txt"
    listed.write_text("a.jpg\n" * 10)
    monkeypatch.setattr(sources, "MAX_LIST_LINES", 5)
    with pytest.raises(DataError, match="has more than 5 lines; a list that long"):
        build_dataset(DataConfig(source="list", list_file=str(listed)))
    crlf = tmp_path / "crlf.txt"
    crlf.write_bytes(b"".join(b"%d.jpg\r\n" % i for i in range(4)) + b"a.jpg\r\n")
    assert len(build_dataset(DataConfig(source="list", list_file=str(crlf)))) == 5
    monkeypatch.setattr(remote, "MAX_TEXT_BYTES", 40)
    with pytest.raises(DataError, match=r"l.txt holds more than 40 bytes \(60\); a list"):
        build_dataset(DataConfig(source="list", list_file=str(listed)))


@pytest.fixture
def memfs():
    """fsspec's in-memory filesystem (one per process), emptied of what the test wrote."""
    import fsspec

    fs = fsspec.filesystem("memory")
    yield fs
    for top in ("/b", "/f"):
        if fs.exists(top):
            fs.rm(top, recursive=True)


def test_a_remote_list_file_is_read_no_further_than_the_limit(monkeypatch, memfs):
    fs = memfs
    fs.pipe("/b/list.txt", "".join(f"{i}.jpg\n" for i in range(1000)).encode())
    monkeypatch.setattr(remote, "filesystem", lambda url: (fs, "/b/list.txt"))
    monkeypatch.setattr(remote, "MAX_TEXT_BYTES", 100)
    with pytest.raises(DataError, match=r"s3://b/list.txt holds more than 100 bytes"):
        build_dataset(DataConfig(source="list", list_file="s3://b/list.txt",
                                 root="s3://b/"))
    monkeypatch.setattr(remote, "MAX_TEXT_BYTES", 10_000)
    ds = build_dataset(DataConfig(source="list", list_file="s3://b/list.txt", root="s3://b/"))
    assert ds.keys[:2] == ["0.jpg", "1.jpg"] and len(ds) == 1000


def test_a_remote_folder_key_longer_than_a_key_is_one_line(monkeypatch, memfs):
    fs = memfs
    fs.pipe("/f/imgs/a.jpg", IMAGE)
    fs.pipe("/f/imgs/" + "d/" * 2100 + "x.jpg", IMAGE)
    monkeypatch.setattr(remote, "filesystem", lambda url: (fs, "/f/imgs"))
    with pytest.raises(DataError, match=r"holds an object key of 4,205 characters \(at most "
                                        r"4,096\): d/d/.*; rename it"):
        remote.find_images("s3://f/imgs", [".jpg"])
    fs.rm("/f/imgs/" + "d/" * 2100 + "x.jpg")
    assert remote.find_images("s3://f/imgs", [".jpg"]) == ["a.jpg"]


def in_thread(call, fifo: Path):
    """``call()``'s result or exception; a FIFO that blocks it is opened and the test fails."""
    result: dict = {}

    def run():
        try:
            result["value"] = call()
        except Exception as exc:  # handed back to the test
            result["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=30)
    if worker.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail(f"blocked on the FIFO {fifo}")
    return result


def test_a_fifo_or_device_as_list_file_or_shard_is_one_line_not_a_hang(tmp_path):
    fifo = tmp_path / "list.txt"
    os.mkfifo(fifo)
    got = in_thread(lambda: build_dataset(DataConfig(source="list", list_file=str(fifo))), fifo)
    assert isinstance(got.get("error"), DataError)
    assert str(got["error"]) == f"data.list_file {fifo} is a FIFO, not a regular file"
    zero = tmp_path / "zero.txt"
    zero.symlink_to("/dev/zero")
    with pytest.raises(DataError, match="zero.txt is a device, not a regular file"):
        build_dataset(DataConfig(source="list", list_file=str(zero)))
    shard = tmp_path / "s.tar"
    os.mkfifo(shard)
    got = in_thread(lambda: build_webdataset(DataConfig(source="webdataset", urls=str(shard))),
                    shard)
    assert str(got["error"]) == f"data.urls: shard {shard} is a FIFO, not a regular file"
    (tmp_path / "z.tar").symlink_to("/dev/zero")
    with pytest.raises(DataError, match="z.tar is a device, not a regular file"):
        build_webdataset(DataConfig(source="webdataset", urls=str(tmp_path / "z.tar")))


def test_a_shard_replaced_by_a_fifo_after_listing_is_an_item_failure(tmp_path):
    shard = tmp_path / "s.tar"
    shard.write_bytes(GOOD + END)
    ds = build_webdataset(DataConfig(source="webdataset", urls=str(shard)))
    shard.unlink()
    os.mkfifo(shard)
    got = in_thread(lambda: ds[0]["error"], shard)
    assert got["value"] == (f"unreadable: shard {shard}: DataError: shard {shard} is a FIFO, "
                            "not a regular file")

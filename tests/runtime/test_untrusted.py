"""The trust rules of runtime.untrusted: regular files only, bounded, no write through a link."""
from __future__ import annotations

import os
import threading

import pytest

from transferlab.errors import StoreError
from transferlab.runtime.untrusted import (
    NotRegularFile,
    claimed_size,
    open_inside,
    open_regular,
    open_untrusted,
    read_bounded,
)


def test_read_bounded_reads_a_regular_file_and_refuses_a_larger_one(tmp_path) -> None:
    f = tmp_path / "a.json"
    f.write_bytes(b"x" * 10)
    assert read_bounded(f, 10, "a file", StoreError) == b"x" * 10
    with pytest.raises(StoreError, match="10 bytes, more than the 9"):
        read_bounded(f, 9, "a file", StoreError)


def test_a_fifo_is_refused_without_blocking(tmp_path) -> None:
    fifo = tmp_path / "fingerprint.json"
    os.mkfifo(fifo)
    done = threading.Event()
    errors = []

    def read() -> None:
        try:
            read_bounded(fifo, 100, "the fingerprint", StoreError)
        except StoreError as exc:
            errors.append(str(exc))
        done.set()

    threading.Thread(target=read, daemon=True).start()
    assert done.wait(5), "reading a FIFO blocked"
    assert errors and "a FIFO, not a regular file" in errors[0]


def test_a_device_and_a_directory_are_refused(tmp_path) -> None:
    with pytest.raises(StoreError, match="a device"):
        read_bounded("/dev/zero", 100, "the index", StoreError)
    with pytest.raises(StoreError, match="a directory"):
        open_untrusted(tmp_path, "the index", StoreError)


def test_a_link_leaving_the_root_is_not_followed_one_inside_is(tmp_path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    outside = tmp_path / "secret.txt"
    outside.write_text("secret")
    (store / "inside.txt").write_text("ok")
    (store / "out.json").symlink_to("../secret.txt")
    (store / "in.json").symlink_to("inside.txt")
    with pytest.raises(StoreError, match="outside"):
        read_bounded(store / "out.json", 100, "meta", StoreError, root=store)
    assert read_bounded(store / "in.json", 100, "meta", StoreError, root=store) == b"ok"


@pytest.mark.parametrize("mode", ["a", "w", "x"])
def test_no_write_through_a_planted_link(tmp_path, mode) -> None:
    store = tmp_path / "store"
    (store / "shards").mkdir(parents=True)
    outside = tmp_path / "victim.txt"
    outside.write_text("untouched")
    (store / "shards" / "failures.jsonl").symlink_to("../../victim.txt")
    with pytest.raises((StoreError, FileExistsError)):
        open_inside(store / "shards" / "failures.jsonl", mode, store, "the failure log",
                    StoreError)
    assert outside.read_text() == "untouched"


def test_no_write_below_a_linked_directory(tmp_path) -> None:
    store, elsewhere = tmp_path / "store", tmp_path / "elsewhere"
    store.mkdir()
    elsewhere.mkdir()
    (store / "shards").symlink_to(elsewhere)
    with pytest.raises(StoreError, match="is a link"):
        open_inside(store / "shards" / "log.jsonl", "a", store, "the failure log", StoreError)
    assert list(elsewhere.iterdir()) == []


def test_open_inside_appends_to_a_regular_file(tmp_path) -> None:
    f = tmp_path / "log.txt"
    f.write_text("a\n")
    with open_inside(f, "a", tmp_path, "the log", StoreError, encoding="utf-8") as out:
        out.write("b\n")
    assert f.read_text() == "a\nb\n"


def test_claimed_sizes_are_bounded_before_use() -> None:
    assert claimed_size(5, 10, "num_classes", StoreError) == 5
    for bad in (5_000_000, -1, 2.5, True, "7"):
        with pytest.raises(StoreError, match="num_classes"):
            claimed_size(bad, 100_000, "num_classes", StoreError)


def test_a_read_below_a_linked_directory_leaving_the_root_is_refused(tmp_path) -> None:
    store, elsewhere = tmp_path / "store", tmp_path / "elsewhere"
    store.mkdir()
    elsewhere.mkdir()
    (elsewhere / "shard.json").write_text("secret")
    (store / "shards").symlink_to(elsewhere)
    with pytest.raises(StoreError, match="outside"):
        read_bounded(store / "shards" / "shard.json", 100, "a shard", StoreError, root=store)


def test_open_inside_refuses_a_fifo_and_a_directory_without_blocking(tmp_path) -> None:
    os.mkfifo(tmp_path / ".lock")
    (tmp_path / "dir.json").mkdir()
    for name in (".lock", "dir.json"):
        for mode in ("a", "w"):
            with pytest.raises(StoreError, match="not a regular file"):
                open_inside(tmp_path / name, mode, tmp_path, "the lock file", StoreError)


def test_open_inside_without_a_root_still_refuses_a_link(tmp_path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (tmp_path / "out.tmp").symlink_to(victim)
    with pytest.raises(StoreError, match="is a link"):
        open_inside(tmp_path / "out.tmp", "xb", None, "the temporary file", StoreError)
    assert victim.read_text() == "keep"


def test_open_regular_says_what_the_file_is(tmp_path) -> None:
    os.mkfifo(tmp_path / "x.png")
    with pytest.raises(NotRegularFile) as err:
        open_regular(tmp_path / "x.png")
    assert err.value.kind == "a FIFO"
    with pytest.raises(FileNotFoundError):
        open_regular(tmp_path / "missing.png")

"""Atomic writes: concurrent writers of one file, and a write that fails half way."""
from __future__ import annotations

import multiprocessing
import threading

import pytest

from transferlab.runtime.atomicfile import atomic_write, atomic_write_text, temporary_path


def write_many(path: str, text: str, times: int) -> None:
    for _ in range(times):
        atomic_write_text(path, text)


def test_concurrent_writers_of_one_file_never_collide(tmp_path):
    """Two processes and two threads rewrite one file: every rename finds its own
    temporary file (a shared ``path.tmp`` made one writer's rename fail under torchrun)."""
    path = tmp_path / "config.yaml"
    texts = ["a" * 5000, "b" * 5000]
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=write_many, args=(str(path), t, 200)) for t in texts]
    errors: list[BaseException] = []

    def thread_body(text: str) -> None:
        try:
            write_many(str(path), text, 200)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=thread_body, args=(t,)) for t in ("c" * 10, "d" * 10)]
    for worker in [*procs, *threads]:
        worker.start()
    for worker in [*procs, *threads]:
        worker.join()
    assert errors == [] and [p.exitcode for p in procs] == [0, 0]
    assert path.read_text() in {*texts, "c" * 10, "d" * 10}
    assert not list(tmp_path.glob("*.tmp"))


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "index.csv"
    atomic_write_text(path, "old\n")

    def half_then_fail(f) -> None:
        f.write("new, half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half_then_fail)
    assert path.read_text() == "old\n"
    assert not list(tmp_path.glob("*.tmp"))


def test_temporary_name_ends_in_tmp_beside_the_target(tmp_path):
    tmp = temporary_path(tmp_path / "shards" / "shard-00001.npy")
    assert tmp.parent == tmp_path / "shards"
    assert tmp.name.startswith("shard-00001.npy.") and tmp.suffix == ".tmp"

"""One policy for every file a user names for a command's output (issue #24): an existing
file is refused unless --overwrite, a FIFO or device is refused without blocking, a file
appears only complete, and no temporary is left behind."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import blobs, make_store
from transferlab.commands.cluster import main as cluster_main
from transferlab.commands.export import main as export_main
from transferlab.commands.maps import main as maps_main
from transferlab.commands.probe import main as probe_main
from transferlab.commands.search import main as search_main
from transferlab.errors import ConfigError, SettingError
from transferlab.runtime import userfiles

pytest.importorskip("matplotlib")
pytest.importorskip("pyarrow")


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> Path:
    x, y = blobs(n_per=10, k=3, d=6)
    path = tmp_path_factory.mktemp("outputs") / "s"
    make_store(path, x, y, keys=[f"k/{i:03d}.png" for i in range(len(y))])
    return path


# command, its argv for a target (the file written), how to name that target in the folder
COMMANDS = {
    "cluster --out": (cluster_main, lambda s, d: [s, "-k", "2", "--n-init", "1", "--device",
                                                  "cpu", "--out", d / "assign.csv"],
                      "assign.csv"),
    "cluster --plot": (cluster_main, lambda s, d: [s, "-k", "2", "--n-init", "1", "--device",
                                                   "cpu", "--plot", d], "clusters_pca.png"),
    "export": (export_main, lambda s, d: [s, d / "f.parquet"], "f.parquet"),
    "maps": (maps_main, lambda s, d: [s, d / "map.png"], "map.png"),
    "search --plot": (search_main, lambda s, d: [s, "k/000.png", "-k", "2", "--plot",
                                                 d / "grid.png"], "grid.png"),
    "probe --plot": (probe_main, lambda s, d: [s, "--l2", "1e-3", "--knn", "0", "--max-iter",
                                               "20", "--device", "cpu", "--plot", d], "pca.png"),
}


@pytest.fixture
def no_hang():
    def alarm(*_):
        raise AssertionError("blocked on a special file")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def run(name, store_dir, folder, *extra):
    main, argv, _ = COMMANDS[name]
    return main([str(a) for a in argv(store_dir, folder)] + list(extra))


@pytest.mark.parametrize("name", COMMANDS)
def test_existing_file_refused_unless_overwrite(name, store_dir, tmp_path, capsys):
    target = tmp_path / COMMANDS[name][2]
    target.write_bytes(b"keep me")
    assert run(name, store_dir, tmp_path) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--overwrite is not set" in err and "already exists" in err
    assert target.read_bytes() == b"keep me"
    assert run(name, store_dir, tmp_path, "--overwrite") == 0
    assert target.read_bytes() != b"keep me" and target.stat().st_size > 0
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("name", COMMANDS)
def test_fifo_refused_without_blocking(name, store_dir, tmp_path, capsys, no_hang):
    target = tmp_path / COMMANDS[name][2]
    os.mkfifo(target)
    for extra in ([], ["--overwrite"]):
        assert run(name, store_dir, tmp_path, *extra) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is a FIFO, not a regular file" in err
    assert Path(target).is_fifo()


@pytest.mark.parametrize("name", COMMANDS)
def test_new_file_written_whole_and_nothing_else(name, store_dir, tmp_path):
    assert run(name, store_dir, tmp_path) == 0
    assert (tmp_path / COMMANDS[name][2]).stat().st_size > 0
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]


def test_link_at_the_path_is_replaced_not_written_through(tmp_path):
    outside = tmp_path / "victim.txt"
    outside.write_text("keep me")
    link = tmp_path / "out.csv"
    link.symlink_to(outside)
    with pytest.raises(SettingError, match="already exists"):
        userfiles.write_output(link, lambda f: f.write("new"))
    userfiles.write_output(link, lambda f: f.write("new"), overwrite=True)
    assert outside.read_text() == "keep me"
    assert not link.is_symlink() and link.read_text() == "new"
    dangling = tmp_path / "dangling.csv"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(SettingError, match="already exists"):
        userfiles.check_output(dangling)


def test_a_file_appearing_meanwhile_is_not_replaced(tmp_path):
    target = tmp_path / "out.csv"

    def write(f):
        target.write_text("someone else's")  # created while ours is being written
        f.write("ours")

    with pytest.raises(SettingError, match="already exists"):
        userfiles.write_output(target, write)
    assert target.read_text() == "someone else's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv"]


def test_directory_and_device_refused(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        userfiles.check_output(tmp_path, overwrite=True)
    with pytest.raises(ConfigError, match="is a device"):
        userfiles.check_output("/dev/null", overwrite=True)


def test_library_writers_follow_the_policy(store_dir, tmp_path):
    from transferlab.analysis.cluster_report import write_assignments

    target = tmp_path / "a.csv"
    write_assignments(target, ["a", "b"], np.array([0, 1]))
    with pytest.raises(SettingError, match="overwrite is not set"):
        write_assignments(target, ["a"], [1])
    write_assignments(target, ["c"], [1], overwrite=True)
    assert target.read_text().splitlines() == ["key,cluster", "c,1"]

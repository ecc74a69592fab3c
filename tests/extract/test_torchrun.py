"""Real ``torchrun`` launches with the gloo backend and two CPU processes."""
from __future__ import annotations

import contextlib
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import yaml

from tests.helpers import CONFIG, REPO, assert_same_rows, env, make_tree, torchrun
from transferlab.config import ExtractConfig, load_config
from transferlab.extract.runner import run_extract
from transferlab.store.reader import FeatureStore

pytestmark = pytest.mark.slow


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and its workers, no cleanup. torchrun starts every worker in a
    session of its own, so killing the launcher's process group would leave them running."""
    workers = psutil.Process(proc.pid).children(recursive=True)
    proc.kill()
    for worker in workers:
        with contextlib.suppress(psutil.NoSuchProcess):
            worker.kill()
    proc.wait()
    psutil.wait_procs(workers, timeout=30)


def write_config(tmp_path: Path, data_root: Path, out: Path) -> Path:
    cfg = {**CONFIG, "data": {"root": str(data_root)}, "output": {**CONFIG["output"],
                                                                  "dir": str(out)}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def single_process_store(config: Path, out: Path) -> FeatureStore:
    return run_extract(load_config(config, [f"output.dir={out}"], ExtractConfig)).store


def test_two_process_extraction_equals_single_process(tmp_path):
    make_tree(tmp_path / "imgs", 41)
    (tmp_path / "imgs" / "a" / "broken.jpg").write_bytes(b"not a jpeg")
    config = write_config(tmp_path, tmp_path / "imgs", tmp_path / "dist")
    proc = subprocess.run(torchrun("-m", "transferlab.extract", str(config)), env=env(),
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("images written") == 1  # rank 0 reports, once
    assert "41 images written, 1 failed" in proc.stdout
    merged = FeatureStore.open(tmp_path / "dist")
    assert merged.meta["world_size"] == 2
    assert_same_rows(merged, single_process_store(config, tmp_path / "single"))


def test_killed_torchrun_extraction_resumes(tmp_path):
    make_tree(tmp_path / "imgs", 480)  # 30 shards: the kill lands long before the end
    out = tmp_path / "dist"
    config = write_config(tmp_path, tmp_path / "imgs", out)
    command = torchrun("-m", "transferlab.extract", str(config))
    proc = subprocess.Popen(command, env=env(), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    shards = out / "ranks" / "world-2"
    deadline = time.time() + 240
    while time.time() < deadline and not list(shards.glob("rank-*/shards/shard-*.json")):
        time.sleep(0.02)
    kill_tree(proc)
    assert not (out / "meta.json").exists()
    done_at_kill = 16 * len(list(shards.glob("rank-*/shards/shard-*.json")))
    assert 0 < done_at_kill < 480
    again = subprocess.run(command, env=env(), cwd=REPO, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    skipped = int(again.stdout.split(" skipped")[0].rsplit(" ", 1)[-1])
    assert skipped == done_at_kill  # finished shards are kept, the rest is computed now
    assert_same_rows(FeatureStore.open(out), single_process_store(config, tmp_path / "single"))

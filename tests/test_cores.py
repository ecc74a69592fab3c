"""Issue #16 item 2: the automatic thread count uses the cores this process may really use
(affinity, cgroup quota, other processes' load), simulated here with files the test writes."""
from __future__ import annotations

from pathlib import Path

import pytest

from transferlab.config import RuntimeConfig
from transferlab.runtime import cores
from transferlab.runtime.device import resolve_runtime


def stat_file(path: Path, busy: dict[int, int], idle: dict[int, int]) -> Path:
    lines = ["cpu  0 0 0 0 0 0 0 0 0 0"]
    lines += [f"cpu{c} {busy[c]} 0 0 {idle[c]} 0 0 0 0 0 0" for c in sorted(busy)]
    path.write_text("\n".join(lines) + "\nintr 1 2 3\n", encoding="utf-8")
    return path


def test_quota_from_cgroup_v2_and_v1(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cores.quota_cores(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cores.quota_cores(tmp_path) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("200000")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert cores.quota_cores(v1) == 2.0
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1")
    assert cores.quota_cores(v1) is None


def test_busy_cores_counts_only_our_cpus(tmp_path, monkeypatch):
    """cpu0 fully busy, cpu1 idle, cpu2 half busy over the sampled interval."""
    path = tmp_path / "stat"
    zero = {0: 0, 1: 0, 2: 0}

    def sleep(_seconds):  # the interval passes: the counters move on
        stat_file(path, {0: 100, 1: 0, 2: 50}, {0: 0, 1: 100, 2: 50})

    monkeypatch.setattr(cores.time, "sleep", sleep)
    for cpus, want in (([0, 1], 1.0), ([0, 1, 2], 1.5), ([1], 0.0)):
        stat_file(path, zero, zero)
        assert cores.busy_cores(cpus, stat=path) == pytest.approx(want, abs=0.05)
    assert cores.busy_cores([0], stat=tmp_path / "missing") == 0.0


@pytest.mark.parametrize("cpus, quota, busy, want", [
    (2, None, 0.0, 2),   # quiet 2-core machine: both cores
    (2, None, 1.0, 1),   # one core busy elsewhere: leave it alone
    (2, None, 0.3, 2),   # a little noise does not cost a thread
    (8, 2.5, 0.0, 3),    # a container limited to 2.5 cores
    (4, None, 3.9, 1),   # never fewer than one
])
def test_usable_cores(monkeypatch, cpus, quota, busy, want):
    monkeypatch.setattr(cores, "affinity_cores", lambda: list(range(cpus)))
    monkeypatch.setattr(cores, "quota_cores", lambda root=None: quota)
    monkeypatch.setattr(cores, "busy_cores", lambda cpus_, seconds=0.1, stat=None: busy)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert cores.usable_cores() == want


def test_torchrun_siblings_are_not_counted_as_load(monkeypatch):
    monkeypatch.setattr(cores, "affinity_cores", lambda: [0, 1, 2, 3])
    monkeypatch.setattr(cores, "quota_cores", lambda root=None: None)
    monkeypatch.setattr(cores, "busy_cores", lambda *a, **k: 3.0)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert cores.usable_cores() == 4  # share_runtime splits the machine between the ranks


def test_automatic_threads_follow_the_usable_cores_and_an_explicit_count_wins(monkeypatch):
    monkeypatch.setattr(cores, "affinity_cores", lambda: [0, 1])
    monkeypatch.setattr(cores, "quota_cores", lambda root=None: None)
    monkeypatch.setattr(cores, "busy_cores", lambda *a, **k: 1.0)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert resolve_runtime(RuntimeConfig(device="cpu")).threads == 1
    assert resolve_runtime(RuntimeConfig(device="cpu"), sample_load=False).threads == 2
    assert resolve_runtime(RuntimeConfig(device="cpu", threads=2)).threads == 2

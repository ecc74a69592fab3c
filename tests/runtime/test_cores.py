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


class FakeMachine:
    """``/proc/stat`` and the clocks of a 2-core machine on which another process keeps
    ``others`` cores busy and this process ``own`` cores, for ``step`` seconds per reading."""

    def __init__(self, path: Path, step: float = 1.0):
        self.path, self.step = path, step
        self.now, self.own_seconds, self.others, self.own = 0.0, 0.0, 0.0, 0.0
        self.busy, self.total = {0: 0.0, 1: 0.0}, {0: 0.0, 1: 0.0}
        self.write()

    def advance(self) -> None:
        """One interval passes: busy ticks spread over both cores."""
        self.now += self.step
        self.own_seconds += self.own * self.step
        for cpu in (0, 1):
            self.total[cpu] += 100 * self.step
            self.busy[cpu] += 100 * self.step * (self.others + self.own) / 2
        self.write()

    def write(self) -> None:
        busy = {c: int(b) for c, b in self.busy.items()}
        idle = {c: int(self.total[c] - self.busy[c]) for c in (0, 1)}
        stat_file(self.path, busy, idle)


def follower(machine: FakeMachine, threads: int, changes: list[int]) -> cores.LoadFollower:
    return cores.LoadFollower(2, threads, changes.append, interval=1.0, stat=machine.path,
                              clock=lambda: machine.now, own_clock=lambda: machine.own_seconds)


def test_a_neighbour_that_starts_and_stops_during_the_run_is_followed(tmp_path, monkeypatch):
    monkeypatch.setattr(cores, "affinity_cores", lambda: [0, 1])
    machine = FakeMachine(tmp_path / "stat")
    changes: list[int] = []
    f = follower(machine, 2, changes)
    machine.own = 2.0  # quiet: our two threads use both cores
    for _ in range(3):
        machine.advance()
        assert f.step() == 2
    machine.others, machine.own = 0.7, 1.3  # a spinner takes its share of the cores
    machine.advance()
    assert f.step() == 2 and changes == []  # one reading is not enough
    machine.advance()
    assert f.step() == 1 and changes == [1]
    machine.others, machine.own = 1.0, 1.0  # one thread each: stable
    for _ in range(3):
        machine.advance()
        assert f.step() == 1
    machine.others = 0.0  # the neighbour ends
    machine.advance()
    assert f.step() == 1
    machine.advance()
    assert f.step() == 2 and changes == [1, 2]
    assert [t for _, t in f.changes] == [1, 2]


def test_one_busy_moment_and_readings_within_the_interval_change_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(cores, "affinity_cores", lambda: [0, 1])
    machine = FakeMachine(tmp_path / "stat", step=0.25)
    changes: list[int] = []
    f = follower(machine, 2, changes)
    machine.own, machine.others = 1.0, 1.0
    for _ in range(3):  # 0.75 s: no reading is taken yet
        machine.advance()
        assert f.step() == 2
    machine.advance()  # 1 s: the first reading wants 1
    assert f.step() == 2
    machine.own, machine.others = 2.0, 0.0  # ... and the next, a second later, 2 again
    for _ in range(4):
        machine.advance()
        f.step()
    assert changes == []
    (tmp_path / "stat").unlink()  # unreadable: the count stays for the rest of the run
    for _ in range(8):
        machine.now += 1.0
        assert f.step() == 2
    assert changes == []


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_threads_changed_mid_run_leave_the_rows_identical(tmp_path, monkeypatch, precision):
    """A neighbour appears after the first batch: the automatic run drops to one thread for
    torch and decoding, records when, and stores the very rows of a 2-thread run."""
    import torch

    from tests.helpers import make_cfg, same_store
    from tests.imagegen import make_image_tree
    from transferlab.extract.runner import run_extract

    root = tmp_path / "imgs"
    make_image_tree(root, ("a", "b"), per_class=12)
    fixed = run_extract(make_cfg(root, tmp_path / "fixed", "runtime.threads=2",
                                 f"runtime.precision={precision}"))
    monkeypatch.setattr(cores, "affinity_cores", lambda: [0, 1])
    monkeypatch.setattr(cores, "quota_cores", lambda root=None: None)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    machine = FakeMachine(tmp_path / "stat")
    machine.own = 2.0
    real = cores.LoadFollower

    def fake(cap, threads, on_change):  # the run's follower, reading the fake machine
        machine.advance()  # the start-up sample is over: quiet, 2 threads chosen
        return real(cap, threads, on_change, interval=0.0, stat=machine.path,
                    clock=lambda: machine.now, own_clock=lambda: machine.own_seconds)

    def neighbour_arrives(done: int) -> None:
        machine.others, machine.own = 1.0, 1.0
        machine.advance()

    monkeypatch.setattr(cores, "busy_cores", lambda *a, **k: 0.0)
    monkeypatch.setattr("transferlab.extract.runner.LoadFollower", fake)
    before = torch.get_num_threads()
    try:
        auto = run_extract(make_cfg(root, tmp_path / "auto", "runtime.threads=null",
                                    f"runtime.precision={precision}"),
                           on_batch=neighbour_arrives)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    runtime = auto.store.meta["runtime"]
    assert runtime["threads"] == 2
    assert [t for _, t in runtime["threads_followed"]] == [1]
    same_store(fixed.store, auto.store)
    explicit = fixed.store.meta["runtime"]
    assert explicit["threads"] == 2 and "threads_followed" not in explicit

"""How many cores this process may really use: its affinity, its cgroup's CPU quota, and
what other processes keep busy right now.

Researchers extract beside a notebook kernel, a training job or a second extraction. On a
2-core machine with one core busy elsewhere, 2 torch threads ran resnet50 at 0.43-0.62 of
the speed of 1 thread (issue #16): oversubscribed threads wait for each other at every
parallel region. So the automatic thread count leaves the busy cores alone.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")
PROC_STAT = Path("/proc/stat")


def affinity_cores() -> list[int]:
    """The CPUs this process may run on."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return list(range(os.cpu_count() or 1))


def quota_cores(root: Path = CGROUP) -> float | None:
    """The cgroup CPU limit in cores (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``), None if none."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def _cpu_times(stat: Path) -> dict[int, tuple[int, int]]:
    """Per CPU: (busy, total) clock ticks since boot."""
    out = {}
    for line in stat.read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit():
            ticks = [int(f) for f in fields[:8]]
            idle = ticks[3] + ticks[4]  # idle + iowait
            out[int(name[3:])] = (sum(ticks) - idle, sum(ticks))
    return out


def _others(before: dict, after: dict, own_cores: float, cpus: list[int]) -> float:
    """Cores of ``cpus`` busy between two ``_cpu_times`` readings, less ``own_cores`` (this
    process's CPU seconds over the wall seconds between them)."""
    busy = -own_cores
    for cpu in cpus:
        if cpu in before and cpu in after:
            total = after[cpu][1] - before[cpu][1]
            if total > 0:
                busy += (after[cpu][0] - before[cpu][0]) / total
    return max(0.0, busy)


def busy_cores(cpus: list[int], seconds: float = 0.1, stat: Path = PROC_STAT) -> float:
    """How many of ``cpus`` other processes keep busy, sampled over ``seconds`` (0 when it
    cannot be read); this process's own threads meanwhile are not counted."""
    try:
        before, own = _cpu_times(stat), time.process_time()
        time.sleep(seconds)
        after, own = _cpu_times(stat), time.process_time() - own
    except (OSError, ValueError, IndexError):
        return 0.0
    return _others(before, after, own / seconds, cpus)


def usable_cores(sample_load: bool = True) -> int:
    """Cores for this process's threads: the affinity, capped by the cgroup quota, less the
    cores other processes are using (rounded; at least 1). Processes of one torchrun job
    split a machine themselves, so they do not count each other as load."""
    cpus = affinity_cores()
    cores = float(len(cpus))
    quota = quota_cores()
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    if sample_load and int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1) <= 1:
        cores = min(cores, len(cpus) - busy_cores(cpus))
    return max(1, math.floor(cores + 0.5))


class LoadFollower:
    """Keeps torch's thread count matched to the cores other processes leave free while a
    run goes on: a neighbour that starts after the run's first sample (or one that stops)
    is followed within a few seconds.

    ``step()`` runs between batches; at most every ``interval`` seconds it reads
    ``/proc/stat`` (no sleeping: the interval since the last reading is the sample), takes
    this process's own CPU time out and wants the cores of its affinity less those others
    kept busy (rounded, at least 1, at most ``cap``: the quota). Two readings in a row must
    want the same count before it changes, so one busy moment does not move it. Only the
    speed changes: a run that switched threads stored the rows of a fixed-count run (tested
    in fp32 and bf16).
    """

    def __init__(self, cap: int, threads: int, on_change: Callable[[int], None],
                 interval: float = 1.0, stat: Path = PROC_STAT,
                 clock: Callable[[], float] = time.monotonic,
                 own_clock: Callable[[], float] = time.process_time):
        self.cap, self.threads, self.on_change = max(1, cap), threads, on_change
        self.interval, self.stat, self.clock, self.own_clock = interval, stat, clock, own_clock
        self.cpus = affinity_cores()
        self.started = clock()
        self.changes: list[tuple[float, int]] = []  # (seconds into the run, threads)
        self._wanted: int | None = None
        self._last = self._reading()

    def _reading(self) -> tuple[float, dict, float] | None:
        try:
            return self.clock(), _cpu_times(self.stat), self.own_clock()
        except (OSError, ValueError, IndexError):
            return None

    def step(self) -> int:
        """Re-count if ``interval`` has passed; returns the thread count now in force."""
        if self._last is None or self.clock() - self._last[0] < self.interval:
            return self.threads
        now = self._reading()
        if now is None:
            self._last = None  # unreadable: keep the count for the rest of the run
            return self.threads
        (t0, before, own0), (t1, after, own1) = self._last, now
        self._last = now
        others = _others(before, after, (own1 - own0) / max(t1 - t0, 1e-6), self.cpus)
        want = max(1, min(self.cap, math.floor(len(self.cpus) - others + 0.5)))
        if want == self.threads or want != self._wanted:
            self._wanted = None if want == self.threads else want
            return self.threads
        self.threads, self._wanted = want, None
        self.on_change(want)
        if len(self.changes) < 1000:
            self.changes.append((round(t1 - self.started, 2), want))
        return want

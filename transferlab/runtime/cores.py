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


def busy_cores(cpus: list[int], seconds: float = 0.1, stat: Path = PROC_STAT) -> float:
    """How many of ``cpus`` other processes keep busy, sampled over ``seconds`` (0 when it
    cannot be read); this process's own threads meanwhile are not counted."""
    try:
        before, own = _cpu_times(stat), time.process_time()
        time.sleep(seconds)
        after, own = _cpu_times(stat), time.process_time() - own
    except (OSError, ValueError, IndexError):
        return 0.0
    busy = -own / seconds
    for cpu in cpus:
        if cpu in before and cpu in after:
            total = after[cpu][1] - before[cpu][1]
            if total > 0:
                busy += (after[cpu][0] - before[cpu][0]) / total
    return max(0.0, busy)


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

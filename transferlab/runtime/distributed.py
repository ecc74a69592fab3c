"""Runs under ``torchrun``: rank discovery, process group set-up and work splitting.

A plain ``python -m ...`` run sees no torchrun variables and stays a single process; under
``torchrun --nproc_per_node=N`` every process reads RANK / WORLD_SIZE / LOCAL_RANK, joins a
process group (NCCL on GPUs, gloo on CPUs, chosen automatically) and takes its own part.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..config import RuntimeConfig
from ..errors import ConfigError
from .device import Runtime


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    """This process's place in a torchrun job (rank 0 of 1 outside torchrun): the joined
    process group when there is one, else what torchrun's variables announce."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(),
                        int(os.environ.get("LOCAL_RANK") or 0))
    try:
        return DistInfo(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                        int(os.environ.get("LOCAL_RANK", "0")))
    except ValueError:
        raise ConfigError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (set by "
                          "torchrun)") from None


def init_distributed(device: str = "auto", timeout_minutes: int = 60) -> DistInfo:
    """Join the process group when launched by torchrun; a no-op otherwise.

    Each process on a machine with GPUs is pinned to ``cuda:LOCAL_RANK`` so that
    ``runtime.device: auto`` (or ``cuda``) means its own GPU.
    """
    info = dist_info()
    if not info.enabled or dist.is_initialized():
        return info
    use_cuda = torch.cuda.is_available() and device != "cpu"
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if not use_cuda:
        dist.init_process_group("gloo", timeout=timeout)
        return info
    gpu = torch.device("cuda", local_gpu(info, device))
    torch.cuda.set_device(gpu)
    dist.init_process_group("nccl", timeout=timeout, device_id=gpu)
    return info


def local_gpu(info: DistInfo, device: str) -> int:
    """The GPU of this torchrun process: ``cuda:LOCAL_RANK``. NCCL refuses two ranks on one
    GPU, and an explicit ``cuda:N`` would put every rank on GPU N: both are one-line errors."""
    if device not in ("auto", "cuda"):
        raise ConfigError(f"runtime.device={device} under torchrun would put every process on "
                          "one GPU; set runtime.device=cuda (each process takes "
                          "cuda:LOCAL_RANK), or runtime.device=cpu")
    count = torch.cuda.device_count()
    if info.local_rank >= count:
        raise ConfigError(f"torchrun started more processes on this machine than it has GPUs "
                          f"(LOCAL_RANK {info.local_rank}, {count} GPUs); use "
                          f"--nproc_per_node={count}, or runtime.device=cpu")
    return info.local_rank


def local_world_size(info: DistInfo) -> int:
    """How many processes of this job share this machine (torchrun's LOCAL_WORLD_SIZE)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size)))
    except ValueError:
        raise ConfigError("LOCAL_WORLD_SIZE must be an integer (set by torchrun)") from None


def share_runtime(rt: Runtime, cfg: RuntimeConfig, info: DistInfo) -> Runtime:
    """Each process on its own GPU; the processes of a machine share its cores, so each
    takes its part of the automatic thread (CPU) and loader worker counts."""
    if not info.enabled:
        return rt
    local = local_world_size(info)
    changes: dict[str, Any] = {}
    if rt.is_cuda and rt.device.index is None:
        changes["device"] = torch.device("cuda", torch.cuda.current_device())
    if not rt.is_cuda and cfg.threads is None:
        changes["threads"] = max(1, rt.threads // local)
    if cfg.num_workers is None:
        changes["num_workers"] = max(min(rt.num_workers, 1), rt.num_workers // local)
    return replace(rt, **changes)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown(finished: bool = True) -> None:
    """Destroy the process group. After a run every process ``finished``, all meet at a
    barrier first: a rank whose peer tore its Gloo connections down while its own worker
    threads were still on them aborted at exit ('terminate called without an active
    exception', 3 of 13 two-process fine-tunes; 0 of 15 with the barrier). Not after a
    failure: the peers may never reach it."""
    if dist.is_available() and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def rank_dir(root: Path, info: DistInfo) -> Path:
    """Where this process writes: ``root`` itself, or its own part under torchrun.

    Parts are keyed by world size too: a rerun with another process count starts afresh
    instead of mixing differently split parts.
    """
    if not info.enabled:
        return root
    return root / "ranks" / f"world-{info.world_size}" / f"rank-{info.rank:05d}"


def _joined() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_gather(obj: Any) -> list:
    """Every process's ``obj``, in rank order, in every process (``[obj]`` alone)."""
    if not _joined():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_to_main(obj: Any) -> list | None:
    """Every process's ``obj``, in rank order, in rank 0 (None in the others)."""
    if not _joined():
        return [obj]
    out: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def from_main(obj: Any) -> Any:
    """Rank 0's ``obj`` in every process."""
    if not _joined():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_values(values: list[float], device: torch.device, op: Any = None) -> list[float]:
    """``values`` summed (or reduced with ``op``) over the processes, as Python floats."""
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    if _joined():
        dist.all_reduce(t, op=op if op is not None else dist.ReduceOp.SUM)
    return t.tolist()


def part_sizes(count: int, world_size: int) -> list[int]:
    """How ``count`` items split over ``world_size`` processes (as ``part_range`` splits)."""
    return [b - a for a, b in (part_range(count, r, world_size) for r in range(world_size))]


def part_range(count: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous [start, stop) of ``count`` items for ``rank``; sizes differ by at most 1."""
    base, extra = divmod(count, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)

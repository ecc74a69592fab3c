"""Runs under ``torchrun``: rank discovery, process group set-up and work splitting.

A plain ``python -m ...`` run sees no torchrun variables and stays a single process; under
``torchrun --nproc_per_node=N`` every process reads RANK / WORLD_SIZE / LOCAL_RANK, joins a
process group (NCCL on GPUs, gloo on CPUs, chosen automatically) and takes its own part.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import ConfigError


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
    """This process's place in a torchrun job (rank 0 of 1 outside torchrun)."""
    try:
        return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                        int(os.environ.get("LOCAL_RANK", 0)))
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
    if use_cuda:
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
    dist.init_process_group("nccl" if use_cuda else "gloo",
                            timeout=datetime.timedelta(minutes=timeout_minutes))
    return info


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def part_range(count: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous [start, stop) of ``count`` items for ``rank``; sizes differ by at most 1."""
    base, extra = divmod(count, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)

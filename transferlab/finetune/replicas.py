"""Several processes (torchrun); each helper is the identity in a single process."""
from __future__ import annotations

import logging

import numpy as np
import torch

from ..runtime.device import derive_seed
from ..runtime.distributed import DistInfo, all_gather, part_range
from ..training.feeds import Source
from ..training.sync import state_digest
from .context import Context

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------
# Several processes (torchrun); each helper is the identity in a single process
# ---------------------------------------------------------------------------------------


def share_rows(count: int, info: DistInfo, seed: int) -> np.ndarray | None:
    """This process's share of ``count`` training items: a seeded random partition (every
    share draws from every class, also from data sorted by class), sorted; None alone."""
    if not info.enabled:
        return None
    perm = np.random.default_rng(seed).permutation(count)
    return np.sort(perm[info.rank::info.world_size])


def part_rows(count: int, info: DistInfo) -> np.ndarray | None:
    """This process's contiguous part of ``count`` items to evaluate (rank order = source
    order once gathered); None alone."""
    if not info.enabled:
        return None
    return np.arange(*part_range(count, info.rank, info.world_size))


def take(src: Source | None, rows: np.ndarray | None) -> Source | None:
    return src if src is None or rows is None else src.subset(rows)


def total(count: int) -> int:
    """``count`` summed over the processes."""
    return int(sum(all_gather(count)))


def reseed_per_process(ctx: Context) -> None:
    """Once the models are built alike, give each process its own random stream (dropout)."""
    if ctx.info.enabled:
        torch.manual_seed(derive_seed(ctx.cfg.runtime.seed, "process", ctx.info.rank))


def check_replicas(ctx: Context, module: torch.nn.Module, what: str) -> str | None:
    """Every process must end with the same trained weights: compare their digests."""
    if not ctx.info.enabled:
        return None
    digest = state_digest(module)
    log.info("rank %d of %d: %s weights sha256 %s", ctx.info.rank, ctx.info.world_size, what,
             digest)
    digests = all_gather(digest)
    if len(set(digests)) != 1:
        raise RuntimeError(f"the {what} weights differ between processes after training "
                           f"({digests}); please report this")
    return digest




"""The items of a run: views seeded per key, resume positions, aligned batches."""
from __future__ import annotations

import random
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from ..data.datasets import ImageDataset, collate_skip_errors, read_batch
from ..data.datasets import make_loader as _make_loader
from ..data.preprocess import PreprocessSpec, build_transform
from ..runtime.device import Runtime

# ---------------------------------------------------------------------------------------
# Views: the plain image plus N augmented ones, seeded per key (so resumes are identical)
# ---------------------------------------------------------------------------------------


class ViewsDataset(Dataset):
    """Wraps an untransformed dataset; item image = (1 + views, C, H, W) uint8 tensor.

    ``decode_threads`` > 1: a batch read in the main process (no loader workers) is decoded
    by that many threads (``data.datasets.read_batch``). Augmented views seed the global RNGs
    per key, so with views the items are read one by one.
    """

    def __init__(self, base: ImageDataset, spec: PreprocessSpec, views: int, seed: int,
                 decode_threads: int = 1):
        self.base = base
        self.plain = build_transform(spec, normalize=False)
        self.augment = build_transform(spec, normalize=False, augment=True) if views else None
        self.views = views
        self.seed = seed
        self.decode_threads = decode_threads

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.base[i]
        if item["error"] is not None:  # collate drops it; no need to transform the placeholder
            item["image"] = None
            return item
        try:
            item["image"] = self.transform(item["image"], item["key"])
        except Exception as exc:
            item["image"], item["error"] = None, transform_failure(exc)
        return item

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """A batch for the DataLoader, in the order of ``indices`` (``read_batch``)."""
        return read_batch(self.__getitem__, indices, 1 if self.views else self.decode_threads)

    def transform(self, image: Any, key: str) -> torch.Tensor:
        if not self.views:  # a view: the collate's stack makes the one copy, in the main
            return self.plain(image).unsqueeze(0)  # thread (decode threads start no OMP team)
        tensors = [self.plain(image)]
        if self.views:
            seed = zlib.crc32(key.encode("utf-8")) ^ self.seed
            random.seed(seed)
            torch.manual_seed(seed)
            tensors += [self.augment(image) for _ in range(self.views)]
        return torch.stack(tensors)


def transform_failure(exc: BaseException) -> str:
    """The failures-list reason of an image that decoded but could not be transformed."""
    return " ".join(f"transform-failed: {type(exc).__name__}: {exc}".split())[:200]


def resume_positions(keys: Sequence[str], done: frozenset[str] | set[str],
                     batch_size: int) -> list[int]:
    """Dataset positions to read: every batch (``position // batch_size``) holding an item
    that is not done, whole.

    Finished items of such a batch are computed again (the writer drops their rows), so a
    resumed run feeds the model the very batches an uninterrupted run did: on a CPU a kernel
    may round differently for another batch composition, and resumed features must be
    identical, not just close.
    """
    groups = sorted({i // batch_size for i, key in enumerate(keys) if key not in done})
    n = len(keys)
    return [p for g in groups for p in range(g * batch_size, min((g + 1) * batch_size, n))]


def aligned_batches(positions: Sequence[int], batch_size: int) -> list[list[int]]:
    """Batches of dataset indices grouped by ``position // batch_size`` in the full dataset.

    A resumed run then computes the same batches as an uninterrupted one (kernels may round
    differently for other batch compositions), so its features are identical.
    """
    batches: list[list[int]] = []
    last = None
    for j, pos in enumerate(positions):
        group = pos // batch_size
        if group != last:
            batches.append([])
            last = group
        batches[-1].append(j)
    return batches


def run_loader(dataset: Dataset, batches: list[list[int]], rt: Runtime,
               collate_fn: Callable[[list], dict] = collate_skip_errors,
               pin_memory: bool | None = None) -> DataLoader:
    """The extraction's loader: ``data.datasets.make_loader`` over aligned ``batches`` with
    the run's workers; pinned memory on CUDA unless ``pin_memory`` is False (raw JPEG bytes
    gain nothing from pinning: the decoder reads them on the host)."""
    pin = rt.is_cuda if pin_memory is None else pin_memory
    return _make_loader(dataset, batches=batches, num_workers=rt.num_workers,
                        pin_memory=pin, collate_fn=collate_fn)

"""Training and evaluation loops for heads on a frozen base (and for whole models).

Inputs come from a *source* yielding ``(x, y, positions)`` batches in a given order:

- ``TensorSource``: in-memory uint8 images (array datasets such as MNIST) or cached features,
  on the device when they fit;
- ``LoaderSource``: images decoded by a DataLoader (image files, random augmentation);
- ``ArraySource``: cached features read from disk (a feature store, or a memory-mapped .npy).

``models.classifier.Classifier`` puts normalisation, base and head together. A frozen base
runs under ``torch.inference_mode`` and stays in eval mode (``FrozenExtractor``), so its
weights and BatchNorm statistics never change. When the base is frozen and no random
augmentation is on, ``cache_features`` runs it once over the data and the head trains on the
cached tensor: the same batches in the same order, so cached and uncached training give the
same head.

Under ``torchrun`` (a process group of several processes) each process holds its own share
of the data in its sources: ``fit`` splits every global batch of ``batch_size`` items across
the processes, sums the gradients of the trainable parameters over them (the gradient of the
mean loss over the global batch, as one process would compute it) and keeps the weights
identical everywhere; ``evaluate`` gathers the predictions of every share.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # inputs, targets, source positions


# ---------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------


class ChunkedSource:
    """A source whose ``steps`` turn chunks of positions into batches (None if empty)."""

    def steps(self, chunks: Sequence[torch.Tensor]) -> Iterator[Batch | None]:
        raise NotImplementedError

    def batches(self, order: torch.Tensor, batch_size: int) -> Iterator[Batch]:
        return _present(self.steps(chunked(order, batch_size)))


class TensorSource(ChunkedSource):
    """Inputs held in one tensor (``kind`` 'images': uint8 NCHW; 'features': base outputs)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, kind: str, device: torch.device,
                 rows: torch.Tensor | None = None):
        self.x, self.y, self.kind, self.device = x, y.to(x.device), kind, device
        self.rows = rows  # positions of this source in x (a view without copying)

    def __len__(self) -> int:
        return len(self.rows) if self.rows is not None else len(self.x)

    @property
    def targets(self) -> np.ndarray:
        rows = self.rows if self.rows is not None else slice(None)
        return self.y[rows].cpu().numpy()

    def subset(self, positions: np.ndarray) -> TensorSource:
        pos = torch.as_tensor(np.asarray(positions), dtype=torch.int64)
        rows = self.rows[pos] if self.rows is not None else pos
        return TensorSource(self.x, self.y, self.kind, self.device, rows)

    def steps(self, chunks: Sequence[torch.Tensor]) -> Iterator[Batch | None]:
        """One batch per chunk of positions (None for an empty chunk)."""
        for pos in chunks:
            if not len(pos):
                yield None
                continue
            idx = (self.rows[pos] if self.rows is not None else pos).to(self.x.device)
            yield (rows_to(self.x, idx, self.device), self.y[idx].to(self.device), pos)


def rows_to(x: torch.Tensor, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x[idx]`` on ``device``. From host memory to a GPU the rows are gathered straight
    into page-locked memory, a batch at a time, so the copy is asynchronous: pinning the whole
    host cache would not be (indexing it gives pageable rows) and would cost up to twice its
    size (the pinned allocator rounds blocks up to a power of two)."""
    if x.device.type != "cpu" or device.type != "cuda":
        return x[idx].to(device)
    staging = torch.empty((len(idx), *x.shape[1:]), dtype=x.dtype, pin_memory=True)
    return torch.index_select(x, 0, idx, out=staging).to(device, non_blocking=True)


class ArraySource(ChunkedSource):
    """Cached features on disk: any numpy-indexable (rows, dim) array, read batch by batch."""

    kind = "features"

    def __init__(self, array: Any, rows: np.ndarray, y: np.ndarray, shape: Sequence[int],
                 device: torch.device):
        self.array, self.rows, self.y = array, np.asarray(rows, np.int64), np.asarray(y)
        self.shape, self.device = tuple(shape), device

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def targets(self) -> np.ndarray:
        return self.y

    def subset(self, positions: np.ndarray) -> ArraySource:
        pos = np.asarray(positions, np.int64)
        return ArraySource(self.array, self.rows[pos], self.y[pos], self.shape, self.device)

    def steps(self, chunks: Sequence[torch.Tensor]) -> Iterator[Batch | None]:
        """One batch per chunk of positions (None for an empty chunk)."""
        for pos in chunks:
            if not len(pos):
                yield None
                continue
            p = pos.numpy()
            x = torch.from_numpy(np.asarray(self.array[self.rows[p]], dtype=np.float32))
            y = torch.from_numpy(self.y[p])
            yield (x.view(len(p), *self.shape).to(self.device, non_blocking=True),
                   y.to(self.device), pos)


class LoaderSource(ChunkedSource):
    """Images of an ``ImageDataset`` (its transform gives uint8 CHW tensors) via a DataLoader.

    Undecodable files are dropped from their batch and collected in ``failures``.
    ``decode_threads`` > 1 without loader workers: each batch is decoded by that many threads
    in the main process, as extraction does (``with_decode_threads``; only for deterministic
    transforms: threads would reorder a random transform's draws).
    """

    kind = "images"

    def __init__(self, dataset: Any, y: np.ndarray, device: torch.device, num_workers: int = 0,
                 seed: int = 0, decode_threads: int = 1):
        self.dataset, self.y, self.device = dataset, np.asarray(y, np.int64), device
        self.num_workers, self.seed = num_workers, seed
        self.decode_threads = decode_threads
        self.failures: dict[str, str] = {}
        self._calls = 0

    def with_decode_threads(self, threads: int) -> LoaderSource:
        """This source read with ``threads`` decoding threads; failures are shared."""
        out = LoaderSource(self.dataset, self.y, self.device, self.num_workers, self.seed,
                           threads)
        out.failures, out._calls = self.failures, self._calls
        return out

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def targets(self) -> np.ndarray:
        return self.y

    def subset(self, positions: np.ndarray) -> LoaderSource:
        pos = np.asarray(positions, np.int64)
        return LoaderSource(self.dataset.subset(pos), self.y[pos], self.device,
                            self.num_workers, self.seed)

    def steps(self, chunks: Sequence[torch.Tensor]) -> Iterator[Batch | None]:
        """One batch per chunk of positions; None for an empty chunk or one whose every
        image failed to decode."""
        from ..data.datasets import ThreadedItems, make_loader
        from ..runtime.device import derive_seed

        sampler = [pos.tolist() for pos in chunks if len(pos)]
        self._calls += 1  # worker seeds differ per pass, but not with the global RNG
        gen = torch.Generator().manual_seed(derive_seed(self.seed, "loader", self._calls))
        dataset = self.dataset
        if self.decode_threads > 1 and self.num_workers == 0:
            dataset = ThreadedItems(dataset, self.decode_threads)
        loader = iter(make_loader(dataset, batches=sampler, num_workers=self.num_workers,
                                  pin_memory=self.device.type == "cuda", generator=gen))
        for chunk in chunks:
            if not len(chunk):
                yield None
                continue
            batch = next(loader)
            self.failures.update(dict(batch["failures"]))
            if batch["image"] is None:
                yield None
                continue
            pos = batch["index"]
            y = torch.from_numpy(self.y[pos.numpy()])
            yield (batch["image"].to(self.device, non_blocking=True),
                   y.to(self.device, non_blocking=True), pos)


Source = TensorSource | ArraySource | LoaderSource


def chunked(order: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """``order`` cut into consecutive batches of ``batch_size`` positions."""
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def _present(steps: Iterator[Batch | None]) -> Iterator[Batch]:
    return (batch for batch in steps if batch is not None)

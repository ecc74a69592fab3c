"""Training and evaluation loops for heads on a frozen base (and for whole models).

Inputs come from a *source* yielding ``(x, y, positions)`` batches in a given order:

- ``TensorSource``: in-memory uint8 images (array datasets such as MNIST) or cached features,
  on the device when they fit;
- ``LoaderSource``: images decoded by a DataLoader (image files, random augmentation);
- ``ArraySource``: cached features read from disk (a feature store, or a memory-mapped .npy).

``Network`` puts normalisation, base and head together. A frozen base runs under
``torch.inference_mode`` and stays in eval mode (``FrozenExtractor``), so its weights and
BatchNorm statistics never change. When the base is frozen and no random augmentation is on,
``cache_features`` runs it once over the data and the head trains on the cached tensor: the
same batches in the same order, so cached and uncached training give the same head.

Under ``torchrun`` (a process group of several processes) each process holds its own share
of the data in its sources: ``fit`` splits every global batch of ``batch_size`` items across
the processes, sums the gradients of the trainable parameters over them (the gradient of the
mean loss over the global batch, as one process would compute it) and keeps the weights
identical everywhere; ``evaluate`` gathers the predictions of every share.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .config import TrainConfig
from .errors import ConfigError, DataError
from .preprocess import DeviceNormalize, PreprocessSpec
from .runtime import Runtime

log = logging.getLogger(__name__)

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
            yield (self.x[idx].to(self.device, non_blocking=True),
                   self.y[idx].to(self.device, non_blocking=True), pos)


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
    """

    kind = "images"

    def __init__(self, dataset: Any, y: np.ndarray, device: torch.device, num_workers: int = 0,
                 seed: int = 0):
        self.dataset, self.y, self.device = dataset, np.asarray(y, np.int64), device
        self.num_workers, self.seed = num_workers, seed
        self.failures: dict[str, str] = {}
        self._calls = 0

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
        from torch.utils.data import DataLoader

        from .datasets import collate_skip_errors

        sampler = [pos.tolist() for pos in chunks if len(pos)]
        self._calls += 1  # worker seeds differ per pass, but not with the global RNG
        gen = torch.Generator().manual_seed(self.seed * 1000 + self._calls)
        extra = {"prefetch_factor": 4} if self.num_workers > 0 else {}
        loader = iter(DataLoader(self.dataset, batch_sampler=sampler,
                                 num_workers=self.num_workers, collate_fn=collate_skip_errors,
                                 generator=gen, pin_memory=self.device.type == "cuda", **extra))
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


# ---------------------------------------------------------------------------------------
# The trained network
# ---------------------------------------------------------------------------------------


class Network(nn.Module):
    """normalise -> base -> head. ``base`` None trains a whole model (the pretrain stage)."""

    def __init__(self, base: nn.Module | None, head: nn.Module, spec: PreprocessSpec,
                 channels_last: bool = False):
        super().__init__()
        self.base = base
        self.head = head
        self.normalize = DeviceNormalize(spec.mean, spec.std)
        self.channels_last = channels_last
        self.base_trainable = False  # True in the partial-unfreeze phase
        self.unfrozen: list[nn.Module] = []  # base modules that train (train mode) with it

    def train(self, mode: bool = True) -> Network:
        super().train(mode)  # a FrozenExtractor base stays in eval mode
        for module in self.unfrozen:
            module.train(mode)
        return self

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        x = self.normalize(images)
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Base output for uint8 images; no autograd through a frozen base."""
        x = self.prepare(images)
        if self.base is None:
            return x
        if self.base_trainable:
            return self.base(x)
        with torch.inference_mode():
            out = self.base(x)
        return out.clone()  # a normal tensor the head may save for backward

    def forward(self, x: torch.Tensor, kind: str = "images") -> torch.Tensor:
        return self.head(self.features(x) if kind == "images" else x)


# ---------------------------------------------------------------------------------------
# Several processes (torchrun)
# ---------------------------------------------------------------------------------------


def process_group() -> tuple[int, int]:
    """(rank, world size) of the process group this process trains in; (0, 1) alone."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def trainable_modules(net: Network) -> list[nn.Module]:
    """The modules training changes (weights, and buffers such as BatchNorm statistics)."""
    return [net.head, *(net.unfrozen if net.base is not None and net.base_trainable else [])]


class GradSync:
    """Sums the gradients of ``params`` over every process, in buckets of at most
    ``bucket`` elements, and scales them to the gradient of the mean loss over the global batch.

    Each process backpropagates the *sum* of its items' losses divided by ``norm`` (the same
    constant everywhere, for a gradient scale like a mean's); the item counts travel in the
    same all-reduce as the gradients, so uneven or empty shares weigh exactly right.
    """

    def __init__(self, params: Sequence[torch.Tensor], norm: float, bucket: int = 1 << 24):
        self.params = [p for p in params if p.requires_grad]
        self.norm, self.bucket = norm, bucket

    def __call__(self, count: int, check_empty: bool = False) -> bool:
        """All-reduce after this process's backward (``count`` items, maybe 0). Returns
        False when no process had an item (then there is nothing to step)."""
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        groups: list[list[torch.Tensor]] = [[]]
        size = 0
        for p in self.params:
            if groups[-1] and (size + p.numel() > self.bucket
                               or p.grad.dtype != groups[-1][0].dtype):
                groups.append([])
                size = 0
            groups[-1].append(p.grad)
            size += p.numel()
        last = groups[-1][0] if groups[-1] else None
        counter = torch.tensor([float(count)], device=last.device if last is not None else
                               "cpu", dtype=last.dtype if last is not None else torch.float32)
        flats = [torch.cat([g.reshape(-1) for g in grads]) for grads in groups if grads]
        flats[-1:] = [torch.cat([flats[-1], counter])] if flats else [counter]
        for flat in flats:
            dist.all_reduce(flat)
        total = flats[-1][-1:].clone()
        if check_empty and float(total) == 0:
            return False
        for grads, flat in zip(groups, flats):
            flat.mul_(self.norm / total.clamp(min=1.0).to(flat.dtype))
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
        return True


def broadcast_trainable(net: Network, params: Sequence[torch.Tensor]) -> None:
    """Rank 0's trained parameters and buffers everywhere: every process starts alike."""
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, 0)
        for module in trainable_modules(net):
            for b in module.buffers():
                dist.broadcast(b, 0)


def average_buffers(net: Network) -> None:
    """Mean of the floating buffers (BatchNorm running statistics) of the trained modules over
    the processes, each having seen its own batches; integer counters come from rank 0."""
    _, world = process_group()
    with torch.no_grad():
        for module in trainable_modules(net):
            for b in module.buffers():
                if b.is_floating_point():
                    dist.all_reduce(b)
                    b.div_(world)
                else:
                    dist.broadcast(b, 0)


def all_reduce_values(values: Sequence[float], device: torch.device,
                      op: Any = None) -> list[float]:
    """``values`` summed (or reduced with ``op``) over the processes, as Python floats."""
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op if op is not None else dist.ReduceOp.SUM)
    return t.tolist()


def share_sizes(count: int, world: int) -> list[int]:
    """How ``count`` items split over ``world`` processes (sizes differ by at most one)."""
    base, extra = divmod(count, world)
    return [base + (1 if r < extra else 0) for r in range(world)]


# ---------------------------------------------------------------------------------------
# Optimiser and schedule
# ---------------------------------------------------------------------------------------


def check_train_config(cfg: TrainConfig, where: str = "train") -> None:
    """Reject values no optimiser can use, naming the key."""
    checks = [(cfg.epochs >= 0, "epochs", ">= 0"), (cfg.batch_size >= 1, "batch_size", ">= 1"),
              (cfg.lr > 0, "lr", "> 0"), (cfg.weight_decay >= 0, "weight_decay", ">= 0"),
              (0 <= cfg.label_smoothing < 1, "label_smoothing", "in [0, 1)"),
              (0 <= cfg.val_split < 1, "val_split", "in [0, 1)"),
              (cfg.early_stopping >= 0, "early_stopping", ">= 0"),
              (cfg.step_epochs >= 1, "step_epochs", ">= 1")]
    for ok, key, rule in checks:
        if not ok:
            raise ConfigError(f"{where}.{key} must be {rule}, got {getattr(cfg, key)!r}")
    if cfg.early_stopping and cfg.val_split <= 0:
        raise ConfigError(f"{where}.early_stopping needs a validation split: set "
                          f"{where}.val_split (e.g. 0.1) or {where}.early_stopping=0")


def make_optimizer(groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD (momentum), Adam or AdamW over parameter groups (a group may set its own lr)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return cls(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig,
                   steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped after every batch: cosine decay to zero over all steps, or a step decay."""
    total = max(1, cfg.epochs * steps_per_epoch)
    every = max(1, cfg.step_epochs * steps_per_epoch)
    if cfg.schedule == "cosine":
        factor = lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))  # noqa: E731
    elif cfg.schedule == "step":
        factor = lambda step: cfg.step_gamma ** (step // every)  # noqa: E731
    else:
        factor = lambda step: 1.0  # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


# ---------------------------------------------------------------------------------------
# Epochs
# ---------------------------------------------------------------------------------------


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    predictions: np.ndarray  # class index per evaluated item
    targets: np.ndarray
    positions: np.ndarray  # source positions evaluated (failed images are missing)


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)
    epochs_run: int = 0
    best_epoch: int | None = None
    stopped_early: bool = False
    seconds: float = 0.0


def train_epoch(net: Network, src: Source, order: torch.Tensor, cfg: TrainConfig,
                opt: torch.optim.Optimizer, sched: Any, scaler: Any, rt: Runtime) -> dict:
    """One pass over ``src`` in ``order``; returns mean loss and accuracy."""
    return run_steps(net, src, chunked(order, cfg.batch_size), cfg, opt, sched, scaler, rt)


def run_steps(net: Network, src: Source, chunks: Sequence[torch.Tensor], cfg: TrainConfig,
              opt: torch.optim.Optimizer, sched: Any, scaler: Any, rt: Runtime,
              sync: GradSync | None = None) -> dict:
    """One optimiser step per chunk of positions; mean loss and accuracy of the pass.

    With ``sync`` (several processes) every process takes every step, also with an empty
    share, and the loss, accuracy and counts are those of all processes together.
    """
    net.train()
    loss_sum = torch.zeros((), device=rt.device, dtype=torch.float64)
    correct = torch.zeros((), device=rt.device, dtype=torch.int64)
    seen = 0
    for batch in src.steps(chunks):
        if batch is None and sync is None:
            continue
        opt.zero_grad(set_to_none=True)
        count = 0
        if batch is not None:
            x, y, _ = batch
            with rt.autocast():
                logits = net(x, src.kind)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing,
                                   reduction="mean" if sync is None else "sum")
            scaler.scale(loss if sync is None else loss / sync.norm).backward()
            count = len(y)
            loss_sum += loss.detach() * (count if sync is None else 1)
            correct += (logits.detach().argmax(1) == y).sum()
            seen += count
        if sync is not None and not sync(count, isinstance(src, LoaderSource)):
            continue  # no process could read an item of this global batch
        scaler.step(opt)
        scaler.update()
        sched.step()
    if sync is not None:
        loss_total, right, seen = all_reduce_values([float(loss_sum), float(correct), seen],
                                                    rt.device)
        loss_sum, correct, seen = torch.tensor(loss_total), torch.tensor(right), int(seen)
    if seen == 0:
        raise DataError("no training item could be read; check the data (see the failures)")
    return {"train_loss": float(loss_sum) / seen, "train_acc": float(correct) / seen}


def evaluate(net: Network, src: Source, batch_size: int, rt: Runtime) -> EvalResult:
    """Loss, accuracy and predictions of ``net`` on ``src`` (in source order).

    Under a process group ``src`` is this process's part: the result (the same in every
    process) covers every part, concatenated in rank order (positions count in that order).
    """
    net.eval()
    losses, preds, targets, positions = [], [], [], []
    with torch.inference_mode():
        for x, y, pos in src.batches(torch.arange(len(src)), batch_size):
            with rt.autocast():
                logits = net(x, src.kind).float()
            losses.append(F.cross_entropy(logits, y, reduction="sum"))
            preds.append(logits.argmax(1).cpu())
            targets.append(y.cpu())
            positions.append(pos)
    if process_group()[1] > 1:
        return _gather_eval(losses, preds, targets, positions, len(src))
    if not preds:
        return EvalResult(float("nan"), float("nan"), np.zeros(0, np.int64),
                          np.zeros(0, np.int64), np.zeros(0, np.int64))
    pred, tgt = torch.cat(preds).numpy(), torch.cat(targets).numpy()
    return EvalResult(float(torch.stack(losses).sum()) / len(tgt), float((pred == tgt).mean()),
                      pred, tgt, torch.cat(positions).numpy())


def _gather_eval(losses: list, preds: list, targets: list, positions: list,
                 size: int) -> EvalResult:
    """Every process's evaluation of its part, put together (identically everywhere)."""
    empty = np.zeros(0, np.int64)
    mine = (float(torch.stack(losses).sum()) if losses else 0.0,
            torch.cat(preds).numpy() if preds else empty,
            torch.cat(targets).numpy() if targets else empty,
            torch.cat(positions).numpy() if positions else empty, size)
    parts: list[Any] = [None] * process_group()[1]
    dist.all_gather_object(parts, mine)
    offsets = np.cumsum([0] + [p[4] for p in parts])
    pred = np.concatenate([p[1] for p in parts])
    tgt = np.concatenate([p[2] for p in parts])
    pos = np.concatenate([p[3] + off for p, off in zip(parts, offsets)])
    if not len(tgt):
        return EvalResult(float("nan"), float("nan"), pred, tgt, pos)
    loss = float(sum(p[0] for p in parts))
    return EvalResult(loss / len(tgt), float((pred == tgt).mean()), pred, tgt, pos)


def trainable_state(net: Network) -> dict[str, torch.Tensor]:
    """A copy of what training changes (the head, plus the base when partly unfrozen)."""
    module = net if net.base_trainable or net.base is None else net.head
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def restore_state(net: Network, state: dict[str, torch.Tensor]) -> None:
    module = net if net.base_trainable or net.base is None else net.head
    module.load_state_dict(state)


def fit(net: Network, train_src: Source, val_src: Source | None, cfg: TrainConfig,
        rt: Runtime, groups: list[dict], generator: torch.Generator, phase: str = "head",
        on_epoch: Callable[[dict], None] | None = None, progress: bool = False) -> FitResult:
    """Train for ``cfg.epochs`` epochs (fewer with early stopping on validation loss).

    The shuffle order comes from ``generator`` only, so cached and uncached runs see the same
    batches. With early stopping the best epoch's weights are restored at the end. Under a
    process group the sources hold this process's share (see ``SharedSteps``).
    """
    check_train_config(cfg, "train" if phase != "pretrain" else "pretrain.train")
    shared = SharedSteps.plan(net, train_src, val_src, cfg, rt, groups, phase)
    steps = shared.steps if shared else max(1, math.ceil(len(train_src) / cfg.batch_size))
    opt = make_optimizer(groups, cfg)
    sched = make_scheduler(opt, cfg, steps)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.precision == "fp16")
    result, best_loss, best_state, bad = FitResult(), math.inf, None, 0
    has_val = shared.has_val if shared else val_src is not None and len(val_src) > 0
    start = time.perf_counter()
    for epoch in _epochs(cfg.epochs, phase, progress and process_group()[0] == 0):
        t0 = time.perf_counter()
        if shared:
            stats = shared.epoch(net, train_src, generator, cfg, opt, sched, scaler, rt)
        else:
            order = torch.randperm(len(train_src), generator=generator)
            stats = train_epoch(net, train_src, order, cfg, opt, sched, scaler, rt)
        record = {"phase": phase, "epoch": epoch + 1, "input": train_src.kind, **stats}
        if has_val:
            val = evaluate(net, val_src, max(cfg.batch_size, 256), rt)
            record.update(val_loss=val.loss, val_acc=val.accuracy)
        record.update(lr=opt.param_groups[0]["lr"], seconds=time.perf_counter() - t0)
        result.history.append(record)
        result.epochs_run = epoch + 1
        if cfg.early_stopping and record["val_loss"] < best_loss:
            best_loss, best_state, bad, result.best_epoch = (record["val_loss"],
                                                            trainable_state(net), 0, epoch + 1)
        elif cfg.early_stopping:
            bad += 1
        if on_epoch is not None:
            on_epoch(record)
        if cfg.early_stopping and bad >= cfg.early_stopping:
            result.stopped_early = True
            break
    if best_state is not None and result.best_epoch != result.epochs_run:
        restore_state(net, best_state)
    result.seconds = time.perf_counter() - start
    return result


@dataclass
class SharedSteps:
    """How the processes of a job train together: every global batch of ``batch_size``
    items is split across them (``batch`` items from this process's share), every process
    takes the same ``steps`` optimiser steps per epoch (an exhausted share takes empty ones)
    and ``sync`` sums the gradients. So the global batch, the number of steps and the
    learning-rate schedule are those of one process on all the data."""

    rank: int
    batch: int
    steps: int
    has_val: bool
    sync: GradSync

    @classmethod
    def plan(cls, net: Network, train_src: Source, val_src: Source | None, cfg: TrainConfig,
             rt: Runtime, groups: list[dict], phase: str) -> SharedSteps | None:
        rank, world = process_group()
        if world == 1:
            return None
        if cfg.batch_size < world:
            where = "pretrain.train" if phase == "pretrain" else "train"
            raise ConfigError(f"{where}.batch_size={cfg.batch_size} is smaller than the {world} "
                              "processes; it is the global batch, split across them: raise it")
        sizes = share_sizes(cfg.batch_size, world)
        local = math.ceil(len(train_src) / sizes[rank])
        steps, n_val = all_reduce_values([-local, -(len(val_src) if val_src else 0)],
                                         rt.device, dist.ReduceOp.MIN)  # -max, -max
        params = [p for g in groups for p in g["params"]]
        broadcast_trainable(net, params)
        return cls(rank, sizes[rank], max(1, -int(steps)), n_val < 0,
                   GradSync(params, float(sizes[0])))

    def epoch(self, net: Network, src: Source, generator: torch.Generator, cfg: TrainConfig,
              opt: torch.optim.Optimizer, sched: Any, scaler: Any, rt: Runtime) -> dict:
        """One epoch: this share in its own seeded order, one chunk per global step."""
        seed = int(torch.randint(2**62, (1,), generator=generator))  # the same everywhere
        order = torch.randperm(len(src), generator=torch.Generator().manual_seed(seed + self.rank))
        chunks = [order[s * self.batch:(s + 1) * self.batch] for s in range(self.steps)]
        stats = run_steps(net, src, chunks, cfg, opt, sched, scaler, rt, self.sync)
        average_buffers(net)
        return stats


def _epochs(n: int, phase: str, progress: bool) -> Any:
    if not progress:
        return range(n)
    from .progress import tqdm_bar

    return tqdm_bar(range(n), desc=phase, unit="epoch", leave=False)


# ---------------------------------------------------------------------------------------
# Feature cache
# ---------------------------------------------------------------------------------------


def available_ram() -> int:
    """Bytes of memory available to new allocations (MemAvailable on Linux)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def plan_cache(mode: str | bool, nbytes: int, rt: Runtime, max_gb: float | None,
               processes: int = 1) -> str:
    """Where cached features live: 'device' (GPU memory), 'cpu', 'disk' or 'off'.

    ``mode`` is ``train.cache``; YAML turns a bare ``off`` into False (and ``on`` into True).
    ``nbytes`` is this process's share; ``processes`` caching alike on this machine share its
    RAM (each has its own GPU).
    """
    mode = {False: "off", True: "auto"}.get(mode, mode) if isinstance(mode, bool) else mode
    if mode in ("off", "disk"):
        return mode
    budget = max_gb * 1e9 if max_gb is not None else None
    if rt.is_cuda:
        free, _ = torch.cuda.mem_get_info(rt.device)
        if nbytes <= (budget if budget is not None else 0.5 * free):
            return "device"
    ram = 0.25 * available_ram() / max(1, processes)
    if mode == "memory" or nbytes <= (budget if budget is not None else ram):
        return "cpu"
    return "disk"


def extract(net: Network, src: Source, positions: torch.Tensor, batch_size: int,
            rt: Runtime) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(features, positions) batches of the frozen base, under inference mode and autocast."""
    net.eval()
    for x, _, pos in src.batches(positions, batch_size):
        with torch.inference_mode(), rt.autocast():
            out = net.base(net.prepare(x)) if net.base is not None else net.prepare(x)
        yield out.float(), pos


def cache_features(net: Network, src: Source, where: str, rt: Runtime, batch_size: int,
                   feature_shape: Sequence[int], keys: Sequence[str] | None = None,
                   cache_dir: Path | None = None, fingerprint: dict | None = None,
                   progress: bool = False) -> Source:
    """Run the frozen base once over ``src``; a source of its features (same targets).

    Items that fail to decode are left out (the returned source is shorter); ``where`` is
    a ``plan_cache`` answer. 'disk' needs ``keys``, ``cache_dir`` and ``fingerprint``.
    """
    if where == "disk":
        return _cache_on_disk(net, src, rt, batch_size, feature_shape, keys, cache_dir,
                              fingerprint or {}, progress)
    device = rt.device if where == "device" else torch.device("cpu")
    buf = torch.empty((len(src), *feature_shape), dtype=torch.float32, device=device,
                      pin_memory=where == "cpu" and rt.is_cuda)
    done = torch.zeros(len(src), dtype=torch.bool)
    for feats, pos in _progress(extract(net, src, torch.arange(len(src)), batch_size, rt),
                                progress, "caching features", len(src), batch_size):
        buf[pos.to(device)] = feats.to(device)
        done[pos] = True
    targets = torch.as_tensor(src.targets)
    if bool(done.all()):
        return TensorSource(buf, targets, "features", rt.device)
    good = torch.nonzero(done).squeeze(1)
    return TensorSource(buf[good.to(device)], targets[good], "features", rt.device)


def _cache_on_disk(net: Network, src: Source, rt: Runtime, batch_size: int,
                   feature_shape: Sequence[int], keys: Sequence[str] | None,
                   cache_dir: Path | None, fingerprint: dict, progress: bool) -> Source:
    if keys is None or cache_dir is None:
        raise ValueError("the disk cache needs keys and cache_dir")
    try:
        from .store import StoreWriter
    except ImportError:  # no feature store module: a plain memory-mapped .npy
        return _cache_memmap(net, src, rt, batch_size, feature_shape, cache_dir, progress)
    writer = StoreWriter(cache_dir, fingerprint, dtype="float32", overwrite=True, fsync=False)
    try:
        done = writer.done_keys
        todo = torch.tensor([i for i, k in enumerate(keys) if k not in done], dtype=torch.int64)
        for feats, pos in _progress(extract(net, src, todo, batch_size, rt), progress,
                                    "caching features", len(todo), batch_size):
            p = pos.numpy()
            writer.add([keys[i] for i in p], src.targets[p], feats.flatten(1))
        if isinstance(src, LoaderSource):
            writer.add_failures(list(src.failures.items()))
        store = writer.close({"purpose": "transferlab.finetune feature cache"})
    except BaseException:
        writer.abort()
        raise
    row_of = {k: i for i, k in enumerate(store.keys)}
    pos = np.array([i for i, k in enumerate(keys) if k in row_of and
                    k not in dict(store.failures)], np.int64)
    rows = np.array([row_of[keys[i]] for i in pos], np.int64)
    return ArraySource(store.features, rows, src.targets[pos], feature_shape, rt.device)


def _cache_memmap(net: Network, src: Source, rt: Runtime, batch_size: int,
                  feature_shape: Sequence[int], cache_dir: Path, progress: bool) -> Source:
    cache_dir.mkdir(parents=True, exist_ok=True)
    dim = int(np.prod(feature_shape))
    array = np.lib.format.open_memmap(cache_dir / "features.npy", mode="w+", dtype=np.float32,
                                      shape=(len(src), dim))
    done = np.zeros(len(src), bool)
    for feats, pos in _progress(extract(net, src, torch.arange(len(src)), batch_size, rt),
                                progress, "caching features", len(src), batch_size):
        array[pos.numpy()] = feats.flatten(1).cpu().numpy()
        done[pos.numpy()] = True
    array.flush()
    good = np.flatnonzero(done)
    reader = np.load(cache_dir / "features.npy", mmap_mode="r")
    return ArraySource(reader, good, src.targets[good], feature_shape, rt.device)


def _progress(it: Any, progress: bool, desc: str, items: int, batch_size: int) -> Any:
    if not progress:
        return it
    from .progress import tqdm_bar

    return tqdm_bar(it, desc=desc, unit="batch", leave=False,
                    total=math.ceil(items / batch_size))


def state_digest(module: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """A short hash of a module's weights (or of a state dict): cached features belong to
    exactly these weights; processes that trained together hold the same ones."""
    h = hashlib.sha256()
    state = module.state_dict() if isinstance(module, nn.Module) else module
    for name, tensor in sorted(state.items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def unfreeze_last(net: Network, layers: Sequence[tuple[str, nn.Module]], count: int,
                  train_bn: bool) -> list[str]:
    """Make the last ``count`` of ``layers`` trainable; returns their names."""
    chosen = list(layers)[-count:] if count > 0 else []
    for _, module in chosen:
        module.requires_grad_(True)
    net.base_trainable = bool(chosen)
    net.unfrozen = []
    for _, module in chosen:
        for sub in module.modules():
            is_bn = isinstance(sub, nn.modules.batchnorm._BatchNorm)
            if not list(sub.children()) and (train_bn or not is_bn):
                net.unfrozen.append(sub)
    return [name for name, _ in chosen]


def base_layers(base: nn.Module, input_size: Sequence[int]) -> list[tuple[str, nn.Module]]:
    """Top-level layers of a cut base that hold parameters, in call order (what
    ``unfreeze.layers`` counts from the end)."""
    from .cuts import top_level_layers, trace_modules

    body = getattr(base, "body", base)
    if isinstance(body, nn.Sequential):
        named = list(body.named_children())
    elif hasattr(body, "graph_module"):
        raise ConfigError("unfreeze.layers is not available for a layer cut at a graph node; "
                          "cut at a module name (layer:NAME) or use first:N / head")
    else:
        model = getattr(body, "model", body)  # TapModule / TimmHead / Features wrap a model
        names = top_level_layers(model, trace_modules(model, input_size))
        limit = getattr(body, "module_name", None)
        if limit:
            names = names[:names.index(limit.split(".")[0]) + 1]
        named = [(n, model.get_submodule(n)) for n in names]
    return [(n, m) for n, m in named if any(True for _ in m.parameters())]

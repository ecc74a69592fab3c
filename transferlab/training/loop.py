"""Optimiser, schedule, epochs: fitting and evaluating a Classifier on sources."""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..config import TrainConfig
from ..errors import ConfigError, DataError
from ..models.classifier import Classifier
from ..runtime.device import Runtime, derive_seed
from ..runtime.distributed import all_gather, all_reduce_values, dist_info, part_sizes
from .feeds import LoaderSource, Source, chunked
from .sync import GradSync, average_buffers, broadcast_trainable

# ---------------------------------------------------------------------------------------
# Optimiser and schedule
# ---------------------------------------------------------------------------------------


def check_train_config(cfg: TrainConfig, where: str = "train", world_size: int = 1) -> None:
    """Reject settings that do not fit together, naming the key (``fit`` trusts a checked
    config; the range of each value is checked by ``config.BOUNDS``).

    ``world_size`` processes split every global batch: each needs at least one item.
    """
    if cfg.early_stopping and cfg.val_split <= 0:
        raise ConfigError(f"{where}.early_stopping needs a validation split: set "
                          f"{where}.val_split (e.g. 0.1) or {where}.early_stopping=0")
    if cfg.batch_size < world_size:
        raise ConfigError(f"{where}.batch_size={cfg.batch_size} is smaller than the "
                          f"{world_size} processes; it is the global batch, split across them: "
                          "raise it")


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

    def factor(step: int) -> float:
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
        if cfg.schedule == "step":
            return cfg.step_gamma ** (step // every)
        return 1.0

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


def train_epoch(net: Classifier, src: Source, order: torch.Tensor, cfg: TrainConfig,
                opt: torch.optim.Optimizer, sched: Any, scaler: Any, rt: Runtime) -> dict:
    """One pass over ``src`` in ``order``; returns mean loss and accuracy."""
    return run_steps(net, src, chunked(order, cfg.batch_size), cfg, opt, sched, scaler, rt)


def run_steps(net: Classifier, src: Source, chunks: Sequence[torch.Tensor], cfg: TrainConfig,
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
                logits = net.logits(x, src.kind)
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


def evaluate(net: Classifier, src: Source, batch_size: int, rt: Runtime) -> EvalResult:
    """Loss, accuracy and predictions of ``net`` on ``src`` (in source order).

    Under a process group ``src`` is this process's part: the result (the same in every
    process) covers every part, concatenated in rank order (positions count in that order).
    """
    net.eval()
    losses, preds, targets, positions = [], [], [], []
    with torch.inference_mode():
        for x, y, pos in src.batches(torch.arange(len(src)), batch_size):
            with rt.autocast():
                logits = net.logits(x, src.kind).float()
            losses.append(F.cross_entropy(logits, y, reduction="sum"))
            preds.append(logits.argmax(1).cpu())
            targets.append(y.cpu())
            positions.append(pos)
    if dist_info().world_size > 1:
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
    parts = all_gather(mine)
    offsets = np.cumsum([0] + [p[4] for p in parts])
    pred = np.concatenate([p[1] for p in parts])
    tgt = np.concatenate([p[2] for p in parts])
    pos = np.concatenate([p[3] + off for p, off in zip(parts, offsets)])
    if not len(tgt):
        return EvalResult(float("nan"), float("nan"), pred, tgt, pos)
    loss = float(sum(p[0] for p in parts))
    return EvalResult(loss / len(tgt), float((pred == tgt).mean()), pred, tgt, pos)


def trainable_state(net: Classifier) -> dict[str, torch.Tensor]:
    """A copy of what training changes (the head, plus the base when partly unfrozen)."""
    module = net if net.base_trainable or net.base is None else net.head
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def restore_state(net: Classifier, state: dict[str, torch.Tensor]) -> None:
    module = net if net.base_trainable or net.base is None else net.head
    module.load_state_dict(state)


def fit(net: Classifier, train_src: Source, val_src: Source | None, cfg: TrainConfig,
        rt: Runtime, groups: list[dict], generator: torch.Generator, phase: str = "head",
        on_epoch: Callable[[dict], None] | None = None, progress: bool = False) -> FitResult:
    """Train for ``cfg.epochs`` epochs (fewer with early stopping on validation loss).

    The shuffle order comes from ``generator`` only, so cached and uncached runs see the same
    batches. With early stopping the best epoch's weights are restored at the end. Under a
    process group the sources hold this process's share (see ``SharedSteps``). ``cfg`` is
    one that ``config.BOUNDS`` and ``check_train_config`` accepted.
    """
    shared = SharedSteps.plan(net, train_src, val_src, cfg, rt, groups, phase)
    steps = shared.steps if shared else max(1, math.ceil(len(train_src) / cfg.batch_size))
    opt = make_optimizer(groups, cfg)
    sched = make_scheduler(opt, cfg, steps)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.precision == "fp16")
    result, best_loss, best_state, bad = FitResult(), math.inf, None, 0
    has_val = shared.has_val if shared else val_src is not None and len(val_src) > 0
    start = time.perf_counter()
    for epoch in _epochs(cfg.epochs, phase, progress and dist_info().is_main):
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
    def plan(cls, net: Classifier, train_src: Source, val_src: Source | None, cfg: TrainConfig,
             rt: Runtime, groups: list[dict], phase: str) -> SharedSteps | None:
        rank, world = dist_info().rank, dist_info().world_size
        if world == 1:
            return None
        sizes = part_sizes(cfg.batch_size, world)  # >= 1 each: check_train_config(world=...)
        local = math.ceil(len(train_src) / sizes[rank])
        steps, n_val = all_reduce_values([-local, -(len(val_src) if val_src else 0)],
                                         rt.device, dist.ReduceOp.MIN)  # -max, -max
        params = [p for g in groups for p in g["params"]]
        broadcast_trainable(net, params)
        return cls(rank, sizes[rank], max(1, -int(steps)), n_val < 0,
                   GradSync(params, float(sizes[0])))

    def epoch(self, net: Classifier, src: Source, generator: torch.Generator, cfg: TrainConfig,
              opt: torch.optim.Optimizer, sched: Any, scaler: Any, rt: Runtime) -> dict:
        """One epoch: this share in its own seeded order, one chunk per global step."""
        seed = int(torch.randint(2**62, (1,), generator=generator))  # the same everywhere
        generator = torch.Generator().manual_seed(derive_seed(seed, self.rank))
        order = torch.randperm(len(src), generator=generator)
        chunks = [order[s * self.batch:(s + 1) * self.batch] for s in range(self.steps)]
        stats = run_steps(net, src, chunks, cfg, opt, sched, scaler, rt, self.sync)
        average_buffers(net)
        return stats


def _epochs(n: int, phase: str, progress: bool) -> Any:
    if not progress:
        return range(n)
    from ..runtime.progress import tqdm_bar

    return tqdm_bar(range(n), desc=phase, unit="epoch", leave=False)




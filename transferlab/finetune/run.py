"""Fine-tune a classifier on a cut, frozen backbone: ``python -m transferlab.finetune CFG``.

Stages, each a section of ``FinetuneConfig``:

1. ``pretrain`` (optional): train the whole backbone on a source task (``pretrain.classes``)
   and save it as a backbone checkpoint, which then becomes the base (the MNIST example:
   LeNet on digits 0-4, reused for 5-9).
2. head: cut the base at ``model.cut``, freeze it, train a new (or the model's own) head on
   the target task (``data.classes``); optionally unfreeze the last base layers afterwards.
3. ``probe`` (optional): multinomial logistic regression on frozen base features of a few
   training items (the "explicit approach").

Everything lands in ``output.dir``: ``config.yaml`` (resolved), ``pretrain.safetensors``,
``model.safetensors`` (rewritten atomically after an epoch at most every
``output.save_interval_s`` seconds and at the end, so a killed run keeps the last good one),
``metrics.jsonl`` (one line per epoch), ``metrics.json`` (the closing table),
``confusion.json`` / ``confusion.csv``.

Under ``torchrun --nproc_per_node=N`` every process takes a seeded share of the training
items (and computes the frozen features of that share only), the gradients of the trainable
part are summed over the processes at every step of the global batch (``train.batch_size``
items in all, split across them), evaluation gathers every process's part, and rank 0
alone writes the outputs. The weights end identical in every process (checked).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from ..config import FinetuneConfig, check_bounds, save_config
from ..errors import ConfigError
from ..runtime.atomicfile import atomic_write_text
from ..runtime.device import Runtime, apply_runtime, resolve_runtime
from ..runtime.distributed import (
    DistInfo,
    barrier,
    dist_info,
    from_main,
    init_distributed,
    share_runtime,
)
from ..runtime.lock import acquire_dir_lock
from ..training.loop import check_train_config
from .context import Context
from .labelled import labelled_data, resolve_data, test_config
from .outputs import MODEL_FILE, FinetuneResult, MetricsLog
from .stages import run_head, run_pretrain, run_probe_stage

# ---------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------


def preflight(cfg: FinetuneConfig) -> None:
    """Check settings and labelled data before any training, so mistakes fail in seconds."""
    from ..models.heads import build_head

    world = dist_info().world_size
    check_bounds(cfg)  # a config built in Python did not pass load_config's checks
    check_train_config(cfg.train, "train", world)  # the one check: fit trusts it
    if cfg.pretrain.enabled:
        check_train_config(cfg.pretrain.train, "pretrain.train", world)
        labelled_data(cfg.data, cfg.pretrain.classes, "pretrain")
    labelled_data(cfg.data, cfg.data.classes, "data")
    test_config(cfg)
    if cfg.head.type != "keep":
        build_head(replace(cfg.head, in_features=None), 1, 2)


def run_finetune(cfg: FinetuneConfig) -> FinetuneResult:
    """Run every configured stage; see the module docstring for what is written where.

    Under torchrun every process calls it (it joins the process group); rank 0 writes the
    outputs and every process returns the same result once they are written. ``output.dir``
    is locked for the run: a second run into it fails at once.
    """
    if cfg.runtime.precision == "int8":  # calibrated on an extraction's first images only
        raise ConfigError("runtime.precision=int8 is for extraction only; set "
                          "runtime.precision=fp32 (or auto) to fine-tune")
    info = init_distributed(cfg.runtime.device)
    rt = share_runtime(resolve_runtime(cfg.runtime), cfg.runtime, info)
    apply_runtime(rt)
    cfg, note = resolve_data(cfg)
    preflight(cfg)
    out = Path(cfg.output.dir)
    with output_lock(out, info):
        return run_stages(cfg, rt, out, note, info)


@contextlib.contextmanager
def output_lock(out: Path, info: DistInfo) -> Iterator[None]:
    """Rank 0 holds ``out``'s lock; every process fails alike when another run holds it."""
    handle, refused = None, None
    if info.is_main:
        try:
            handle = acquire_dir_lock(out)
        except ConfigError as exc:
            refused = str(exc)
    refused = from_main(refused)  # the other ranks must not wait for a rank 0 that stopped
    if refused is not None:
        raise ConfigError(refused)
    try:
        yield
    finally:
        if handle is not None:
            handle.close()


def run_stages(cfg: FinetuneConfig, rt: Runtime, out: Path, note: str,
               info: DistInfo) -> FinetuneResult:
    if info.is_main:
        save_config(cfg, out / "config.yaml")
    metrics = MetricsLog(out / "metrics.jsonl" if info.is_main else None)
    ctx = Context(cfg, rt, out, metrics, info)
    stages, pretrain_path = [], None
    if cfg.pretrain.enabled:
        stage, pretrain_path = run_pretrain(ctx)
        stages.append(stage)
        model = replace(cfg.model, name=str(pretrain_path), source="checkpoint",
                        pretrained=False, weights=None, num_classes=None)
        ctx.cfg = cfg = replace(cfg, model=model)
        if info.is_main:
            save_config(cfg, out / "config.yaml")
    stage, run = run_head(ctx)
    stages.append(stage)
    if cfg.probe.samples > 0:
        stages.append(run_probe_stage(ctx, run))
    result = FinetuneResult(stages, out, out / MODEL_FILE, pretrain_path, note, cfg,
                            ctx.metrics.records)
    if info.is_main:
        write_summary(result, rt)
    barrier()
    return result


def write_summary(result: FinetuneResult, rt: Runtime) -> Path:
    summary = {"data": result.data_note, "data_source": result.config.data.source,
               "runtime": rt.to_dict(), "processes": dist_info().world_size,
               "checkpoint": str(result.checkpoint),
               "pretrain_checkpoint": str(result.pretrain_checkpoint)
               if result.pretrain_checkpoint else None,
               "stages": [dataclasses.asdict(s) for s in result.stages]}
    path = result.output_dir / "metrics.json"
    atomic_write_text(path, json.dumps(summary, indent=1))
    return path




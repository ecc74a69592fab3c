"""The stages of a fine-tuning run: pretrain, head, unfreeze, probe."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import DataConfig, to_dict
from ..data.preprocess import PreprocessSpec
from ..errors import ConfigError
from ..models.checkpoint import BACKBONE_FORMAT
from ..models.classifier import Classifier, classifier_meta, save_classifier
from ..models.heads import cut_with_head, head_description
from ..runtime.device import seed_everything
from ..runtime.distributed import (
    all_gather,
    barrier,
    from_main,
    gather_to_main,
    local_world_size,
    rank_dir,
)
from ..training.cache import cache_features, frozen_features, plan_cache
from ..training.feeds import Source
from ..training.loop import evaluate, fit
from ..training.sync import state_digest
from .context import Context
from .labelled import LabelledData, image_source, labelled_data, split, test_config
from .model import build_model, resolve_arch
from .outputs import (
    MODEL_FILE,
    PRETRAIN_FILE,
    StageResult,
    confusion_matrix,
    write_confusion,
)
from .replicas import (
    check_replicas,
    part_rows,
    reseed_per_process,
    share_rows,
    take,
    total,
)

# ---------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------


def run_pretrain(ctx: Context) -> tuple[StageResult, Path]:
    """Train the whole backbone on ``pretrain.classes``; save a backbone checkpoint."""
    cfg, rt = ctx.cfg, ctx.rt
    t0 = time.perf_counter()
    gen = seed_everything(cfg.runtime.seed)
    data = labelled_data(cfg.data, cfg.pretrain.classes, "pretrain")
    model_cfg = replace(cfg.model, num_classes=len(data.labels))
    backbone, spec = build_model(model_cfg, cfg.preprocess)
    model = backbone.model.requires_grad_(True)
    if rt.channels_last:
        model.to(memory_format=torch.channels_last)
    net = Classifier(None, model, data.class_names, spec, runtime=rt).to(rt.device)
    images = image_source(data, spec, rt, cfg.pretrain.train.augment, ctx.worker_seed)
    train_src, val_src = split(take(images, share_rows(len(images), ctx.info, cfg.runtime.seed)),
                               cfg.pretrain.train.val_split, cfg.runtime.seed)
    path = ctx.out / PRETRAIN_FILE
    meta = {"format": BACKBONE_FORMAT, "backbone": resolve_arch(model_cfg),
            "data_config": jsonable(backbone.data_config), "class_names": data.class_names,
            "labels": data.labels, "preprocess": spec.to_dict(), "config": to_dict(cfg),
            "stage": "pretrain"}

    def on_epoch(record: dict) -> None:
        ctx.metrics.write({"stage": "pretrain", **record})
        if ctx.checkpoint_due():
            save_pretrain(path, model, {**meta, "epoch": record["epoch"], "metrics": record})

    reseed_per_process(ctx)
    result = fit(net, train_src, val_src, cfg.pretrain.train, rt,
                 [{"params": list(model.parameters())}], gen, "pretrain", on_epoch, ctx.progress)
    check_replicas(ctx, model, "pretrained model")
    held = held_out_eval(ctx, net, test_config(cfg), cfg.pretrain.classes, data, spec, val_src)
    if ctx.main:
        save_pretrain(path, model, {**meta, "epoch": result.epochs_run,
                                    "test_accuracy": held[1] if held else None})
    barrier()  # the head stage of every process reads the checkpoint rank 0 wrote
    stage = StageResult("pretrain", total(len(train_src)), result.epochs_run,
                        held[1] if held else None, time.perf_counter() - t0,
                        held[0] if held else None, {"classes": data.class_names})
    return stage, path


def save_pretrain(path: Path, model: torch.nn.Module, meta: dict) -> None:
    from ..models.checkpoint import save_checkpoint

    save_checkpoint(path, model.state_dict(), meta)


def jsonable(data: dict) -> dict:
    return json.loads(json.dumps(data, default=lambda v: list(v) if isinstance(v, tuple)
                                 else str(v)))


def held_out_eval(ctx: Context, net: Classifier, test_cfg: DataConfig | None,
                  classes: list | None, train: LabelledData, spec: PreprocessSpec,
                  val_src: Source | None, test_src: Source | None = None
                  ) -> tuple[str, float, Any] | None:
    """(which, accuracy, EvalResult) on the test data, else on the validation split."""
    if test_src is None and test_cfg is not None:
        test = labelled_data(test_cfg, classes, "test", known=train.labels)
        test_src = image_source(test, spec, ctx.rt, False, ctx.worker_seed)
        test_src = take(test_src, part_rows(len(test_src), ctx.info))
    src, which = (test_src, "test") if test_src is not None else (val_src, "validation")
    if src is None or not total(len(src)):
        return None
    res = evaluate(net, src, ctx.eval_batch(net), ctx.rt)
    return which, res.accuracy, res


@dataclass
class HeadRun:
    """State of the head stage shared by its phases and the probe."""

    net: Classifier
    data: LabelledData
    spec: PreprocessSpec
    meta: dict
    train_all: Source  # the training items (features when cached), before the val split
    test: Source | None
    cached: str  # where the features are cached: device | cpu | disk | off


def run_head(ctx: Context) -> tuple[StageResult, HeadRun]:
    """Frozen base + head training (phase 1), optional partial unfreeze (phase 2)."""
    cfg, rt = ctx.cfg, ctx.rt
    t0 = time.perf_counter()
    gen = seed_everything(cfg.runtime.seed)
    data = labelled_data(cfg.data, cfg.data.classes, "data")
    backbone, spec = build_model(cfg.model, cfg.preprocess)
    base, head = cut_with_head(backbone.model, cfg.model.cut, cfg.model.pool, spec.input_size,
                               cfg.head, len(data.labels), cfg.model.name)
    if rt.channels_last:
        base.to(memory_format=torch.channels_last)
    net = Classifier(base, head, data.class_names, spec, runtime=rt).to(rt.device)
    t_cache = time.perf_counter()
    run = prepare_head_run(ctx, net, data, spec)
    cache_seconds = time.perf_counter() - t_cache
    run.meta = classifier_meta(resolve_arch(cfg.model), str(base.cut), cfg.model.pool, cfg.head,
                               base.feature_dim, data.class_names, spec, labels=data.labels,
                               config=to_dict(cfg), stage="head")
    train_src, val_src = split(run.train_all, cfg.train.val_split, cfg.runtime.seed)
    reseed_per_process(ctx)
    fit_res = fit(net, train_src, val_src, cfg.train, rt, [{"params": list(head.parameters())}],
                  gen, "head", epoch_saver(ctx, run), ctx.progress)
    epochs = fit_res.epochs_run
    details = {"cache": run.cached, "cache_seconds": cache_seconds if run.cached != "off" else 0.0,
               "head": head_description(head),
               "feature_shape": list(base.output_shape), "epoch_seconds":
               [r["seconds"] for r in fit_res.history]}
    train_samples = total(len(train_src))
    if cfg.unfreeze.layers > 0 and cfg.unfreeze.epochs > 0:
        del train_src, val_src  # cached features of a base about to change (GPU memory too)
        unfreeze_epochs, val_src = run_unfreeze(ctx, run, gen, details)
        epochs += unfreeze_epochs
    if ctx.info.enabled:
        details["processes"] = ctx.info.world_size
        trained = net if net.base_trainable else net.head  # the head, or all when unfrozen
        details["weights_sha256"] = check_replicas(ctx, trained, "trained")
    held = held_out_eval(ctx, net, None, None, data, spec, val_src, run.test)
    finish_head(ctx, run, held, epochs)
    seconds = time.perf_counter() - t0
    return StageResult("head-only" if not details.get("unfrozen") else "fine-tune",
                       train_samples, epochs, held[1] if held else None, seconds,
                       held[0] if held else None, details), run


def prepare_head_run(ctx: Context, net: Classifier, data: LabelledData,
                     spec: PreprocessSpec) -> HeadRun:
    """Image sources, replaced by cached features when the base is frozen and not augmented."""
    cfg, rt = ctx.cfg, ctx.rt
    seed = cfg.runtime.seed
    train_all = image_source(data, spec, rt, cfg.train.augment, ctx.worker_seed)
    train_rows = share_rows(len(train_all), ctx.info, seed)
    train_all = take(train_all, train_rows)
    test_cfg = test_config(cfg)
    test_data = labelled_data(test_cfg, cfg.data.classes, "test", known=data.labels) \
        if test_cfg is not None else None
    test = image_source(test_data, spec, rt, False, ctx.worker_seed) \
        if test_data is not None else None
    test_rows = part_rows(len(test), ctx.info) if test is not None else None
    test = take(test, test_rows)
    shape = tuple(net.base.output_shape)
    nbytes = 4 * int(np.prod(shape)) * (len(train_all) + (len(test) if test else 0))
    local = local_world_size(ctx.info)
    where = "off" if cfg.train.augment else plan_cache(cfg.train.cache, nbytes, rt,
                                                       cfg.train.cache_max_gb, local)
    if where != "off":
        digest = {"base": state_digest(net.base) if where == "disk" else None,
                  "cut": str(net.base.cut), "pool": net.base.pool_name,
                  "preprocess": spec.to_dict()}
        train_all = cache(ctx, net, train_all, where, keys_of(data, train_rows), cfg.data,
                          digest, "train")
        if test is not None:
            test = cache(ctx, net, test, where, keys_of(test_data, test_rows), test_cfg, digest,
                         "test")
    return HeadRun(net, data, spec, {}, train_all, test, where)


def keys_of(data: LabelledData, rows: np.ndarray | None) -> list[str]:
    keys = data.dataset.keys
    return list(keys) if rows is None else [keys[i] for i in rows]


def cache(ctx: Context, net: Classifier, src: Source, where: str, keys: list[str],
          data_cfg: DataConfig, digest: dict, name: str) -> Source:
    """Features of ``src`` (this process's share); a disk cache of each process goes to
    ``cache/ranks/world-N/rank-R`` as the parts of an extraction do."""
    folder = rank_dir(ctx.out / "cache", ctx.info)
    return cache_features(net, src, where, ctx.rt, ctx.eval_batch(net), net.base.output_shape,
                          keys, folder / name, digest, ctx.progress,
                          fold_bn=ctx.cfg.runtime.fold_bn, data=data_cfg)


def epoch_saver(ctx: Context, run: HeadRun) -> Any:
    def on_epoch(record: dict) -> None:
        ctx.metrics.write({"stage": "head", **record})
        if ctx.checkpoint_due():
            save_classifier(ctx.out / MODEL_FILE, run.net.base, run.net.head,
                            {**run.meta, "epoch": record["epoch"], "metrics": record})
    return on_epoch


def run_unfreeze(ctx: Context, run: HeadRun, gen: torch.Generator, details: dict
                 ) -> tuple[int, Source | None]:
    """Phase 2: the last ``unfreeze.layers`` base layers train at ``lr * lr_mult``; images
    go through the base every step. (epochs run, the validation images).

    The run's cached features belong to the base before it trained: the images replace them
    in ``run`` (for the evaluation and the probe after this phase), which also frees the
    cache's memory (on the GPU: room for the activations the unfrozen layers keep)."""
    cfg, rt, net = ctx.cfg, ctx.rt, run.net
    layers = net.base_layers()
    if cfg.unfreeze.layers > len(layers):
        names = ", ".join(n for n, _ in layers)
        raise ConfigError(f"unfreeze.layers={cfg.unfreeze.layers} but the base has only "
                          f"{len(layers)} layers with weights ({names})")
    details["unfrozen"] = net.unfreeze_last(layers, cfg.unfreeze.layers,
                                            cfg.unfreeze.train_bn)
    seed = cfg.runtime.seed
    images = image_source(run.data, run.spec, rt, cfg.train.augment, ctx.worker_seed)
    run.train_all = images = take(images, share_rows(len(images), ctx.info, seed))
    run.cached = "off"
    train_src, val_src = split(images, cfg.train.val_split, seed)
    if run.test is not None and run.test.kind == "features":
        test_data = labelled_data(test_config(cfg), cfg.data.classes, "test",
                                  known=run.data.labels)
        test = image_source(test_data, run.spec, rt, False, ctx.worker_seed)
        run.test = take(test, part_rows(len(test), ctx.info))
    base_params = [p for p in net.base.parameters() if p.requires_grad]
    groups = [{"params": list(net.head.parameters())},
              {"params": base_params, "lr": cfg.train.lr * cfg.unfreeze.lr_mult}]
    tcfg = replace(cfg.train, epochs=cfg.unfreeze.epochs)
    res = fit(net, train_src, val_src, tcfg, rt, groups, gen, "unfreeze", epoch_saver(ctx, run),
              ctx.progress)
    details["unfreeze_epoch_seconds"] = [r["seconds"] for r in res.history]
    return res.epochs_run, val_src


def finish_head(ctx: Context, run: HeadRun, held: tuple | None, epochs: int) -> None:
    if not ctx.main:
        return
    meta = {**run.meta, "epoch": epochs}
    if held is not None:
        which, acc, res = held
        meta[f"{which}_accuracy"] = acc
        matrix = confusion_matrix(res.predictions, res.targets, len(run.data.class_names))
        write_confusion(ctx.out, matrix, run.data.class_names, which)
    save_classifier(ctx.out / MODEL_FILE, run.net.base, run.net.head, meta)


def run_probe_stage(ctx: Context, run: HeadRun) -> StageResult:
    """Logistic regression on frozen base features of ``probe.samples`` training items.

    Under torchrun the items are drawn from every process's share; their features (and
    those of the test parts) are gathered, rank 0 fits, and every process gets its result.
    """
    from ..analysis.linear_probe import fit_logistic
    from ..analysis.splits import stratified_split

    cfg, pcfg = ctx.cfg, ctx.cfg.probe
    t0 = time.perf_counter()
    sizes = all_gather(len(run.train_all))
    offset = sum(sizes[:ctx.info.rank])
    n = min(pcfg.samples, sum(sizes))
    rng = np.random.default_rng(cfg.runtime.seed)
    rows = np.sort(rng.choice(sum(sizes), n, replace=False))
    mine = rows[(rows >= offset) & (rows < offset + len(run.train_all))] - offset
    train = gathered_features(ctx, run.net, run.train_all.subset(mine))
    test = gathered_features(ctx, run.net, run.test) if run.test is not None else None
    if not ctx.main:
        return from_main(None)
    x, y = train
    l2s = list(pcfg.l2)
    if len(l2s) > 1:
        tr, va = stratified_split(y, pcfg.val_fraction, cfg.runtime.seed)
        sweep = fit_logistic(x[tr], y[tr], l2s, val_features=x[va], val_labels=y[va],
                             device=ctx.rt.device, max_iter=pcfg.max_iter)
        l2s = [sweep.best_l2]
    res = fit_logistic(x, y, l2s, device=ctx.rt.device, max_iter=pcfg.max_iter)
    acc, which = None, None
    if test is not None:
        acc, which = res.accuracy(*test)[0], "test"
    stage = StageResult("probe", n, None, acc, time.perf_counter() - t0, which,
                        {"l2": l2s[0], "features_cached": run.train_all.kind == "features"})
    return from_main(stage)


def gathered_features(ctx: Context, net: Classifier, src: Source
                      ) -> tuple[torch.Tensor, np.ndarray] | None:
    """``features_of`` every process's ``src``, in rank order, in rank 0 (None elsewhere)."""
    if not ctx.info.enabled:
        return features_of(ctx, net, src)
    x, y = features_of(ctx, net, src) if len(src) else (None, None)
    parts = gather_to_main((x.cpu().numpy(), y) if x is not None else None)
    if parts is None:
        return None
    parts = [p for p in parts if p is not None]
    return (torch.from_numpy(np.concatenate([p[0] for p in parts])).to(ctx.rt.device),
            np.concatenate([p[1] for p in parts]))


def features_of(ctx: Context, net: Classifier, src: Source) -> tuple[torch.Tensor, np.ndarray]:
    """Flattened frozen-base features (from the cache when ``src`` holds features)."""
    order = torch.arange(len(src))
    net.eval()  # layers unfrozen in phase 2 too
    if src.kind == "images":
        batches = frozen_features(net.base_engine(ctx.rt), src, order, ctx.eval_batch(net))
    else:
        batches = ((x, pos) for x, _, pos in src.batches(order, ctx.eval_batch(net)))
    xs, positions = zip(*((x.float().flatten(1), pos) for x, pos in batches))
    return torch.cat(xs), src.targets[torch.cat(positions).numpy()]




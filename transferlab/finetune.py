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

import dataclasses
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .atomicfile import atomic_write_text
from .backbones import Backbone, build_backbone, resolve_source
from .config import (DataConfig, FinetuneConfig, ModelConfig, RuntimeConfig, from_dict,
                     save_config, to_dict)
from .distributed import DistInfo, barrier, dist_info, init_distributed, part_range, shutdown
from .errors import ConfigError, DataError, ModelError
from .extractor import model_in_chans
from .heads import cut_with_head, head_description
from .model_io import BACKBONE_FORMAT, classifier_meta, read_meta, save_classifier
from .preprocess import PreprocessSpec, resolve_preprocess
from .runtime import (Runtime, apply_runtime, default_batch_size, resolve_runtime,
                      seed_everything)
from .training import (LoaderSource, Network, Source, TensorSource, base_layers,
                       cache_features, check_train_config, evaluate, fit, plan_cache,
                       state_digest, unfreeze_last)

log = logging.getLogger(__name__)

MODEL_FILE, PRETRAIN_FILE = "model.safetensors", "pretrain.safetensors"


@dataclass
class StageResult:
    """One row of the closing table."""

    stage: str
    train_samples: int
    epochs: int | None  # None for the probe (no epochs)
    accuracy: float | None  # on held-out data (test set, else the validation split)
    seconds: float
    held_out: str | None = None  # 'test', 'validation' or None
    details: dict = field(default_factory=dict)


@dataclass
class FinetuneResult:
    stages: list[StageResult]
    output_dir: Path
    checkpoint: Path
    pretrain_checkpoint: Path | None
    data_note: str
    config: FinetuneConfig
    history: list[dict]

    def stage(self, name: str) -> StageResult:
        return next(s for s in self.stages if s.stage == name)

    def table(self) -> str:
        return format_table(self.stages)


# ---------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------


@dataclass
class LabelledData:
    """A dataset restricted to labelled items, with contiguous class indices."""

    dataset: Any  # ImageDataset
    targets: np.ndarray  # class index per item
    labels: list[int]  # original label of each class index
    class_names: list[str]


def describe_data(cfg: DataConfig) -> str:
    if cfg.source == "mnist-5k":
        return "mnist-5k (the 5,000 bundled MNIST digits, fixed 80/20 train/test split)"
    if cfg.source == "torchvision":
        return f"torchvision {cfg.dataset} (root {cfg.root})"
    return f"{cfg.source} {cfg.root or cfg.list_file}"


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and \
            isinstance(out.get(key), dict) else value
    return out


def fallback_config(cfg: FinetuneConfig) -> FinetuneConfig | None:
    """``cfg`` with its ``fallback`` overrides applied (validated), or None without one."""
    if not cfg.fallback:
        return None
    data = merge({**to_dict(cfg), "fallback": None}, cfg.fallback)
    return from_dict(FinetuneConfig, data, "the 'fallback' section")


def resolve_data(cfg: FinetuneConfig) -> tuple[FinetuneConfig, str]:
    """Check the data loads; on failure switch to ``fallback``. Returns (config, note)."""
    from .datasets import build_dataset

    fallback = fallback_config(cfg)  # validated up front: typos fail before any work
    try:
        build_dataset(replace(cfg.data, classes=None, limit=None))
        return cfg, f"data: {describe_data(cfg.data)}"
    except DataError as exc:
        if fallback is None:
            raise
        reason = " ".join(str(exc).split(" (")[0].split(";")[0].split())
        log.debug("data not available: %s", exc)
    note = (f"data: {describe_data(cfg.data)} is not available ({reason}); using "
            f"{describe_data(fallback.data)} instead (the 'fallback' section)")
    return fallback, note


def load_labelled(data_cfg: DataConfig, classes: list | None, where: str,
                  known: list[int] | None = None) -> LabelledData:
    """The items of ``classes`` with labels; clear errors for empty, unlabelled or one-class
    data. ``known`` maps labels to the class indices of a training set (test data)."""
    from .datasets import build_dataset

    ds = build_dataset(replace(data_cfg, classes=classes))
    if len(ds) == 0:
        raise DataError(f"{where}: the class filter {classes} (and limit {data_cfg.limit}) "
                        f"leaves no item of {describe_data(data_cfg)}; fix {where}.classes")
    labelled = ds.labels >= 0
    if not labelled.any():
        raise DataError(f"{where}: none of the {len(ds)} items of {describe_data(data_cfg)} has "
                        "a label (all -1); put the images in class sub-folders (source folder) "
                        "or give a label column (source list, data.label_column)")
    if not labelled.all():
        log.warning("%s: ignoring %d unlabelled items of %d", where, int((~labelled).sum()),
                    len(ds))
        ds = ds.subset(np.flatnonzero(labelled))
    labels = known if known is not None else sorted(int(v) for v in np.unique(ds.labels))
    if len(labels) < 2:
        raise DataError(f"{where}: only one class ({class_name(ds, labels[0])}) in the data; a "
                        "classifier needs at least two: widen the class filter or add data")
    if known is not None:
        keep = np.isin(ds.labels, known)
        if not keep.all():
            log.warning("%s: ignoring %d items of classes not in training", where,
                        int((~keep).sum()))
            ds = ds.subset(np.flatnonzero(keep))
    lookup = {label: i for i, label in enumerate(labels)}
    targets = np.array([lookup[int(v)] for v in ds.labels], np.int64)
    return LabelledData(ds, targets, labels, [class_name(ds, v) for v in labels])


def class_name(ds: Any, label: int) -> str:
    names = ds.class_names
    return str(names[label]) if names and 0 <= label < len(names) else str(label)


def array_pixels(ds: Any, spec: PreprocessSpec) -> torch.Tensor | None:
    """uint8 (N, C, H, W) pixels of an in-memory array dataset already at the input size (its
    preprocessing is then the identity), else None."""
    images = getattr(getattr(ds, "reader", None), "images", None)
    rows = getattr(ds, "rows", None)
    c, h, w = spec.input_size
    if images is None or rows is None or spec.crop_pct != 1.0 or images.shape[1:3] != (h, w):
        return None
    arr = images[rows]
    arr = arr[:, None] if arr.ndim == 3 else arr.transpose(0, 3, 1, 2)
    if arr.shape[1] != c:
        if not (arr.shape[1] == 1 and c == 3):
            return None  # RGB -> L uses PIL's weights: take the generic path
        arr = np.repeat(arr, 3, axis=1)
    return torch.from_numpy(np.ascontiguousarray(arr))


def image_source(data: LabelledData, spec: PreprocessSpec, rt: Runtime, augment: bool,
                 seed: int) -> Source:
    """Pixels in memory for array datasets at the input size, else a DataLoader."""
    targets = torch.as_tensor(data.targets)
    pixels = None if augment else array_pixels(data.dataset, spec)
    if pixels is not None:
        device = rt.device if rt.is_cuda and pixels.numel() < (2 << 30) else torch.device("cpu")
        return TensorSource(pixels.to(device), targets, "images", rt.device)
    from .preprocess import build_transform

    ds = data.dataset.subset(np.arange(len(data.dataset)))
    ds.transform = build_transform(spec, normalize=False, augment=augment)
    ds.image_mode, ds.draft_size = spec.image_mode, spec.scale_size()
    return LoaderSource(ds, data.targets, rt.device, rt.num_workers, seed)


def test_config(cfg: FinetuneConfig) -> DataConfig | None:
    if cfg.test is None:
        return None
    return from_dict(DataConfig, merge(to_dict(cfg.data), cfg.test), "the 'test' section")


def split(src: Source, fraction: float, seed: int) -> tuple[Source, Source | None]:
    """Stratified, seeded (train, validation) split; no validation when fraction is 0."""
    if fraction <= 0:
        return src, None
    from .probe import stratified_split

    train_rows, val_rows = stratified_split(src.targets, fraction, seed)
    return src.subset(train_rows), src.subset(val_rows)


# ---------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------


class MetricsLog:
    """``metrics.jsonl``: one JSON line per epoch, flushed at once (``path`` None: records
    kept in memory only, as in the processes other than rank 0)."""

    def __init__(self, path: Path | None):
        self.path = path
        if path is not None:
            path.write_text("", encoding="utf-8")
        self.records: list[dict] = []

    def write(self, record: dict) -> None:
        self.records.append(record)
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def confusion_matrix(pred: np.ndarray, target: np.ndarray, n: int) -> np.ndarray:
    m = np.zeros((n, n), np.int64)
    np.add.at(m, (target, pred), 1)
    return m


def write_confusion(out: Path, matrix: np.ndarray, names: list[str], held_out: str) -> None:
    """confusion.json ({classes, matrix, held_out}) and confusion.csv (rows: true class)."""
    data = {"held_out": held_out, "classes": names, "matrix": matrix.tolist(),
            "rows": "true class", "columns": "predicted class"}
    atomic_write_text(out / "confusion.json", json.dumps(data, indent=1))
    lines = [",".join(["true\\predicted", *names])]
    lines += [",".join([names[i], *map(str, row)]) for i, row in enumerate(matrix)]
    (out / "confusion.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")


def format_table(stages: Sequence[StageResult]) -> str:
    rows = [f"{'stage':<12}{'train samples':>14}{'epochs':>8}{'held-out acc':>14}{'seconds':>9}"]
    for s in stages:
        acc = f"{s.accuracy:.4f}" if s.accuracy is not None else "-"
        epochs = str(s.epochs) if s.epochs is not None else "-"
        rows.append(f"{s.stage:<12}{s.train_samples:>14}{epochs:>8}{acc:>14}{s.seconds:>9.1f}")
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------
# Several processes (torchrun); each helper is the identity in a single process
# ---------------------------------------------------------------------------------------


def share_runtime(rt: Runtime, cfg: RuntimeConfig, info: DistInfo) -> Runtime:
    """Each process on its own GPU; the processes of a machine share its cores, so each
    takes its part of the automatic thread (CPU) and loader worker counts."""
    if not info.enabled:
        return rt
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size)))
    changes: dict[str, Any] = {}
    if rt.is_cuda and rt.device.index is None:
        changes["device"] = torch.device("cuda", torch.cuda.current_device())
    if not rt.is_cuda and cfg.threads is None:
        changes["threads"] = max(1, rt.threads // local)
    if cfg.num_workers is None:
        changes["num_workers"] = max(min(rt.num_workers, 1), rt.num_workers // local)
    return replace(rt, **changes)


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


def total(ctx: Context, count: int) -> int:
    """``count`` summed over the processes."""
    return int(sum(gather(ctx, count)))


def gather(ctx: Context, obj: Any) -> list:
    """Every process's ``obj``, in rank order, in every process."""
    if not ctx.info.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.info.world_size
    torch.distributed.all_gather_object(out, obj)
    return out


def gather_to_main(ctx: Context, obj: Any) -> list | None:
    """Every process's ``obj``, in rank order, in rank 0 (None in the others)."""
    if not ctx.info.enabled:
        return [obj]
    out: list[Any] | None = [None] * ctx.info.world_size if ctx.main else None
    torch.distributed.gather_object(obj, out, dst=0)
    return out


def from_main(ctx: Context, obj: Any) -> Any:
    """Rank 0's ``obj`` in every process."""
    if not ctx.info.enabled:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def reseed_per_process(ctx: Context) -> None:
    """Once the models are built alike, give each process its own random stream (dropout)."""
    if ctx.info.enabled:
        torch.manual_seed(ctx.cfg.runtime.seed * 1_000_003 + ctx.info.rank)


def check_replicas(ctx: Context, module: torch.nn.Module, what: str) -> str | None:
    """Every process must end with the same trained weights: compare their digests."""
    if not ctx.info.enabled:
        return None
    digest = state_digest(module)
    log.info("rank %d of %d: %s weights sha256 %s", ctx.info.rank, ctx.info.world_size, what,
             digest)
    digests = gather(ctx, digest)
    if len(set(digests)) != 1:
        raise RuntimeError(f"the {what} weights differ between processes after training "
                           f"({digests}); please report this")
    return digest


# ---------------------------------------------------------------------------------------
# Model resolution
# ---------------------------------------------------------------------------------------


def resolve_arch(cfg: ModelConfig) -> dict:
    """The architecture (ModelConfig dict, random init) that rebuilds the backbone offline."""
    source = resolve_source(cfg.name, cfg.source)
    if source == "checkpoint":
        meta = read_meta(cfg.name) or {}
        arch = dict(meta.get("backbone") or {})
    else:
        arch = {**dataclasses.asdict(cfg), "source": source}
    return {**arch, "pretrained": False, "weights": None}


def check_weights_file(cfg: ModelConfig) -> None:
    """A transferlab checkpoint given as ``model.weights`` must be of the same model."""
    if not cfg.weights or not str(cfg.weights).endswith(".safetensors"):
        return
    meta = read_meta(cfg.weights)
    if not meta:
        return
    if meta.get("format") == "transferlab.classifier":
        raise ModelError(f"model.weights {cfg.weights} is a fine-tuned classifier checkpoint "
                         f"(base + head of '{meta.get('arch', {}).get('name')}'); load it "
                         "with transferlab.load_model or python -m transferlab.predict")
    arch = meta.get("backbone") or {}
    if arch.get("name") and arch["name"] != cfg.name:
        raise ModelError(f"model.weights {cfg.weights} is a checkpoint of model "
                         f"'{arch['name']}', not '{cfg.name}'; set model.name to its path with "
                         "model.source: checkpoint to reuse it, or give weights of "
                         f"'{cfg.name}'")


def build_model(cfg: ModelConfig, preprocess: Any) -> tuple[Backbone, PreprocessSpec]:
    check_weights_file(cfg)
    backbone = build_backbone(cfg)
    spec = resolve_preprocess(backbone.data_config, preprocess, model_in_chans(backbone.model))
    return backbone, spec


# ---------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------


@dataclass
class Context:
    cfg: FinetuneConfig
    rt: Runtime
    out: Path
    metrics: MetricsLog
    info: DistInfo = field(default_factory=DistInfo)
    last_save: float = field(default_factory=time.perf_counter)  # of the last checkpoint

    @property
    def main(self) -> bool:
        """Whether this process writes the outputs (rank 0, or the only process)."""
        return self.info.is_main

    @property
    def progress(self) -> bool:
        return self.cfg.runtime.progress and self.main

    @property
    def worker_seed(self) -> int:
        """Seed of the loader workers (random augmentation): one stream per process."""
        return self.cfg.runtime.seed + 7919 * self.info.rank

    @property
    def eval_batch(self) -> int:
        """Batch of the no-grad passes (caching, evaluation): extraction's (BENCHMARKS.md)."""
        return default_batch_size(self.rt, self.cfg.runtime.batch_size)

    def checkpoint_due(self) -> bool:
        """Whether to rewrite the checkpoint after this epoch: at most every
        ``output.save_interval_s`` seconds, so fast epochs (cached features) are not
        dominated by rewriting a large frozen base; the final write always happens."""
        out = self.cfg.output
        if not (out.save_every_epoch and self.main):
            return False
        now = time.perf_counter()
        if now - self.last_save < out.save_interval_s:
            return False
        self.last_save = now
        return True


def run_pretrain(ctx: Context) -> tuple[StageResult, Path]:
    """Train the whole backbone on ``pretrain.classes``; save a backbone checkpoint."""
    cfg, rt = ctx.cfg, ctx.rt
    t0 = time.perf_counter()
    gen = seed_everything(cfg.runtime.seed)
    data = load_labelled(cfg.data, cfg.pretrain.classes, "pretrain")
    model_cfg = replace(cfg.model, num_classes=len(data.labels))
    backbone, spec = build_model(model_cfg, cfg.preprocess)
    model = backbone.model.requires_grad_(True)
    if rt.channels_last:
        model.to(memory_format=torch.channels_last)
    net = Network(None, model, spec, rt.channels_last).to(rt.device)
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
    stage = StageResult("pretrain", total(ctx, len(train_src)), result.epochs_run,
                        held[1] if held else None, time.perf_counter() - t0,
                        held[0] if held else None, {"classes": data.class_names})
    return stage, path


def save_pretrain(path: Path, model: torch.nn.Module, meta: dict) -> None:
    from .checkpoint import save_checkpoint

    save_checkpoint(path, model.state_dict(), meta)


def jsonable(data: dict) -> dict:
    return json.loads(json.dumps(data, default=lambda v: list(v) if isinstance(v, tuple)
                                 else str(v)))


def held_out_eval(ctx: Context, net: Network, test_cfg: DataConfig | None,
                  classes: list | None, train: LabelledData, spec: PreprocessSpec,
                  val_src: Source | None, test_src: Source | None = None
                  ) -> tuple[str, float, Any] | None:
    """(which, accuracy, EvalResult) on the test data, else on the validation split."""
    if test_src is None and test_cfg is not None:
        test = load_labelled(test_cfg, classes, "test", known=train.labels)
        test_src = image_source(test, spec, ctx.rt, False, ctx.worker_seed)
        test_src = take(test_src, part_rows(len(test_src), ctx.info))
    src, which = (test_src, "test") if test_src is not None else (val_src, "validation")
    if src is None or not total(ctx, len(src)):
        return None
    res = evaluate(net, src, ctx.eval_batch, ctx.rt)
    return which, res.accuracy, res


@dataclass
class HeadRun:
    """State of the head stage shared by its phases and the probe."""

    net: Network
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
    check_train_config(cfg.train)
    data = load_labelled(cfg.data, cfg.data.classes, "data")
    backbone, spec = build_model(cfg.model, cfg.preprocess)
    base, head = cut_with_head(backbone.model, cfg.model.cut, cfg.model.pool, spec.input_size,
                               cfg.head, len(data.labels), cfg.model.name)
    if rt.channels_last:
        base.to(memory_format=torch.channels_last)
    net = Network(base, head, spec, rt.channels_last).to(rt.device)
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
    train_samples = total(ctx, len(train_src))
    if cfg.unfreeze.layers > 0 and cfg.unfreeze.epochs > 0:
        epochs += run_unfreeze(ctx, run, gen, details)
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


def prepare_head_run(ctx: Context, net: Network, data: LabelledData,
                     spec: PreprocessSpec) -> HeadRun:
    """Image sources, replaced by cached features when the base is frozen and not augmented."""
    cfg, rt = ctx.cfg, ctx.rt
    seed = cfg.runtime.seed
    train_all = image_source(data, spec, rt, cfg.train.augment, ctx.worker_seed)
    train_rows = share_rows(len(train_all), ctx.info, seed)
    train_all = take(train_all, train_rows)
    test_cfg = test_config(cfg)
    test_data = load_labelled(test_cfg, cfg.data.classes, "test", known=data.labels) \
        if test_cfg is not None else None
    test = image_source(test_data, spec, rt, False, ctx.worker_seed) \
        if test_data is not None else None
    test_rows = part_rows(len(test), ctx.info) if test is not None else None
    test = take(test, test_rows)
    shape = tuple(net.base.output_shape)
    nbytes = 4 * int(np.prod(shape)) * (len(train_all) + (len(test) if test else 0))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", ctx.info.world_size))
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


def cache(ctx: Context, net: Network, src: Source, where: str, keys: list[str],
          data_cfg: DataConfig, digest: dict, name: str) -> Source:
    """Features of ``src`` (this process's share); a disk cache of each process goes to
    ``cache/ranks/world-N/rank-R`` as the parts of an extraction do."""
    fingerprint = {**digest, "data": {k: getattr(data_cfg, k) for k in
                                      ("source", "root", "list_file", "dataset", "split")}}
    folder = ctx.out / "cache"
    if ctx.info.enabled:
        folder = folder / "ranks" / f"world-{ctx.info.world_size}" / f"rank-{ctx.info.rank:05d}"
    return cache_features(net, src, where, ctx.rt, ctx.eval_batch, net.base.output_shape,
                          keys, folder / name, fingerprint, ctx.progress)


def epoch_saver(ctx: Context, run: HeadRun) -> Any:
    def on_epoch(record: dict) -> None:
        ctx.metrics.write({"stage": "head", **record})
        if ctx.checkpoint_due():
            save_classifier(ctx.out / MODEL_FILE, run.net.base, run.net.head,
                            {**run.meta, "epoch": record["epoch"], "metrics": record})
    return on_epoch


def run_unfreeze(ctx: Context, run: HeadRun, gen: torch.Generator, details: dict) -> int:
    """Phase 2: the last ``unfreeze.layers`` base layers train at ``lr * lr_mult``; images
    go through the base every step (no cache)."""
    cfg, rt, net = ctx.cfg, ctx.rt, run.net
    layers = base_layers(net.base, run.spec.input_size)
    if cfg.unfreeze.layers > len(layers):
        names = ", ".join(n for n, _ in layers)
        raise ConfigError(f"unfreeze.layers={cfg.unfreeze.layers} but the base has only "
                          f"{len(layers)} layers with weights ({names})")
    details["unfrozen"] = unfreeze_last(net, layers, cfg.unfreeze.layers, cfg.unfreeze.train_bn)
    seed = cfg.runtime.seed
    images = image_source(run.data, run.spec, rt, cfg.train.augment, ctx.worker_seed)
    images = take(images, share_rows(len(images), ctx.info, seed))
    train_src, val_src = split(images, cfg.train.val_split, seed)
    if run.test is not None and run.test.kind == "features":
        test_data = load_labelled(test_config(cfg), cfg.data.classes, "test",
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
    return res.epochs_run


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


def run_probe(ctx: Context, run: HeadRun) -> StageResult:
    """Logistic regression on frozen base features of ``probe.samples`` training items.

    Under torchrun the items are drawn from every process's share; their features (and
    those of the test parts) are gathered, rank 0 fits, and every process gets its result.
    """
    from .probe import fit_logistic, stratified_split

    cfg, pcfg = ctx.cfg, ctx.cfg.probe
    t0 = time.perf_counter()
    sizes = gather(ctx, len(run.train_all))
    offset = sum(sizes[:ctx.info.rank])
    n = min(pcfg.samples, sum(sizes))
    rng = np.random.default_rng(cfg.runtime.seed)
    rows = np.sort(rng.choice(sum(sizes), n, replace=False))
    mine = rows[(rows >= offset) & (rows < offset + len(run.train_all))] - offset
    train = gathered_features(ctx, run.net, run.train_all.subset(mine))
    test = gathered_features(ctx, run.net, run.test) if run.test is not None else None
    if not ctx.main:
        return from_main(ctx, None)
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
    return from_main(ctx, stage)


def gathered_features(ctx: Context, net: Network, src: Source
                      ) -> tuple[torch.Tensor, np.ndarray] | None:
    """``features_of`` every process's ``src``, in rank order, in rank 0 (None elsewhere)."""
    if not ctx.info.enabled:
        return features_of(ctx, net, src)
    x, y = features_of(ctx, net, src) if len(src) else (None, None)
    parts = gather_to_main(ctx, (x.cpu().numpy(), y) if x is not None else None)
    if parts is None:
        return None
    parts = [p for p in parts if p is not None]
    return (torch.from_numpy(np.concatenate([p[0] for p in parts])).to(ctx.rt.device),
            np.concatenate([p[1] for p in parts]))


def features_of(ctx: Context, net: Network, src: Source) -> tuple[torch.Tensor, np.ndarray]:
    """Flattened frozen-base features (from the cache when ``src`` holds features)."""
    xs, ys = [], []
    net.eval()
    for x, y, _ in src.batches(torch.arange(len(src)), ctx.eval_batch):
        if src.kind == "images":
            with torch.inference_mode(), ctx.rt.autocast():
                x = net.base(net.prepare(x))
        xs.append(x.float().flatten(1))
        ys.append(y.cpu())
    return torch.cat(xs), torch.cat(ys).numpy()


# ---------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------


def preflight(cfg: FinetuneConfig) -> None:
    """Check settings and labelled data before any training, so mistakes fail in seconds."""
    from .heads import build_head

    check_train_config(cfg.train)
    world = dist_info().world_size
    for key, tcfg in (("train", cfg.train), ("pretrain.train", cfg.pretrain.train)):
        if tcfg.batch_size < world and (key == "train" or cfg.pretrain.enabled):
            raise ConfigError(f"{key}.batch_size={tcfg.batch_size} is smaller than the {world} "
                              "processes; it is the global batch, split across them: raise it")
    if cfg.pretrain.enabled:
        check_train_config(cfg.pretrain.train, "pretrain.train")
        load_labelled(cfg.data, cfg.pretrain.classes, "pretrain")
    load_labelled(cfg.data, cfg.data.classes, "data")
    test_config(cfg)
    if cfg.head.type != "keep":
        build_head(replace(cfg.head, in_features=None), 1, 2)
    u = cfg.unfreeze
    for ok, key, value in ((cfg.probe.samples >= 0, "probe.samples", cfg.probe.samples),
                           (u.layers >= 0, "unfreeze.layers", u.layers),
                           (u.epochs >= 0, "unfreeze.epochs", u.epochs),
                           (u.lr_mult > 0, "unfreeze.lr_mult", u.lr_mult),
                           (cfg.output.save_interval_s >= 0, "output.save_interval_s",
                            cfg.output.save_interval_s)):
        if not ok:
            raise ConfigError(f"{key} must be {'> 0' if key.endswith('mult') else '>= 0'}, "
                              f"got {value}")


def run_finetune(cfg: FinetuneConfig) -> FinetuneResult:
    """Run every configured stage; see the module docstring for what is written where.

    Under torchrun every process calls it (it joins the process group); rank 0 writes the
    outputs and every process returns the same result once they are written.
    """
    info = init_distributed(cfg.runtime.device)
    rt = share_runtime(resolve_runtime(cfg.runtime), cfg.runtime, info)
    apply_runtime(rt)
    cfg, note = resolve_data(cfg)
    preflight(cfg)
    out = Path(cfg.output.dir)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
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
        stages.append(run_probe(ctx, run))
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


def main(argv: Sequence[str] | None = None) -> FinetuneResult:
    from .cli import config_parser, load_cli_config

    parser = config_parser("python -m transferlab.finetune",
                           "Fine-tune a head on a frozen, cut backbone (optionally after "
                           "pretraining the backbone), with an optional logistic probe.")
    args = parser.parse_args(argv)
    cfg = load_cli_config(args, FinetuneConfig)
    try:
        result = run_finetune(cfg)
    finally:
        shutdown()
    if dist_info().is_main:  # under torchrun: rank 0 prints, once
        print(result.data_note)
        print(result.table())
        print(f"checkpoint: {result.checkpoint}   metrics: {result.output_dir / 'metrics.json'}")
    return result


if __name__ == "__main__":
    import sys

    from .cli import run_cli

    sys.exit(run_cli(main))

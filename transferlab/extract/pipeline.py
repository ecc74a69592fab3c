"""The pieces of an extraction run, shared by the single-cut and the multi-cut runner: what
the rows depend on (fingerprint), the loader, computing and storing batches, metadata, and
merging torchrun parts."""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ..config import ExtractConfig, to_dict
from ..data.datasets import ImageDataset
from ..data.fingerprint import data_fingerprint, label_fingerprint
from ..data.preprocess import PreprocessSpec
from ..data.webdataset import item_shards
from ..errors import ConfigError
from ..models.engine import FeatureComputer, Pending
from ..models.extractor import ExtractorBundle
from ..runtime.cores import LoadFollower, usable_cores
from ..runtime.device import (
    Runtime,
    apply_runtime,
    default_batch_size,
    resolve_runtime,
)
from ..runtime.distributed import (
    DistInfo,
    all_gather,
    barrier,
    part_range,
    rank_dir,
    share_runtime,
)
from ..runtime.record import compute_record
from ..store.format import PCA_FILE, library_versions
from ..store.merge import merge_stores
from ..store.reader import FeatureStore
from ..store.writer import StoreWriter
from .batches import ViewsDataset, aligned_batches, run_loader
from .reduce import (
    ReduceSpec,
    SparseProjection,
    collect_rows,
    open_pca,
    parse_reduce,
    reduce_fingerprint,
)


@dataclass
class ExtractResult:
    """What a run did: counts, speed and the finished store."""

    store: FeatureStore
    written: int  # images whose features were written by this run
    failed: int  # images that could not be read in this run
    skipped: int  # images already done by an earlier (killed) run
    seconds: float  # whole run, model building included
    loop_seconds: float  # reading, computing and writing only
    out_dir: Path
    stale: int = 0  # stored keys (rows or failures) not in this run's data: deleted files?
    stores: dict[str, FeatureStore] = field(default_factory=dict)  # several cuts: per cut dir

    def _where(self) -> str:
        if self.stores:
            return (f"; {len(self.stores)} stores in {self.out_dir}: " + ", ".join(
                f"{name}/ ({s.features.shape[1]}-d)" for name, s in self.stores.items()))
        return (f"; store: {self.out_dir} ({len(self.store)} rows, "
                f"{self.store.features.shape[1]}-d {self.store.dtype})")

    @property
    def images_per_second(self) -> float:
        return self.written / self.loop_seconds if self.loop_seconds > 0 else 0.0

    def summary(self) -> str:
        return (f"{self.written} images written, {self.failed} failed, {self.skipped} skipped "
                f"(already done) in {self.seconds:.1f} s ({self.images_per_second:.1f} images/s)"
                + self._where()
                + (f"; {self.stale} stored items are not in this run's data (deleted or moved "
                   "files? another data.limit or data.classes?): kept; output.overwrite=true "
                   "rebuilds the store"
                   if self.stale else ""))



# ---------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------


def fingerprint(cfg: ExtractConfig, bundle: ExtractorBundle, compute: dict,
                class_names: list[str] | None) -> dict:
    """What the features and their labels depend on; a store written with another
    fingerprint is refused. ``compute`` is ``compute_settings``: the resolved settings that
    change the numbers beyond the store dtype's rounding."""
    model = cfg.model
    weights: Any = None
    if model.weights:
        weights = {"file": str(Path(model.weights).resolve()), "sha256": file_hash(model.weights)}
    elif bundle.backbone.source == "checkpoint":
        weights = {"checkpoint": str(Path(model.name).resolve()), "sha256": file_hash(model.name)}
    elif model.pretrained:
        weights = "pretrained"
    else:
        weights = {"random_init_seed": cfg.runtime.seed}
    return {"backbone": model.name, "source": bundle.backbone.source, "weights": weights,
            "kwargs": model.kwargs, "num_classes": model.num_classes, "in_chans": model.in_chans,
            # pooling as asked (null: the model's own) and as applied after the cut: a timm
            # head pools inside the model, so its pool_after_cut is 'none' for avg and max
            "cut": str(bundle.extractor.cut), "pool": model.pool,
            "pool_after_cut": bundle.extractor.pool_name,
            "preprocess": bundle.spec.to_dict(), "views": cfg.output.views,
            "view_mode": cfg.output.view_mode if cfg.output.views else None,
            "decode": "torchvision" if cfg.runtime.gpu_decode else "pil",  # kernels differ
            "compute": compute, "data": data_fingerprint(cfg.data),
            "labels": label_fingerprint(cfg.data, class_names)}


def compute_settings(compute: FeatureComputer) -> dict:
    """``meta["compute"]``: what computed the rows (queries are embedded alike); BatchNorm
    folding counts only where a BatchNorm was folded (not where fx cannot trace the cut)."""
    return compute_record(compute.rt, compute.folded)


def file_hash(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()



def run_runtime(cfg: ExtractConfig, extractor: nn.Module, info: DistInfo) -> tuple[Runtime, int]:
    """The resolved runtime of this process (applied) and the batch size."""
    conv_net = any(isinstance(m, nn.Conv2d) for m in extractor.modules())
    rt = share_runtime(resolve_runtime(cfg.runtime, conv_net), cfg.runtime, info)
    apply_runtime(rt)
    return rt, default_batch_size(rt, cfg.runtime.batch_size)


def rank_items(full: ImageDataset, info: DistInfo) -> tuple[int, int]:
    """[start, stop) of this rank's items: a contiguous share of the items, or of whole
    shards for tar shards (no shard is read by two ranks); either way rank order is item
    order, so the merged store lists the items as a single process does."""
    shards = item_shards(full)
    if shards is None or not len(shards):
        return part_range(len(full), info.rank, info.world_size)
    firsts = np.flatnonzero(np.r_[True, shards[1:] != shards[:-1]])  # each shard's first item
    bounds = np.r_[firsts, len(shards)]
    start, stop = part_range(len(firsts), info.rank, info.world_size)
    return int(bounds[start]), int(bounds[stop])


def stored_keys(store: FeatureStore) -> set[str]:
    return set(store.keys) | {key for key, _ in store.failures}


def merge_ranks(out_dir: Path, info: DistInfo, counts: tuple[int, int, int], meta: dict,
                total: int) -> tuple[tuple[int, int, int], FeatureStore]:
    """After every rank has closed its part, rank 0 writes the merged index and metadata."""
    gathered = all_gather(counts)
    summed = tuple(int(sum(c[i] for c in gathered)) for i in range(3))
    if info.is_main:
        parts = [rank_dir(out_dir, DistInfo(r, info.world_size)) for r in range(info.world_size)]
        merged_meta = {**meta, "counts": {"dataset": total, "written_this_run": summed[0],
                                          "failed_this_run": summed[1],
                                          "skipped_this_run": summed[2]},
                       "world_size": info.world_size}
        merge_stores(out_dir, parts, merged_meta)
    barrier()
    return summed, FeatureStore.open(out_dir)


def check_gpu_decode(cfg: ExtractConfig, spec: PreprocessSpec) -> None:
    from ..data.gpudecode import check_spec

    if cfg.output.views:
        raise ConfigError("runtime.gpu_decode works on plain images only; set output.views=0 "
                          "or runtime.gpu_decode=false (augmented views are made with PIL)")
    check_spec(spec)


def build_loader(cfg: ExtractConfig, todo: ImageDataset, positions: list[int],
                 spec: PreprocessSpec, rt: Runtime, batch_size: int
                 ) -> tuple[DataLoader, Callable[[dict], dict] | None]:
    """The loader over the items still to do, in batches aligned with the full dataset, and
    the step (if any) that finishes its batches in the main process (GPU decoding)."""
    batches = aligned_batches(positions, batch_size)
    if not cfg.runtime.gpu_decode:
        threads = rt.threads if rt.num_workers == 0 else 1  # workers decode in parallel
        views = ViewsDataset(todo, spec, cfg.output.views, cfg.runtime.seed, threads)
        return run_loader(views, batches, rt), None
    from ..data.gpudecode import BatchDecoder, RawJpegDataset, collate_raw

    raw = RawJpegDataset(todo, spec, cfg.data.max_image_pixels)
    decoder = BatchDecoder(spec, rt.device, cfg.data.max_image_pixels)
    if rt.is_cuda:  # workers read bytes; the GPU decodes whole batches in the main process
        return run_loader(raw, batches, rt, collate_raw, pin_memory=False), decoder
    return run_loader(raw, batches, rt, decoder.collate), None  # CPU: decode in the workers


def load_follower(cfg: ExtractConfig, rt: Runtime, loader: DataLoader,
                  info: DistInfo) -> LoadFollower | None:
    """The automatic CPU thread count, kept matched to the cores other processes leave free
    during the run (``runtime.cores.LoadFollower``), for torch and the decode threads. Not
    for an explicit ``runtime.threads``, loader workers (their CPU time would look like
    another process's) or torchrun (its processes split the machine between them)."""
    if rt.is_cuda or cfg.runtime.threads or rt.num_workers or info.enabled:
        return None
    views = loader.dataset

    def use(threads: int) -> None:
        torch.set_num_threads(threads)
        if isinstance(views, ViewsDataset):
            views.decode_threads = threads

    return LoadFollower(usable_cores(sample_load=False), rt.threads, use)


def progress_bar(total: int, enabled: bool) -> Any:
    from ..runtime.progress import tqdm_bar

    return tqdm_bar(total=total, unit="img", disable=not enabled, dynamic_ncols=True,
                desc="extract")


def write_features(loader: DataLoader, compute: FeatureComputer, writer: StoreWriter,
                   cfg: ExtractConfig, bar: Any, on_batch: Callable[[int], None] | None,
                   prepare: Callable[[dict], dict] | None = None,
                   chunk: int | None = None,
                   follower: LoadFollower | None = None) -> tuple[int, int]:
    """Compute and store every batch; returns (written, failed) counts of items that were
    not done before this run. Batch i + 1 is launched before batch i's rows are stored.

    A batch of B images with views is B * (1 + views) images: they go through the model
    ``chunk`` (the batch size) at a time, so views do not multiply the activation memory."""
    chunk = max(1, chunk or cfg.runtime.batch_size or 1 << 30)
    done = writer.done_keys
    counts = [0, 0]
    pending: tuple[dict, list[Pending]] | None = None

    def store(batch: dict, handles: list[Pending]) -> None:
        failures = [f for f in batch["failures"] if f[0] not in done]
        if failures:
            writer.add_failures(failures)
        if handles:
            b = len(batch["key"])
            # several outputs side by side (a multi-cut writer splits them by width)
            rows = np.concatenate([np.concatenate(compute.finish(h), axis=1) for h in handles])
            feats = rows.reshape(b, cfg.output.views + 1, -1)
            add_rows(writer, batch["key"], batch["label"].numpy(), feats, cfg)
        new = sum(key not in done for key in batch["key"])
        counts[0] += new
        counts[1] += len(failures)
        bar.update(new + len(failures))
        if on_batch is not None:
            on_batch(counts[0] + counts[1])

    for batch in loader:
        if follower is not None:  # between batches: no forward pass is running
            follower.step()
        if prepare is not None:
            batch = prepare(batch)
        images = batch["image"]  # (B, 1 + views, C, H, W) uint8, or None: all failed
        handles = [] if images is None else [  # memory of at most chunk images' activations
            compute.start(part) for part in images.flatten(0, 1).split(chunk)]
        if pending is not None:
            store(*pending)
        pending = (batch, handles)
    if pending is not None:
        store(*pending)
    return counts[0], counts[1]


def add_rows(writer: StoreWriter, keys: list[str], labels: np.ndarray, feats: np.ndarray,
             cfg: ExtractConfig) -> None:
    """One row per image, or one per view (view 0 = plain), or the mean of all views."""
    b, v, d = feats.shape
    if v == 1 or cfg.output.view_mode == "mean":
        writer.add(keys, labels, feats.mean(axis=1) if v > 1 else feats[:, 0])
        return
    writer.add([k for k in keys for _ in range(v)], np.repeat(labels, v), feats.reshape(b * v, d),
               np.tile(np.arange(v), b))


def store_meta(cfg: ExtractConfig, bundle: ExtractorBundle, rt: Runtime, dataset: ImageDataset,
               batch_size: int, counts: tuple[int, int, int], seconds: float,
               follower: LoadFollower | None = None) -> dict:
    """``meta.json``; ``runtime.threads`` is the count the run started with, and
    ``runtime.threads_followed`` lists [seconds into the loop, threads] of each change."""
    written, failed, skipped = counts
    followed = {"threads_followed": follower.changes} if follower is not None else {}
    return {"backbone": cfg.model.name, "source": bundle.backbone.source,
            "cut": str(bundle.extractor.cut), "pool": cfg.model.pool,
            "pool_after_cut": bundle.extractor.pool_name,
            "output_shape": list(bundle.extractor.output_shape),
            "preprocess": bundle.spec.to_dict(), "class_names": dataset.class_names,
            "runtime": {**rt.to_dict(), "batch_size": batch_size,
                        "gpu_decode": cfg.runtime.gpu_decode, **followed},
            "versions": library_versions(), "config": to_dict(cfg),
            "counts": {"dataset": len(dataset), "written_this_run": written,
                       "failed_this_run": failed, "skipped_this_run": skipped},
            "elapsed_seconds": round(seconds, 3)}


# ---- output.reduce: rows projected to D dims (extract/reduce.py) --------------------------


def reduce_settings(cfg: ExtractConfig, d_in: int, available: int, info: DistInfo,
                    prints: dict) -> ReduceSpec | None:
    """The parsed ``output.reduce``; its record goes into the fingerprint (only when set, so
    stores without it keep theirs)."""
    spec = parse_reduce(cfg.output.reduce)
    if spec is None:
        return None
    if spec.kind == "pca" and info.enabled:
        raise ConfigError("output.reduce=pca is fitted by one process; under torchrun use "
                          f"output.reduce=srp:{spec.dim}, or run one process")
    prints["reduce"] = reduce_fingerprint(spec, d_in, cfg.runtime.seed, available)
    return spec


def output_width(bundle: Any, spec: ReduceSpec | None) -> int:
    return spec.dim if spec is not None else bundle.extractor.feature_dim


def open_reduction(cfg: ExtractConfig, spec: ReduceSpec | None, writer: StoreWriter,
                   dataset: ImageDataset, compute: FeatureComputer,
                   batch_size: int) -> nn.Module | None:
    """The projection for ``compute``'s rows: srp drawn from the seed; pca fitted on the first
    rows before any row is stored, and loaded (never refitted) when the store has rows."""
    if spec is None:
        return None
    return make_reduction(cfg, spec, compute.model_dims[0], writer, len(dataset),
                          lambda k: first_rows(cfg, dataset, k, compute, batch_size))


def make_reduction(cfg: ExtractConfig, spec: ReduceSpec, d_in: int, writer: StoreWriter,
                   available: int, sample: Callable[[int], Any]) -> nn.Module:
    """srp from the seed; pca fitted on ``sample(K)`` unless ``writer``'s store has rows."""
    if spec.kind == "srp":
        return SparseProjection(d_in, spec.dim, cfg.runtime.seed)
    return open_pca(writer.dir / PCA_FILE, spec, d_in, available, sample,
                    resuming=writer.dim is not None)


def first_rows(cfg: ExtractConfig, dataset: ImageDataset, k: int, compute: FeatureComputer,
               batch_size: int) -> Any:
    """Unreduced plain-view rows of the first ``k`` items (what pca is fitted on)."""
    plain = replace(cfg, output=replace(cfg.output, views=0))
    positions = list(range(min(k, len(dataset))))
    loader, prepare = build_loader(plain, dataset.subset(positions), positions, compute.spec,
                                   compute.rt, batch_size)

    def rows() -> Any:
        for batch in loader:
            batch = prepare(batch) if prepare is not None else batch
            if batch["image"] is not None:
                yield np.concatenate(compute(batch["image"][:, 0]), axis=1)
    return collect_rows(rows(), k)

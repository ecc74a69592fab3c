"""``run_extract(cfg)``: frozen features of every image into feature stores on disk.

Every image of the data source goes through the frozen, cut backbone once; one vector per
image (or per augmented view) and cut lands in a resumable feature store
(``transferlab.store``). One cut writes ``output.dir``; several cuts (``model.cut`` a list,
``all-stages``, ``all-blocks``) share the decode and the base's forward pass and write one
store per cut (``extract.cutstore``). Kill it at any moment and rerun the same command: it
continues where the last finished shard ended.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ..config import ExtractConfig, save_config
from ..data.datasets import ImageDataset
from ..data.preprocess import PreprocessSpec
from ..data.sources import build_dataset
from ..errors import ComputeError, ConfigError
from ..models.engine import FeatureComputer, Pending, engine_batch_size
from ..models.extractor import extractor_from_config
from ..models.multicut import is_multi_cut
from ..runtime.cores import LoadFollower, usable_cores
from ..runtime.device import (
    Runtime,
    apply_runtime,
    resolve_runtime,
    seed_everything,
)
from ..runtime.distributed import (
    DistInfo,
    all_gather,
    barrier,
    init_distributed,
    part_range,
    rank_dir,
    share_runtime,
)
from ..runtime.record import compute_record
from ..store.format import PCA_FILE
from ..store.reader import FeatureStore
from ..store.writer import StoreWriter
from .batches import ViewsDataset, aligned_batches, resume_positions, run_loader
from .cutstore import CutStore, cut_stores, fingerprint, open_writers, store_meta
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
    """What a run did: counts, speed and the finished store(s)."""

    store: FeatureStore  # several cuts: the first cut's
    written: int  # images whose features were written by this run
    failed: int  # images that could not be read in this run
    skipped: int  # images already done by an earlier (killed) run
    seconds: float  # whole run, model building included
    loop_seconds: float  # reading, computing and writing only
    out_dir: Path
    stale: int = 0  # stored keys (rows or failures) not in this run's data: deleted files?
    stores: dict[str, FeatureStore] = field(default_factory=dict)  # several cuts: per cut dir
    prepared: str = ""  # how the backend got ready (an exported graph's first-run export time)

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
                + (f"; {self.prepared}" if self.prepared else "")
                + (f"; {self.stale} stored items are not in this run's data (deleted or moved "
                   "files? another data.limit or data.classes?): kept; output.overwrite=true "
                   "rebuilds the store"
                   if self.stale else ""))


def run_extract(cfg: ExtractConfig, progress: bool = False,
                on_batch: Callable[[int], None] | None = None) -> ExtractResult:
    """Features of every item of ``cfg.data`` into the store(s) under ``cfg.output.dir``: data
    checked first, then the cuts (one dummy forward). ``on_batch(n_done)`` runs after each
    stored batch; any exception keeps the finished shards: rerunning resumes. With several
    cuts the result's ``store`` is the first cut's and ``stores`` maps each cut's directory
    name to its store."""
    multi = is_multi_cut(cfg.model.cut)
    if multi and (cfg.runtime.compile or cfg.runtime.backend == "compile"):
        raise ConfigError("runtime.compile does not apply to several cuts in one pass (the "
                          "cuts are taken by hooks); set runtime.compile=false and "
                          "runtime.backend to eager, onnxruntime or openvino")
    started = time.time()
    info = init_distributed(cfg.runtime.device)
    full = build_dataset(cfg.data)  # a missing or empty root fails before the model loads
    dataset = full.subset(range(*rank_items(full, info, cfg.data.source == "webdataset")))
    seed_everything(cfg.runtime.seed)  # random-init weights are reproducible
    bundle = extractor_from_config(cfg.model, cfg.preprocess)
    spec = bundle.spec
    dataset.image_mode, dataset.draft_size = spec.image_mode, spec.scale_size()
    rt, batch_size = run_runtime(cfg, bundle.extractor, spec.input_size, info)
    if cfg.runtime.gpu_decode:
        check_gpu_decode(cfg, spec)
    calibration = calibration_images(cfg, dataset, spec, rt, batch_size, info)
    # several cuts are taken by hooks, which torch.fx cannot trace: they run unfolded
    compute = FeatureComputer(bundle.extractor, spec, rt, cfg.runtime.compile,
                              cfg.runtime.fold_bn and not multi, calibration)
    compute.hflip = cfg.output.hflip
    computed = compute_record(rt, compute.folded, compute.backend,  # as it happened
                              compute.calibration.record() if compute.calibration else None)
    stores = cut_stores(cfg, bundle, multi)
    prints = [fingerprint(s, bundle, computed, full.class_names) for s in stores]
    reduces = reduce_specs(cfg, stores, multi, len(full), info, prints)
    writers = open_writers(cfg, stores, prints, info)
    try:  # on any exception: abort, keeping finished shards for a resume
        if info.is_main:  # one writer: ranks racing on one file lose each other's rename
            for store in stores:
                save_config(store.cfg, store.dir / "config.yaml")
        reductions = open_reductions(cfg, reduces, writers, dataset, compute, batch_size)
        compute.set_reduce(reductions)
        # no rows: sets each store's width now (also when every image fails) and checks it
        for writer, width in zip(writers, compute.out_dims):
            writer.add([], [], np.zeros((0, width), np.float32))
        done = frozenset.intersection(*(w.done_keys for w in writers))  # in every store
        skipped = sum(key in done for key in dataset.keys)
        positions = resume_positions(dataset.keys, done, batch_size)
        loader, prepare = build_loader(cfg, dataset.subset(positions), positions, spec, rt,
                                       batch_size)
        follower = load_follower(cfg, rt, loader, info)
        loop_started = time.time()
        with progress_bar(len(dataset) - skipped, progress and info.is_main) as bar:
            try:
                written, failed = write_features(loader, compute, writers, done, cfg, bar,
                                                 on_batch, prepare, batch_size, follower)
            except ComputeError as exc:  # the engine's line, and what a rerun does
                raise ComputeError(f"{exc} (finished shards are kept)") from None
        counts = (written, failed, skipped)
        metas = [{**store_meta(s, bundle, rt, dataset, batch_size, counts,
                               time.time() - started, follower), "compute": computed,
                  **({"reduce": r.record()} if r is not None else {})}
                 for s, r in zip(stores, reductions)]
        closed = [w.close(m) for w, m in zip(writers, metas)]
    finally:
        for writer in writers:
            writer.abort()  # a no-op for closed writers
    loop_seconds = time.time() - loop_started
    if info.enabled:
        merged = [merge_ranks(s.dir, info, counts, m, len(full)) for s, m in zip(stores, metas)]
        counts, closed = merged[0][0], [c for _, c in merged]
        loop_seconds = time.time() - loop_started
    stale = len(stored_keys(closed[0]) - set(full.keys))
    per_cut = {s.dir.name: c for s, c in zip(stores, closed)} if multi else {}
    return ExtractResult(closed[0], *counts, time.time() - started, loop_seconds,
                         Path(cfg.output.dir), stale, per_cut,
                         compute.prepared.summary() if compute.backend != "eager" else "")


# ---------------------------------------------------------------------------------------
# The run's settings: runtime, this rank's items, the loader
# ---------------------------------------------------------------------------------------


def run_runtime(cfg: ExtractConfig, extractor: nn.Module, input_size: Sequence[int],
                info: DistInfo) -> tuple[Runtime, int]:
    """The resolved runtime of this process (applied) and the batch size."""
    conv_net = any(isinstance(m, nn.Conv2d) for m in extractor.modules())
    rt = share_runtime(resolve_runtime(cfg.runtime, conv_net), cfg.runtime, info)
    apply_runtime(rt)
    return rt, engine_batch_size(extractor, input_size, rt, cfg.runtime.batch_size)


def rank_items(full: ImageDataset, info: DistInfo, tar_shards: bool) -> tuple[int, int]:
    """[start, stop) of this rank's items: a contiguous share of the items, or of whole
    shards for tar shards (no shard is read by two ranks); either way rank order is item
    order, so the merged store lists the items as a single process does."""
    shards = None
    if tar_shards and info.enabled:
        from ..data.webdataset import item_shards

        shards = item_shards(full)
    if shards is None or not len(shards):
        return part_range(len(full), info.rank, info.world_size)
    firsts = np.flatnonzero(np.r_[True, shards[1:] != shards[:-1]])  # each shard's first item
    bounds = np.r_[firsts, len(shards)]
    start, stop = part_range(len(firsts), info.rank, info.world_size)
    return int(bounds[start]), int(bounds[stop])


def calibration_images(cfg: ExtractConfig, dataset: ImageDataset, spec: PreprocessSpec,
                       rt: Runtime, batch_size: int, info: DistInfo) -> torch.Tensor | None:
    """precision int8: the plain views of the first ``runtime.calibration_images`` items in
    dataset order (those that decode), uint8, what the graph is quantised on: a resume
    decodes the same images, so it calibrates alike (and finds the graph in the cache)."""
    if rt.precision != "int8":
        return None
    if info.enabled:
        raise ConfigError("runtime.precision=int8 is calibrated by one process; run without "
                          "torchrun, or set runtime.precision=fp32")
    plain = replace(cfg, output=replace(cfg.output, views=0))
    positions = list(range(min(cfg.runtime.calibration_images, len(dataset))))
    loader, prepare = build_loader(plain, dataset.subset(positions), positions, spec, rt,
                                   batch_size)
    images = []
    for batch in loader:
        batch = prepare(batch) if prepare is not None else batch
        if batch["image"] is not None:
            images.append(batch["image"][:, 0].cpu())
    if not images:
        raise ConfigError(f"runtime.precision=int8: none of the first {len(positions)} images "
                          "could be read to calibrate on; check data")
    return torch.cat(images)


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


# ---------------------------------------------------------------------------------------
# The loop: compute and store every batch
# ---------------------------------------------------------------------------------------


def write_features(loader: DataLoader, compute: FeatureComputer, writers: Sequence[StoreWriter],
                   done: frozenset[str], cfg: ExtractConfig, bar: Any,
                   on_batch: Callable[[int], None] | None,
                   prepare: Callable[[dict], dict] | None = None,
                   chunk: int | None = None,
                   follower: LoadFollower | None = None) -> tuple[int, int]:
    """Compute every batch and store output i in ``writers[i]``; returns (written, failed)
    counts of items not ``done`` before this run (a writer skips keys it holds). Batch
    i + 1 is launched before batch i's rows are stored.

    A batch of B images with views is B * (1 + views) images: they go through the model
    ``chunk`` (the batch size) at a time, so views do not multiply the activation memory."""
    chunk = max(1, chunk or cfg.runtime.batch_size or 1 << 30)
    counts = [0, 0]
    pending: tuple[dict, list[Pending]] | None = None

    def store(batch: dict, handles: list[Pending]) -> None:
        failures = [f for f in batch["failures"] if f[0] not in done]
        if failures:
            for writer in writers:
                writer.add_failures(failures)
        if handles:
            b = len(batch["key"])
            parts = [compute.finish(h) for h in handles]  # per chunk: one array per output
            for i, writer in enumerate(writers):
                rows = np.concatenate([p[i] for p in parts])
                add_rows(writer, batch["key"], batch["label"].numpy(),
                         rows.reshape(b, cfg.output.views + 1, -1), cfg)
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


# ---------------------------------------------------------------------------------------
# output.reduce: rows projected to D dims on the device (extract/reduce.py)
# ---------------------------------------------------------------------------------------


def reduce_specs(cfg: ExtractConfig, stores: Sequence[CutStore], multi: bool, available: int,
                 info: DistInfo, prints: Sequence[dict]) -> list[ReduceSpec | None]:
    """``output.reduce`` per cut, recorded in that cut's fingerprint (only when set, so
    stores without it keep theirs). Of several cuts, one already at most D wide is stored
    as it is (what a single-cut run of it without reduce records)."""
    spec = parse_reduce(cfg.output.reduce)
    out: list[ReduceSpec | None] = []
    for store, p in zip(stores, prints):
        d_in = store.output.feature_dim
        if spec is None or (multi and d_in <= spec.dim):
            out.append(None)
            continue
        if spec.kind == "pca" and info.enabled:
            raise ConfigError("output.reduce=pca is fitted by one process; under torchrun use "
                              f"output.reduce=srp:{spec.dim}, or run one process")
        p["reduce"] = reduce_fingerprint(spec, d_in, cfg.runtime.seed, available)
        out.append(spec)
    return out


def open_reductions(cfg: ExtractConfig, specs: Sequence[ReduceSpec | None],
                    writers: Sequence[StoreWriter], dataset: ImageDataset,
                    compute: FeatureComputer, batch_size: int) -> list[nn.Module | None]:
    """Each cut's projection: srp drawn from the seed; pca fitted on the first rows of that
    cut (read once for all cuts) before any row is stored, and loaded (never refitted) when
    its store has rows."""
    samples: dict[int, list[torch.Tensor]] = {}

    def sample(k: int, i: int) -> torch.Tensor:
        if k not in samples:
            samples[k] = first_rows(cfg, dataset, k, compute, batch_size)
        return samples[k][i]

    out: list[nn.Module | None] = []
    for i, (spec, d_in, writer) in enumerate(zip(specs, compute.model_dims, writers)):
        if spec is None:
            out.append(None)
        elif spec.kind == "srp":
            out.append(SparseProjection(d_in, spec.dim, cfg.runtime.seed))
        else:
            out.append(open_pca(writer.dir / PCA_FILE, spec, d_in, len(dataset),
                                lambda k, i=i: sample(k, i), resuming=writer.dim is not None))
    return out


def first_rows(cfg: ExtractConfig, dataset: ImageDataset, k: int, compute: FeatureComputer,
               batch_size: int) -> list[torch.Tensor]:
    """Unreduced plain-view rows of the first ``k`` items, per output (what pca is fitted
    on)."""
    plain = replace(cfg, output=replace(cfg.output, views=0))
    positions = list(range(min(k, len(dataset))))
    loader, prepare = build_loader(plain, dataset.subset(positions), positions, compute.spec,
                                   compute.rt, batch_size)
    rows = []  # per batch, one array per output
    for batch in loader:
        batch = prepare(batch) if prepare is not None else batch
        if batch["image"] is not None:
            rows.append(compute(batch["image"][:, 0]))
    return [collect_rows((r[i] for r in rows), k) for i in range(len(compute.model_dims))]


# ---------------------------------------------------------------------------------------
# torchrun: each rank writes its part; rank 0 merges them
# ---------------------------------------------------------------------------------------


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
        from ..store.merge import merge_stores  # torchrun only

        merge_stores(out_dir, parts, merged_meta)
    barrier()
    return summed, FeatureStore.open(out_dir)

"""``python -m transferlab.extract CONFIG [key=value ...]``: frozen features to a store on disk.

Every image of the data source goes through the frozen, cut backbone; one vector per image
(or per augmented view) lands in a resumable feature store (``transferlab.store``). Kill it
at any moment and rerun the same command: it continues where the last finished shard ended.
"""
from __future__ import annotations

import hashlib
import logging
import random
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, get_worker_info

from .cli import config_parser, load_cli_config, run_cli
from .config import ExtractConfig, RuntimeConfig, from_dict, save_config, to_dict
from .errors import ConfigError
from .datasets import ImageDataset, build_dataset, collate_skip_errors
from .extractor import ExtractorBundle, extractor_from_config
from .imageio import decoding_threads_quiet, load_image
from .preprocess import DeviceNormalize, PreprocessSpec, build_transform
from .runtime import Runtime, apply_runtime, default_batch_size, resolve_runtime, seed_everything
from .distributed import (DistInfo, barrier, dist_info, init_distributed, part_range,
                          shutdown)
from .store import (FeatureStore, StoreWriter, check_fingerprint, library_versions,
                    merge_stores)

log = logging.getLogger(__name__)


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

    @property
    def images_per_second(self) -> float:
        return self.written / self.loop_seconds if self.loop_seconds > 0 else 0.0

    def summary(self) -> str:
        return (f"{self.written} images written, {self.failed} failed, {self.skipped} skipped "
                f"(already done) in {self.seconds:.1f} s ({self.images_per_second:.1f} images/s)"
                f"; store: {self.out_dir} ({len(self.store)} rows, "
                f"{self.store.features.shape[1]}-d {self.store.dtype})"
                + (f"; {self.stale} stored items are not in this run's data (deleted or moved "
                   "files? another data.limit or data.classes?): kept; output.overwrite=true "
                   "rebuilds the store"
                   if self.stale else ""))


# ---------------------------------------------------------------------------------------
# Views: the plain image plus N augmented ones, seeded per key (so resumes are identical)
# ---------------------------------------------------------------------------------------


class ViewsDataset(Dataset):
    """Wraps an untransformed dataset; item image = (1 + views, C, H, W) uint8 tensor.

    ``decode_threads`` > 1: a batch read in the main process (no loader workers) is decoded
    by that many threads (PIL releases the GIL), between forward passes, on the cores the
    forward pass uses; measured in BENCHMARKS.md. Augmented views seed the global RNGs per
    key, so with views the items are read one by one.
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
        except Exception as exc:  # noqa: BLE001 - one odd image must not kill a worker
            item["image"], item["error"] = None, transform_failure(exc)
        return item

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """A batch for the DataLoader, in the order of ``indices``."""
        threads = min(self.decode_threads, len(indices))
        if threads < 2 or self.views or get_worker_info() is not None:
            return [self[i] for i in indices]
        with decoding_threads_quiet(), ThreadPoolExecutor(threads, "decode") as pool:
            return list(pool.map(self.__getitem__, indices))

    def transform(self, image: Any, key: str) -> torch.Tensor:
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


# ---------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------


def fingerprint(cfg: ExtractConfig, bundle: ExtractorBundle) -> dict:
    """What the features depend on; a store written with another fingerprint is refused."""
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
            "data": {"source": cfg.data.source, "root": absolute(cfg.data.root),
                     "list_file": absolute(cfg.data.list_file), "dataset": cfg.data.dataset,
                     "split": cfg.data.split}}


def absolute(path: str | None) -> str | None:
    """The same folder named from another working directory is the same data."""
    return None if path is None else str(Path(path).expanduser().resolve())


def file_hash(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def prepare_model(extractor: nn.Module, rt: Runtime, compile_model: bool = False,
                  fold_input: Sequence[int] | None = None) -> nn.Module:
    """The extractor ready to run: BatchNorm folded (checked on an input of ``fold_input``
    size; None: not folded), on the device, channels_last, compiled."""
    model = extractor
    if fold_input is not None:
        from .fusion import fold_batchnorm

        model = fold_batchnorm(model, fold_input)
    model = model.to(rt.device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile_model:
        model = torch.compile(model)
    return model


def make_loader(dataset: Dataset, batches: list[list[int]], rt: Runtime,
                collate_fn: Callable[[list], dict] = collate_skip_errors) -> DataLoader:
    kwargs: dict[str, Any] = {}
    if rt.num_workers > 0:
        kwargs.update(prefetch_factor=4, persistent_workers=False)
    return DataLoader(dataset, batch_sampler=batches, num_workers=rt.num_workers,
                      pin_memory=rt.is_cuda, collate_fn=collate_fn, **kwargs)


Pending = tuple[torch.Tensor, Any]  # feature rows (on the host once ready), CUDA event or None


class FeatureComputer:
    """uint8 batches -> float32 feature rows on the host (normalise on the device, AMP).

    ``start`` launches a batch and, on CUDA, queues the copy of its rows into pinned host
    memory; ``finish`` waits for them. The runner starts batch i + 1 before finishing batch i,
    so the GPU computes while the host stores rows and fetches the next batch.
    """

    def __init__(self, extractor: nn.Module, spec: PreprocessSpec, rt: Runtime,
                 compile_model: bool = False, fold_bn: bool = False):
        self.rt = rt
        self.model = prepare_model(extractor, rt, compile_model,
                                   spec.input_size if fold_bn else None)
        self.normalize = DeviceNormalize(spec.mean, spec.std).to(rt.device)

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        return self.finish(self.start(images))

    @torch.inference_mode()
    def start(self, images: torch.Tensor) -> Pending:
        x = images.to(self.rt.device, non_blocking=True)
        x = self.normalize(x)
        if self.rt.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with self.rt.autocast():
            out = self.model(x)
        out = out.float().flatten(1)
        if not out.is_cuda:
            return out, None
        host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
        host.copy_(out, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return host, ready

    @staticmethod
    def finish(pending: Pending) -> np.ndarray:
        rows, ready = pending
        if ready is not None:
            ready.synchronize()
        return rows.numpy()


def run_extract(cfg: ExtractConfig, progress: bool = False,
                on_batch: Callable[[int], None] | None = None) -> ExtractResult:
    """Extract features of every item of ``cfg.data`` into the store at ``cfg.output.dir``.

    The data source is checked first, then the cut is validated (one dummy forward) before
    any image is decoded. ``progress`` shows a tqdm bar; ``on_batch(n_done)`` is called after
    each stored batch (tests use it to interrupt). An exception (KeyboardInterrupt included)
    leaves the finished shards on disk: rerunning the same config resumes.
    """
    started = time.time()
    info = init_distributed(cfg.runtime.device)
    full = build_dataset(cfg.data)  # a missing or empty root fails before the model loads
    dataset = full.subset(range(*part_range(len(full), info.rank, info.world_size)))
    seed_everything(cfg.runtime.seed)  # random-init weights are reproducible
    bundle = extractor_from_config(cfg.model, cfg.preprocess)
    spec = bundle.spec
    dataset.image_mode, dataset.draft_size = spec.image_mode, spec.scale_size()
    conv_net = any(isinstance(m, nn.Conv2d) for m in bundle.extractor.modules())
    rt = resolve_runtime(cfg.runtime, conv_net)
    apply_runtime(rt)
    batch_size = default_batch_size(rt, cfg.runtime.batch_size)
    if cfg.runtime.gpu_decode:
        check_gpu_decode(cfg, spec)
    out_dir = Path(cfg.output.dir)
    prints = fingerprint(cfg, bundle)
    if info.enabled:
        if info.is_main:  # the merged store must not mix with one written otherwise
            check_fingerprint(out_dir, prints, cfg.output.dtype, cfg.output.overwrite)
        barrier()
    writer = StoreWriter(rank_dir(out_dir, info), prints, cfg.output.dtype,
                         cfg.output.shard_size, cfg.output.overwrite)
    with writer:  # on any exception: abort, keeping finished shards for a resume
        if info.is_main:  # one writer: ranks racing on one file lose each other's rename
            save_config(cfg, out_dir / "config.yaml")
        # no rows: sets the store's width now (also when every image fails) and checks it
        writer.add([], [], np.zeros((0, bundle.extractor.feature_dim), np.float32))
        done = writer.done_keys
        skipped = sum(key in done for key in dataset.keys)
        positions = resume_positions(dataset.keys, done, batch_size)
        loader, prepare = build_loader(cfg, dataset.subset(positions), positions, spec, rt,
                                       batch_size)
        compute = FeatureComputer(bundle.extractor, spec, rt, cfg.runtime.compile,
                                  cfg.runtime.fold_bn)
        loop_started = time.time()
        bar = progress_bar(len(dataset) - skipped, progress and info.is_main)
        with bar:
            written, failed = write_features(loader, compute, writer, cfg, bar, on_batch,
                                             prepare)
        loop_seconds = time.time() - loop_started
        counts = (written, failed, skipped)
        meta = store_meta(cfg, bundle, rt, dataset, batch_size, counts, time.time() - started)
        store = writer.close(meta)
    if info.enabled:
        counts, store = merge_ranks(out_dir, info, counts, meta, len(full))
        loop_seconds = time.time() - loop_started
    stale = len(stored_keys(store) - set(full.keys))
    return ExtractResult(store, *counts, time.time() - started, loop_seconds, out_dir, stale)


def stored_keys(store: FeatureStore) -> set[str]:
    return set(store.keys) | {key for key, _ in store.failures}


def rank_dir(out_dir: Path, info: DistInfo) -> Path:
    """Where this process writes: the store itself, or its own part under torchrun.

    Parts are keyed by world size too: a rerun with another process count starts afresh
    instead of mixing differently split parts.
    """
    if not info.enabled:
        return out_dir
    return out_dir / "ranks" / f"world-{info.world_size}" / f"rank-{info.rank:05d}"


def merge_ranks(out_dir: Path, info: DistInfo, counts: tuple[int, int, int], meta: dict,
                total: int) -> tuple[tuple[int, int, int], FeatureStore]:
    """After every rank has closed its part, rank 0 writes the merged index and metadata."""
    gathered: list[Any] = [None] * info.world_size
    torch.distributed.all_gather_object(gathered, counts)
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
    from .gpudecode import check_spec

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
        return make_loader(views, batches, rt), None
    from .gpudecode import BatchDecoder, RawJpegDataset, collate_raw

    raw = RawJpegDataset(todo, spec, cfg.data.max_image_pixels)
    decoder = BatchDecoder(spec, rt.device, cfg.data.max_image_pixels)
    if rt.is_cuda:  # workers read bytes; the GPU decodes whole batches in the main process
        return make_loader(raw, batches, rt, collate_raw), decoder
    return make_loader(raw, batches, rt, decoder.collate), None  # CPU: decode in the workers


def progress_bar(total: int, enabled: bool) -> Any:
    from .progress import tqdm_bar

    return tqdm_bar(total=total, unit="img", disable=not enabled, dynamic_ncols=True,
                desc="extract")


def write_features(loader: DataLoader, compute: FeatureComputer, writer: StoreWriter,
                   cfg: ExtractConfig, bar: Any, on_batch: Callable[[int], None] | None,
                   prepare: Callable[[dict], dict] | None = None) -> tuple[int, int]:
    """Compute and store every batch; returns (written, failed) counts of items that were
    not done before this run. Batch i + 1 is launched before batch i's rows are stored."""
    done = writer.done_keys
    counts = [0, 0]
    pending: tuple[dict, Pending | None] | None = None

    def store(batch: dict, handle: Pending | None) -> None:
        failures = [f for f in batch["failures"] if f[0] not in done]
        if failures:
            writer.add_failures(failures)
        if handle is not None:
            b = len(batch["key"])
            feats = compute.finish(handle).reshape(b, cfg.output.views + 1, -1)
            add_rows(writer, batch["key"], batch["label"].numpy(), feats, cfg)
        new = sum(key not in done for key in batch["key"])
        counts[0] += new
        counts[1] += len(failures)
        bar.update(new + len(failures))
        if on_batch is not None:
            on_batch(counts[0] + counts[1])

    for batch in loader:
        if prepare is not None:
            batch = prepare(batch)
        images = batch["image"]  # (B, 1 + views, C, H, W) uint8, or None: all failed
        handle = compute.start(images.flatten(0, 1)) if images is not None else None
        if pending is not None:
            store(*pending)
        pending = (batch, handle)
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
               batch_size: int, counts: tuple[int, int, int], seconds: float) -> dict:
    written, failed, skipped = counts
    return {"backbone": cfg.model.name, "source": bundle.backbone.source,
            "cut": str(bundle.extractor.cut), "pool": cfg.model.pool,
            "pool_after_cut": bundle.extractor.pool_name,
            "output_shape": list(bundle.extractor.output_shape),
            "preprocess": bundle.spec.to_dict(), "class_names": dataset.class_names,
            "runtime": {**rt.to_dict(), "batch_size": batch_size,
                        "gpu_decode": cfg.runtime.gpu_decode},
            "versions": library_versions(), "config": to_dict(cfg),
            "counts": {"dataset": len(dataset), "written_this_run": written,
                       "failed_this_run": failed, "skipped_this_run": skipped},
            "elapsed_seconds": round(seconds, 3)}


# ---------------------------------------------------------------------------------------
# Embedding a few images with a store's own model (search queries, notebooks)
# ---------------------------------------------------------------------------------------


def bundle_from_meta(meta: dict) -> ExtractorBundle:
    """Rebuild the extractor a store was written with, from its metadata."""
    cfg = from_dict(ExtractConfig, meta["config"], "store metadata")
    seed_everything(cfg.runtime.seed)  # same random-init weights as the run that wrote it
    return extractor_from_config(cfg.model, cfg.preprocess)


def embed_images(meta: dict, paths: Sequence[str | Path], batch_size: int = 16) -> np.ndarray:
    """Features of image files, computed exactly as the store of ``meta`` computed its rows."""
    bundle = bundle_from_meta(meta)
    cfg = from_dict(ExtractConfig, meta["config"], "store metadata")
    rt = resolve_runtime(RuntimeConfig())  # this machine's device, not the writer's
    compute = FeatureComputer(bundle.extractor, bundle.spec, rt, fold_bn=cfg.runtime.fold_bn)
    transform = build_transform(bundle.spec, normalize=False)
    spec = bundle.spec
    rows = []
    for chunk in chunks(list(paths), batch_size):
        images = [transform(load_image(p, spec.image_mode, spec.scale_size(),
                                       cfg.data.max_image_pixels)) for p in chunk]
        rows.append(compute(torch.stack(images)))
    return np.concatenate(rows) if rows else np.zeros((0, bundle.extractor.feature_dim), np.float32)


def chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def main(argv: Sequence[str] | None = None) -> None:
    parser = config_parser("python -m transferlab.extract",
                           "Extract frozen features of every image into a feature store.")
    args = parser.parse_args(argv)
    cfg = load_cli_config(args, ExtractConfig)
    try:
        result = run_extract(cfg, progress=cfg.runtime.progress)
    finally:
        shutdown()
    if dist_info().is_main:
        print(result.summary())


if __name__ == "__main__":
    raise SystemExit(run_cli(main))

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .cli import config_parser, load_cli_config, run_cli
from .config import ExtractConfig, RuntimeConfig, from_dict, save_config, to_dict
from .datasets import ImageDataset, build_dataset, collate_skip_errors
from .extractor import ExtractorBundle, extractor_from_config
from .imageio import load_image
from .preprocess import DeviceNormalize, PreprocessSpec, build_transform
from .runtime import Runtime, apply_runtime, default_batch_size, resolve_runtime, seed_everything
from .store import FeatureStore, StoreWriter, library_versions

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

    @property
    def images_per_second(self) -> float:
        return self.written / self.loop_seconds if self.loop_seconds > 0 else 0.0

    def summary(self) -> str:
        return (f"{self.written} images written, {self.failed} failed, {self.skipped} skipped "
                f"(already done) in {self.seconds:.1f} s ({self.images_per_second:.1f} images/s)"
                f"; store: {self.out_dir} ({len(self.store)} rows, "
                f"{self.store.features.shape[1]}-d {self.store.dtype})")


# ---------------------------------------------------------------------------------------
# Views: the plain image plus N augmented ones, seeded per key (so resumes are identical)
# ---------------------------------------------------------------------------------------


class ViewsDataset(Dataset):
    """Wraps an untransformed dataset; item image = (1 + views, C, H, W) uint8 tensor."""

    def __init__(self, base: ImageDataset, spec: PreprocessSpec, views: int, seed: int):
        self.base = base
        self.plain = build_transform(spec, normalize=False)
        self.augment = build_transform(spec, normalize=False, augment=True) if views else None
        self.views = views
        self.seed = seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.base[i]
        image = item["image"]
        tensors = [self.plain(image)]
        if self.views:
            seed = zlib.crc32(item["key"].encode("utf-8")) ^ self.seed
            random.seed(seed)
            torch.manual_seed(seed)
            tensors += [self.augment(image) for _ in range(self.views)]
        item["image"] = torch.stack(tensors)
        return item


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
            "cut": str(bundle.extractor.cut), "pool": bundle.extractor.pool_name,
            "preprocess": bundle.spec.to_dict(), "views": cfg.output.views,
            "view_mode": cfg.output.view_mode if cfg.output.views else None,
            "data": {"source": cfg.data.source, "root": cfg.data.root,
                     "list_file": cfg.data.list_file, "dataset": cfg.data.dataset,
                     "split": cfg.data.split}}


def file_hash(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def prepare_model(extractor: nn.Module, rt: Runtime, compile_model: bool) -> nn.Module:
    model = extractor.to(rt.device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile_model:
        model = torch.compile(model)
    return model


def make_loader(dataset: Dataset, batches: list[list[int]], rt: Runtime) -> DataLoader:
    kwargs: dict[str, Any] = {}
    if rt.num_workers > 0:
        kwargs.update(prefetch_factor=4, persistent_workers=False)
    return DataLoader(dataset, batch_sampler=batches, num_workers=rt.num_workers,
                      pin_memory=rt.is_cuda, collate_fn=collate_skip_errors, **kwargs)


class FeatureComputer:
    """uint8 batches -> float32 feature rows on the host (normalise on the device, AMP)."""

    def __init__(self, extractor: nn.Module, spec: PreprocessSpec, rt: Runtime,
                 compile_model: bool = False):
        self.rt = rt
        self.model = prepare_model(extractor, rt, compile_model)
        self.normalize = DeviceNormalize(spec.mean, spec.std).to(rt.device)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        x = images.to(self.rt.device, non_blocking=True)
        x = self.normalize(x)
        if self.rt.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with self.rt.autocast():
            out = self.model(x)
        return out.float().flatten(1).cpu().numpy()


def run_extract(cfg: ExtractConfig, progress: bool = False,
                on_batch: Callable[[int], None] | None = None) -> ExtractResult:
    """Extract features of every item of ``cfg.data`` into the store at ``cfg.output.dir``.

    The cut is validated (one dummy forward) before any data is read. ``progress`` shows a
    tqdm bar; ``on_batch(n_done)`` is called after each batch (tests use it to interrupt).
    """
    started = time.time()
    seed_everything(cfg.runtime.seed)  # random-init weights are reproducible
    bundle = extractor_from_config(cfg.model, cfg.preprocess)
    conv_net = any(isinstance(m, nn.Conv2d) for m in bundle.extractor.modules())
    rt = resolve_runtime(cfg.runtime, conv_net)
    apply_runtime(rt)
    batch_size = default_batch_size(rt, cfg.runtime.batch_size)
    spec = bundle.spec
    dataset = build_dataset(cfg.data, None, spec.image_mode, spec.scale_size())
    out_dir = Path(cfg.output.dir)
    writer = StoreWriter(out_dir, fingerprint(cfg, bundle), cfg.output.dtype,
                         cfg.output.shard_size, cfg.output.overwrite)
    with writer:
        save_config(cfg, out_dir / "config.yaml")
        done = writer.done_keys
        positions = [i for i, key in enumerate(dataset.keys) if key not in done]
        todo = ViewsDataset(dataset.subset(positions), spec, cfg.output.views, cfg.runtime.seed)
        compute = FeatureComputer(bundle.extractor, spec, rt, cfg.runtime.compile)
        loader = make_loader(todo, aligned_batches(positions, batch_size), rt)
        loop_started = time.time()
        written, failed = write_features(loader, compute, writer, cfg, len(todo), progress,
                                         on_batch)
        loop_seconds = time.time() - loop_started
        seconds = time.time() - started
        meta = store_meta(cfg, bundle, rt, dataset, batch_size, written, failed, seconds)
        store = writer.close(meta)
    return ExtractResult(store, written, failed, len(dataset) - len(positions), seconds,
                         loop_seconds, out_dir)


def write_features(loader: DataLoader, compute: FeatureComputer, writer: StoreWriter,
                   cfg: ExtractConfig, total: int, progress: bool,
                   on_batch: Callable[[int], None] | None) -> tuple[int, int]:
    from tqdm.auto import tqdm

    views = cfg.output.views
    written = failed = 0
    with tqdm(total=total, unit="img", disable=not progress, dynamic_ncols=True,
              desc="extract") as bar:
        for batch in loader:
            if batch["failures"]:
                writer.add_failures(batch["failures"])
                failed += len(batch["failures"])
            if batch["image"] is not None:
                images = batch["image"]  # (B, 1 + views, C, H, W)
                b = images.shape[0]
                feats = compute(images.flatten(0, 1)).reshape(b, views + 1, -1)
                add_rows(writer, batch["key"], batch["label"].numpy(), feats, cfg)
                written += b
            bar.update(len(batch["key"]) + len(batch["failures"]))
            if on_batch is not None:
                on_batch(written + failed)
    return written, failed


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
               batch_size: int, written: int, failed: int, seconds: float) -> dict:
    return {"backbone": cfg.model.name, "source": bundle.backbone.source,
            "cut": str(bundle.extractor.cut), "pool": bundle.extractor.pool_name,
            "output_shape": list(bundle.extractor.output_shape),
            "preprocess": bundle.spec.to_dict(), "class_names": dataset.class_names,
            "runtime": {**rt.to_dict(), "batch_size": batch_size},
            "versions": library_versions(), "config": to_dict(cfg),
            "counts": {"dataset": len(dataset), "written_this_run": written,
                       "failed_this_run": failed},
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
    compute = FeatureComputer(bundle.extractor, bundle.spec, rt)
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
    result = run_extract(cfg, progress=cfg.runtime.progress)
    print(result.summary())


if __name__ == "__main__":
    raise SystemExit(run_cli(main))

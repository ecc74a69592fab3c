"""Several cut points in one pass: one decode and one base forward per batch, one store per
cut in ``output.dir/<cut>/`` (``model.cut`` a list, ``all-stages`` or ``all-blocks``).

Each per-cut store records what a single-cut run of that cut records (its cut, pool, the
same data, preprocessing and compute settings), so it is identical, row for row, to that
run with ``runtime.fold_bn=false`` (hooks cannot be folded by torch.fx: multi-cut runs do
not fold BatchNorm) and resumes like any store. Failures are shared: every store lists them.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from torch import nn

from ..config import ExtractConfig, save_config
from ..data.sources import build_dataset
from ..errors import ConfigError
from ..models.engine import FeatureComputer
from ..models.multicut import ConcatCuts, multi_extractor_from_config, per_cut_configs
from ..runtime.device import seed_everything
from ..runtime.distributed import barrier, init_distributed, rank_dir
from ..store.owner import prepare_store
from ..store.writer import StoreWriter
from .batches import resume_positions
from .pipeline import (
    ExtractResult,
    build_loader,
    check_gpu_decode,
    compute_settings,
    fingerprint,
    first_rows,
    load_follower,
    make_reduction,
    merge_ranks,
    progress_bar,
    rank_items,
    reduce_settings,
    run_runtime,
    store_meta,
    stored_keys,
    write_features,
)
from .reduce import ReduceSpec, parse_reduce


class CutWriters:
    """The per-cut ``StoreWriter``s behind the one-writer interface ``write_features`` uses:
    each batch's rows are split by cut width; a key is done only once every store has it."""

    def __init__(self, writers: Sequence[StoreWriter], dims: Sequence[int]):
        self.writers = list(writers)
        self.dims = list(dims)
        self.done_keys = frozenset.intersection(*(w.done_keys for w in self.writers))

    def add(self, keys: Sequence[str], labels: Any, features: np.ndarray,
            views: Any = None) -> None:
        start = 0
        for writer, dim in zip(self.writers, self.dims):  # a writer skips keys it holds
            writer.add(keys, labels, features[:, start:start + dim], views)
            start += dim

    def add_failures(self, failures: Sequence[tuple[str, str]]) -> None:
        for writer in self.writers:
            writer.add_failures(failures)

    def abort(self) -> None:
        for writer in self.writers:
            writer.abort()


def cut_bundles(cfg: ExtractConfig, bundle: Any) -> list[tuple[ExtractConfig, Any]]:
    """Per cut: the single-cut config and the stand-in bundle (cut, pool, shape) that
    ``fingerprint`` and ``store_meta`` read, so a per-cut store records a single-cut run."""
    multi = bundle.extractor
    out = []
    for i, model_cfg in enumerate(per_cut_configs(cfg.model, multi)):
        part = SimpleNamespace(cut=multi.cuts[i], pool_name=multi.pool_names[i],
                               output_shape=multi.output_shapes[i],
                               feature_dim=multi.feature_dims[i])
        out.append((replace(cfg, model=model_cfg),
                    SimpleNamespace(extractor=part, backbone=bundle.backbone, spec=bundle.spec)))
    return out


def run_multi_extract(cfg: ExtractConfig, progress: bool = False,
                      on_batch: Callable[[int], None] | None = None) -> ExtractResult:
    """``run_extract`` for several cuts; the result's ``store`` is the first cut's and
    ``stores`` maps each cut's directory name to its store."""
    check_multi(cfg)
    started = time.time()
    info = init_distributed(cfg.runtime.device)
    full = build_dataset(cfg.data)  # a missing or empty root fails before the model loads
    dataset = full.subset(range(*rank_items(full, info)))
    seed_everything(cfg.runtime.seed)
    bundle = multi_extractor_from_config(cfg.model, cfg.preprocess)
    spec, flat = bundle.spec, ConcatCuts(bundle.extractor)
    dataset.image_mode, dataset.draft_size = spec.image_mode, spec.scale_size()
    rt, batch_size = run_runtime(cfg, bundle.extractor, info)
    if cfg.runtime.gpu_decode:
        check_gpu_decode(cfg, spec)
    compute = FeatureComputer(bundle.extractor, spec, rt, fold_bn=False)
    computed = compute_settings(compute)
    parts = cut_bundles(cfg, bundle)
    dirs = [Path(cfg.output.dir) / name for name in bundle.dirs]
    prints = [fingerprint(c, b, computed, full.class_names) for c, b in parts]
    reduces = cut_reduces(cfg, flat.feature_dims, len(full), info, prints)
    writers = CutWriters(open_writers(cfg, dirs, prints, info), flat.feature_dims)
    try:
        if info.is_main:
            for out, (cut_cfg, _) in zip(dirs, parts):
                save_config(cut_cfg, out / "config.yaml")
        reductions = open_cut_reductions(cfg, reduces, writers, flat, dataset, compute,
                                         batch_size)
        for writer, dim in zip(writers.writers, writers.dims):  # sets and checks each width
            writer.add([], [], np.zeros((0, dim), np.float32))
        skipped = sum(key in writers.done_keys for key in dataset.keys)
        positions = resume_positions(dataset.keys, writers.done_keys, batch_size)
        loader, prepare = build_loader(cfg, dataset.subset(positions), positions, spec, rt,
                                       batch_size)
        follower = load_follower(cfg, rt, loader, info)
        loop_started = time.time()
        with progress_bar(len(dataset) - skipped, progress and info.is_main) as bar:
            written, failed = write_features(loader, compute, writers, cfg, bar, on_batch,
                                             prepare, batch_size, follower)
        counts = (written, failed, skipped)
        metas = []
        for (cut_cfg, cut_bundle), reduction in zip(parts, reductions):
            meta = store_meta(cut_cfg, cut_bundle, rt, dataset, batch_size, counts,
                              time.time() - started, follower)
            metas.append({**meta, "compute": computed,
                          **({"reduce": reduction.record()} if reduction is not None else {})})
        stores = [w.close(m) for w, m in zip(writers.writers, metas)]
    finally:
        writers.abort()  # a no-op for closed writers: finished shards stay for a resume
    loop_seconds = time.time() - loop_started
    if info.enabled:
        merged = [merge_ranks(out, info, counts, m, len(full)) for out, m in zip(dirs, metas)]
        counts, stores = merged[0][0], [s for _, s in merged]
    stale = len(stored_keys(stores[0]) - set(full.keys))
    return ExtractResult(stores[0], *counts, time.time() - started, loop_seconds,
                         dirs[0].parent, stale, dict(zip(bundle.dirs, stores)))


def check_multi(cfg: ExtractConfig) -> None:
    if cfg.runtime.compile:
        raise ConfigError("runtime.compile does not apply to several cuts in one pass (the "
                          "cuts are taken by hooks); set runtime.compile=false")


def cut_reduces(cfg: ExtractConfig, dims: Sequence[int], available: int, info: Any,
                prints: Sequence[dict]) -> list[ReduceSpec | None]:
    """``output.reduce`` per cut, recorded in that cut's fingerprint; a cut already at most
    D wide is stored as it is (what a single-cut run of it without reduce records)."""
    spec = parse_reduce(cfg.output.reduce)
    return [None if spec is None or d <= spec.dim else
            reduce_settings(cfg, d, available, info, p) for d, p in zip(dims, prints)]


def open_cut_reductions(cfg: ExtractConfig, specs: Sequence[ReduceSpec | None],
                        writers: CutWriters, flat: ConcatCuts, dataset: Any,
                        compute: FeatureComputer, batch_size: int) -> list[nn.Module | None]:
    """Each cut's projection (pca fitted on the first rows of that cut, sampled once for
    all cuts), set on ``compute`` by ``set_reduce``; the writers take the new widths."""
    if not any(specs):
        return [None] * len(specs)
    samples: dict[int, Any] = {}

    def sample(k: int, i: int) -> Any:
        if k not in samples:
            samples[k] = flat.split(first_rows(cfg, dataset, k, compute, batch_size))
        return samples[k][i]

    modules = [None if s is None else make_reduction(
        cfg, s, d, w, len(dataset), lambda k, i=i: sample(k, i))
        for i, (s, d, w) in enumerate(zip(specs, flat.feature_dims, writers.writers))]
    compute.set_reduce(modules)
    writers.dims = compute.out_dims
    return modules


def open_writers(cfg: ExtractConfig, dirs: Sequence[Path], prints: Sequence[dict],
                 info: Any) -> list[StoreWriter]:
    """One writer per cut (under torchrun each cut's root prepared by rank 0 first); if one
    cannot open (another configuration, a lock), the opened ones are released."""
    if info.enabled:
        if info.is_main:
            for out, p in zip(dirs, prints):
                prepare_store(out, p, cfg.output.dtype, cfg.output.overwrite)
        barrier()
    writers: list[StoreWriter] = []
    try:
        for out, p in zip(dirs, prints):
            writers.append(StoreWriter(rank_dir(out, info), p, cfg.output.dtype,
                                       cfg.output.shard_size, cfg.output.overwrite))
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
    return writers

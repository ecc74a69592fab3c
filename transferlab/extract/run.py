"""``python -m transferlab.extract CONFIG [key=value ...]``: frozen features to a store on disk.

Every image of the data source goes through the frozen, cut backbone; one vector per image
(or per augmented view) lands in a resumable feature store (``transferlab.store``). Kill it
at any moment and rerun the same command: it continues where the last finished shard ended.
Several cuts (``model.cut`` a list, ``all-stages``, ``all-blocks``) go to ``extract.multi``.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from ..config import ExtractConfig, save_config
from ..data.datasets import ImageDataset
from ..data.sources import build_dataset
from ..errors import ConfigError
from ..models.extractor import extractor_from_config
from ..models.multicut import is_multi_cut
from ..runtime.device import (
    seed_everything,
)
from ..runtime.distributed import (
    DistInfo,
    barrier,
    init_distributed,
    rank_dir,
)
from ..store.format import PCA_FILE
from ..store.owner import prepare_store
from ..store.writer import StoreWriter
from .batches import resume_positions
from .compute import FeatureComputer
from .pipeline import (
    ExtractResult,
    build_loader,
    check_gpu_decode,
    compute_settings,
    fingerprint,
    merge_ranks,
    progress_bar,
    rank_items,
    run_runtime,
    store_meta,
    stored_keys,
    write_features,
)
from .reduce import (
    ReduceSpec,
    SparseProjection,
    collect_rows,
    open_pca,
    parse_reduce,
    reduce_fingerprint,
)


def run_extract(cfg: ExtractConfig, progress: bool = False,
                on_batch: Callable[[int], None] | None = None) -> ExtractResult:
    """Features of every item of ``cfg.data`` into the store at ``cfg.output.dir``: data
    checked first, then the cut (one dummy forward). ``on_batch(n_done)`` runs after each
    stored batch; any exception keeps the finished shards: rerunning resumes."""
    if is_multi_cut(cfg.model.cut):
        from .multi import run_multi_extract

        return run_multi_extract(cfg, progress, on_batch)
    started = time.time()
    info = init_distributed(cfg.runtime.device)
    full = build_dataset(cfg.data)  # a missing or empty root fails before the model loads
    dataset = full.subset(range(*rank_items(full, info)))
    seed_everything(cfg.runtime.seed)  # random-init weights are reproducible
    bundle = extractor_from_config(cfg.model, cfg.preprocess)
    spec = bundle.spec
    dataset.image_mode, dataset.draft_size = spec.image_mode, spec.scale_size()
    rt, batch_size = run_runtime(cfg, bundle.extractor, info)
    if cfg.runtime.gpu_decode:
        check_gpu_decode(cfg, spec)
    out_dir = Path(cfg.output.dir)
    compute = FeatureComputer(bundle.extractor, spec, rt, cfg.runtime.compile,
                              cfg.runtime.fold_bn)
    computed = compute_settings(compute)
    prints = fingerprint(cfg, bundle, computed, full.class_names)
    reduce_spec = reduce_settings(cfg, bundle.extractor.feature_dim, len(full), info, prints)
    if info.enabled:
        if info.is_main:  # the merged store must not mix with one written otherwise
            prepare_store(out_dir, prints, cfg.output.dtype, cfg.output.overwrite)
        barrier()
    writer = StoreWriter(rank_dir(out_dir, info), prints, cfg.output.dtype,
                         cfg.output.shard_size, cfg.output.overwrite)
    with writer:  # on any exception: abort, keeping finished shards for a resume
        if info.is_main:  # one writer: ranks racing on one file lose each other's rename
            save_config(cfg, out_dir / "config.yaml")
        reduction = open_reduction(cfg, reduce_spec, writer, dataset, compute, batch_size)
        # no rows: sets the store's width now (also when every image fails) and checks it
        writer.add([], [], np.zeros((0, output_width(bundle, reduce_spec)), np.float32))
        done = writer.done_keys
        skipped = sum(key in done for key in dataset.keys)
        positions = resume_positions(dataset.keys, done, batch_size)
        loader, prepare = build_loader(cfg, dataset.subset(positions), positions, spec, rt,
                                       batch_size)
        loop_started = time.time()
        bar = progress_bar(len(dataset) - skipped, progress and info.is_main)
        with bar:
            written, failed = write_features(loader, compute, writer, cfg, bar, on_batch,
                                             prepare, batch_size)
        loop_seconds = time.time() - loop_started
        counts = (written, failed, skipped)
        meta = store_meta(cfg, bundle, rt, dataset, batch_size, counts, time.time() - started)
        meta.update(compute=computed, **({"reduce": reduction.record()} if reduction else {}))
        store = writer.close(meta)
    if info.enabled:
        counts, store = merge_ranks(out_dir, info, counts, meta, len(full))
        loop_seconds = time.time() - loop_started
    stale = len(stored_keys(store) - set(full.keys))
    return ExtractResult(store, *counts, time.time() - started, loop_seconds, out_dir, stale)


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
    """The projection, set on ``compute``: srp drawn from the seed; pca fitted on the first
    rows before any row is stored, and loaded (never refitted) when the store has rows."""
    if spec is None:
        return None
    d_in = compute.model_width
    if spec.kind == "srp":
        module: nn.Module = SparseProjection(d_in, spec.dim, cfg.runtime.seed)
    else:
        module = open_pca(writer.dir / PCA_FILE, spec, d_in, len(dataset),
                          lambda k: first_rows(cfg, dataset, k, compute, batch_size),
                          resuming=writer.dim is not None)
    compute.set_reduce(module)
    return module


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
                yield compute(batch["image"][:, 0])
    return collect_rows(rows(), k)

"""``python -m transferlab.extract CONFIG [key=value ...]``: frozen features to a store on disk.

Every image of the data source goes through the frozen, cut backbone; one vector per image
(or per augmented view) lands in a resumable feature store (``transferlab.store``). Kill it
at any moment and rerun the same command: it continues where the last finished shard ended.
Several cuts (``model.cut`` a list, ``all-stages``, ``all-blocks``) go to ``extract.multi``.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..config import ExtractConfig, save_config
from ..data.sources import build_dataset
from ..models.engine import FeatureComputer
from ..models.extractor import extractor_from_config
from ..models.multicut import is_multi_cut
from ..runtime.device import (
    seed_everything,
)
from ..runtime.distributed import (
    barrier,
    init_distributed,
    rank_dir,
)
from ..store.owner import prepare_store
from ..store.writer import StoreWriter
from .batches import resume_positions
from .pipeline import (
    ExtractResult,
    build_loader,
    check_gpu_decode,
    compute_settings,
    fingerprint,
    load_follower,
    merge_ranks,
    open_reduction,
    output_width,
    progress_bar,
    rank_items,
    reduce_settings,
    run_runtime,
    store_meta,
    stored_keys,
    write_features,
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
        compute.set_reduce([reduction])
        # no rows: sets the store's width now (also when every image fails) and checks it
        writer.add([], [], np.zeros((0, output_width(bundle, reduce_spec)), np.float32))
        done = writer.done_keys
        skipped = sum(key in done for key in dataset.keys)
        positions = resume_positions(dataset.keys, done, batch_size)
        loader, prepare = build_loader(cfg, dataset.subset(positions), positions, spec, rt,
                                       batch_size)
        follower = load_follower(cfg, rt, loader, info)
        loop_started = time.time()
        with progress_bar(len(dataset) - skipped, progress and info.is_main) as bar:
            written, failed = write_features(loader, compute, writer, cfg, bar, on_batch,
                                             prepare, batch_size, follower)
        loop_seconds = time.time() - loop_started
        counts = (written, failed, skipped)
        meta = store_meta(cfg, bundle, rt, dataset, batch_size, counts, time.time() - started,
                          follower)
        meta.update(compute=computed, **({"reduce": reduction.record()} if reduction else {}))
        store = writer.close(meta)
    if info.enabled:
        counts, store = merge_ranks(out_dir, info, counts, meta, len(full))
        loop_seconds = time.time() - loop_started
    stale = len(stored_keys(store) - set(full.keys))
    return ExtractResult(store, *counts, time.time() - started, loop_seconds, out_dir, stale)

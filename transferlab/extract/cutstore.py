"""The stores of a run, one per cut, and what each records: its fingerprint (what the rows
depend on, checked on every resume), its ``config.yaml`` and its ``meta.json``.

One cut writes its store in ``output.dir``; several cuts (``model.cut`` a list,
``all-stages``, ``all-blocks``) one store each in ``output.dir/<cut>/``, each recording
what a single-cut run of that cut records (its cut, pool, the same data, preprocessing and
compute settings), so it equals that run with ``runtime.fold_bn=false`` row for row (hooks
cannot be folded by torch.fx) and resumes like any store.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from ..config import ExtractConfig, to_dict
from ..data.datasets import ImageDataset
from ..data.fingerprint import label_fingerprint
from ..errors import StoreError
from ..models.cuts import CutOutput
from ..models.extractor import ExtractorBundle
from ..models.provenance import weights_record
from ..runtime.cores import LoadFollower
from ..runtime.device import Runtime
from ..runtime.distributed import DistInfo, barrier, rank_dir
from ..runtime.record import rows_fingerprint
from ..runtime.untrusted import no_link_below
from ..store.format import LOCK, library_versions
from ..store.owner import check_target, prepare_store
from ..store.writer import StoreWriter


@dataclass(frozen=True)
class CutStore:
    """One cut of a run and the store it goes to: the extractor's output (cut, pool as
    asked and as applied, shape), the store directory, and the config the store records
    (for several cuts, the single-cut config of its cut and pool)."""

    output: CutOutput
    dir: Path
    cfg: ExtractConfig


def cut_stores(cfg: ExtractConfig, bundle: ExtractorBundle, multi: bool) -> list[CutStore]:
    """The store of each cut of ``bundle``: ``output.dir`` for one cut, ``output.dir/<cut>``
    per cut for several (a list of one included)."""
    out = Path(cfg.output.dir)
    if not multi:
        return [CutStore(bundle.outputs[0], out, cfg)]
    return [CutStore(o, out / name, replace(cfg, model=replace(cfg.model, cut=str(o.cut),
                                                                pool=o.pool)))
            for o, name in zip(bundle.outputs, bundle.dirs)]


def fingerprint(store: CutStore, bundle: ExtractorBundle, compute: dict,
                class_names: list[str] | None) -> dict:
    """What the features and their labels depend on; a store written with another
    fingerprint is refused. ``compute`` is ``compute_record``: the resolved settings that
    change the numbers beyond the store dtype's rounding."""
    cfg, model = store.cfg, store.cfg.model
    # the weights by content (a file's or a Hub file's digest), never by how they were
    # asked for: new weights saved into the same folder are another fingerprint
    weights = weights_record(model.name, model.weights, bundle.backbone.source,
                             bundle.backbone.weights_digest, cfg.runtime.seed)
    return rows_fingerprint({
        "backbone": model.name, "source": bundle.backbone.source, "weights": weights,
        "kwargs": model.kwargs, "num_classes": model.num_classes, "in_chans": model.in_chans,
        # pooling as asked (null: the model's own) and as applied after the cut: a timm
        # head pools inside the model, so its pool_after_cut is 'none' for avg and max
        "cut": str(store.output.cut), "pool": model.pool,
        "pool_after_cut": store.output.pool_after_cut,
        "preprocess": bundle.spec.to_dict(), "views": cfg.output.views,
        "view_mode": cfg.output.view_mode if cfg.output.views else None,
        **({"hflip": True} if cfg.output.hflip else {}),  # only when set: old stores match
        "decode": "torchvision" if cfg.runtime.gpu_decode else "pil",  # kernels differ
        "labels": label_fingerprint(cfg.data, class_names)}, cfg.data, compute)


def open_writers(cfg: ExtractConfig, stores: Sequence[CutStore], prints: Sequence[dict],
                 info: DistInfo) -> list[StoreWriter]:
    """One writer per cut (under torchrun each cut's root prepared by rank 0 first, so the
    merged store does not mix with one written otherwise); if one cannot open (another
    configuration, a lock), the opened ones are released. Every cut's directory is checked
    before any is created: a refusal leaves no store of another cut behind."""
    if info.enabled:
        if info.is_main:
            for store, p in zip(stores, prints):
                check_target(store.dir, p, cfg.output.dtype, cfg.output.overwrite)
            for store, p in zip(stores, prints):
                prepare_store(store.dir, p, cfg.output.dtype, cfg.output.overwrite)
        barrier()
    for store, p in zip(stores, prints):
        part = rank_dir(store.dir, info)
        if part != store.dir:  # ranks/world-N/rank-R: no linked folder on the way
            no_link_below(part / LOCK, store.dir, "the store part", StoreError)
        check_target(part, p, cfg.output.dtype, cfg.output.overwrite)
    writers: list[StoreWriter] = []
    try:
        for store, p in zip(stores, prints):
            writers.append(StoreWriter(rank_dir(store.dir, info), p, cfg.output.dtype,
                                       cfg.output.shard_size, cfg.output.overwrite))
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
    return writers


def store_meta(store: CutStore, bundle: ExtractorBundle, rt: Runtime, dataset: ImageDataset,
               batch_size: int, counts: tuple[int, int, int], seconds: float,
               follower: LoadFollower | None = None) -> dict:
    """``meta.json``; ``runtime.threads`` is the count the run started with, and
    ``runtime.threads_followed`` lists [seconds into the loop, threads] of each change."""
    cfg = store.cfg
    written, failed, skipped = counts
    followed = {"threads_followed": follower.changes} if follower is not None else {}
    return {"backbone": cfg.model.name, "source": bundle.backbone.source,
            "cut": str(store.output.cut), "pool": cfg.model.pool,
            "pool_after_cut": store.output.pool_after_cut,
            "output_shape": list(store.output.shape),
            "preprocess": bundle.spec.to_dict(), "class_names": dataset.class_names,
            "runtime": {**rt.to_dict(), "batch_size": batch_size,
                        "gpu_decode": cfg.runtime.gpu_decode, **followed},
            "versions": library_versions(), "config": to_dict(cfg),
            "counts": {"dataset": len(dataset), "written_this_run": written,
                       "failed_this_run": failed, "skipped_this_run": skipped},
            "elapsed_seconds": round(seconds, 3), **text_meta(store, bundle)}


def text_meta(store: CutStore, bundle: ExtractorBundle) -> dict:
    """``text_tower``: the text tower a CLIP-family image embedding pairs with, recorded
    only for the store of that embedding (cut head, the model's own pooling)."""
    text = bundle.backbone.text_tower
    if not text or store.output.cut.kind != "head" or store.output.pool is not None:
        return {}
    return {"text_tower": dict(text)}

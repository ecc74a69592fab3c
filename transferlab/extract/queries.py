"""Embedding a few images with a store's own model (search queries, notebooks): the same
engine as extraction, with the settings the store recorded."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ExtractConfig, ModelConfig, RuntimeConfig, from_dict
from ..data.imageio import load_image
from ..data.preprocess import build_transform
from ..errors import ModelError, StoreError
from ..models.engine import FeatureComputer
from ..models.extractor import ExtractorBundle, extractor_from_config
from ..models.provenance import content, has_digest, short, weights_record
from ..models.recorded import checked_model, contained_path
from ..runtime.device import (
    PRECISIONS,
    Runtime,
    resolve_precision,
    resolve_runtime,
    seed_everything,
)
from ..runtime.untrusted import claimed_size
from .reduce import MAX_REDUCE_WIDTH, reduction_from_record


def store_model(meta: dict, root: Path | None, trust_code: bool) -> tuple[ExtractConfig,
                                                                          ModelConfig]:
    """A store's config and its model config checked at the trust boundary: the architecture
    from timm / torchvision / the built-ins, a weights path inside the store ``root``."""
    cfg = from_dict(ExtractConfig, meta.get("config"), "store metadata")
    if "window" not in (meta.get("preprocess") or {}):  # written before the crop window:
        cfg = replace(cfg, preprocess=replace(cfg.preprocess, window="image"))  # whole image
    origin = f"the store {root}" if root is not None else "the store metadata"
    model = checked_model(cfg.model, origin, trust_code)
    if model.weights:
        model = replace(model, weights=contained_path(model.weights, root, origin, trust_code))
    return cfg, replace(model, trust_code=trust_code)


def bundle_from_meta(meta: dict, root: Path | None = None,
                     trust_code: bool = False) -> ExtractorBundle:
    """Rebuild the extractor a store was written with, from its metadata."""
    cfg, model = store_model(meta, root, trust_code)
    seed_everything(cfg.runtime.seed)  # same random-init weights as the run that wrote it
    return extractor_from_config(model, cfg.preprocess)


def store_calibration(meta: dict) -> tuple[str | None, int]:
    """(digest, count) of an int8 store's calibration images (``compute.calibration``):
    its quantised graph is looked up in the graph cache by them."""
    recorded = meta.get("compute")
    calibration = recorded.get("calibration") if isinstance(recorded, dict) else None
    if not isinstance(calibration, dict) or not isinstance(calibration.get("sha256"), str):
        return None, 0
    count = calibration.get("images")
    return calibration["sha256"], count if isinstance(count, int) else 0


def store_runtime(meta: dict, cfg: ExtractConfig) -> tuple[Runtime, bool]:
    """(runtime, fold_bn) the store's rows were computed with, on this machine's device.

    ``meta["compute"]`` (precision, fold_bn, channels_last) is what extraction records; older
    stores give the resolved ``meta["runtime"]``, then the configured runtime."""
    local = resolve_runtime(RuntimeConfig(precision="fp32"))
    recorded = meta.get("compute") or meta.get("runtime") or {}
    if not isinstance(recorded, dict):
        recorded = {}
    precision = recorded.get("precision", cfg.runtime.precision)
    # 'auto' of an old store: as this machine would resolve it
    if precision not in PRECISIONS:
        precision = resolve_precision(cfg.runtime.precision, local.device)
    channels_last = recorded.get("channels_last", local.channels_last)
    fold_bn = recorded.get("fold_bn", cfg.runtime.fold_bn)
    backend = recorded.get("backend", "eager")  # rows of an exported graph: queries too
    rt = replace(local, precision=precision, channels_last=bool(channels_last),
                 backend=backend if isinstance(backend, str) else "eager")
    return rt, bool(fold_bn)


def embed_images(meta: dict, paths: Sequence[str | Path], batch_size: int = 16,
                 root: str | Path | None = None, trust_code: bool = False) -> np.ndarray:
    """Features of image files, computed exactly as the store of ``meta`` computed its rows
    (same model, precision, BatchNorm folding, layout; this machine's device).

    ``root`` is the store directory: a weights file the metadata names must lie inside it.
    The store's model is rebuilt only from timm, torchvision or the built-ins unless
    ``trust_code`` (a store's meta.json can be written by anyone)."""
    return query_embedder(meta, root, trust_code, batch_size)(paths)


def query_embedder(meta: dict, root: str | Path | None = None, trust_code: bool = False,
                   batch_size: int = 16) -> Callable[[Sequence[str | Path]], np.ndarray]:
    """``embed_images`` with the model built once: a function of image paths, for a caller
    that embeds queries one at a time (the viewer's uploads)."""
    root = Path(root) if root is not None else None
    bundle = bundle_from_meta(meta, root, trust_code)
    cfg = from_dict(ExtractConfig, meta["config"], "store metadata")
    check_weights(meta, bundle, root, trust_code)
    rt, fold_bn = store_runtime(meta, cfg)
    digest, count = store_calibration(meta)  # int8: the quantised graph from the cache
    compute = FeatureComputer(bundle.extractor, bundle.spec, rt, fold_bn=fold_bn,
                              calibration_digest=digest, calibration_count=count)
    compute.hflip = cfg.output.hflip  # query rows as the store's rows were computed
    width = store_width(meta)
    compute.set_reduce([reduction_from_record(meta.get("reduce"), root,  # as the rows were
                                              compute.model_dims[0], width)])
    if width is not None and compute.out_dims[0] != width:
        where = f"the store {root}" if root is not None else "the store"
        raise StoreError(f"{where} holds rows of {width:,} features but the model its "
                         f"meta.json describes gives {compute.out_dims[0]:,}: its metadata was "
                         "altered, or it was written by another model; re-extract it")
    transform = build_transform(bundle.spec, normalize=False)
    spec = bundle.spec

    def embed(paths: Sequence[str | Path]) -> np.ndarray:
        rows = []
        for chunk in chunks(list(paths), batch_size):
            images = [transform(load_image(p, spec.image_mode, spec.scale_size(),
                                           cfg.data.max_image_pixels)) for p in chunk]
            rows.append(compute(torch.stack(images))[0])
        return np.concatenate(rows) if rows else np.zeros((0, compute.out_dims[0]), np.float32)

    return embed


def embed_texts(meta: dict, texts: Sequence[str], root: str | Path | None = None,
                trust_code: bool = False) -> np.ndarray:
    """Text embeddings in the space of a CLIP-family store's rows: the text tower its
    meta.json records, rebuilt as its image tower was (same name, seed, weights check),
    with the store's row reduction (``output.reduce``) applied as to its rows."""
    from ..models.texttower import encode_texts, no_text_tower

    root = Path(root) if root is not None else None
    where = f"the store {root}" if root is not None else "the store"
    record = meta.get("text_tower")
    if not isinstance(record, dict):
        raise no_text_tower(f"{where} (model '{meta.get('backbone')}', cut "
                            f"'{meta.get('cut')}')")
    cfg, model = store_model(meta, root, trust_code)
    if model.weights:
        raise ModelError(f"{where} replaced its model's weights (model.weights); its text "
                         "tower cannot be rebuilt from them: extract with the library's "
                         "weights (model.pretrained: true)")
    tower = cached_text_tower(model, record, cfg.runtime.seed)
    fingerprint = meta.get("fingerprint")
    stored = fingerprint.get("weights") if isinstance(fingerprint, dict) else None
    if has_digest(stored):  # the weights by content, as image queries are checked
        from ..models.provenance import state_record

        now = weights_record(model.name, None, str(record.get("source")),
                             state_record(tower.model), cfg.runtime.seed)
        if content(now) != content(stored):
            raise ModelError(f"{where} was computed with other weights than '{model.name}' "
                             f"gives now (stored: {short(stored)}; now: {short(now)}); text "
                             "queries would be compared with rows of another model")
    vectors = encode_texts(tower, texts)
    width = store_width(meta)
    reduce = reduction_from_record(meta.get("reduce"), root, vectors.shape[1], width)
    if reduce is not None:
        with torch.no_grad():
            vectors = reduce(vectors)
    if width is not None and vectors.shape[1] != width:
        raise StoreError(f"{where} holds rows of {width:,} features but its text tower gives "
                         f"{vectors.shape[1]:,}: its metadata was altered; re-extract it")
    return vectors.cpu().numpy().astype(np.float32)


# the last text tower built (a notebook or a server asks one store many questions: building
# a ViT-B text tower takes seconds); keyed by everything that decides its weights
_TEXT_TOWER: dict[str, Any] = {}


def cached_text_tower(model: ModelConfig, record: dict, seed: int) -> Any:
    """The text tower of ``model`` built with the image tower's seed, reused while the same
    model, record and seed are asked for (a model folder's files: by size and time too)."""
    import json

    from ..models.texttower import build_text_tower

    files = []
    if model.name.startswith(("hf:", "transformers:")):
        from ..models.transformers_source import target

        folder = target(model.name)[1]
        if folder is not None:
            files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                           for p in folder.iterdir() if p.is_file())
    key = json.dumps([dataclasses.asdict(model), record, seed, files], sort_keys=True,
                     default=str)
    if key not in _TEXT_TOWER:
        _TEXT_TOWER.clear()
        seed_everything(seed)  # random-init weights: the same as the image tower's
        _TEXT_TOWER[key] = build_text_tower(model, record)
    return _TEXT_TOWER[key]


def check_weights(meta: dict, bundle: ExtractorBundle, root: Path | None,
                  trust_code: bool) -> None:
    """A ModelError (one line) when the store names its weights by content and the model
    rebuilt now has other weights: queries embedded with them would be compared with rows
    of another model. Stores that record no digest (written before transferlab named
    weights by content, or random initial weights) are not checked."""
    fingerprint = meta.get("fingerprint")
    stored = fingerprint.get("weights") if isinstance(fingerprint, dict) else None
    if not has_digest(stored):
        return
    _, model = store_model(meta, root, trust_code)
    seed = from_dict(ExtractConfig, meta["config"], "store metadata").runtime.seed
    now = weights_record(model.name, model.weights, bundle.backbone.source,
                         bundle.backbone.weights_digest, seed)
    if content(now) != content(stored):
        where = f"the store {root}" if root is not None else "the store"
        raise ModelError(f"{where} was computed with other weights than '{model.name}' gives "
                         f"now (stored: {short(stored)}; now: {short(now)}); queries would be "
                         "embedded by another model: restore those weights, or extract the "
                         "store again (output.overwrite=true)")


def store_width(meta: dict) -> int | None:
    """The width of a store's rows as its meta.json records it (None: not recorded)."""
    dim = meta.get("dim")
    if dim is None:
        return None
    return claimed_size(dim, MAX_REDUCE_WIDTH, "the store's row width (meta.json 'dim')",
                        StoreError, 1)


def chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]

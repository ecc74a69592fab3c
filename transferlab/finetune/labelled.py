"""The labelled data of a fine-tuning run: resolving, loading, splitting."""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from ..config import DataConfig, FinetuneConfig, from_dict, to_dict
from ..data.preprocess import PreprocessSpec
from ..errors import DataError
from ..runtime.device import Runtime
from ..training.feeds import LoaderSource, Source, TensorSource

log = logging.getLogger(__name__)

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
    from ..data.sources import build_dataset, describe_data

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


def labelled_data(data_cfg: DataConfig, classes: list | None, where: str,
                  known: list[int] | None = None) -> LabelledData:
    """The items of ``classes`` with labels; clear errors for empty, unlabelled or one-class
    data. ``known`` maps labels to the class indices of a training set (test data)."""
    from ..data.sources import build_dataset, describe_data

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
    c, h, w = spec.input_size
    arr = ds.pixels((h, w)) if spec.crop_pct == 1.0 else None
    if arr is None:
        return None
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
    from ..data.preprocess import build_transform

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
    from ..analysis.splits import stratified_split

    train_rows, val_rows = stratified_split(src.targets, fraction, seed)
    return src.subset(train_rows), src.subset(val_rows)




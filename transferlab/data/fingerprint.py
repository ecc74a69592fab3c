"""What a data configuration contributes to a fingerprint: one description of the data for
extraction stores and the fine-tune feature cache, and the class names that give labels
their meaning. What a source adds beyond the common keys is its entry in
``sources.DATA_SOURCES``."""
from __future__ import annotations

from ..config import DataConfig
from .remote import absolute
from .sources import data_source


def data_fingerprint(cfg: DataConfig) -> dict:
    """Which images the keys name (the items chosen by classes/limit are not part of it: a
    store of a few classes grows into one of more). A source with more to name (tar shards:
    their list and label member) adds it, and only then, so the fingerprints of other
    stores stay as they were."""
    out = {"source": cfg.source, "root": absolute(cfg.root),
           "list_file": absolute(cfg.list_file), "dataset": cfg.dataset, "split": cfg.split}
    extra = data_source(cfg.source).fingerprint
    if extra is not None:
        out.update(extra(cfg))
    return out


def label_fingerprint(cfg: DataConfig, class_names: list[str] | None) -> dict:
    """What stored labels mean: label i is ``class_names[i]`` (a class folder added to the
    data renumbers them), read from ``label_column`` for a source that reads one (list)."""
    column = cfg.label_column if data_source(cfg.source).labels_from_column else None
    return {"class_names": list(class_names) if class_names is not None else None,
            "label_column": column}

"""What a data configuration contributes to a fingerprint: one description of the data for
extraction stores and the fine-tune feature cache, and the class names that give labels
their meaning."""
from __future__ import annotations

from pathlib import Path

from ..config import DataConfig


def absolute(path: str | None) -> str | None:
    """The same folder named from another working directory is the same data; a URL
    (s3://, gs://, http(s)://, file://) is already absolute and stays as written."""
    if path is None or "://" in str(path):
        return path
    return str(Path(path).expanduser().resolve())


def data_fingerprint(cfg: DataConfig) -> dict:
    """Which images the keys name (the items chosen by classes/limit are not part of it: a
    store of a few classes grows into one of more). Tar shards add their list and label
    member (only then, so the fingerprints of other stores stay as they were)."""
    out = {"source": cfg.source, "root": absolute(cfg.root),
           "list_file": absolute(cfg.list_file), "dataset": cfg.dataset, "split": cfg.split}
    if cfg.source == "webdataset":
        urls = [cfg.urls] if isinstance(cfg.urls, str) or cfg.urls is None else cfg.urls
        out.update(urls=[absolute(u) for u in urls], label_key=cfg.label_key)
    return out


def label_fingerprint(cfg: DataConfig, class_names: list[str] | None) -> dict:
    """What stored labels mean: label i is ``class_names[i]`` (a class folder added to the
    data renumbers them), read from ``label_column`` for a list file."""
    return {"class_names": list(class_names) if class_names is not None else None,
            "label_column": cfg.label_column if cfg.source == "list" else None}

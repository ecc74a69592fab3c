"""What a data configuration contributes to a fingerprint: one description of the data for
extraction stores and the fine-tune feature cache, and the class names that give labels
their meaning."""
from __future__ import annotations

from pathlib import Path

from ..config import DataConfig


def absolute(path: str | None) -> str | None:
    """The same folder named from another working directory is the same data."""
    return None if path is None else str(Path(path).expanduser().resolve())


def data_fingerprint(cfg: DataConfig) -> dict:
    """Which images the keys name (the items chosen by classes/limit are not part of it: a
    store of a few classes grows into one of more)."""
    return {"source": cfg.source, "root": absolute(cfg.root),
            "list_file": absolute(cfg.list_file), "dataset": cfg.dataset, "split": cfg.split}


def label_fingerprint(cfg: DataConfig, class_names: list[str] | None) -> dict:
    """What stored labels mean: label i is ``class_names[i]`` (a class folder added to the
    data renumbers them), read from ``label_column`` for a list file."""
    return {"class_names": list(class_names) if class_names is not None else None,
            "label_column": cfg.label_column if cfg.source == "list" else None}

"""The outputs of a fine-tuning run: results, metrics log, confusion matrix."""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import FinetuneConfig
from ..runtime.atomicfile import atomic_write_text

MODEL_FILE, PRETRAIN_FILE = "model.safetensors", "pretrain.safetensors"


@dataclass
class StageResult:
    """One row of the closing table."""

    stage: str
    train_samples: int
    epochs: int | None  # None for the probe (no epochs)
    accuracy: float | None  # on held-out data (test set, else the validation split)
    seconds: float
    held_out: str | None = None  # 'test', 'validation' or None
    details: dict = field(default_factory=dict)


@dataclass
class FinetuneResult:
    stages: list[StageResult]
    output_dir: Path
    checkpoint: Path
    pretrain_checkpoint: Path | None
    data_note: str
    config: FinetuneConfig
    history: list[dict]

    def stage(self, name: str) -> StageResult:
        return next(s for s in self.stages if s.stage == name)

    def table(self) -> str:
        return format_table(self.stages)



# ---------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------


class MetricsLog:
    """``metrics.jsonl``: one JSON line per epoch, flushed at once (``path`` None: records
    kept in memory only, as in the processes other than rank 0)."""

    def __init__(self, path: Path | None):
        self.path = path
        if path is not None:
            path.write_text("", encoding="utf-8")
        self.records: list[dict] = []

    def write(self, record: dict) -> None:
        self.records.append(record)
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def confusion_matrix(pred: np.ndarray, target: np.ndarray, n: int) -> np.ndarray:
    m = np.zeros((n, n), np.int64)
    np.add.at(m, (target, pred), 1)
    return m


def write_confusion(out: Path, matrix: np.ndarray, names: list[str], held_out: str) -> None:
    """confusion.json ({classes, matrix, held_out}) and confusion.csv (rows: true class)."""
    data = {"held_out": held_out, "classes": names, "matrix": matrix.tolist(),
            "rows": "true class", "columns": "predicted class"}
    atomic_write_text(out / "confusion.json", json.dumps(data, indent=1))
    lines = [",".join(["true\\predicted", *names])]
    lines += [",".join([names[i], *map(str, row)]) for i, row in enumerate(matrix)]
    (out / "confusion.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")


def format_table(stages: Sequence[StageResult]) -> str:
    rows = [f"{'stage':<12}{'train samples':>14}{'epochs':>8}{'held-out acc':>14}{'seconds':>9}"]
    for s in stages:
        acc = f"{s.accuracy:.4f}" if s.accuracy is not None else "-"
        epochs = str(s.epochs) if s.epochs is not None else "-"
        rows.append(f"{s.stage:<12}{s.train_samples:>14}{epochs:>8}{acc:>14}{s.seconds:>9.1f}")
    return "\n".join(rows)




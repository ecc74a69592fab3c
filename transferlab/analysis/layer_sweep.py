"""Which backbone, which layer? ``run_sweep(cfg)`` extracts every backbone at every cut and
probes each store, into a leaderboard.

For each backbone: one multi-cut extraction (``extract.runner.run_extract``: the decode and
the base's forward pass shared by the cuts) into ``output.dir/<backbone>/<cut>/``, then the
probe of each cut (``analysis.probe_report.run_probe``: the linear L2 sweep and cosine kNN
on a stratified held-out split fixed by ``runtime.seed``, the same images for every store).

Resumable: the stores resume like any store (a finished one costs a model build and no
forward pass), each probe's result is kept beside the stores (``probe-<cut>.json``, reused
while its store's fingerprint, row count and the probe settings match) and the measured
throughput too (``throughput.json``, rewritten only by a run that extracted images). A
killed sweep rerun redoes only what is missing; its leaderboard is the same.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from ..config import ExtractConfig, ModelConfig, SweepConfig
from ..errors import ConfigError
from ..runtime.atomicfile import atomic_write_text

THROUGHPUT_FILE = "throughput.json"
LEADERBOARD_COLUMNS = ("backbone", "cut", "relative_depth", "dim", "probe_acc", "best_l2",
                       "knn_acc", "images_per_second", "store_mb")
MAX_RECORD_BYTES = 1 << 20  # a probe or throughput record is a few hundred bytes


@dataclass
class SweepResult:
    """Every (backbone, cut) row (in sweep order: backbones as listed, cuts by depth), what
    this run computed, and where it all is."""

    rows: list[dict]
    out_dir: Path
    extracted: dict[str, int] = field(default_factory=dict)  # backbone -> images written now
    probed: list[tuple[str, str]] = field(default_factory=list)  # probes computed now

    @property
    def best(self) -> dict:
        """The row of the highest probe accuracy (then kNN accuracy; then sweep order)."""
        return ranked(self.rows)[0]


def backbone_dir(name: str) -> str:
    """A directory name for a backbone: 'hf-hub:org/model' -> 'hf-hub_org_model'."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name.strip()).strip(".") or "_"


def backbone_config(cfg: SweepConfig, name: str) -> ExtractConfig:
    """The multi-cut extract config of one backbone of the sweep."""
    cuts = cfg.cuts
    if isinstance(cuts, str) and cuts.strip() not in ("all-stages", "all-blocks"):
        cuts = [cuts]  # one cut still gets its own directory, like every other
    model = ModelConfig(name=name, cut=cuts, pool=cfg.pool, pretrained=cfg.pretrained)
    out = replace(cfg.output, dir=str(Path(cfg.output.dir) / backbone_dir(name)))
    return ExtractConfig(model=model, preprocess=cfg.preprocess, data=cfg.data,
                         runtime=cfg.runtime, output=out)


def check_backbones(cfg: SweepConfig) -> None:
    dirs: dict[str, str] = {}
    for name in cfg.backbones:
        other = dirs.setdefault(backbone_dir(name).lower(), name)
        if other != name:
            raise ConfigError(f"backbones {other!r} and {name!r} would share the directory "
                              f"{backbone_dir(name)!r}; list each backbone once")


def run_sweep(cfg: SweepConfig, progress: bool = False,
              on_backbone: Callable[[str, int], None] | None = None) -> SweepResult:
    """Extract and probe every backbone x cut of ``cfg``; ``on_backbone(name, written)``
    runs after each backbone is extracted and probed. Writes the leaderboard
    (``leaderboard.csv``, ``leaderboard.md``) into ``output.dir`` after every backbone."""
    from ..extract.runner import run_extract
    from ..store.reader import FeatureStore

    check_backbones(cfg)
    out = Path(cfg.output.dir)
    result = SweepResult([], out)
    for name in cfg.backbones:
        ext = backbone_config(cfg, name)
        done = run_extract(ext, progress=progress)
        bdir = Path(ext.output.dir)
        speed = throughput(bdir, done.written, done.loop_seconds)
        result.extracted[name] = done.written
        names = list(done.stores)
        for i, cut_name in enumerate(names):
            store = FeatureStore.open(bdir / cut_name)
            probe, fresh = cut_probe(cfg, store, bdir / f"probe-{cut_name}.json")
            if fresh:
                result.probed.append((name, cut_name))
            result.rows.append({
                "backbone": name, "cut": str(store.meta.get("cut", cut_name)),
                "relative_depth": round(i / (len(names) - 1), 4) if len(names) > 1 else 1.0,
                "dim": int(store.features.shape[1]), **probe,
                "images_per_second": speed, "store_mb": round(store_bytes(bdir / cut_name)
                                                              / 1e6, 3),
                "store": str(bdir / cut_name)})
        write_leaderboard(result.rows, out)
        if on_backbone is not None:
            on_backbone(name, done.written)
    return result


def throughput(bdir: Path, written: int, loop_seconds: float) -> float | None:
    """Images/s of the backbone's extraction: measured by a run that extracted images (and
    kept), else the one kept by an earlier run (None when there is none)."""
    path = bdir / THROUGHPUT_FILE
    if written > 0 and loop_seconds > 0:
        speed = round(written / loop_seconds, 1)
        atomic_write_text(path, json.dumps({"images_per_second": speed, "images": written,
                                            "seconds": round(loop_seconds, 3)}) + "\n")
        return speed
    record = read_sweep_record(path)
    value = record.get("images_per_second") if record else None
    return float(value) if isinstance(value, (int, float)) else None


def cut_probe(cfg: SweepConfig, store: Any, path: Path) -> tuple[dict, bool]:
    """(probe_acc, best_l2, knn_acc) of one store, and whether it was computed now (False:
    read from ``path``, written for the same store rows and probe settings)."""
    from .probe_report import run_probe

    p = cfg.probe
    key = {"fingerprint": store.meta.get("fingerprint"), "rows": len(store),
           "val_fraction": p.val_fraction, "l2": list(p.l2), "knn": p.knn,
           "max_iter": p.max_iter, "seed": cfg.runtime.seed}
    record = read_sweep_record(path)
    if record and record.get("key") == key and probe_record_ok(record.get("result")):
        return record["result"], False
    device = None if cfg.runtime.device == "auto" else cfg.runtime.device
    report = run_probe(store, val_fraction=p.val_fraction, l2s=p.l2, knn=p.knn,
                       seed=cfg.runtime.seed, device=device, max_iter=p.max_iter)
    res = {"probe_acc": round(float(report.test_acc[report.best]), 6),
           "best_l2": float(report.l2s[report.best]),
           "knn_acc": None if report.knn_acc is None else round(float(report.knn_acc), 6)}
    atomic_write_text(path, json.dumps({"key": key, "result": res}) + "\n")
    return res, True


def probe_record_ok(result: Any) -> bool:
    """A kept probe result as ``cut_probe`` writes it (anything else is computed again)."""
    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    return (isinstance(result, dict) and set(result) == {"probe_acc", "best_l2", "knn_acc"}
            and number(result["probe_acc"]) and number(result["best_l2"])
            and (result["knn_acc"] is None or number(result["knn_acc"])))


def read_sweep_record(path: Path) -> dict | None:
    """A JSON object this module wrote, or None (missing, too large, not an object)."""
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > MAX_RECORD_BYTES:
            return None
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def store_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def ranked(rows: list[dict]) -> list[dict]:
    """Rows by probe accuracy, then kNN accuracy, best first (ties keep sweep order)."""
    return sorted(rows, key=lambda r: (-(r["probe_acc"] or 0.0), -(r["knn_acc"] or 0.0)))


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-3 and value else f"{value:.4f}".rstrip(
            "0").rstrip(".")
    return str(value)


def leaderboard_csv(rows: list[dict]) -> str:
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(LEADERBOARD_COLUMNS)
    for row in ranked(rows):
        writer.writerow([_cell(row[c]) for c in LEADERBOARD_COLUMNS])
    return buf.getvalue()


def leaderboard_markdown(rows: list[dict]) -> str:
    lines = ["| rank | " + " | ".join(LEADERBOARD_COLUMNS) + " |",
             "|---:|" + "|".join("---" if c in ("backbone", "cut") else "---:"
                                 for c in LEADERBOARD_COLUMNS) + "|"]
    for i, row in enumerate(ranked(rows), 1):
        cells = [_cell(row[c]).replace("|", "\\|") for c in LEADERBOARD_COLUMNS]
        lines.append(f"| {i} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def leaderboard_paths(out_dir: Path) -> tuple[Path, Path]:
    return Path(out_dir) / "leaderboard.csv", Path(out_dir) / "leaderboard.md"


def write_leaderboard(rows: list[dict], out_dir: Path) -> tuple[Path, Path]:
    """The sweep's own outputs in its ``output.dir``: rewritten by every run (atomically)."""
    csv_path, md_path = leaderboard_paths(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(csv_path, leaderboard_csv(rows))
    atomic_write_text(md_path, leaderboard_markdown(rows))
    return csv_path, md_path


def plot_sweep(rows: list[dict], out_dir: Path) -> list[Path]:
    """Accuracy by relative depth (a line per backbone) and accuracy vs throughput."""
    from . import plots

    return [plots.plot_depth_curves(rows, Path(out_dir) / "accuracy_by_depth.png"),
            plots.plot_accuracy_throughput(rows, Path(out_dir) / "accuracy_vs_throughput.png")]


def _changed(section: Any) -> dict:
    """The fields of a config section that differ from its defaults."""
    default = type(section)()
    return {f.name: getattr(section, f.name) for f in fields(section)
            if getattr(section, f.name) != getattr(default, f.name)}


def best_configs(cfg: SweepConfig, row: dict) -> tuple[str, str]:
    """(extract YAML, finetune YAML) that use the (backbone, cut) of ``row``: its single-cut
    store's model section, and the sweep's data and preprocess settings."""
    model = {"name": row["backbone"], "cut": row["cut"], "pool": cfg.pool,
             **({"pretrained": True} if cfg.pretrained else {})}
    shared = {k: v for k, v in (("preprocess", _changed(cfg.preprocess)),
                                ("data", _changed(cfg.data))) if v}
    cut_name = re.sub(r"[^A-Za-z0-9._-]", "-", row["cut"])
    out_dir = f"outputs/{backbone_dir(row['backbone'])}-{cut_name}"
    extract = {"model": model, **shared, "output": {"dir": out_dir}}
    finetune = {"model": model, **shared}
    return (yaml.safe_dump(extract, sort_keys=False),
            yaml.safe_dump(finetune, sort_keys=False))

"""Curation at scale: time and peak RSS of each stage of ``transferlab curate`` (duplicates
and outliers; no labels) on a synthetic clustered float16 store with planted near-duplicate
groups.

    PYTHONPATH=. python benchmarks/curate_scale.py                   # 100,000 x 256
    PYTHONPATH=. python benchmarks/curate_scale.py --rows 1000000    # the issue's size
    PYTHONPATH=. python benchmarks/curate_scale.py --quick           # seconds
    PYTHONPATH=. python benchmarks/curate_scale.py --rows 1000000 --labels 10  # + label issues

Each size is curated in a fresh child process, so its peak RSS (``ru_maxrss``, which
includes the store's memory-mapped pages it touched) is its own. The planted groups give
the duplicates' recall and precision (a planted copy is found when it shares a group with
its source; a found pair is right when both rows belong to one planted group).
"""
from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import base_parser, machine_line, resolve_device, table, write_json
from transferlab.errors import StoreError
from transferlab.store.reader import FeatureStore
from transferlab.store.writer import StoreWriter

CHUNK = 65536


def synthetic_store(path: Path, rows: int, dim: int, clusters: int, dup_fraction: float,
                    seed: int = 0, classes: int = 0,
                    flip_fraction: float = 0.05) -> tuple[Any, np.ndarray, np.ndarray]:
    """A float16 store of clustered vectors (random pairs of one cluster: cosine ~0.7) in
    which ``dup_fraction`` of the rows are near-copies (cosine ~0.998) of an earlier row of
    their chunk; returns the store, the (copy, source) pairs and the rows whose label was
    flipped. With ``classes``, cluster j belongs to class j % classes (its centre near its
    class's centre: a linear probe separates the classes) and ``flip_fraction`` of the
    labels are changed to another class at random. Reused when present."""
    pairs_file = path.with_suffix(".pairs.npy")
    flips_file = path.with_suffix(".flips.npy")
    try:
        store = FeatureStore.open(path)
        if store.features.shape == (rows, dim) and pairs_file.is_file() and (
                flips_file.is_file() or not classes):
            return store, np.load(pairs_file), (np.load(flips_file) if classes else
                                                np.zeros(0, np.int64))
    except StoreError:
        pass
    shutil.rmtree(path, ignore_errors=True)
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, dim)).astype(np.float32) * 1.5
    if classes:
        class_centers = rng.normal(size=(classes, dim)).astype(np.float32) * 1.5
        centers = class_centers[np.arange(clusters) % classes] + 0.5 * centers
    pairs, flips = [], []
    with StoreWriter(path, {"bench": "curate", "rows": rows, "dim": dim}, dtype="float16",
                     shard_size=CHUNK, fsync=False) as writer:
        for start in range(0, rows, CHUNK):
            n = min(CHUNK, rows - start)
            cluster = rng.integers(0, clusters, n)
            x = centers[cluster] + rng.normal(size=(n, dim)).astype(np.float32)
            copies = rng.choice(np.arange(n // 2, n), int(n * dup_fraction), replace=False)
            sources = rng.integers(0, n // 2, len(copies))
            x[copies] = x[sources] + 0.05 * rng.normal(size=(len(copies), dim))
            cluster[copies] = cluster[sources]
            pairs += list(zip(copies + start, sources + start))
            labels = cluster % classes if classes else np.full(n, -1)
            if classes:
                flip = rng.choice(n, int(round(n * flip_fraction)), replace=False)
                labels[flip] = (labels[flip] + rng.integers(1, classes, len(flip))) % classes
                flips += (flip + start).tolist()
            writer.add([f"c/{i:08d}.png" for i in range(start, start + n)], labels, x)
        store = writer.close({"class_names": [str(c) for c in range(classes)]}
                             if classes else {})
    pairs = np.array(pairs, dtype=np.int64).reshape(-1, 2)
    np.save(pairs_file, pairs)
    flips = np.sort(np.array(flips, dtype=np.int64))
    if classes:
        np.save(flips_file, flips)
    return store, pairs, flips


def child(store_dir: str, k: int, threshold: float, exact: bool, center: bool,
          labels: bool = False, folds: int = 5) -> None:
    """Curate in this (fresh) process; print one JSON line of per-stage seconds and RSS."""
    from transferlab.analysis import curation
    from transferlab.store.rows import plain_rows

    stages = []

    def mark(name: str, started: float) -> None:
        stages.append([name, time.perf_counter() - started,
                       resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024])

    t = time.perf_counter()
    store = FeatureStore.open(store_dir)
    rows = plain_rows(store)
    mark("open", t)
    t = time.perf_counter()
    notes: list[str] = []
    mean = curation.feature_mean(store, rows) if center else None
    mark("mean feature" if center else "(no centring)", t)
    t = time.perf_counter()
    index = None if exact else curation._fresh_index(store, rows, mean, notes)
    mark("index (built in memory)", t)
    t = time.perf_counter()
    dist, idx, source = curation.knn_graph(store, rows, k, index, mean)
    mark(f"neighbours k={k}", t)
    t = time.perf_counter()
    groups = curation.duplicate_groups(store, rows, idx, 1.0 - dist, threshold, mean)
    mark("duplicate groups", t)
    t = time.perf_counter()
    scores = np.nanmean(np.where(np.isfinite(dist), dist, np.nan), axis=1)
    top = np.argsort(-scores, kind="stable")[:100]
    mark("outlier scores", t)
    flagged: list[int] = []
    if labels:
        t = time.perf_counter()
        issues, method = curation.label_issues(store, rows, folds=folds, notes=notes)
        flagged = [i.row for i in issues]
        mark(f"label issues ({method})", t)
    print(json.dumps({"stages": stages, "source": source, "notes": notes, "top": len(top),
                      "groups": [[g.keep, *g.others] for g in groups], "flagged": flagged}))


def quality(groups: list[list[int]], pairs: np.ndarray) -> tuple[float, float]:
    """Recall of planted (copy, source) pairs; precision of found pairs (each found
    member paired with its group's kept row)."""
    group_of = {r: g for g, members in enumerate(groups) for r in members}
    found = sum(group_of.get(int(c), -1) == group_of.get(int(s), -2) for c, s in pairs)
    planted_group: dict[int, int] = {}
    for c, s in pairs.tolist():  # a planted group: a source and all its copies
        planted_group[c] = planted_group.setdefault(s, s)
    right = total = 0
    for members in groups:
        keep = members[0]
        for r in members[1:]:
            total += 1
            right += planted_group.get(r, -1) == planted_group.get(keep, -2)
    return found / max(1, len(pairs)), right / max(1, total)


def main(argv: Sequence[str] | None = None) -> list[list]:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--rows", default="100000", help="comma-separated sizes, e.g. 100000,1000000")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--dup-fraction", type=float, default=0.01)
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--threshold", type=float, default=None)
    p.add_argument("--exact", action="store_true", help="no FAISS index: exact search")
    p.add_argument("--center", action="store_true", help="as curate --center")
    p.add_argument("--labels", type=int, default=0, metavar="C",
                   help="a labelled store of C classes, 5%% of its labels flipped: also time "
                        "the label issues (out-of-fold probe + cleanlab)")
    p.add_argument("--folds", type=int, default=5, help="the probe's folds (curate --folds)")
    p.add_argument("--child", default=None, help=argparse_hidden())
    args = p.parse_args(argv)
    from transferlab.analysis.curation import DEFAULT_THRESHOLD

    threshold = args.threshold or DEFAULT_THRESHOLD
    if args.child:
        child(args.child, args.k, threshold, args.exact, args.center, bool(args.labels),
              args.folds)
        return []
    sizes = [int(v) for v in args.rows.split(",")]
    if args.quick:
        sizes, args.dim, args.clusters, args.labels, args.folds = [3000], 32, 20, 5, 2
    device = resolve_device(args.device)
    print(machine_line(device))
    out_rows = []
    for n in sizes:
        path = Path(args.bench_dir) / (f"curate_store_{n}x{args.dim}"
                                       + (f"_{args.labels}classes" if args.labels else ""))
        t = time.perf_counter()
        _, pairs, flips = synthetic_store(path, n, args.dim, args.clusters, args.dup_fraction,
                                          classes=args.labels)
        print(f"store: {n} x {args.dim} float16, {args.clusters} clusters, {len(pairs)} "
              f"planted copies, {len(flips)} flipped labels "
              f"(ready in {time.perf_counter() - t:.1f} s)")
        cmd = [sys.executable, "-m", "benchmarks.curate_scale", "--child", str(path),
               "-k", str(args.k), "--threshold", str(threshold),
               "--labels", str(args.labels), "--folds", str(args.folds)] + (
            ["--exact"] if args.exact else []) + (["--center"] if args.center else [])
        done = subprocess.run(cmd, capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parents[1])
        result = json.loads(done.stdout.strip().splitlines()[-1])
        recall, precision = quality(result["groups"], pairs)
        total = sum(s[1] for s in result["stages"])
        for name, secs, rss in result["stages"]:
            out_rows.append([n, name, secs, rss])
        out_rows.append([n, f"total ({result['source']})", total,
                         max(s[2] for s in result["stages"])])
        print(f"{n} rows: duplicates recall {recall:.4f}, precision {precision:.4f} at "
              f"threshold {threshold}; {'; '.join(result['notes'])}")
        if args.labels:
            hit = len(set(result["flagged"]) & set(flips.tolist()))
            print(f"{n} rows: label issues precision "
                  f"{hit / max(1, len(result['flagged'])):.4f}, recall "
                  f"{hit / max(1, len(flips)):.4f} ({len(result['flagged'])} flagged)")
    print()
    what = "duplicates + outliers" + (f" + label issues, {args.labels} classes"
                                       if args.labels else "")
    print(table(f"curate ({what}), {args.dim}-d float16, k={args.k}"
                f"{', centred' if args.center else ''}",
                ["rows", "stage", "seconds", "peak RSS MiB"], out_rows))
    write_json(args.json, {"rows": out_rows, "args": vars(args)})
    return out_rows


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()

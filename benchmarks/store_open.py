"""Opening a big store: seconds to ``FeatureStore.open`` and to the first key lookup.

    PYTHONPATH=. python benchmarks/store_open.py            # 1,000,000 rows x 8, float16
    PYTHONPATH=. python benchmarks/store_open.py --quick    # 20,000 rows

The store is written once (``StoreWriter``, cached under the bench folder). Each measurement
is a fresh child process (as a user's script or notebook opens a store), alternating the two
ways of reading the index round by round: ``index.npz`` (the binary copy the writer leaves
beside ``index.csv``, used while the CSV's SHA-256 matches) and parsing ``index.csv`` (what
happens without the copy: measured on a copy of the store without ``index.npz``, its other
files hard-linked). Targets (issue #16): open <= 0.5 s, first lookup <= 1 s at 1M rows.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import base_parser, machine_line, table

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys, time
from transferlab.store.reader import FeatureStore
t0 = time.perf_counter()
store = FeatureStore.open(sys.argv[1])
t1 = time.perf_counter()
store.get(store.keys[len(store) // 2])
t2 = time.perf_counter()
print(json.dumps({"open": t1 - t0, "lookup": t2 - t1, "rows": len(store)}))
"""


def build_store(directory: Path, rows: int, dim: int = 8) -> Path:
    import numpy as np

    from transferlab.store.reader import FeatureStore
    from transferlab.store.writer import StoreWriter

    try:
        if len(FeatureStore.open(directory)) == rows:
            return directory
    except Exception:
        pass
    rng = np.random.default_rng(0)
    with StoreWriter(directory, {"bench": rows}, "float16", 4096, overwrite=True,
                     fsync=False) as writer:
        for start in range(0, rows, 50_000):
            n = min(50_000, rows - start)
            keys = [f"class_{(start + i) % 100:03d}/image_{start + i:08d}.jpg" for i in range(n)]
            writer.add(keys, [(start + i) % 100 for i in range(n)],
                       rng.standard_normal((n, dim), dtype=np.float32))
        writer.close({})
    return directory


def without_sidecar(store: Path) -> Path:
    """A copy of ``store`` without ``index.npz`` (its other files hard-linked where the file
    system allows): opening it parses ``index.csv``."""
    from transferlab.store.files import INDEX_SIDECAR

    if not (store / INDEX_SIDECAR).is_file():
        raise SystemExit(f"{store} has no {INDEX_SIDECAR}: nothing to compare")
    copy = store.with_name(store.name + "_csv_only")
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(store, copy, copy_function=link_or_copy,
                    ignore=shutil.ignore_patterns(INDEX_SIDECAR, ".lock"))
    return copy


def link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def measure(store: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(store)], check=True,
                         capture_output=True, text=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    rows = args.rows or (20_000 if args.quick else 1_000_000)
    store = build_store(Path(args.bench_dir) / f"open_store_{rows}", rows)
    csv_only = without_sidecar(store)
    results: dict[str, list[dict]] = {"index.npz": [], "index.csv parsed": []}
    for _ in range(args.rounds):  # alternate, so drift hits both alike
        results["index.npz"].append(measure(store))
        results["index.csv parsed"].append(measure(csv_only))
    import torch

    print(machine_line(torch.device("cpu")))
    print(f"store: {rows:,} rows x 8 float16, {len(list((store / 'shards').glob('*.npy')))} "
          f"shards; {args.rounds} rounds, each a fresh process")
    lines = []
    for name, runs in results.items():
        opens = [r["open"] for r in runs]
        looks = [r["lookup"] for r in runs]
        lines.append([name, f"{min(opens):.3f} / {statistics.median(opens):.3f} / "
                      f"{max(opens):.3f}", f"{statistics.median(looks):.3f}"])
    ratio = [c["open"] / n["open"] for n, c in zip(results["index.npz"],
                                                  results["index.csv parsed"])]
    print(table("Opening a store", ["index read from", "open s (min / median / max)",
                                     "first lookup s (median)"], lines))
    print("open, parsed / npz per round: " + " ".join(f"{r:.1f}x" for r in ratio))
    return results


if __name__ == "__main__":
    main()

"""Search at scale: exact scan vs the store's FAISS index (flat, IVF, HNSW) on a synthetic
clustered store.

    PYTHONPATH=. python benchmarks/bench_index.py                    # 100,000 x 256 float16
    PYTHONPATH=. python benchmarks/bench_index.py --rows 1000000     # the issue's size
    PYTHONPATH=. python benchmarks/bench_index.py --quick            # seconds

Per method: build time, one query's latency, batched queries per second and recall@10
against the exact scan (the exact scan is the reference, recall 1 by definition). With
``--export``, also the store's Parquet export in a child process, with its peak RSS.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import base_parser, machine_line, resolve_device, table, write_json
from transferlab.analysis.neighbors import nearest
from transferlab.errors import StoreError
from transferlab.store.faiss_index import build_index, load_index
from transferlab.store.reader import FeatureStore
from transferlab.store.writer import StoreWriter


def synthetic_store(path: Path, rows: int, dim: int, clusters: int, seed: int = 0) -> Any:
    """A float16 store of clustered vectors, written chunk by chunk (reused when present)."""
    try:
        store = FeatureStore.open(path)
        if store.features.shape == (rows, dim):
            return store
    except StoreError:  # absent or unfinished: written anew below
        pass
    shutil.rmtree(path, ignore_errors=True)
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, dim)).astype(np.float32) * 3
    with StoreWriter(path, {"bench": "index", "rows": rows, "dim": dim}, dtype="float16",
                     shard_size=65536, fsync=False) as writer:
        for start in range(0, rows, 65536):
            n = min(65536, rows - start)
            x = centers[rng.integers(0, clusters, n)] + rng.normal(size=(n, dim)).astype(
                np.float32)
            writer.add([f"c/{i:08d}.png" for i in range(start, start + n)], [-1] * n, x)
        return writer.close({})


def queries(store: Any, count: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(store), count, replace=False))
    q = store.features[rows].astype(np.float32)
    return q + 0.5 * rng.normal(size=q.shape).astype(np.float32)


def rate(fn: Any, repeats: int) -> float:
    """Best-of-``repeats`` seconds of one call (after a warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def measure_exact(store: Any, q: np.ndarray, k: int, device: str) -> tuple[list, np.ndarray]:
    one = rate(lambda: nearest(store, q[:1], k, device=device), 3)
    batch = rate(lambda: nearest(store, q, k, device=device), 2)
    _, ref = nearest(store, q, k, device=device)
    return ["exact scan", "-", one * 1e3, len(q) / batch, 1.0], ref


def measure_index(store: Any, kind: str, q: np.ndarray, k: int, ref: np.ndarray,
                  nprobe: int | None = None) -> list:
    record = build_index(store, kind, "cosine", **({"nprobe": nprobe} if kind == "ivf" else {}))
    index = load_index(store, "cosine")
    one = rate(lambda: index.search(q[:1], k), 5)
    batch = rate(lambda: index.search(q, k), 3)
    _, got = index.search(q, k)
    recall = float(np.mean([len(set(g) & set(r)) / k for g, r in zip(got, ref)]))
    params = ", ".join(f"{a} {b}" for a, b in record["params"].items() if a != "train_rows")
    return [f"{kind} ({params})" if params else kind, record["build_seconds"], one * 1e3,
            len(q) / batch, recall]


# Run in the child: the export, then its own peak RSS and its anonymous memory at the end
# (the rest of the RSS is the shards' page cache, mapped read-only and reclaimable).
# (VmHWM, not ru_maxrss: that survives exec, so it would report this parent's peak.)
_CHILD = ("import sys; from pathlib import Path; from transferlab.export import main; "
          "rc = main(sys.argv[1:]); st = dict(l.split(':', 1) for l in "
          "Path('/proc/self/status').read_text().splitlines()); "
          "print('MEM', st['VmHWM'].split()[0], st['RssAnon'].split()[0]); sys.exit(rc)")


def measure_export(store: Any, out: Path) -> str:
    """Export to Parquet in a fresh child process: seconds, the child's peak RSS."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _CHILD, str(store.dir), str(out),
                           "--overwrite"], check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    peak, anon = (int(v) / 1024 for v in done.stdout.split("MEM", 1)[1].split())
    size = store.features.shape[0] * store.features.shape[1] * store.features.dtype.itemsize
    return (f"parquet export: {seconds:.1f} s, {out.stat().st_size / 2**20:.0f} MiB file from "
            f"{size / 2**20:.0f} MiB of features; child peak RSS {peak:.0f} MiB (anonymous "
            f"at the end {anon:.0f} MiB, the rest mapped shard pages)")


def main(argv: Sequence[str] | None = None) -> list[list]:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--queries", type=int, default=256)
    p.add_argument("--kinds", default="flat,ivf,hnsw")
    p.add_argument("--export", action="store_true", help="also time the Parquet export")
    p.add_argument("--nprobe", type=int, default=None, help="IVF lists probed (default: auto)")
    args = p.parse_args(argv)
    if args.quick:
        args.rows, args.dim, args.clusters, args.queries = 4000, 32, 40, 32
    device = resolve_device(args.device)
    print(machine_line(device))
    path = Path(args.bench_dir) / f"index_store_{args.rows}x{args.dim}"
    started = time.perf_counter()
    store = synthetic_store(path, args.rows, args.dim, args.clusters)
    print(f"store: {args.rows} x {args.dim} float16, {args.clusters} clusters "
          f"(ready in {time.perf_counter() - started:.1f} s); {args.queries} queries, k=10")
    q = queries(store, args.queries)
    exact, ref = measure_exact(store, q, 10, str(device))
    rows = [exact] + [measure_index(store, kind, q, 10, ref, args.nprobe)
                      for kind in args.kinds.split(",")]
    print()
    print(table(f"search, cosine, {args.rows} x {args.dim} float16 ({device.type})",
                ["method", "build s", "1 query ms", "batched queries/s", "recall@10"], rows))
    if args.export:
        print(measure_export(store, path.with_suffix(".parquet")))
    write_json(args.json, {"rows": rows, "args": vars(args)})
    return rows


if __name__ == "__main__":
    main()

"""CKA and RSA between two big stores: seconds and memory of ``compare_stores`` (issue #28).

    PYTHONPATH=. python benchmarks/similarity_scale.py            # 100,000 rows x 2048, float16
    PYTHONPATH=. python benchmarks/similarity_scale.py --quick    # 2,000 rows x 64

Two stores of the same keys are written once (``StoreWriter``, cached under the bench
folder): A random, B = A times a random matrix plus noise. Each batch size runs in a fresh
child process (as a user's script would) that samples its anonymous memory (``RssAnon``:
the arrays it allocates, not the file pages the memory maps bring in, which the kernel
drops under pressure) every 10 ms; the peak is what the minibatches cost.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import base_parser, machine_line, table

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys, threading, time
from transferlab.analysis.similarity import compare_stores
from transferlab.store.reader import FeatureStore

def anon_kb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    return 0

peak, stop = [anon_kb()], threading.Event()
def watch():
    while not stop.is_set():
        peak[0] = max(peak[0], anon_kb())
        time.sleep(0.01)
watcher = threading.Thread(target=watch, daemon=True)
watcher.start()
a, b = FeatureStore.open(sys.argv[1]), FeatureStore.open(sys.argv[2])
base = anon_kb()
t0 = time.perf_counter()
res = compare_stores({"a": a}, {"b": b}, batch_size=int(sys.argv[3]), rsa_sample_size=1000)
seconds = time.perf_counter() - t0
stop.set()
watcher.join()
print(json.dumps({"seconds": seconds, "cka": float(res.cka[0, 0]), "rsa": float(res.rsa[0, 0]),
                  "base_mb": base / 1024, "peak_mb": peak[0] / 1024, "rows": res.n_keys}))
"""


def build_pair(directory: Path, rows: int, dim: int) -> tuple[Path, Path]:
    import numpy as np

    from transferlab.store.reader import FeatureStore
    from transferlab.store.writer import StoreWriter

    a, b = directory / "a", directory / "b"
    try:
        if len(FeatureStore.open(a)) == rows and len(FeatureStore.open(b)) == rows:
            return a, b
    except Exception:
        pass
    rng = np.random.default_rng(0)
    mix = rng.standard_normal((dim, dim), dtype=np.float32) / np.sqrt(dim)
    writers = [StoreWriter(p, {"bench": rows}, "float16", 4096, overwrite=True, fsync=False)
               for p in (a, b)]
    for start in range(0, rows, 10_000):
        n = min(10_000, rows - start)
        keys = [f"image_{start + i:08d}.jpg" for i in range(n)]
        x = rng.standard_normal((n, dim), dtype=np.float32)
        y = np.tanh(x @ mix) + 0.5 * rng.standard_normal((n, dim), dtype=np.float32)
        writers[0].add(keys, [0] * n, x)
        writers[1].add(keys, [0] * n, y)
    for w in writers:
        w.close({})
    return a, b


def measure(a: Path, b: Path, batch: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(a), str(b), str(batch)], check=True,
                         capture_output=True, text=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--dim", type=int, default=None)
    parser.add_argument("--batches", type=int, nargs="+", default=None)
    args = parser.parse_args(argv)
    rows = args.rows or (2_000 if args.quick else 100_000)
    dim = args.dim or (64 if args.quick else 2048)
    batches = args.batches or ([256, 1024] if args.quick else [512, 1024, 2048])
    a, b = build_pair(Path(args.bench_dir) / f"similarity_{rows}x{dim}", rows, dim)
    results = {batch: measure(a, b, batch) for batch in batches}
    import torch

    print(machine_line(torch.device("cpu")))
    store_mb = sum(p.stat().st_size for p in (a / "shards").glob("*.npy")) / 1e6
    print(f"stores: 2 x {rows:,} rows x {dim} float16 ({store_mb:.0f} MB of shards each); "
          "unbiased minibatch CKA and RSA on 1,000 images, one fresh process per row")
    print(table("CKA + RSA between two stores", [
        "batch", "seconds", "anonymous memory MB (peak - at start)", "CKA", "RSA"],
        [[batch, r["seconds"], r["peak_mb"] - r["base_mb"], f"{r['cka']:.4f}",
          f"{r['rsa']:.4f}"] for batch, r in results.items()]))
    return results


if __name__ == "__main__":
    main()

"""Peak resident memory of an extraction of 1,000 vs 10,000 images: it must not grow with N.

    PYTHONPATH=. python benchmarks/memory.py            # 1,000 and 10,000 tiny PNGs
    PYTHONPATH=. python benchmarks/memory.py --quick    # 50 and 500

Each extraction runs in a fresh child process (``run_extract`` with automatic settings, a
tiny timm model at a small input size, features to a store on disk); the child reports its
own peak resident set (``ru_maxrss``), the peak of its finished children (DataLoader
workers, if any) and its resident set before the run started (Python + torch + timm). The
folders of tiny PNGs are generated once and cached. Target: peaks differ by < 20%.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    base_parser,
    extract_config,
    load_line,
    machine_line,
    resolve_device,
    table,
    tiny_folder,
    write_json,
)

ROOT = Path(__file__).resolve().parents[1]


def rss_kb(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def child(args) -> None:
    """One extraction in this (fresh) process; prints a JSON line with the memory figures."""
    import resource

    from benchmarks.common import clear_store
    from transferlab.extract.runner import run_extract

    extra = [f"preprocess.input_size=[{args.input_size},{args.input_size}]",
             f"runtime.device={args.device_type}", *args.set]
    cfg = extract_config(Path(args.data), Path(args.out), args.model, extra)
    clear_store(Path(args.out))
    before = rss_kb()
    # importing torch already ran a (large) helper child; only count children started later
    kids_before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result = run_extract(cfg)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    report = {"written": result.written, "seconds": result.seconds,
              "rss_before_kb": before,
              "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
              "peak_children_kb": kids if kids > kids_before else None,
              "workers": result.store.meta["runtime"]["num_workers"],
              "feature_dim": int(result.store.features.shape[1])}
    print("MEMORY " + json.dumps(report))


def run_child(data: Path, out: Path, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--data", str(data),
           "--out", str(out), "--model", args.model, "--input-size", str(args.input_size),
           "--device-type", args.device_type]
    for item in args.set:
        cmd += ["--set", item]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    lines = [s for s in done.stdout.splitlines() if s.startswith("MEMORY ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"child failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return json.loads(lines[-1][len("MEMORY "):])


def main(argv: Sequence[str] | None = None) -> list[dict]:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1000,10000", help="image counts, comma-separated")
    p.add_argument("--model", default="test_resnet")
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--set", action="append", default=[],
                   help="extra transferlab override for the children (repeatable), "
                        "e.g. --set runtime.num_workers=2")
    p.add_argument("--child", action="store_true", help=argparse_hidden())
    p.add_argument("--data", help=argparse_hidden())
    p.add_argument("--out", help=argparse_hidden())
    p.add_argument("--device-type", default=None, help=argparse_hidden())
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return []
    device = resolve_device(args.device)
    args.device_type = device.type
    bench = Path(args.bench_dir)
    sizes = [20, 100] if args.quick else [int(s) for s in args.sizes.split(",")]
    print(machine_line(device))
    print(f"model: {args.model} at {args.input_size}x{args.input_size}, automatic settings"
          f"{' + ' + ' '.join(args.set) if args.set else ''}")
    print(f"before: {load_line()}")
    results, rows = [], []
    for n in sizes:
        data = tiny_folder(bench, n)
        r = run_child(data, bench / "stores" / f"memory_{n}", args)
        r["images"] = n
        results.append(r)
    base = max(results[0]["peak_kb"], 1)
    for r in results:
        kids = r["peak_children_kb"]
        rows.append([r["images"], r["written"], r["feature_dim"], r["workers"],
                     r["rss_before_kb"] / 1024, r["peak_kb"] / 1024,
                     "-" if kids is None else kids / 1024,
                     (r["peak_kb"] - r["rss_before_kb"]) / 1024, r["peak_kb"] / base,
                     r["written"] / r["seconds"]])
    print(f"after: {load_line()}")
    print()
    growth = results[-1]["peak_kb"] / base - 1.0
    print(table(f"peak resident memory ({device.type}; target: < 20% apart; measured "
                f"{growth * 100:+.1f}%: {'met' if abs(growth) < 0.2 else 'NOT met'})",
                ["images", "written", "feature dim", "workers", "RSS before run MB", "peak RSS MB",
                 "peak workers MB", "peak - before MB", "peak / first", "img/s (whole run)"],
                rows))
    write_json(args.json, {"machine": machine_line(device), "results": results})
    return results


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()

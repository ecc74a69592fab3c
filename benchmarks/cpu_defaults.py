"""Which CPU settings are fastest on this machine? Evidence for the automatic runtime
settings (``transferlab/runtime/device.py``: ``resolve_runtime``, ``default_batch_size``,
``tune_malloc``).

    PYTHONPATH=. python benchmarks/cpu_defaults.py                 # resnet50
    PYTHONPATH=. python benchmarks/cpu_defaults.py --models resnet50,legacy_xception
    PYTHONPATH=. python benchmarks/cpu_defaults.py --quick         # tiny model, tiny grid

Two grids, each measured in alternating rounds in one process (retried when no round was
quiet). Each row reports the best measurement taken while other processes used at most 10%
of the machine (``common.sample``), and its ratio to the automatic setting's:

1. forward only (synthetic batch, no data): batch {1, 4, 8, 16, 32} x channels_last
   {on, off} at the automatic precision (bf16 on CPUs with AMX or AVX512-BF16, else fp32) with the
   automatic thread count; the other precision at every batch size (channels_last on);
   threads {1, cores} at the automatic batch size; BatchNorm folding off
   (``runtime.fold_bn=false``) at the automatic settings.
2. end to end (``run_extract`` over ~500x375 JPEGs): DataLoader workers {0, 1, 2} with the
   automatic thread split (cores - workers) and with all cores for torch (oversubscribed),
   plus the best forward batch sizes with workers 0.

3. glibc malloc as is (``runtime.tune_malloc=false``) vs ``tune_malloc()`` (the
   default: big blocks from the heap, no trimming), each in a fresh process: forward at
   batch 4, 16, 32 and end to end.

Combinations dominated in grid 1 (channels_last off, the slower precision) are not
repeated in grid 2.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    Forward,
    Sample,
    base_parser,
    busy_note,
    cpu_cores,
    extract_config,
    folder_stats,
    jpeg_folder,
    load_line,
    machine_line,
    others,
    pick,
    rounds_of,
    run_extract_ips,
    table,
    write_json,
)
from transferlab.runtime.device import cpu_has_bf16_units, resolve_precision, tune_malloc


def settings(batch: int | None = None, cl: bool | None = None, precision: str | None = None,
             workers: int | None = None, threads: int | None = None,
             fold: bool | None = None) -> list[str]:
    """key=value overrides; None leaves a setting automatic."""
    out = ["runtime.device=cpu"]
    if precision is not None:
        out.append(f"runtime.precision={precision}")
    if fold is not None:
        out.append(f"runtime.fold_bn={str(fold).lower()}")
    if batch is not None:
        out.append(f"runtime.batch_size={batch}")
    if cl is not None:
        out.append(f"runtime.channels_last={str(cl).lower()}")
    if workers is not None:
        out.append(f"runtime.num_workers={workers}")
    if threads is not None:
        out.append(f"runtime.threads={threads}")
    return out


def forward_grid(batches: list[int], cores: int, other_precision: str) -> list[dict]:
    grid = [dict(batch=b, cl=cl) for b in batches for cl in (True, False)]
    grid += [dict(batch=b, cl=True, precision=other_precision) for b in batches]
    grid += [dict(threads=t) for t in sorted({1, cores})]
    grid.append(dict(fold=False))
    return [{"precision": None, "batch": None, "cl": None, "threads": None, "fold": None, **g}
            for g in grid]


def e2e_grid(cores: int, batches: list[int], max_workers: int = 2) -> list[dict]:
    workers = range(0, min(max_workers, cores) + 1)
    grid = [dict(workers=w) for w in workers]  # automatic thread split
    grid += [dict(workers=w, threads=cores) for w in workers if w]
    grid += [dict(workers=0, batch=b) for b in batches]
    return [{"batch": None, "threads": None, **g} for g in grid]


def run_forward(model: str, data: Path, out: Path, grid: list[dict], rounds: int,
                images: int) -> list[dict]:
    cases: dict[str, Forward] = {}
    for i, g in enumerate(grid):
        cfg = extract_config(data, out, model, settings(g["batch"], g["cl"], g["precision"],
                                                        threads=g["threads"], fold=g["fold"]))
        cases[str(i)] = Forward(cfg)
    cases["auto"] = Forward(extract_config(data, out, model, settings()))

    def measure(f: Forward):
        return lambda: (f.images_per_second(0.0, warmup=1,
                                            min_steps=max(1, images // f.batch_size)), None)

    samples = rounds_of({k: measure(f) for k, f in cases.items()}, rounds)
    folds = {str(i): g["fold"] is not False for i, g in enumerate(grid)}
    return [result_row("forward", cases[k].batch_size, cases[k].rt.to_dict(), "-",
                       samples[k], samples["auto"], rounds, k == "auto", folds.get(k, True))
            for k in cases]


def result_row(mode: str, batch: int, rt: dict, workers, got: list[Sample],
               base: list[Sample], rounds: int, default: bool, fold: bool = True) -> dict:
    s, b = pick(got), pick(base)
    return {"mode": mode, "batch": batch, "cl": rt["channels_last"], "precision": rt["precision"],
            "fold_bn": fold,
            "workers": workers, "threads": rt["threads"], "ips": s.value, "others": others(s),
            "vs_default": s.value / b.value, "default": default,
            "rounds": [x.value for x in got], "foreign": [x.foreign for x in got]}


def run_e2e(model: str, data: Path, out: Path, grid: list[dict], rounds: int,
            images: int) -> list[dict]:
    cfgs = {str(i): extract_config(data, out, model,
                                   settings(g["batch"], workers=g["workers"], threads=g["threads"])
                                   + [f"data.limit={images}"]) for i, g in enumerate(grid)}
    cfgs["auto"] = extract_config(data, out, model, settings() + [f"data.limit={images}"])
    run_extract_ips(extract_config(data, out, model, settings() + ["data.limit=16"]))  # warm-up

    def measure(cfg):
        def run():
            ips, result = run_extract_ips(cfg)
            return ips, result.store.meta["runtime"]
        return run

    samples = rounds_of({k: measure(c) for k, c in cfgs.items()}, rounds)
    rows = []
    for k, got in samples.items():
        rt = got[0].extra
        rows.append(result_row("end-to-end", rt["batch_size"], rt, rt["num_workers"], got,
                               samples["auto"], rounds, k == "auto"))
    return rows


def alloc_child(model: str, data: Path, out: Path, mode: str, images: int,
                batches: list[int]) -> dict:
    """In a fresh process: forward at ``batches`` and end-to-end (automatic settings)."""
    tuned = tune_malloc() if mode == "tuned" else False
    malloc = [f"runtime.tune_malloc={str(mode == 'tuned').lower()}"]
    result = {"mode": mode, "applied": tuned, "forward": {}}
    for b in batches:
        f = Forward(extract_config(data, out, model, settings(b) + malloc))
        result["forward"][b] = f.images_per_second(0.0, warmup=2,
                                                   min_steps=max(2, images // b))
        del f
    cfg = extract_config(data, out, model, settings() + malloc + [f"data.limit={images}"])
    run_extract_ips(extract_config(data, out, model, settings() + malloc + ["data.limit=16"]))
    result["e2e"], res = run_extract_ips(cfg)
    result["batch"] = res.store.meta["runtime"]["batch_size"]
    return result


def run_alloc(model: str, data: Path, out: Path, rounds: int, images: int,
              batches: list[int]) -> list[dict]:
    """glibc malloc as is vs ``tune_malloc()``, each in fresh processes, alternating."""
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}

    def case(mode: str):
        def run():
            cmd = [sys.executable, str(Path(__file__).resolve()), "--alloc-child", mode,
                   "--models", model, "--images", str(images), "--bench-dir", str(out.parent),
                   "--alloc-batches", ",".join(map(str, batches))]
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            lines = [x for x in done.stdout.splitlines() if x.startswith("ALLOC ")]
            if done.returncode != 0 or not lines:
                raise RuntimeError(f"child failed:\n{done.stdout}\n{done.stderr}")
            r = json.loads(lines[-1][len("ALLOC "):])
            return r["e2e"], r
        return run

    samples = rounds_of({m: case(m) for m in ("default", "tuned")}, rounds)
    base = pick(samples["default"])
    rows = []
    for mode, got in samples.items():
        s = pick(got)
        r = s.extra
        rows.append({"model": model, "malloc": mode if r["applied"] or mode == "default"
                     else "tuned (not applied)", "batch": r["batch"], "e2e": s.value,
                     "e2e_vs": s.value / base.value, "others": others(s),
                     **{f"fwd{b}": v for b, v in r["forward"].items()}})
    return rows


def main(argv: Sequence[str] | None = None) -> list[dict]:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet50", help="comma-separated timm names")
    p.add_argument("--images", type=int, default=48, help="images per end-to-end pass")
    p.add_argument("--forward-images", type=int, default=32, help="images per forward pass")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--alloc-rounds", type=int, default=2,
                   help="rounds of the malloc comparison (0 = skip it)")
    p.add_argument("--alloc-only", action="store_true",
                   help="only the malloc comparison (skip grids 1 and 2)")
    p.add_argument("--alloc-child", choices=["default", "tuned"], help=argparse.SUPPRESS)
    p.add_argument("--alloc-batches", default="4,16,32", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    bench = Path(args.bench_dir)
    if args.alloc_child:
        data = jpeg_folder(bench, 8, size=(96, 72)) if args.images <= 8 else \
            jpeg_folder(bench, max(args.images, 128))
        r = alloc_child(args.models, data, bench / "stores" / "cpu_alloc", args.alloc_child,
                        args.images, [int(b) for b in args.alloc_batches.split(",")])
        print("ALLOC " + json.dumps(r))
        return []
    cores = cpu_cores()
    if args.quick:
        models, rounds, images, fimages = ["test_resnet"], 1, 8, 8
        batches, e2e_batches = [4], []
        alloc_rounds, alloc_batches = 0, [4]
        data = jpeg_folder(bench, 8, size=(96, 72))
    else:
        models, rounds, images, fimages = (args.models.split(","), args.rounds, args.images,
                                           args.forward_images)
        batches, e2e_batches = [1, 4, 8, 16, 32], [4, 8, 32]
        alloc_rounds, alloc_batches = args.alloc_rounds, [4, 16, 32]
        data = jpeg_folder(bench, max(images, 128))
    import torch
    auto = resolve_precision("auto", torch.device("cpu"))
    other = "fp32" if auto == "bf16" else "bf16"
    print(machine_line(torch.device("cpu")))
    print(f"automatic precision here: {auto} (bf16 matrix units: "
          f"{'yes' if cpu_has_bf16_units() else 'no'})")
    print(f"data: {data} ({folder_stats(data)})")
    print(f"before: {load_line()}")
    all_rows: list[dict] = []
    alloc_rows: list[dict] = []
    for model in models:
        out = bench / "stores" / "cpu_defaults"
        rows = [] if args.alloc_only else run_forward(
            model, data, out, forward_grid(batches, cores, other), rounds, fimages)
        if not args.alloc_only:
            rows += run_e2e(model, data, out,
                            e2e_grid(cores, e2e_batches, 1 if args.quick else 2), rounds, images)
        if alloc_rounds:
            alloc_rows += run_alloc(model, data, bench / "stores" / "cpu_alloc", alloc_rounds,
                                    images, alloc_batches)
        for r in rows:
            r["model"] = model
        all_rows += rows
        print(f"after {model}: {load_line()}")
    print()
    if all_rows:
        print(table("CPU settings (img/s of the reported measurement; 'vs auto' = over the "
                    "automatic setting's, measured in the same rounds)",
                    ["model", "mode", "batch", "channels_last", "precision", "fold_bn", "workers",
                     "threads", "img/s", "others %", "vs auto", "all measurements"],
                    [[r["model"], r["mode"] + (" (auto)" if r["default"] else ""), r["batch"],
                      "on" if r["cl"] else "off", r["precision"], "on" if r["fold_bn"] else "off",
                      r["workers"], r["threads"],
                      r["ips"], r["others"], r["vs_default"],
                      " ".join(f"{x:.1f}/{f * 100:.0f}%"
                               for x, f in zip(r["rounds"], r["foreign"]))]
                     for r in all_rows]))
        print(busy_note())
        print("all measurements: img/s / others % of every round (and retry) of that row.")
    if alloc_rows:
        print()
        print(table("glibc malloc as is vs tuned (mallopt M_MMAP_THRESHOLD = M_TRIM_THRESHOLD "
                    "= 1 GiB), fresh process each (img/s)",
                    ["model", "malloc", *[f"forward b{b}" for b in alloc_batches],
                     "end-to-end (auto)", "vs as is", "others %"],
                    [[r["model"], r["malloc"], *[r[f"fwd{b}"] for b in alloc_batches],
                      r["e2e"], r["e2e_vs"], r["others"]] for r in alloc_rows]))
    all_rows += [{"alloc": r} for r in alloc_rows]
    write_json(args.json, {"machine": machine_line(torch.device("cpu")), "rows": all_rows})
    return all_rows


if __name__ == "__main__":
    main()

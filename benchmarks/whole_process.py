"""Whole-process extraction speed (``python -m transferlab.extract``) over the best pure forward.

    PYTHONPATH=. python benchmarks/whole_process.py            # resnet50 @224, legacy_xception @299
    PYTHONPATH=. python benchmarks/whole_process.py --quick    # tiny model, a few images

Measured the way a user runs it (issue #16): the command as a fresh process over N_small and
N_big photo-like 500x375 JPEGs (24 and 152), rate = (N_big - N_small) / (t_big - t_small), so
interpreter start-up, imports, model building and the first batches cancel. The ceiling is
the best pure forward this machine finds for the model: fp32 and bf16 autocast, NCHW and
channels_last, batch 1-32, BatchNorm folded, all cores, glibc malloc tuned and kept warm
(warm-up steps before every measurement), on a synthetic batch. Ceiling, small run and big
run alternate (order rotating) over ``--rounds``; the per-round ratios are printed. A last,
instrumented run of N_big images (``stage_child``: the same command with timers around the
decode, compute and store calls) gives the seconds per stage.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    QUIET,
    Forward,
    base_parser,
    busy_note,
    clear_store,
    cpu_cores,
    extract_config,
    folder_stats,
    jpeg_folder,
    load_line,
    machine_line,
    median,
    others,
    pick,
    resolve_device,
    sample,
    table,
    write_json,
)

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("resnet50", "legacy_xception")
BATCHES = (1, 2, 4, 8, 16, 32)
GPU_BATCHES = (64, 128, 256)  # transferlab's automatic GPU batch is 256
GPU_SIZES = "512,2560"  # a GPU batch is 256 images: several batches between the two runs


# ---------------------------------------------------------------------------------------
# The command as a whole process
# ---------------------------------------------------------------------------------------


def write_config(path: Path, data: Path, out: Path, model: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"model:\n  name: {model}\n  pretrained: false\n"
                    f"data:\n  source: folder\n  root: {data}\n"
                    f"output:\n  dir: {out}\n  overwrite: true\n"
                    "runtime:\n  progress: false\n")
    return path


def yaml_value(config: Path, key: str) -> str:
    line = next(x for x in config.read_text().splitlines() if x.strip().startswith(key + ":"))
    return line.split(":", 1)[1].strip()


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def run_command(config: Path, images: int, extra: Sequence[str] = (),
                stages: bool = False, candidate: str | None = None,
                watch: Callable[[Path, subprocess.Popen], None] | None = None
                ) -> tuple[float, dict]:
    """Wall seconds of one ``python -m transferlab.extract CONFIG data.limit=N ...`` (spawn to
    exit) and, with ``stages``, the child's per-stage seconds; ``candidate``: the same
    command run as a decode candidate (``decode_candidates.py``); ``watch(store
    dir, child)`` runs while the child does (``contention.py`` changes the load in it)."""
    args = [str(config), f"data.limit={images}", *extra]
    clear_store(Path(yaml_value(config, "dir")))  # a fresh store: never a resume
    if stages:
        cmd = [sys.executable, "-c", "import benchmarks.whole_process as w; w.stage_child()",
               *args]
    elif candidate:
        code = f"import benchmarks.decode_candidates as c; c.main({candidate!r})"
        cmd = [sys.executable, "-c", code, *args]
    else:
        cmd = [sys.executable, "-m", "transferlab.extract", *args]
    started = time.perf_counter()
    child = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    if watch is not None:
        watch(Path(yaml_value(config, "dir")), child)
    stdout, stderr = child.communicate()
    wall = time.perf_counter() - started
    proc = subprocess.CompletedProcess(cmd, child.returncode, stdout, stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr[-2000:]}")
    if f"{images} images written, 0 failed" not in proc.stdout:  # a fast failure is no speed
        raise RuntimeError(f"{' '.join(cmd)} did not write {images} images: {proc.stdout[-500:]}")
    info: dict = {"wall": wall}
    if stages:
        info.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    return wall, info


def stage_child() -> None:
    """``python -m transferlab.extract`` with timers around its stages (one JSON line out)."""
    from transferlab.commands import extraction as cli
    from transferlab.extract import batches
    from transferlab.models import engine as compute
    from transferlab.store import writer

    spent = {"decode": 0.0, "compute": 0.0, "store": 0.0, "close": 0.0}

    def timed(owner, name: str, stage: str) -> None:
        inner = getattr(owner, name)

        def wrapper(*a, **k):
            s = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                spent[stage] += time.perf_counter() - s
        setattr(owner, name, wrapper)

    timed(batches.ViewsDataset, "__getitems__", "decode")
    timed(compute.FeatureComputer, "start", "compute")
    timed(compute.FeatureComputer, "finish", "compute")
    for name in ("add", "add_failures"):
        timed(writer.StoreWriter, name, "store")
    timed(writer.StoreWriter, "close", "close")
    result = cli.command(sys.argv[1:])
    spent.update(loop=result.loop_seconds, run=result.seconds,
                 written=result.written)
    meta = json.loads((result.out_dir / "meta.json").read_text())
    spent["runtime"] = meta.get("runtime")
    print(json.dumps(spent))


def rate(n_small: int, t_small: float, n_big: int, t_big: float) -> float:
    return (n_big - n_small) / (t_big - t_small) if t_big > t_small else float("nan")


# ---------------------------------------------------------------------------------------
# The ceiling: the best pure forward this machine finds
# ---------------------------------------------------------------------------------------


def forward_at(fwd: Forward, full, batch: int) -> Forward:
    fwd.batch_size, fwd.x = batch, full[:batch]
    return fwd


def batch_sweep(fwd: Forward, batches: Sequence[int], seconds: float) -> list[dict]:
    full, out = fwd.x, []
    for b in batches:
        forward_at(fwd, full, b)
        s = sample(lambda: (fwd.images_per_second(seconds, warmup=2, min_steps=2), None))
        out.append({"batch": b, "ips": s.value, "foreign": s.foreign})
    return out


# what the ceiling search tries per runtime.backend (issue #30): precisions, layouts (an
# exported graph has one layout: its runtime picks it)
BACKEND_GRID = {"eager": (("fp32", "bf16"), (False, True)),
                "compile": (("fp32", "bf16"), (True,)),
                "onnxruntime": (("fp32",), (False,)),
                "int8": (("int8",), (False,)),  # ONNX Runtime's int8 graph (lossy: opted into)
                "openvino": (("fp32", "bf16"), (False,))}


def search_ceiling(data: Path, out: Path, model: str, batches: Sequence[int],
                   device: str, seconds: float,
                   backends: Sequence[str] = ("eager",)) -> tuple[list[dict], dict]:
    """Every (backend, precision, layout, batch), measured once; (all rows, the best one)."""
    rows = []
    # on a GPU fp32 and NCHW never win for conv nets (tensor cores): searched on CPUs only
    cuda = device == "cuda"
    for name in ("eager",) if cuda else backends:
        precisions, layouts = BACKEND_GRID[name]
        backend = "onnxruntime" if name == "int8" else name
        for precision in ("bf16", "fp16") if cuda else precisions:
            for cl in (True,) if cuda else layouts:
                cfg = extract_config(data, out, model, [
                    f"runtime.precision={precision}", f"runtime.channels_last={str(cl).lower()}",
                    f"runtime.batch_size={max(batches)}", f"runtime.threads={cpu_cores()}",
                    f"runtime.device={device}", f"runtime.backend={backend}"])
                rows += [{"backend": backend, "precision": precision, "channels_last": cl, **r}
                         for r in batch_sweep(Forward(cfg), batches, seconds)]
    quiet = [r for r in rows if r["foreign"] <= QUIET] or rows
    return rows, max(quiet, key=lambda r: r["ips"])


def ceiling_forward(data: Path, out: Path, model: str, best: dict, device: str) -> Forward:
    cfg = extract_config(data, out, model, [
        f"runtime.precision={best['precision']}",
        f"runtime.channels_last={str(best['channels_last']).lower()}",
        f"runtime.batch_size={best['batch']}", f"runtime.threads={cpu_cores()}",
        f"runtime.device={device}", f"runtime.backend={best.get('backend', 'eager')}"])
    return Forward(cfg)


def settings(r: dict) -> str:
    return (f"{r.get('backend', 'eager')} {r['precision']}, "
            f"{'NHWC' if r['channels_last'] else 'NCHW'}, batch {r['batch']}")


# ---------------------------------------------------------------------------------------
# One model: search, then ceiling / small / big alternating
# ---------------------------------------------------------------------------------------


def measure_model(model: str, data: Path, bench: Path, sizes: tuple[int, int], rounds: int,
                  batches: Sequence[int], search_s: float, extra: Sequence[str],
                  device: str, warm: bool = True, candidates: Sequence[str] = (),
                  options: dict[str, list[str]] | None = None,
                  backends: Sequence[str] = ("eager",)) -> dict:
    """``candidates``: decode candidates (``decode_candidates.py``); ``options``: name ->
    overrides, the shipped command with those settings (``gpu_decode``, ``compile``),
    measured alike; ``backends``: the runtime backends the ceiling search tries (where the
    best is not eager, the command with that backend and precision is measured too)."""
    out = bench / "stores" / f"whole_{model}"
    config = write_config(bench / "configs" / f"whole_{model}.yaml", data, out, model)
    grid, best = search_ceiling(data, out, model, batches, device, search_s, backends)
    fwd = ceiling_forward(data, out, model, best, device)
    if best.get("backend", "eager") != "eager":
        label = f"backend={best['backend']}" + (" int8" if best["precision"] == "int8" else "")
        options = {**(options or {}), label: [
            f"runtime.backend={best['backend']}", f"runtime.precision={best['precision']}"]}
    if warm:  # an exported graph's first export is paid here, once: later runs read the cache
        for sets in (options or {}).values():
            run_command(config, sizes[0], [*extra, *sets])
    if warm:
        run_command(config, sizes[0], extra)  # page cache, .pyc files
    cases = {"forward": lambda: (fwd.images_per_second(max(2.0, search_s), warmup=3), None)}
    runs = {"transferlab": (None, []), **{c: (c, []) for c in candidates},
            **{name: (None, sets) for name, sets in (options or {}).items()}}
    for variant, (cand, sets) in runs.items():
        for which, n in (("small", sizes[0]), ("big", sizes[1])):
            cases[f"{variant}:{which}"] = (lambda n=n, cand=cand, sets=sets:
                                           run_command(config, n, [*extra, *sets],
                                                       candidate=cand))
    samples = alternate(cases, rounds)
    variants = {}
    for variant in runs:
        small, big = samples[f"{variant}:small"], samples[f"{variant}:big"]
        rates = [rate(sizes[0], s.value, sizes[1], b.value) for s, b in zip(small, big)]
        ratios = [x / f.value for x, f in zip(rates, samples["forward"])]
        busy = [max(s.foreign, b.foreign, f.foreign)
                for s, b, f in zip(small, big, samples["forward"])]
        quiet = [i for i, x in enumerate(busy) if x <= QUIET] or list(range(len(busy)))
        variants[variant] = {"rates": rates, "ratios": ratios, "others": busy,
                             "quiet_rounds": quiet,
                             "median_rate": median([rates[i] for i in quiet]),
                             "median_ratio": median([ratios[i] for i in quiet]),
                             "t_small": [x.value for x in small], "t_big": [x.value for x in big]}
    _, stages = run_command(config, sizes[1], extra, stages=True)
    worst = max(max(s.foreign for s in v) for v in samples.values())
    return {"model": model, "input": "x".join(map(str, fwd.spec.input_size[1:])),
            "best": best, "grid": grid, "variants": variants,
            "forward": [s.value for s in samples["forward"]],
            "forward_best": pick(samples["forward"]).value,
            "forward_others": others(pick(samples["forward"])),
            "worst_others": worst, "stages": stages, "sizes": sizes}


def alternate(cases: dict, rounds: int) -> dict[str, list]:
    """Every case once per round, the order rotating by one each round."""
    samples: dict[str, list] = {k: [] for k in cases}
    names = list(cases)
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            samples[name].append(sample(cases[name]))
    return samples


def stage_row(r: dict) -> list:
    st, n_big = r["stages"], r["sizes"][1]
    loop = st["loop"]
    rest = loop - st["decode"] - st["compute"] - st["store"]
    return [r["model"], n_big, st["wall"], st["wall"] - st["run"],
            st["run"] - loop - st["close"], st["decode"], st["compute"], st["store"], rest,
            st["close"], st["written"] / loop if loop else 0.0,
            (st.get("runtime") or {}).get("threads", "-")]


def main(argv: Sequence[str] | None = None) -> list[dict]:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated timm names")
    p.add_argument("--sizes", default=None,
                   help=f"N_small,N_big images per run (default 24,152; {GPU_SIZES} on CUDA)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    p.add_argument("--search-seconds", type=float, default=1.0,
                   help="seconds per ceiling-search configuration")
    p.add_argument("--candidates", default="",
                   help="decode candidates to measure beside the shipped path: pil, image "
                   "(benchmarks/decode_candidates.py)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra override for the command (repeatable)")
    p.add_argument("--backends", default="eager",
                   help="runtime backends the ceiling search tries, comma-separated "
                   "(eager,compile,onnxruntime,openvino; int8: ONNX Runtime's int8 graph)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE[,...]",
                   help="also measure the command with these overrides, in the same "
                   "alternation (repeatable), e.g. fp32:runtime.precision=fp32")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    bench = Path(args.bench_dir)
    cuda = device.type == "cuda"
    sizes = args.sizes or (GPU_SIZES if cuda else "24,152")
    small, big = (int(v) for v in sizes.split(","))
    models, batches, rounds, search_s = args.models.split(","), \
        GPU_BATCHES if cuda else BATCHES, args.rounds, args.search_seconds
    options = {name: [f"runtime.{name}=true"]
               for name, on in (("gpu_decode", args.gpu_decode), ("compile", args.compile)) if on}
    for spec in args.variant:
        name, _, sets = spec.partition(":")
        options[name] = [x for x in sets.split(",") if x]
    if args.quick:
        models, (small, big), batches, rounds, search_s = ["test_resnet"], (4, 12), (1, 4), 1, 0.1
        data = jpeg_folder(bench, 12, size=(96, 72))
    else:  # GPU runs need thousands of files: copies of 512 generated ones
        data = jpeg_folder(bench, big, distinct=512 if cuda else None)
    extra = [f"runtime.device={device.type}", *args.set]
    print(machine_line(device))
    print(f"data: {data} ({folder_stats(data)}); runs of {small} and {big} images")
    print(f"before: {load_line()}")
    results = [measure_model(m, data, bench, (small, big), rounds, batches, search_s, extra,
                             device.type, not args.quick,
                             [c for c in args.candidates.split(",") if c], options,
                             [b for b in args.backends.split(",") if b])
               for m in models]
    print(f"after: {load_line()}")
    print()
    rows = [[r["model"], r["input"], name, settings(r["best"]), r["forward_best"],
             r["forward_others"], v["median_rate"], v["median_ratio"],
             " ".join(f"{x:.2f}" + ("" if o <= QUIET else "*")
                      for x, o in zip(v["ratios"], v["others"])),
             f"{len(v['quiet_rounds'])}/{len(v['ratios'])}",
             "yes" if v["median_ratio"] >= 0.9 else "NO"]
            for r in results for name, v in r["variants"].items()]
    print(table(f"whole process / best pure forward ({device.type}, target >= 0.9)",
                ["model", "input", "decode path", "best forward", "forward img/s", "others %",
                 "whole process img/s", "ratio (median)", "per round", "quiet rounds",
                 "target met"], rows))
    print()
    print(table(f"stages of one whole run of {big} images (seconds)",
                ["model", "images", "process wall", "interpreter, imports, exit",
                 "model + setup", "decode", "compute", "store", "loop other", "close",
                 "loop img/s", "threads"], [stage_row(r) for r in results]))
    print()
    print("whole process img/s: (N_big - N_small) / (t_big - t_small) of the round's two runs "
          "(spawn to exit); ratio: over the ceiling measured in the same round; medians over "
          "the quiet rounds (others <= 10% in all three measurements; * marks the others). "
          "model + setup: data scan, model, BatchNorm folding, cut check, store set-up. "
          "decode: the batches' decode + resize + crop (ViewsDataset.__getitems__); compute: "
          "normalise + forward + rows to numpy; store: StoreWriter calls. "
          + busy_note())
    write_json(args.json, {"machine": machine_line(device), "results": results})
    return results


if __name__ == "__main__":
    main()

"""Whole-process extraction speed per thread count, on a quiet machine and beside a busy core.

    PYTHONPATH=. python benchmarks/contention.py             # resnet50, 24 / 152 JPEGs
    PYTHONPATH=. python benchmarks/contention.py --quick     # tiny model, a few images

Researchers extract beside a notebook kernel, a training job or a second extraction
(issue #16 item 2). For each situation — ``quiet``, and ``busy``: one other process spinning
in a loop pinned to one core (``os.sched_setaffinity``) — and each setting —
``runtime.threads`` = 1 .. cores, and the automatic choice (``runtime.cores.usable_cores``) —
``python -m transferlab.extract`` runs as a whole process over N_small and N_big JPEGs and
the rate is (N_big - N_small) / (t_big - t_small), as in ``whole_process.py``. Situations
and settings alternate, the order rotating every round; per-round ratios to the automatic
setting of the same round and situation are printed. Targets: automatic >= 0.9 of the best
setting in each situation, and no loss when quiet.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    base_parser,
    cpu_cores,
    folder_stats,
    jpeg_folder,
    load_line,
    machine_line,
    median,
    resolve_device,
    sample,
    table,
    write_json,
)
from benchmarks.whole_process import rate, run_command, write_config, yaml_value

SPIN = "import os, sys\nos.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True:\n    pass\n"


@contextmanager
def busy_core(core: int | None) -> Iterator[None]:
    """One process spinning on ``core`` while the block runs (None: nothing extra)."""
    if core is None:
        yield
        return
    spinner = subprocess.Popen([sys.executable, "-c", SPIN, str(core)])
    try:
        time.sleep(0.5)  # running before the measured process starts and samples the load
        yield
    finally:
        spinner.kill()
        spinner.wait()


def chosen_threads(config: Path) -> int | None:
    meta = Path(yaml_value(config, "dir")) / "meta.json"
    try:
        return int(json.loads(meta.read_text())["runtime"]["threads"])
    except (OSError, KeyError, ValueError, TypeError):
        return None


def measure_pair(config: Path, sizes: tuple[int, int], extra: list[str]) -> dict:
    """Small and big run back to back (same situation): the rate, the threads used."""
    small = sample(lambda: run_command(config, sizes[0], extra))
    big = sample(lambda: run_command(config, sizes[1], extra))
    return {"ips": rate(sizes[0], small.value, sizes[1], big.value),
            "threads": chosen_threads(config), "foreign": max(small.foreign, big.foreign),
            "t_small": small.value, "t_big": big.value}


def run_rounds(config: Path, sizes: tuple[int, int], settings: dict[str, list[str]],
               situations: dict[str, int | None], rounds: int) -> dict[str, dict[str, list]]:
    """out[situation][setting] = one measure_pair dict per round, alternating."""
    out: dict[str, dict[str, list]] = {s: {k: [] for k in settings} for s in situations}
    names, places = list(settings), list(situations)
    for r in range(rounds):
        for place in places[r % len(places):] + places[:r % len(places)]:
            order = names[r % len(names):] + names[:r % len(names)]
            with busy_core(situations[place]):
                for name in order:
                    out[place][name].append(measure_pair(config, sizes, settings[name]))
    return out


def rows_of(results: dict[str, dict[str, list]]) -> list[list]:
    rows = []
    for place, by_setting in results.items():
        auto = by_setting["auto"]
        best = max(median([m["ips"] for m in ms]) for ms in by_setting.values())
        for name, ms in by_setting.items():
            ips = median([m["ips"] for m in ms])
            ratios = [m["ips"] / a["ips"] for m, a in zip(ms, auto)]
            threads = sorted({m["threads"] for m in ms if m["threads"] is not None})
            rows.append([place, name, "/".join(map(str, threads)) or "-", ips,
                         median(ratios), " ".join(f"{x:.2f}" for x in ratios), ips / best,
                         f"{max(m['foreign'] for m in ms) * 100:.0f}%"])
    return rows


def main(argv: Sequence[str] | None = None) -> dict:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--sizes", default="24,152", help="N_small,N_big images per run")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    bench = Path(args.bench_dir)
    cores = cpu_cores()
    small, big = (int(v) for v in args.sizes.split(","))
    model, rounds, counts = args.model, args.rounds, list(range(1, cores + 1))
    if args.quick:
        model, (small, big), rounds, counts = "test_resnet", (2, 6), 1, []
        data = jpeg_folder(bench, 6, size=(96, 72))
    else:
        data = jpeg_folder(bench, big)
    config = write_config(bench / "configs" / f"contention_{model}.yaml", data,
                          bench / "stores" / f"contention_{model}", model)
    base = [f"runtime.device={device.type}"]
    settings = {f"threads={n}": base + [f"runtime.threads={n}"] for n in counts}
    settings["auto"] = base
    situations = {"quiet": None, "busy": max(0, cores - 1)} if cores > 1 else {"quiet": None}
    print(machine_line(device))
    print(f"data: {data} ({folder_stats(data)}); model {model}; runs of {small} and {big}")
    print(f"before: {load_line()}")
    if not args.quick:
        run_command(config, small, base)  # page cache, .pyc files
    results = run_rounds(config, (small, big), settings, situations, rounds)
    print(f"after: {load_line()}")
    print()
    print(table(f"whole-process img/s by runtime.threads, quiet and beside one busy core "
                f"({model}, {device.type})",
                ["situation", "setting", "threads used", "img/s (median)", "vs auto (median)",
                 "vs auto per round", "of the best", "others %"], rows_of(results)))
    print()
    print("busy: one process spinning pinned to the last core while the runs of that "
          "situation go. img/s: (N_big - N_small) / (t_big - t_small) of a small and a big run "
          "back to back; vs auto: over the automatic setting in the same round and situation; "
          "of the best: median img/s over the best setting's median in that situation. "
          "others %: CPU share of other processes (the spinner counts: ~50% on 2 cores).")
    out = {"machine": machine_line(device), "model": model, "sizes": [small, big],
           "results": results}
    write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()

"""Whole-process extraction speed per thread count: quiet, beside a busy core, and beside
a neighbour that arrives or leaves during the run.

    PYTHONPATH=. python benchmarks/contention.py             # resnet50, 24 / 152 JPEGs
    PYTHONPATH=. python benchmarks/contention.py --quick     # tiny model, a few images

Researchers extract beside a notebook kernel, a training job or a second extraction
(issue #16 item 2). For each situation — ``quiet``; ``busy``: one other process spinning in
a loop pinned to one core (``os.sched_setaffinity``) all along; ``arrives``: it starts when
the run's loop starts, after the run sampled the load at start-up; ``leaves``: it spins at
start-up and stops when the loop starts — and each setting — ``runtime.threads`` = 1 ..
cores, and the automatic choice (``runtime.cores``: the start-up sample, then
``LoadFollower`` during the run) — ``python -m transferlab.extract`` runs as a whole process
over N_small and N_big JPEGs and the rate is (N_big - N_small) / (t_big - t_small), as in
``whole_process.py``. Situations and settings alternate, the order rotating every round;
per-round ratios to the automatic setting of the same round and situation are printed.
Targets: automatic >= 0.9 of the best setting in each situation, and no loss when quiet.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
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


class Neighbour:
    """One process spinning in a loop pinned to ``core``, started and stopped on demand."""

    def __init__(self, core: int):
        self.core, self.proc = core, None

    def spin(self, on: bool) -> None:
        """Start it (a no-op when running) or stop it (a no-op when stopped)."""
        if on and self.proc is None:
            self.proc = subprocess.Popen([sys.executable, "-c", SPIN, str(self.core)])
        elif not on and self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@dataclass(frozen=True)
class Situation:
    """When the neighbour spins, relative to each measured run: ``before`` its start (the
    start-up sample sees it), and ``during`` its loop (which begins when the run writes its
    config.yaml, after the sample)."""

    core: int | None = None
    before: bool = False
    during: bool = False


def situations(cores: int) -> dict[str, Situation]:
    if cores < 2:
        return {"quiet": Situation()}
    last = cores - 1
    return {"quiet": Situation(), "busy": Situation(last, True, True),
            "arrives": Situation(last, False, True), "leaves": Situation(last, True, False)}


@contextmanager
def neighbour_for(place: Situation) -> Iterator[tuple[Callable, Callable] | None]:
    """The neighbour of one situation: (``watch``, which moves it during a run, ``reset``,
    which puts it in its state before a run), or None when there is none."""
    if place.core is None:
        yield None
        return
    spinner = Neighbour(place.core)

    def watch(store: Path, child: subprocess.Popen) -> None:
        if place.before == place.during:
            return
        while child.poll() is None and not (store / "config.yaml").exists():
            time.sleep(0.01)  # the run's loop starts: its start-up sample is over
        spinner.spin(place.during)

    def reset() -> None:
        spinner.spin(place.before)
        time.sleep(0.5)  # running (or gone) before the measured process starts

    try:
        yield (watch, reset)
    finally:
        spinner.spin(False)


def chosen_threads(config: Path) -> tuple[int | None, list]:
    """The threads the last run started with, and its [seconds, threads] changes."""
    meta = Path(yaml_value(config, "dir")) / "meta.json"
    try:
        runtime = json.loads(meta.read_text())["runtime"]
        return int(runtime["threads"]), list(runtime.get("threads_followed", []))
    except (OSError, KeyError, ValueError, TypeError):
        return None, []


def measure_pair(config: Path, sizes: tuple[int, int], extra: list[str],
                 neighbour: tuple[Callable, Callable] | None) -> dict:
    """Small and big run back to back (same situation): the rate, the threads used (as
    started, and the changes of the big run)."""
    def run(n: int):
        if neighbour is None:
            return sample(lambda: run_command(config, n, extra))
        watch, reset = neighbour
        reset()
        return sample(lambda: run_command(config, n, extra, watch=watch))

    small = run(sizes[0])
    big = run(sizes[1])
    started, changes = chosen_threads(config)
    return {"ips": rate(sizes[0], small.value, sizes[1], big.value), "threads": started,
            "changes": changes, "foreign": max(small.foreign, big.foreign),
            "t_small": small.value, "t_big": big.value}


def run_rounds(config: Path, sizes: tuple[int, int], settings: dict[str, list[str]],
               places: dict[str, Situation], rounds: int) -> dict[str, dict[str, list]]:
    """out[situation][setting] = one measure_pair dict per round, alternating."""
    out: dict[str, dict[str, list]] = {s: {k: [] for k in settings} for s in places}
    names, order_places = list(settings), list(places)
    for r in range(rounds):
        k = r % len(order_places)
        for place in order_places[k:] + order_places[:k]:
            order = names[r % len(names):] + names[:r % len(names)]
            with neighbour_for(places[place]) as neighbour:
                for name in order:
                    out[place][name].append(measure_pair(config, sizes, settings[name],
                                                         neighbour))
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
            used = "/".join(map(str, threads)) or "-"
            moves = ["->".join(str(t) for _, t in m["changes"]) for m in ms if m["changes"]]
            if moves:
                used += " then " + ", ".join(sorted(set(moves)))
            rows.append([place, name, used, ips,
                         median(ratios), " ".join(f"{x:.2f}" for x in ratios), ips / best,
                         f"{max(m['foreign'] for m in ms) * 100:.0f}%"])
    return rows


def main(argv: Sequence[str] | None = None) -> dict:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--sizes", default="24,152", help="N_small,N_big images per run")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--situations", default="",
                   help="a subset of quiet,busy,arrives,leaves (default: all)")
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
    places = situations(cores)
    if args.situations:
        places = {k: v for k, v in places.items() if k in args.situations.split(",")}
    print(machine_line(device))
    print(f"data: {data} ({folder_stats(data)}); model {model}; runs of {small} and {big}")
    print(f"before: {load_line()}")
    if not args.quick:
        run_command(config, small, base)  # page cache, .pyc files
    results = run_rounds(config, (small, big), settings, places, rounds)
    print(f"after: {load_line()}")
    print()
    print(table(f"whole-process img/s by runtime.threads, quiet and beside one busy core "
                f"({model}, {device.type})",
                ["situation", "setting", "threads used", "img/s (median)", "vs auto (median)",
                 "vs auto per round", "of the best", "others %"], rows_of(results)))
    print()
    print("busy: one process spinning pinned to the last core during both runs; arrives: it "
          "starts when each run's loop starts (after the run's start-up sample, when "
          "config.yaml appears); leaves: it spins at start-up and stops when the loop starts. "
          "threads used: as started (meta.json runtime.threads), then the changes the "
          "automatic setting made during the big run (runtime.threads_followed). img/s: "
          "(N_big - N_small) / (t_big - t_small) of a small and a big run back to back; vs "
          "auto: over the automatic setting in the same round and situation; of the best: "
          "median img/s over the best setting's median in that situation. others %: CPU share "
          "of other processes (the spinner counts: ~50% on 2 cores).")
    out = {"machine": machine_line(device), "model": model, "sizes": [small, big],
           "results": results}
    write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()

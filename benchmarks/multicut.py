"""Four cuts in one pass vs four single-cut runs over the same folder (issue #13).

    PYTHONPATH=. python benchmarks/multicut.py            # resnet50 @224, 48 JPEGs of 500x375
    PYTHONPATH=. python benchmarks/multicut.py --quick    # tiny model, a few images

Both sides are ``run_extract`` with the automatic settings, ``runtime.fold_bn=false`` (what
the per-cut stores of a multi-cut run equal) and average-pooled cuts, writing fresh stores:
the multi-cut run
decodes each image once and runs the base once per batch; the four single-cut runs decode
and run their part of the base four times. Measured in one process, alternating the two
``--rounds`` times; the table gives each side's seconds and the per-round ratio.
Target: >= 3x on a CPU.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    base_parser,
    clear_store,
    extract_config,
    jpeg_folder,
    load_line,
    machine_line,
    median,
    resolve_device,
    table,
    write_json,
)

CUTS = ["stage:1", "stage:2", "stage:3", "head"]


def timed_runs(data: Path, out: Path, model: str, extra: list[str], cuts: list[str],
               multi: bool) -> float:
    from transferlab.extract.runner import run_extract

    clear_store(out)
    started = time.perf_counter()
    if multi:
        run_extract(extract_config(data, out, model, [f"model.cut={cuts}", *extra]))
    else:
        for cut in cuts:
            run_extract(extract_config(data, out / cut.replace(":", "-"), model,
                                       [f"model.cut={cut}", *extra]))
    return time.perf_counter() - started


def main(argv: Sequence[str] | None = None) -> dict:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    bench = Path(args.bench_dir)
    if args.quick:
        model, images, rounds = "test_resnet", 8, 1
        data = jpeg_folder(bench, 8, size=(96, 72))
        extra = ["preprocess.input_size=[32, 32]"]
    else:
        model, images, rounds = args.model, args.images, args.rounds
        data = jpeg_folder(bench, images)
        extra = []
    extra += [f"runtime.device={device.type}", "runtime.fold_bn=false", f"data.limit={images}",
              "model.pool=avg"]  # pooled rows: what a layer sweep stores
    print(machine_line(device))
    print(f"before: {load_line()}")
    out = bench / "stores" / "multicut"
    timed_runs(data, out / "warm", model, extra, CUTS[:1], False)  # imports, first model build
    multi, single = [], []
    for _ in range(rounds):  # alternate, so the machine's drift hits both alike
        multi.append(timed_runs(data, out / "multi", model, extra, CUTS, True))
        single.append(timed_runs(data, out / "single", model, extra, CUTS, False))
    ratios = [s / m for s, m in zip(single, multi)]
    print(f"after: {load_line()}")
    print(table(f"Four cuts ({', '.join(CUTS)}) of {model}, {images} images",
                ["way", "seconds (median)", "per round"],
                [["one pass, 4 stores", median(multi), " ".join(f"{x:.2f}" for x in multi)],
                 ["4 single-cut runs", median(single), " ".join(f"{x:.2f}" for x in single)],
                 ["ratio", median(ratios), " ".join(f"{x:.2f}x" for x in ratios)]]))
    results = {"model": model, "images": images, "multi_s": multi, "single_s": single,
               "ratios": ratios}
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()

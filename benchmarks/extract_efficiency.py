"""End-to-end extraction speed over the model's pure forward speed (the ceiling).

    PYTHONPATH=. python benchmarks/extract_efficiency.py            # resnet50 + legacy_xception
    PYTHONPATH=. python benchmarks/extract_efficiency.py --quick    # tiny model, a few images
    PYTHONPATH=. python benchmarks/extract_efficiency.py --gpu-decode --compile   # on a GPU

For each model: ``run_extract`` over a folder of photo-like ~500x375 JPEGs (generated once,
cached) with transferlab's automatic settings, and the forward pass of the same extractor,
batch size, precision and memory format on a synthetic batch already on the device. Both are
measured in the same process, alternating, ``--rounds`` times (more when no round was
quiet); the table gives for each the best measurement taken while other processes used at
most 10% of the machine (``common.sample``), their ratio, and the median of the per-round
ratios. Targets: ratio >= 0.9 on a GPU, >= 0.8 on a CPU.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    Forward,
    base_parser,
    busy_note,
    decode_ms,
    extract_config,
    folder_stats,
    jpeg_folder,
    load_line,
    machine_line,
    median,
    others,
    pick,
    resolve_device,
    rounds_of,
    run_extract_ips,
    table,
    write_json,
)

MODELS = {"resnet50": None, "legacy_xception": None}  # input size: the model's own (224, 299)


def variants(args, device) -> list[tuple[str, list[str]]]:
    """transferlab settings measured: automatic, then GPU decode / compile when asked."""
    out = [("auto", [])]
    if args.gpu_decode:
        out.append(("gpu_decode", ["runtime.gpu_decode=true"]))
    if args.compile:
        out.append(("compile", ["runtime.compile=true"]))
    if args.gpu_decode and args.compile:
        out.append(("gpu_decode+compile", ["runtime.gpu_decode=true", "runtime.compile=true"]))
    return out


def measure_one(data: Path, out: Path, model: str, extra: list[str], images: int,
                rounds: int) -> dict:
    cfg = extract_config(data, out, model, extra + [f"data.limit={images}"])
    forward = Forward(cfg)
    bs = forward.batch_size
    warm = extract_config(data, out, model, extra + [f"data.limit={bs}"])
    run_extract_ips(warm)  # kernel caches, page cache, lazy imports
    steps = max(2, images // bs // 2)
    samples = rounds_of({"forward": lambda: (forward.images_per_second(0.0, min_steps=steps), None),
                         "e2e": lambda: run_extract_ips(cfg)}, rounds)
    fwd, e2e = pick(samples["forward"]), pick(samples["e2e"])
    paired = [e.value / f.value for f, e in zip(samples["forward"][:rounds],
                                                 samples["e2e"][:rounds])]
    rt = forward.rt
    dec = decode_ms(sorted(data.rglob("*.jpg")), forward.spec)
    return {"model": model, "input": "x".join(map(str, forward.spec.input_size[1:])),
            "batch": bs, "precision": rt.precision, "channels_last": rt.channels_last,
            "workers": rt.num_workers, "threads": rt.threads, "images": images,
            "forward_ips": fwd.value, "e2e_ips": e2e.value, "ratio": e2e.value / fwd.value,
            "forward_others": others(fwd), "e2e_others": others(e2e),
            "median_ratio": median(paired), "ratios": paired, "decode_ms": dec,
            "samples": {k: [(x.value, x.foreign) for x in v] for k, v in samples.items()},
            # 0 workers: each batch is decoded by rt.threads threads, then the forward pass
            # runs; taking turns, that is the best ratio they can give
            "turn_bound": 1.0 / (1.0 + dec / 1000 / rt.threads * fwd.value)
            if rt.num_workers == 0 else None}


def main(argv: Sequence[str] | None = None) -> list[dict]:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated timm names")
    p.add_argument("--images", type=int, default=None,
                   help="images per pass (default 128 on CPU, 2048 on GPU)")
    p.add_argument("--rounds", type=int, default=3, help="alternating forward/extract rounds")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    bench = Path(args.bench_dir)
    if args.quick:
        models, images, rounds = ["test_resnet"], 8, 1
        data = jpeg_folder(bench, 8, size=(96, 72))
    else:
        models = args.models.split(",")
        images = args.images or (2048 if device.type == "cuda" else 128)
        rounds = args.rounds
        data = jpeg_folder(bench, max(images, 128))
    target = 0.9 if device.type == "cuda" else 0.8
    print(machine_line(device))
    print(f"data: {data} ({folder_stats(data)})")
    print(f"before: {load_line()}")
    rows, results = [], []
    for model in models:
        for name, extra in variants(args, device):
            extra = extra + [f"runtime.device={device.type}"]
            r = measure_one(data, bench / "stores" / "efficiency", model, extra, images, rounds)
            r["variant"] = name
            results.append(r)
            rows.append([model, r["input"], name, r["batch"], r["precision"],
                         "on" if r["channels_last"] else "off", r["workers"], r["threads"],
                         r["forward_ips"], r["forward_others"], r["e2e_ips"],
                         r["e2e_others"], r["ratio"], r["median_ratio"],
                         " ".join(f"{x:.2f}" for x in r["ratios"]),
                         "yes" if r["ratio"] >= target else "NO",
                         r["decode_ms"], "-" if r["turn_bound"] is None else r["turn_bound"]])
    print(f"after: {load_line()}")
    print()
    print(table(f"end-to-end / forward ({device.type}, target >= {target})",
                ["model", "input", "settings", "batch", "precision", "channels_last",
                 "workers", "threads", "forward img/s", "others %", "end-to-end img/s",
                 "others %", "ratio",
                 "median ratio", "per round", "target met", "decode ms/img",
                 "turn bound"], rows))
    print(busy_note())
    print("ratio: end-to-end / forward of the reported measurements; median ratio: of the "
          "per-round ratios (forward and end-to-end alternate, round by round, whatever the "
          "load). decode ms/img: one thread, PIL path (the default), "
          "decode + resize + crop. turn bound (0 workers): 1 / (1 + decode time / threads x "
          "forward img/s), the best ratio when the main process decodes each batch in "
          "`threads` threads and then runs the forward pass.")
    write_json(args.json, {"machine": machine_line(device), "results": results})
    return results


if __name__ == "__main__":
    main()

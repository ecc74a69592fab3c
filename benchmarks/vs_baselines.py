"""transferlab's extraction against the two ways a user would write it by hand.

    PYTHONPATH=. python benchmarks/vs_baselines.py   # legacy_xception at 299 (the Keras example)
    PYTHONPATH=. python benchmarks/vs_baselines.py --quick    # tiny model, a few images
    PYTHONPATH=. python benchmarks/vs_baselines.py --models legacy_xception,resnet50

On the same folder of photo-like ~500x375 JPEGs, in alternating rounds:

(a) ``per-image loop``: the Keras Xception example ported to PyTorch the straightforward way:
    for each file, PIL open, resize to the input size, to array, scale to [-1, 1], forward one
    image at a time (fp32, ``torch.no_grad``), keep the vector in a dict. channels_last is
    not asked for, but ``permute`` of the HWC array leaves channels_last strides, which
    PyTorch's CPU convolutions then follow: the straightforward code gets it by accident.
(b) ``timm + DataLoader``: timm's ``create_transform(**resolve_data_config(model=...))``, a
    torchvision ``ImageFolder``, a default ``DataLoader(batch_size=32)`` (num_workers=0, no
    pinned memory), fp32, no channels_last, ``torch.no_grad``, features gathered in a list.
(c) ``transferlab``: ``run_extract`` with its automatic settings, features to a store on disk.

Every measurement runs in a fresh Python process (``--in-process`` to share one), so no
thread, allocator or kernel-cache setting of one method leaks into another. Timed: the loop
over the images, after the model is built and warmed up on a few images (as ``loop_seconds``
of ``run_extract`` excludes model building). Each method runs ``--rounds`` times,
alternating (the order rotates each round), more when no round was quiet; reported: the best
measurement taken while other processes used at most 10% of the machine
(``common.sample``), and the per-round ratios. Targets: (c) >= 1.3x (a) on a CPU (>= 20x on
a GPU); (c) >= 1.5x (b).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from benchmarks.common import (
    base_parser,
    busy_note,
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
    sync,
    table,
    write_json,
)


def image_files(root: Path, limit: int) -> list[Path]:
    """The first ``limit`` images in the order ImageFolder and transferlab both use."""
    return sorted(p for p in root.rglob("*.jpg"))[:limit]


def user_model(name: str, device: torch.device) -> torch.nn.Module:
    import timm

    return timm.create_model(name, pretrained=False, num_classes=0).eval().to(device)


def per_image_loop(model: torch.nn.Module, files: list[Path], size: tuple[int, int],
                   device: torch.device) -> dict[str, np.ndarray]:
    """(a) The Keras Xception example, in PyTorch, as a user would write it."""
    from PIL import Image

    features = {}
    for filename in files:
        image = Image.open(filename).convert("RGB")
        image = image.resize(size)
        image = np.expand_dims(np.asarray(image, dtype=np.float32), axis=0)
        image = image / 127.5
        image = image - 1.0
        x = torch.from_numpy(image).permute(0, 3, 1, 2).to(device)
        with torch.no_grad():
            feature = model(x)
        features[filename.name] = feature.cpu().numpy()
    return features


def timm_dataloader_loop(model: torch.nn.Module, root: Path, limit: int,
                         device: torch.device, batch_size: int = 32,
                         num_workers: int = 0) -> np.ndarray:
    """(b) timm's eval transform, ImageFolder and a default DataLoader, batch 32, fp32."""
    from timm.data import create_transform, resolve_data_config
    from torch.utils.data import DataLoader, Subset
    from torchvision.datasets import ImageFolder

    transform = create_transform(**resolve_data_config({}, model=model))
    dataset = Subset(ImageFolder(str(root), transform=transform), range(limit))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    features = []
    with torch.no_grad():
        for images, _ in loader:
            features.append(model(images.to(device)).cpu().numpy())
    return np.concatenate(features)


def timed_ips(fn, n: int, device: torch.device) -> float:
    sync(device)
    started = time.perf_counter()
    fn()
    sync(device)
    return n / (time.perf_counter() - started)


def method_ips(key: str, model_name: str, data: Path, out: Path, images: int,
               device: torch.device, extra: list[str], baseline_workers: int) -> float:
    """Build method ``key``'s model, warm it up on a few images, then time ``images``."""
    if key == "c":
        def run(n: int) -> float:
            overrides = extra + [f"data.limit={n}", f"runtime.device={device.type}"]
            return run_extract_ips(extract_config(data, out, model_name, overrides))[0]
    else:
        model = user_model(model_name, device)
        size = tuple(model.pretrained_cfg["input_size"][1:])[::-1]  # (W, H) for PIL
        files = image_files(data, images)
        if key == "a":
            def run(n: int) -> float:
                return timed_ips(lambda: per_image_loop(model, files[:n], size, device), n,
                                 device)
        else:
            def run(n: int) -> float:
                return timed_ips(lambda: timm_dataloader_loop(model, data, n, device,
                                                              num_workers=baseline_workers),
                                 n, device)
    run(min(images, 16))  # warm-up: kernel caches, page cache, lazy imports
    return run(images)


def child_ips(key: str, model_name: str, data: Path, out: Path, images: int,
              device: torch.device, extra: list[str], baseline_workers: int) -> float:
    """``method_ips`` in a fresh Python process: no thread, allocator or kernel-cache state
    set by one method (transferlab's runtime settings) leaks into another."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", key, "--models",
           model_name, "--data", str(data), "--out", str(out), "--images", str(images),
           "--device", device.type, "--baseline-workers", str(baseline_workers)]
    cmd += [f"--set={item}" for item in extra]
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    lines = [x for x in done.stdout.splitlines() if x.startswith("IPS ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"method {key} failed ({done.returncode}):\n{done.stdout}\n"
                           f"{done.stderr}")
    return float(lines[-1].split()[1])


def compare(model_name: str, data: Path, out: Path, images: int, rounds: int,
            device: torch.device, extra: list[str], baseline_workers: int,
            isolate: bool) -> dict:
    measure = child_ips if isolate else method_ips
    threads = torch.get_num_threads()

    def case(key: str):
        def run() -> tuple[float, None]:
            ips = measure(key, model_name, data, out, images, device, extra, baseline_workers)
            torch.set_num_threads(threads)  # run_extract sets its own; restore the user's
            return ips, None
        return run

    samples = rounds_of({k: case(k) for k in ("a", "b", "c")}, rounds)
    best = {k: pick(v) for k, v in samples.items()}
    per_round = {k: [x.value for x in v[:rounds]] for k, v in samples.items()}
    ratios_a = [c / a for a, c in zip(per_round["a"], per_round["c"])]
    ratios_b = [c / b for b, c in zip(per_round["b"], per_round["c"])]
    import timm

    size = timm.create_model(model_name, pretrained=False).pretrained_cfg["input_size"]
    return {"model": model_name, "input": f"{size[1]}x{size[2]}", "images": images,
            "user_threads": threads, **{f"{k}_ips": v.value for k, v in best.items()},
            **{f"{k}_others": others(v) for k, v in best.items()},
            "samples": {k: [(x.value, x.foreign) for x in v] for k, v in samples.items()},
            "c_over_a": best["c"].value / best["a"].value,
            "c_over_b": best["c"].value / best["b"].value,
            "c_over_a_median": median(ratios_a), "c_over_b_median": median(ratios_b),
            "c_over_a_rounds": ratios_a, "c_over_b_rounds": ratios_b}


def main(argv: Sequence[str] | None = None) -> list[dict]:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--models", default="legacy_xception", help="comma-separated timm names")
    p.add_argument("--images", type=int, default=None,
                   help="images per pass (default 64 on CPU, 1024 on GPU)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--baseline-workers", type=int, default=0,
                   help="num_workers of baseline (b)'s DataLoader (its default is 0)")
    p.add_argument("--in-process", action="store_true",
                   help="run every method in this process (default: a fresh process per "
                        "measurement; --quick always runs in-process)")
    p.add_argument("--child", choices=["a", "b", "c"], help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting of (c), transferlab's run (repeatable), e.g. "
                   "runtime.backend=openvino")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    bench = Path(args.bench_dir)
    if args.child:
        print(f"IPS {method_ips(args.child, args.models, Path(args.data), Path(args.out), args.images, device, args.set, args.baseline_workers)}")  # noqa: E501
        return []
    extra = (["runtime.gpu_decode=true"] if args.gpu_decode else []) + \
            (["runtime.compile=true"] if args.compile else []) + args.set
    if args.quick:
        models, images, rounds = ["test_resnet"], 8, 1
        data = jpeg_folder(bench, 8, size=(96, 72))
    else:
        models, rounds = args.models.split(","), args.rounds
        images = args.images or (1024 if device.type == "cuda" else 64)
        data = jpeg_folder(bench, max(images, 128))
    gpu = device.type == "cuda"
    target_a, target_b = (20.0 if gpu else 1.3), 1.5
    print(machine_line(device))
    print(f"data: {data} ({folder_stats(data)}); {images} images per pass, {rounds} rounds")
    print(f"transferlab settings: automatic{' + ' + ' '.join(extra) if extra else ''}; "
          + ("all in this process" if args.quick or args.in_process
           else "a fresh process per measurement"))
    print(f"before: {load_line()}")
    results, rows = [], []
    for model_name in models:
        r = compare(model_name, data, bench / "stores" / "baselines", images, rounds, device,
                    extra, args.baseline_workers, not (args.quick or args.in_process))
        results.append(r)
        rows.append([model_name, r["input"], f"{r['a_ips']:.2f} ({r['a_others']})",
                     f"{r['b_ips']:.2f} ({r['b_others']})", f"{r['c_ips']:.2f} ({r['c_others']})",
                     r["c_over_a"], r["c_over_a_median"],
                     " ".join(f"{x:.2f}" for x in r["c_over_a_rounds"]),
                     "yes" if r["c_over_a"] >= target_a else "NO",
                     r["c_over_b"], r["c_over_b_median"],
                     " ".join(f"{x:.2f}" for x in r["c_over_b_rounds"]),
                     "yes" if r["c_over_b"] >= target_b else "NO"])
    print(f"after: {load_line()}")
    print()
    print(table(f"images/s vs baselines ({device.type}; targets c/a >= {target_a}, "
                f"c/b >= {target_b})",
                ["model", "input", "(a) per-image", "(b) timm+DataLoader", "(c) transferlab",
                 "c/a", "median", "per round", "met", "c/b", "median", "per round", "met"],
                rows))
    print("img/s (others %): " + busy_note())
    print("c/a, c/b: ratios of the reported measurements; median: of the per-round ratios "
          "(methods alternate within a round, whatever the load).")
    write_json(args.json, {"machine": machine_line(device), "results": results})
    return results


if __name__ == "__main__":
    main()

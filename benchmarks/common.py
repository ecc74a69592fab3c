"""Shared pieces of the benchmark scripts: data generation, machine description, timing, tables.

Every benchmark measures the things it compares *side by side in one process*, interleaved
round by round, so that the ratios it reports survive a noisy machine (other jobs, thermal
throttling) better than absolute numbers do. Absolute numbers are printed with the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random weights only; never touch the network

BENCH_DIR = Path(os.environ.get("TRANSFERLAB_BENCH_DIR",
                                Path(tempfile.gettempdir()) / "transferlab_bench"))


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------


def base_parser(description: str) -> argparse.ArgumentParser:
    """Flags every script shares: --quick, device, GPU options, data/output folders."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true",
                   help="tiny inputs and a tiny model: checks the script runs (seconds)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda")
    p.add_argument("--gpu-decode", action="store_true",
                   help="also pass runtime.gpu_decode=true to transferlab (GPU only)")
    p.add_argument("--compile", action="store_true",
                   help="also pass runtime.compile=true (torch.compile the extractor)")
    p.add_argument("--bench-dir", default=str(BENCH_DIR),
                   help="where generated images are cached and stores are written")
    p.add_argument("--json", default=None, help="also write the results as JSON to this file")
    return p


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ---------------------------------------------------------------------------------------
# The machine
# ---------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def machine(device: torch.device) -> dict[str, Any]:
    from transferlab.runtime.device import cpu_bf16_units

    # the model name alone does not tell CPUs apart ("Intel(R) Xeon(R) Processor" with and
    # without AMX): bf16 speed depends on the units
    units = cpu_bf16_units()
    isa = torch.backends.cpu.get_cpu_capability() + (f" + {units}" if units else "")
    info = {"cpu": cpu_model(), "cores": cpu_cores(), "isa": isa, "torch": torch.__version__,
            "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def machine_line(device: torch.device) -> str:
    m = machine(device)
    gpu = f", GPU: {m['gpu']}" if "gpu" in m else ", no GPU"
    return (f"machine: {m['cpu']} ({m['cores']} cores, {m['isa']}){gpu}; torch {m['torch']}; "
            f"device {m['device']}")


# ---------------------------------------------------------------------------------------
# Generated data (cached)
# ---------------------------------------------------------------------------------------


def structured_image(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A photo-like image: a colour gradient, blurred shapes, texture and sensor noise.

    Pure noise makes huge, slow JPEGs; flat colour makes tiny ones. This lands at a JPEG size
    and decode cost near real photos of the same size (~60-70 KB at 500x375, quality 90;
    Flickr8k, the data set of the Keras Xception
    example, averages ~100 KB at the same size).
    """
    w, h = size
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = (np.linspace(0.0, 1.0, w)[None, :, None] * 0.6
         + np.linspace(0.0, 1.0, h)[:, None, None] * 0.4)
    im = Image.fromarray((c0 * (1 - t) + c1 * t).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(12, 30))):
        x0, y0 = rng.integers(-w // 4, w), rng.integers(-h // 4, h)
        x1, y1 = x0 + rng.integers(10, w // 2), y0 + rng.integers(10, h // 2)
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        kind = rng.integers(0, 3)
        if kind == 0:
            draw.ellipse([x0, y0, x1, y1], fill=colour)
        elif kind == 1:
            draw.rectangle([x0, y0, x1, y1], fill=colour)
        else:
            pts = [(int(rng.integers(0, w)), int(rng.integers(0, h))) for _ in range(4)]
            draw.polygon(pts, fill=colour)
    im = im.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.8, 2.0))))
    coarse = rng.normal(0.0, 1.0, (h // 8 + 1, w // 8 + 1)).astype(np.float32)
    fine = rng.normal(0.0, 1.0, (h // 2 + 1, w // 2 + 1)).astype(np.float32)
    texture = sum(a * np.asarray(Image.fromarray(t).resize((w, h), Image.BILINEAR))
                  for a, t in ((12.0, coarse), (16.0, fine)))[..., None]
    noise = rng.normal(0.0, 5.0, (h, w, 3)).astype(np.float32)
    arr = np.asarray(im, np.float32) + texture + noise
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def _folder_ready(root: Path, spec: dict) -> bool:
    marker = root / ".bench.json"
    return marker.is_file() and json.loads(marker.read_text()) == spec


def _mark_ready(root: Path, spec: dict) -> None:
    (root / ".bench.json").write_text(json.dumps(spec))


def jpeg_folder(bench_dir: str | Path, count: int, size: tuple[int, int] = (500, 375),
                classes: int = 2, quality: int = 90, seed: int = 0,
                distinct: int | None = None) -> Path:
    """``count`` photo-like JPEGs in ``classes`` sub-folders, generated once and cached.
    ``distinct``: only that many are generated (~20-40 ms each), the rest are copies of
    them, byte for byte: the thousands of files a GPU run needs, in seconds."""
    distinct = count if distinct is None else min(count, distinct)
    spec = {"kind": "jpeg", "count": count, "size": list(size), "classes": classes,
            "quality": quality, "seed": seed, "version": 1,
            **({"distinct": distinct} if distinct < count else {})}
    name = f"jpeg_{count}_{size[0]}x{size[1]}_q{quality}"
    root = Path(bench_dir) / (name if distinct == count else f"{name}_d{distinct}")
    if _folder_ready(root, spec):
        return root
    rng = np.random.default_rng(seed)
    made: list[Path] = []
    for i in range(count):
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i:06d}.jpg"
        if i >= distinct:
            path.write_bytes(made[i % distinct].read_bytes())
            continue
        # some portrait images too, as in real folders
        wh = size if i % 5 else (size[1], size[0])
        structured_image(rng, wh).save(path, quality=quality)
        made.append(path)
    _mark_ready(root, spec)
    return root


def tiny_folder(bench_dir: str | Path, count: int, size: int = 32, seed: int = 0) -> Path:
    """``count`` tiny PNGs (mixed sizes around ``size``) in 10 class folders, cached."""
    spec = {"kind": "tiny", "count": count, "size": size, "seed": seed, "version": 1}
    root = Path(bench_dir) / f"tiny_{count}_{size}"
    if _folder_ready(root, spec):
        return root
    rng = np.random.default_rng(seed)
    for i in range(count):
        folder = root / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 256, (size // 4, size // 4, 3), np.uint8)
        Image.fromarray(arr).resize((size, size), Image.BILINEAR).save(folder / f"{i:06d}.png")
    _mark_ready(root, spec)
    return root


def folder_stats(root: Path) -> str:
    files = [p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")]
    sizes = [p.stat().st_size for p in files]
    with Image.open(files[0]) as im:
        dims = f"{im.size[0]}x{im.size[1]}"
    return (f"{len(files)} files, e.g. {dims}, mean {statistics.mean(sizes) / 1024:.0f} KB "
            f"(min {min(sizes) / 1024:.0f}, max {max(sizes) / 1024:.0f})")


# ---------------------------------------------------------------------------------------
# transferlab configs and the pure-forward ceiling
# ---------------------------------------------------------------------------------------


def extract_config(data_root: Path, out_dir: Path, model: str, extra: Sequence[str] = ()):
    """An ``ExtractConfig`` built the way the CLI builds it (``key=value`` overrides)."""
    from transferlab.config import ExtractConfig, load_config

    overrides = [f"model.name={model}", "model.pretrained=false", "data.source=folder",
                 f"data.root={data_root}", f"output.dir={out_dir}", "output.overwrite=true",
                 "runtime.progress=false", *extra]
    return load_config(None, overrides, ExtractConfig)


def clear_store(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Forward:
    """The ceiling: the extractor's forward pass on a synthetic batch already on the device.

    Built exactly as ``run_extract`` builds its model (same extractor, runtime resolution,
    threads, BatchNorm folding, channels_last, precision, compile), so end-to-end / forward
    isolates the cost of reading, decoding, resizing, copying and writing.
    """

    def __init__(self, cfg, batch_size: int | None = None):
        from torch import nn

        from transferlab.models.engine import FeatureComputer, engine_batch_size
        from transferlab.models.extractor import extractor_from_config
        from transferlab.runtime.device import (
            apply_runtime,
            resolve_runtime,
            seed_everything,
        )

        seed_everything(cfg.runtime.seed)
        bundle = extractor_from_config(cfg.model, cfg.preprocess)
        conv_net = any(isinstance(m, nn.Conv2d) for m in bundle.extractor.modules())
        self.rt = resolve_runtime(cfg.runtime, conv_net)
        apply_runtime(self.rt)
        self.batch_size = batch_size or engine_batch_size(bundle.extractor, bundle.spec.input_size,
                                                          self.rt, cfg.runtime.batch_size)
        # int8 is calibrated on images: here a fixed synthetic batch (the speed is the same)
        calibration = (torch.randint(0, 256, (cfg.runtime.calibration_images,
                                              *bundle.spec.input_size), dtype=torch.uint8,
                                     generator=torch.Generator().manual_seed(0))
                       if self.rt.precision == "int8" else None)
        engine = FeatureComputer(bundle.extractor, bundle.spec, self.rt, cfg.runtime.compile,
                                 cfg.runtime.fold_bn, calibration)
        # what extraction runs: the model, or its exported graph (runtime.backend)
        self.model = engine.graph if engine.graph is not None else engine.model
        self.backend = engine.backend
        self.spec = bundle.spec
        x = torch.randn(self.batch_size, *bundle.spec.input_size, device=self.rt.device)
        if self.rt.channels_last and engine.graph is None:
            x = x.contiguous(memory_format=torch.channels_last)
        self.x = x

    @torch.inference_mode()
    def step(self) -> None:
        with self.rt.autocast():
            self.model(self.x)

    def images_per_second(self, seconds: float = 3.0, warmup: int = 2,
                          min_steps: int = 2) -> float:
        """Batches until ``seconds`` have passed (at least ``min_steps``) after ``warmup``
        untimed ones."""
        from transferlab.runtime.device import apply_runtime

        apply_runtime(self.rt)  # threads: another measurement may have changed them
        for _ in range(warmup):
            self.step()
        sync(self.rt.device)
        steps, started = 0, time.perf_counter()
        while steps < min_steps or time.perf_counter() - started < seconds:
            self.step()
            steps += 1
        sync(self.rt.device)
        return steps * self.batch_size / (time.perf_counter() - started)


def run_extract_ips(cfg) -> tuple[float, Any]:
    """images/s of the extraction loop (read, decode, compute, write) of a fresh store, and
    the run's result."""
    from transferlab.extract.runner import run_extract

    clear_store(Path(cfg.output.dir))
    result = run_extract(cfg)
    return result.images_per_second, result


def decode_ms(files: Sequence[Path], spec, count: int = 32) -> float:
    """Milliseconds per image to decode + resize + crop to uint8 on one thread (what each
    DataLoader worker, or each decoding thread of the main process, spends per image)."""
    from transferlab.data.imageio import load_image
    from transferlab.data.preprocess import build_transform

    transform = build_transform(spec, normalize=False)
    files = list(files)[:count]
    transform(load_image(files[0], spec.image_mode, spec.scale_size()))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    started = time.process_time()
    for f in files:
        transform(load_image(f, spec.image_mode, spec.scale_size()))
    torch.set_num_threads(threads)
    return (time.process_time() - started) / len(files) * 1000


# ---------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------


def fmt(value: Any) -> str:
    if isinstance(value, float):
        if value >= 100:
            return f"{value:.0f}"
        if value >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    return str(value)


def table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (pasted into BENCHMARKS.md as printed)."""
    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    out = [f"### {title}", "", line(list(headers)),
           "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in cells]
    return "\n".join(out)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(payload, indent=2, default=str))


def load_line() -> str:
    """How busy the machine is: 1-minute load average and CPU pressure (other jobs)."""
    try:
        load = Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "load: unknown"
    pressure = ""
    try:
        some = Path("/proc/pressure/cpu").read_text().splitlines()[0]
        pressure = f", CPU pressure avg10 {some.split()[1].split('=')[1]}%"
    except (OSError, IndexError):
        pass
    return f"load average (1 min) {load} on {cpu_cores()} cores{pressure}"


# ---------------------------------------------------------------------------------------
# Measuring on a shared machine: how much CPU did *other* processes take meanwhile?
# ---------------------------------------------------------------------------------------


def _busy_seconds() -> float | None:
    """CPU seconds all processes have used (incl. steal), from /proc/stat; None off Linux."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@dataclass
class Sample:
    """One measurement: its value (img/s), and the share of the machine's CPU that other
    processes used meanwhile (0 = we had the machine to ourselves; 1 = all cores busy)."""

    value: float
    foreign: float
    extra: Any = None


def sample(fn: Callable[[], tuple[float, Any]]) -> Sample:
    """Run ``fn`` (returns ``(value, extra)``) and measure the others' CPU use meanwhile.

    DataLoader workers of ``fn`` count as ours once they have exited (they are reaped
    before ``run_extract`` returns).
    """
    busy0, own0, wall0 = _busy_seconds(), _own_seconds(), time.perf_counter()
    value, extra = fn()
    wall, busy1 = time.perf_counter() - wall0, _busy_seconds()
    foreign = 0.0
    if busy0 is not None and busy1 is not None and wall > 0:
        others = (busy1 - busy0) - (_own_seconds() - own0)
        foreign = min(1.0, max(0.0, others / (wall * cpu_cores())))
    return Sample(value, foreign, extra)


QUIET = 0.10  # a measurement with others using <= 10% of the machine counts as quiet


def pick(samples: Sequence[Sample], quiet: float = QUIET) -> Sample:
    """The best quiet measurement (else the best of all): the least disturbed estimate."""
    clean = [s for s in samples if s.foreign <= quiet]
    return max(clean or samples, key=lambda s: s.value)


def rounds_of(cases: dict[str, Callable[[], tuple[float, Any]]], rounds: int,
              retries: int = 2, quiet: float = QUIET) -> dict[str, list[Sample]]:
    """Measure every case ``rounds`` times, alternating (the order rotates each round); then
    up to ``retries`` more times each case that never got a quiet measurement."""
    names = list(cases)
    out: dict[str, list[Sample]] = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            out[name].append(sample(cases[name]))
    for name in names:
        for _ in range(retries):
            if any(s.foreign <= quiet for s in out[name]):
                break
            out[name].append(sample(cases[name]))
    return out


def busy_note(quiet: float = QUIET) -> str:
    return (f"'others %': CPU share other processes used during the reported measurement "
            f"(<= {quiet * 100:.0f}% counts as quiet; the best quiet measurement is reported, "
            "else the best of all, marked with *)")


def others(s: Sample, quiet: float = QUIET) -> str:
    return f"{s.foreign * 100:.0f}%" + ("" if s.foreign <= quiet else "*")

"""The frozen forward on each runtime backend (issue #30): speed and agreement with eager fp32.

    PYTHONPATH=. python benchmarks/runtimes.py                   # the four models, all backends
    PYTHONPATH=. python benchmarks/runtimes.py --models resnet50 --rounds 3
    PYTHONPATH=. python benchmarks/runtimes.py --quick           # tiny model, a few batches

Each variant is transferlab's own engine (``models.engine.FeatureComputer``: uint8 images
in, BatchNorm folded, channels_last, the backend of ``runtime.backend``) on a synthetic
uint8 batch (timm random weights: the arithmetic is the same as pretrained): eager fp32 and
bf16 autocast, ``compile`` (inductor, freezing) in fp32 and bf16, ONNX Runtime fp32, OpenVINO
fp32 and bf16 (bf16 only where the CPU has bf16 units). The variants of a model are timed in
alternated rounds (order rotating), ``--batches`` batches each after one warm-up batch; the
median img/s is reported with each round's and the CPU share other processes took meanwhile
("others": eager PyTorch loses far more than the exported runtimes when the cores are
oversubscribed). Agreement: the rows of every variant on one batch against eager fp32's
(largest absolute difference, relative to the largest value, and the smallest cosine).
The first-call cost (export, or compile) is measured too, and with it after how many
images the backend pays for it against eager in the same precision.
"""
from __future__ import annotations

import gc
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from benchmarks.common import base_parser, machine_line, median, sample, table, write_json

MODELS = {"resnet50": 224, "legacy_xception": 299, "vit_base_patch16_224": 224,
          "convnext_tiny": 224}
# (label, backend, precision)
VARIANTS = [("eager fp32", "eager", "fp32"), ("eager bf16", "eager", "bf16"),
            ("compile fp32", "compile", "fp32"), ("compile bf16", "compile", "bf16"),
            ("onnxruntime fp32", "onnxruntime", "fp32"), ("openvino fp32", "openvino", "fp32"),
            ("openvino bf16", "openvino", "bf16")]


def variants(backends: list[str], bf16: bool) -> list[tuple[str, str, str]]:
    from transferlab.models.backends import backend_available

    return [v for v in VARIANTS if v[1] in backends and (bf16 or v[2] == "fp32")
            and backend_available(v[1])]


def agreement(got: np.ndarray, want: np.ndarray) -> dict[str, float]:
    diff = float(np.abs(got - want).max())
    cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    return {"max_abs": diff, "max_rel": diff / float(np.abs(want).max()),
            "min_cos": float(cos.min())}


def measure_model(name: str, size: int, chosen: list[tuple[str, str, str]], batch: int,
                  batches: int, rounds: int, threads: int) -> dict[str, Any]:
    from transferlab.models.engine import FeatureComputer
    from transferlab.models.extractor import build_extractor
    from transferlab.runtime.device import Runtime, apply_runtime

    torch.manual_seed(0)
    built = build_extractor(name, cut="head", preprocess={"input_size": [3, size, size]}
                            if name in MODELS else None)
    spec = built.spec
    conv = any(isinstance(m, torch.nn.Conv2d) for m in built.extractor.modules())
    rt = Runtime(torch.device("cpu"), "fp32", conv, 0, threads, True)
    apply_runtime(rt)  # as extraction: threads, and glibc malloc tuned (eager needs it)
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (batch, *spec.input_size), dtype=torch.uint8, generator=gen)
    engines, first, rows = {}, {}, {}
    for label, backend, precision in chosen:
        started = time.perf_counter()
        engine = FeatureComputer(built.extractor, spec, replace(rt, backend=backend,
                                                                precision=precision),
                                 fold_bn=True)
        rows[label] = engine(x)[0]  # the first call: compile happens here
        first[label] = {"seconds": time.perf_counter() - started,
                        "export_seconds": engine.prepared.seconds,
                        "cached": engine.prepared.cached}
        engines[label] = engine
    speeds: dict[str, list[float]] = {label: [] for label in engines}
    busy: dict[str, list[float]] = {label: [] for label in engines}  # others' CPU share
    labels = list(engines)

    def timed(engine: Any) -> tuple[float, None]:
        engine(x)  # warm-up
        started = time.perf_counter()
        for _ in range(batches):
            engine(x)
        return batch * batches / (time.perf_counter() - started), None

    for r in range(rounds):
        order = labels[r % len(labels):] + labels[:r % len(labels)]
        for label in order:
            s = sample(lambda e=engines[label]: timed(e))
            speeds[label].append(s.value)
            busy[label].append(s.foreign)
    ref = rows[labels[0]]
    out = {}
    for label, backend, precision in chosen:
        ips = median(speeds[label])
        base = f"eager {precision}"
        gain = ips / median(speeds[base]) if base in speeds else None
        # images after which the first-call cost (export or compile, beyond one batch of
        # eager) is paid back by the faster forward
        extra = first[label]["seconds"] - batch / median(speeds[base]) if base in speeds else 0
        per_image = (1 / median(speeds[base]) - 1 / ips) if base in speeds else 0
        pays = (max(0.0, extra) / per_image) if per_image > 0 else None
        out[label] = {"backend": backend, "precision": precision, "rounds": speeds[label],
                      "others": busy[label],
                      "median": ips, "vs_eager_same_precision": gain,
                      **agreement(rows[label], ref), **first[label],
                      "pays_off_after_images": pays}
    del engines
    gc.collect()
    return out


def _bench_dir(path: str) -> Path:
    Path(path).mkdir(parents=True, exist_ok=True)
    return Path(path)


def main(argv: list[str] | None = None) -> dict:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=list(MODELS))
    p.add_argument("--backends", nargs="*",
                   default=["eager", "compile", "onnxruntime", "openvino"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--batches", type=int, default=3, help="timed batches per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="0: every core")
    args = p.parse_args(argv)
    from transferlab.models.backends import cpu_kind
    from transferlab.runtime.cores import usable_cores

    # exports measured from scratch, in a cache (and key) of this run, not the user's
    scratch = Path(tempfile.mkdtemp(prefix="runtimes-", dir=_bench_dir(args.bench_dir)))
    os.environ["TRANSFERLAB_GRAPH_CACHE"] = str(scratch / "graphs")
    os.environ.setdefault("TRANSFERLAB_INDEX_KEY_FILE", str(scratch / "index.key"))
    threads = args.threads or usable_cores(False)
    torch.set_num_threads(threads)
    models, batch, batches, rounds = args.models, args.batch, args.batches, args.rounds
    backends = args.backends
    if args.quick:
        models, batch, batches, rounds = ["test_resnet"], 4, 1, 1
        backends = [b for b in backends if b != "compile"]  # inductor: minutes, not seconds
    kind = cpu_kind()
    chosen = variants(backends, kind in ("AMX", "AVX512-BF16"))
    print(machine_line(torch.device("cpu")) + f"; CPU kind for runtime.backend: {kind}; "
          f"{threads} threads; batch {batch}; shared machine (alternated rounds, medians)")
    results: dict[str, Any] = {"cpu_kind": kind, "threads": threads, "batch": batch,
                               "models": {}}
    for name in models:
        size = MODELS.get(name, 0)
        res = measure_model(name, size, chosen, batch, batches, rounds, threads)
        results["models"][name] = res
        table_rows = [[label, " ".join(f"{v:.1f}" for v in r["rounds"]),
                       " ".join(f"{o:.0%}" for o in r["others"]), f"{r['median']:.1f}",
                       "-" if r["vs_eager_same_precision"] is None
                       else f"{r['vs_eager_same_precision']:.2f}",
                       f"{r['max_abs']:.1e}", f"{r['max_rel']:.1e}", f"{r['min_cos']:.6f}",
                       f"{r['seconds']:.1f}",
                       "-" if r["pays_off_after_images"] is None
                       else f"{r['pays_off_after_images']:.0f}"]
                      for label, r in res.items()]
        print(table(f"{name} @{size or 'default'}, batch {batch}",
                    ["variant", "img/s per round", "others per round", "median",
                     "vs eager (same precision)",
                     "largest diff vs eager fp32", "relative", "min cosine",
                     "first call s", "pays off after images"], table_rows))
        sys.stdout.flush()
        write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()

"""``transferlab predict`` vs ``transferlab extract`` on the same backbone and folder.

    PYTHONPATH=. python benchmarks/predict_vs_extract.py               # resnet50, 24 / 100 JPEGs
    PYTHONPATH=. python benchmarks/predict_vs_extract.py --images 16 --rounds 1
    PYTHONPATH=. python benchmarks/predict_vs_extract.py --quick       # tiny model, a few images

Both commands run as a user runs them, each as a fresh process (spawn to exit) with its
default runtime: ``python -m transferlab.predict CKPT FOLDER --out preds.csv`` on a
random-init classifier checkpoint (the backbone cut at its head, a linear head) written
here, and ``python -m transferlab.extract CONFIG`` of the same backbone. Each is timed on a
small and a big folder of generated JPEGs (the big one's first images are the small one's);
rate = (N_big - N_small) / (t_big - t_small), so interpreter start-up, imports, model
building and the first batches cancel. Commands and sizes alternate, the order rotating
each round; the per-round predict/extract ratios are printed (target >= 0.9, issue #23).
"""
from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    QUIET,
    base_parser,
    busy_note,
    clear_store,
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
from benchmarks.whole_process import child_env, rate, write_config

ROOT = Path(__file__).resolve().parents[1]
GPU_SIZES = (512, 2560)  # a GPU batch is 256 images: several batches between the two runs


def write_checkpoint(path: Path, model: str) -> Path:
    """A random-init classifier checkpoint of ``model`` (cut at its head, a linear head for
    2 classes), written as the fine-tune runner writes one."""
    from transferlab.config import HeadConfig, ModelConfig, PreprocessConfig
    from transferlab.finetune.model import build_model, resolve_arch
    from transferlab.models.classifier import classifier_meta, save_classifier
    from transferlab.models.heads import cut_with_head
    from transferlab.runtime.device import seed_everything

    seed_everything(0)
    cfg = ModelConfig(name=model, pretrained=False)
    backbone, spec = build_model(cfg, PreprocessConfig())
    head_cfg = HeadConfig()
    base, head = cut_with_head(backbone.model, cfg.cut, cfg.pool, spec.input_size, head_cfg,
                               2, model)
    meta = classifier_meta(resolve_arch(cfg), str(base.cut), cfg.pool, head_cfg,
                           base.feature_dim, ["class0", "class1"], spec, stage="benchmark")
    return save_classifier(path, base, head, meta)


def run(cmd: list[str], check: str) -> tuple[float, None]:
    """Wall seconds of one command (spawn to exit); ``check`` must be in its output."""
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True,
                          check=False)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr[-2000:]}")
    if check not in proc.stdout + proc.stderr:  # a fast failure is no speed
        raise RuntimeError(f"{' '.join(cmd)}: no '{check}' in {proc.stderr[-500:]}")
    return wall, None


def predict_case(ckpt: Path, data: Path, images: int, out: Path, device: str):
    cmd = [sys.executable, "-m", "transferlab.predict", str(ckpt), str(data), "--out",
           str(out), "--overwrite", "--device", device]  # rounds rewrite it
    return lambda: run(cmd, f"{images} predictions written")


def extract_case(config: Path, images: int, device: str):
    cmd = [sys.executable, "-m", "transferlab.extract", str(config), f"runtime.device={device}"]
    store = Path(config.read_text().split("dir: ", 1)[1].splitlines()[0])

    def case() -> tuple[float, None]:
        clear_store(store)  # a fresh store: never a resume
        return run(cmd, f"{images} images written, 0 failed")
    return case


def measure(model: str, folders: dict[int, Path], bench: Path, rounds: int, device: str,
            warm: bool) -> dict:
    ckpt = write_checkpoint(bench / "checkpoints" / f"{model}.safetensors", model)
    cases = {}
    for n, data in folders.items():
        config = write_config(bench / "configs" / f"pve_{model}_{n}.yaml", data,
                              bench / "stores" / f"pve_{model}_{n}", model)
        cases[f"predict:{n}"] = predict_case(ckpt, data, n, bench / f"pve_{n}.csv", device)
        cases[f"extract:{n}"] = extract_case(config, n, device)
    if warm:  # page cache, .pyc files
        for name, case in cases.items():
            if name.endswith(f":{min(folders)}"):
                case()
    samples: dict[str, list] = {k: [] for k in cases}
    names = list(cases)
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            samples[name].append(sample(cases[name]))
    small, big = sorted(folders)
    out = {"model": model, "sizes": [small, big]}
    for command in ("predict", "extract"):
        s, b = samples[f"{command}:{small}"], samples[f"{command}:{big}"]
        out[command] = {"rates": [rate(small, x.value, big, y.value) for x, y in zip(s, b)],
                        "others": [max(x.foreign, y.foreign) for x, y in zip(s, b)],
                        "t_small": [x.value for x in s], "t_big": [y.value for y in b]}
    out["ratios"] = [p / e for p, e in zip(out["predict"]["rates"], out["extract"]["rates"])]
    busy = [max(p, e) for p, e in zip(out["predict"]["others"], out["extract"]["others"])]
    quiet = [i for i, x in enumerate(busy) if x <= QUIET]
    rounds_used = quiet or list(range(len(busy)))  # no quiet round: every round
    out.update(others=busy, quiet_rounds=quiet,
               median_ratio=median([out["ratios"][i] for i in rounds_used]),
               **{f"{c}_median": median([out[c]["rates"][i] for i in rounds_used])
                  for c in ("predict", "extract")})
    return out


def main(argv: Sequence[str] | None = None) -> list[dict]:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet50", help="comma-separated timm names")
    p.add_argument("--images", type=int, default=None,
                   help="images of the big run (default 100; 2560 on CUDA); the small run "
                   "has a quarter of them")
    p.add_argument("--image-size", default="224x224", help="WxH of the generated JPEGs")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    bench = Path(args.bench_dir)
    cuda = device.type == "cuda"
    big = args.images or (GPU_SIZES[1] if cuda else 100)
    small = GPU_SIZES[0] if cuda and not args.images else max(1, big // 4)
    size = tuple(int(v) for v in args.image_size.split("x"))
    models, rounds = args.models.split(","), args.rounds
    if args.quick:
        models, (small, big), size, rounds = ["test_resnet"], (4, 12), (96, 72), 1
    folders = {n: jpeg_folder(bench, n, size=size, distinct=512 if cuda else None)
               for n in (small, big)}
    print(machine_line(device))
    print(f"data: {folders[big]} ({folder_stats(folders[big])}); runs of {small} and {big} "
          "images")
    print(f"before: {load_line()}")
    results = [measure(m, folders, bench, rounds, device.type, not args.quick) for m in models]
    print(f"after: {load_line()}")
    print()
    rows = [[r["model"], r["predict_median"], r["extract_median"], r["median_ratio"],
             " ".join(f"{x:.2f}" + ("" if o <= QUIET else "*")
                      for x, o in zip(r["ratios"], r["others"])),
             f"{len(r['quiet_rounds'])}/{len(r['ratios'])}",
             "yes" if r["median_ratio"] >= 0.9 else "NO"] for r in results]
    print(table(f"transferlab predict / transferlab extract, whole processes ({device.type}, "
                "target >= 0.9)",
                ["model", "predict img/s", "extract img/s", "ratio (median)", "per round",
                 "quiet rounds", "target met"], rows))
    print()
    print("img/s: (N_big - N_small) / (t_big - t_small) of the round's two runs of one "
          "command (spawn to exit); medians over the quiet rounds (others <= 10% in all four "
          "runs of the round; * marks the others), over every round when none was quiet. "
          + busy_note())
    write_json(args.json, {"machine": machine_line(device), "results": results})
    return results


if __name__ == "__main__":
    main()

"""Curation quality, measured on planted problems: precision and recall of each finding of
``transferlab curate``, and the duplicate threshold they choose.

    PYTHONPATH=. python benchmarks/curate_quality.py            # a few minutes on 2 cores
    PYTHONPATH=. python benchmarks/curate_quality.py --quick    # seconds
    PYTHONPATH=. python benchmarks/curate_quality.py --only-duplicates --count 5000 \
        --settings "dedup (stage:1, grid4, hflip, squash)"     # the threshold at 5,000

- **Near-duplicates**: distinct photo-like images (``common.structured_image``), a fifth of
  them copied once by JPEG recompression (quality 30-50), a 50% downscale, a 90% centre
  crop, a brightness change (+-10%) or a horizontal flip; features of a *random-weight*
  ResNet-18 (no download here), extracted by ``run_extract`` with each of ``SETTINGS``
  (the built-in ``dedup`` config and variants without one of its parts). Swept over
  thresholds; a planted copy is found when it shares a group with its source, a found
  member is right when its group's kept image is of its family.
- **Label issues**: LeNet trained here on the bundled digits 0-4 (the MNIST split's
  source task), its 800-d features (cut first:7) of the 2,500 bundled digits 5-9 with 5%
  of the labels flipped at random.
- **Outliers**: 20 non-digits (4 each of blank, noise, stripes, checkerboards, text-like
  strokes) among the same digits' features; precision and recall of the top 20. (A tight
  group of k or more alike foreign images is not an outlier by this score: it is a small
  cluster, and a near-duplicate group when alike enough.)
"""
from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from benchmarks.common import (
    base_parser,
    machine_line,
    resolve_device,
    structured_image,
    table,
    write_json,
)
from transferlab.analysis import curation
from transferlab.store.rows import plain_rows
from transferlab.store.writer import StoreWriter

MNIST = Path(__file__).resolve().parents[1] / "transferlab" / "data" / "mnist_5k.npz"
TRANSFORMS = ("jpeg q30-50", "downscale 50%", "crop 90%", "brightness", "hflip")


def variant(im: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
    if kind.startswith("jpeg"):
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=int(rng.integers(30, 51)))
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    if kind.startswith("downscale"):
        return im.resize((im.width // 2, im.height // 2), Image.BILINEAR)
    if kind.startswith("crop"):
        w, h = im.size
        dw, dh = int(w * 0.05), int(h * 0.05)
        return im.crop((dw, dh, w - dw, h - dh))
    if kind == "brightness":
        return ImageEnhance.Brightness(im).enhance(float(rng.choice([0.9, 1.1])))
    return ImageOps.mirror(im)


def duplicate_folder(root: Path, count: int, rng: np.random.Generator) -> dict[str, str]:
    """``count`` distinct images, a fifth copied by one transform each; copy key -> source."""
    root.mkdir(parents=True, exist_ok=True)
    family = {}
    for i in range(count):
        im = structured_image(rng, (200, 150))
        im.save(root / f"img{i:04d}.jpg", quality=92)
        if i % 5 == 0:
            kind = TRANSFORMS[(i // 5) % len(TRANSFORMS)]
            name = f"img{i:04d}_{kind.split()[0]}.png"
            variant(im, kind, rng).save(root / name)
            family[name] = f"img{i:04d}.jpg"
    return family


# Feature settings compared for the duplicates: extraction overrides on top of a config
# (the built-in ``dedup`` config is the recommended one; ``head`` the plain pooled vector).
SETTINGS = {
    "dedup (stage:1, grid4, hflip, squash)": ("dedup", []),
    "dedup, centre crop": ("dedup", ["preprocess.resize=center_crop"]),
    "dedup, no hflip": ("dedup", ["output.hflip=false"]),
    "dedup, global avg pool": ("dedup", ["model.pool=avg"]),
    "head (global avg pool)": (None, ["model.name=resnet18", "model.pretrained=false",
                                      "model.cut=head"]),
}
DEDUP_THRESHOLDS = tuple(round(0.90 + 0.005 * i, 3) for i in range(20))


def duplicates_quality(bench: Path, count: int, device: str, setting: str, center: bool,
                       thresholds: Sequence[float] = DEDUP_THRESHOLDS) -> list[list]:
    """Rows (setting, cosine of, threshold, precision, recall, pairs, recall per kind)."""
    from transferlab.config import ExtractConfig, load_config
    from transferlab.extract.runner import run_extract

    rng = np.random.default_rng(0)
    data = bench / f"curate_dups_{count}"
    if not (data / "family.json").is_file():
        family = duplicate_folder(data, count, rng)
        (data / "family.json").write_text(json.dumps(family), encoding="utf-8")
    family = json.loads((data / "family.json").read_text(encoding="utf-8"))
    config, extra = SETTINGS[setting]
    name = "curate_dups_store_" + "".join(c if c.isalnum() else "_" for c in setting)
    cfg = load_config(config, [f"data.root={data}", "data.source=folder",
                               f"output.dir={bench / name}", "output.overwrite=true",
                               "runtime.progress=false", f"runtime.device={device}",
                               "runtime.batch_size=32", *extra],
                      ExtractConfig)
    store = run_extract(cfg).store
    rows = plain_rows(store)
    mean = curation.feature_mean(store, rows) if center else None
    dist, idx, _ = curation.knn_graph(store, rows, 10, None, mean)
    sim = 1.0 - dist
    key_row = {k: r for r, k in enumerate(store.keys)}
    fam_of = {r: r for r in range(len(store.keys))}
    for copy, src in family.items():
        fam_of[key_row[copy]] = key_row[src]
    out = []
    for t in thresholds:
        groups = curation.duplicate_groups(store, rows, idx, sim, t, mean)
        group_of = {r: g for g, grp in enumerate(groups) for r in [grp.keep, *grp.others]}
        found = {c: group_of.get(key_row[c], -1) == group_of.get(key_row[s], -2)
                 for c, s in family.items()}
        members = [(g.keep, r) for g in groups for r in g.others]
        right = sum(fam_of[a] == fam_of[b] for a, b in members)
        per_kind = [np.mean([v for c, v in found.items() if c.split("_")[1].startswith(
            k.split()[0])]) for k in TRANSFORMS]
        out.append([setting, "centred" if center else "raw", f"{t:.3f}",
                    right / max(1, len(members)), float(np.mean(list(found.values()))),
                    len(members), *per_kind])
    return out


def best_rows(rows: list[list], target: float = 0.95) -> list[list]:
    """Per (setting, cosine): the thresholds where precision and recall both reach
    ``target``, and the best recall at precision >= target."""
    out = []
    for key in dict.fromkeys((r[0], r[1]) for r in rows):
        mine = [r for r in rows if (r[0], r[1]) == key]
        ok = [float(r[2]) for r in mine if r[3] >= target and r[4] >= target]
        precise = [r for r in mine if r[3] >= target]
        best = max(precise, key=lambda r: (r[4], -float(r[2]))) if precise else None
        out.append([*key, f"{min(ok):.3f}-{max(ok):.3f}" if ok else "none",
                    "-" if best is None else best[2],
                    "-" if best is None else best[3], "-" if best is None else best[4]])
    return out


def train_lenet(x: np.ndarray, y: np.ndarray, epochs: int, seed: int = 0) -> torch.nn.Module:
    from transferlab.models.lenet import lenet

    torch.manual_seed(seed)
    net = lenet(5)
    opt = torch.optim.Adam(net.parameters(), lr=0.003)
    xt = torch.from_numpy(x[:, None].astype(np.float32) / 255.0)
    yt = torch.from_numpy(y.astype(np.int64))
    for _ in range(epochs):
        perm = torch.randperm(len(xt))
        for s in range(0, len(xt), 64):
            b = perm[s:s + 64]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(xt[b]), yt[b]).backward()
            opt.step()
    return net.eval()


def lenet_features(net: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return net[:7](torch.from_numpy(images[:, None].astype(np.float32) / 255.0)).numpy()


def non_digits(n: int, rng: np.random.Generator) -> np.ndarray:
    """Blank, noise, stripes, checkerboards and text-like strokes, 28x28 grey."""
    out = []
    for i in range(n):
        kind = i % 5
        if kind == 0:
            a = np.full((28, 28), int(rng.integers(0, 256)), np.uint8)
        elif kind == 1:
            a = rng.integers(0, 256, (28, 28), dtype=np.uint8)
        elif kind == 2:
            a = np.zeros((28, 28), np.uint8)
            a[:, ::int(rng.integers(2, 5))] = 255
        elif kind == 3:
            s = int(rng.integers(2, 6))
            a = ((np.indices((28, 28)).sum(0) // s) % 2 * 255).astype(np.uint8)
        else:
            im = Image.new("L", (28, 28))
            d = ImageDraw.Draw(im)
            for row in range(3, 26, 6):
                x = 1
                while x < 26:
                    w = int(rng.integers(2, 6))
                    d.rectangle([x, row, min(27, x + w), row + 2], fill=255)
                    x += w + 2
            a = np.asarray(im)
        out.append(a)
    return np.stack(out)


def write_store(path: Path, x: np.ndarray, labels: np.ndarray) -> object:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
    w = StoreWriter(path, {"bench": "curate_quality"}, dtype="float16", fsync=False)
    w.add([f"d/{i:05d}.png" for i in range(len(x))], labels, x)
    return w.close({"class_names": [str(c) for c in range(5, 10)]})


def digits_quality(bench: Path, epochs: int, per_class: int) -> tuple[list, list]:
    with np.load(MNIST) as d:
        images, labels = d["images"], d["labels"].astype(np.int64)
    src = labels < 5
    net = train_lenet(images[src], labels[src], epochs)
    tgt = np.flatnonzero(labels >= 5)
    tgt = np.concatenate([tgt[labels[tgt] == c][:per_class] for c in range(5, 10)])
    feats = lenet_features(net, images[tgt])
    y = labels[tgt] - 5
    rng = np.random.default_rng(1)
    flip = rng.choice(len(y), int(round(0.05 * len(y))), replace=False)
    noisy = y.copy()
    noisy[flip] = (y[flip] + rng.integers(1, 5, len(flip))) % 5
    store = write_store(bench / "curate_digits_labels", feats, noisy)
    label_rows = []
    for use_cleanlab in (True, False):
        notes: list[str] = []
        if use_cleanlab:
            try:
                import cleanlab  # noqa: F401
            except ImportError:
                continue
        issues, method = curation.label_issues(store, plain_rows(store), notes=notes,
                                               use_cleanlab=use_cleanlab)
        found = {i.row for i in issues}
        tp = len(found & set(flip.tolist()))
        right = sum(i.suggested == y[i.row] for i in issues if i.row in set(flip.tolist()))
        label_rows.append([method, len(flip), len(found), tp / max(1, len(found)),
                           tp / len(flip), right / max(1, tp)])
    odd = lenet_features(net, non_digits(20, np.random.default_rng(2)))
    x = np.concatenate([feats, odd])
    store = write_store(bench / "curate_digits_outliers", x,
                        np.concatenate([y, np.zeros(len(odd), np.int64)]))
    report = curation.curate(store, top=len(odd), labels=False)  # raw cosine (the default)
    planted = set(range(len(feats), len(x)))
    hit = len(set(report.outliers) & planted)
    out_rows = [[len(feats), len(odd), report.k, hit / len(report.outliers), hit / len(odd)]]
    return label_rows, out_rows


def main(argv: Sequence[str] | None = None) -> list[list]:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--settings", default=None,
                   help="names of SETTINGS for the duplicates, separated by ';' (default all)")
    p.add_argument("--only-duplicates", action="store_true")
    p.add_argument("--count", type=int, default=None,
                   help="distinct photo-like images for the duplicates (default 1000)")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    print(machine_line(device))
    bench = Path(args.bench_dir)
    count, epochs, per_class = (40, 1, 60) if args.quick else (1000, 5, 500)
    count = args.count or count
    names = args.settings.split(";") if args.settings else list(SETTINGS)
    if args.quick:
        names = names[:1]
    dup = []
    for setting in names:
        dup += duplicates_quality(bench, count, device.type, setting, False)
        if setting.startswith("head"):  # its raw cosine is useless: the centred one too
            dup += duplicates_quality(bench, count, device.type, setting, True)
    print()
    head = ["features", "cosine of", "threshold", "precision", "recall", "pairs found",
            *[f"recall {k}" for k in TRANSFORMS]]
    title = (f"near-duplicates: {count} photo-like images, {count // 5} planted copies "
             "(random-weight ResNet-18)")
    print(table(title + ", the recommended config", head,
                [r for r in dup if r[0] == names[0] and r[1] == "raw"]))
    print()
    print(table(title + ": thresholds reaching precision and recall >= 0.95",
                ["features", "cosine of", "P and R >= 0.95 at", "best R at P >= 0.95: t",
                 "precision", "recall"], best_rows(dup)))
    if args.only_duplicates:
        write_json(args.json, {"duplicates": dup})
        return dup
    labels, outliers = digits_quality(bench, epochs, per_class)
    print()
    print(table("label issues: LeNet (digits 0-4) features of digits 5-9, 5% flipped",
                ["method", "flipped", "flagged", "precision", "recall",
                 "suggested = true label"], labels))
    print()
    print(table("outliers: 20 non-digits among the digits (top 20 by mean distance to k NN)",
                ["digits", "planted", "k", "precision", "recall"], outliers))
    write_json(args.json, {"duplicates": dup, "labels": labels, "outliers": outliers})
    return dup + labels + outliers


if __name__ == "__main__":
    main()

"""Classify image files with a fine-tuned checkpoint, and write the predictions as CSV.

A path is an image file or a folder (searched recursively for image files). The CSV has
one row per readable image: ``path,class,probability`` (the most likely class and its
softmax probability; RFC 4180: "\\r\\n" line ends, fields with line breaks quoted; a name
that is not UTF-8 written as ``imageio.escape_name`` gives it); files that cannot be decoded
are reported as failures, not in the CSV. Without an output path the CSV goes to stdout.
"""
from __future__ import annotations

import csv
import io
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config import IMAGE_EXTENSIONS, RuntimeConfig
from ..data.datasets import FileReader, ImageDataset, ThreadedItems, make_loader
from ..data.imageio import DEFAULT_MAX_PIXELS, escape_name
from ..data.preprocess import build_transform
from ..data.sources import scan_folder
from ..errors import DataError
from ..runtime.device import Runtime, apply_runtime, resolve_device
from ..runtime.userfiles import check_output, write_output
from .classifier import Classifier, load_model


@dataclass
class Prediction:
    path: str
    label: str
    probability: float


@dataclass
class PredictResult:
    predictions: list[Prediction]
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


def collect_images(paths: Sequence[str | Path],
                   extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[str]:
    """Image files named by ``paths``: files as given, folders searched recursively (sorted)."""
    files: list[str] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = scan_folder(p, list(extensions), escape=False)  # opened by path here
            if not found:
                raise DataError(f"no image files ({', '.join(extensions)}) under {p}")
            files += [str(p / key) for key in found]
        elif p.exists():
            files.append(str(p))
        else:
            raise DataError(f"{p} does not exist; give image files or folders of images")
    if not files:
        raise DataError("no images given; pass image files or folders")
    return files


def predict_files(model: Classifier, files: Sequence[str], batch_size: int | None = None,
                  runtime: Runtime | None = None, fold_bn: bool = True) -> PredictResult:
    """Decode ``files`` (robustly: bad files become failures) and classify them through the
    frozen-forward engine with ``runtime`` (default ``model.default_runtime()``), read as
    extraction reads: by its loader workers, or without them each batch by its threads;
    the batch size by default extraction's. A name that is not UTF-8 is read, and reported
    under its lossless escape (``escape_name``)."""
    rt = runtime or model.default_runtime()
    spec = model.preprocess
    names = [escape_name(f) or f for f in files]
    ds = ImageDataset(FileReader(None, files, DEFAULT_MAX_PIXELS), names, np.full(len(files), -1),
                      transform=build_transform(spec, normalize=False),
                      image_mode=spec.image_mode, draft_size=spec.scale_size())
    threaded = ThreadedItems(ds, rt.threads) if rt.num_workers == 0 else ds
    loader = make_loader(threaded, model.batch_size(rt, batch_size), rt.num_workers,
                         pin_memory=rt.is_cuda)
    result = PredictResult([])

    def batches() -> Iterator[tuple[torch.Tensor, list[str]]]:
        for batch in loader:
            result.failures += batch["failures"]
            if batch["image"] is not None:
                yield batch["image"], batch["key"]

    for probs, keys in model.proba_batches(batches(), model.engine(rt, fold_bn)):
        best, idx = probs.max(1)
        result.predictions += [Prediction(path, model.class_names[int(i)], float(p))
                               for path, p, i in zip(keys, best, idx)]
    return result


def write_csv(predictions: Sequence[Prediction], out: io.TextIOBase) -> None:
    """RFC 4180, as the store's index.csv: "\r\n" line ends, so QUOTE_MINIMAL quotes any
    field holding "\r" or "\n" (a "\n" terminator leaves "\r" bare, and csv.reader takes
    it for a line end). ``out`` must not translate newlines (``newline=""``)."""
    writer = csv.writer(out)
    writer.writerow(["path", "class", "probability"])
    writer.writerows([p.path, p.label, f"{p.probability:.6f}"] for p in predictions)


def run_predict(checkpoint: str | Path, paths: Sequence[str | Path], out: str | Path | None,
                batch_size: int | None = None, device: str = "auto",
                num_workers: int | None = None, trust_code: bool = False,
                precision: str = "auto", overwrite: bool = False) -> PredictResult:
    """Load ``checkpoint``, classify the images under ``paths`` and write the CSV to ``out``
    (stdout when None; a file under ``runtime.userfiles``' policy: an existing one is refused
    unless ``overwrite``, checked before the model loads, and written whole). ``trust_code``
    lets a trusted checkpoint name code to run.

    The runtime is resolved and applied as extraction's is (``runtime`` defaults: precision
    ``auto``, channels_last for conv nets, threads of the free cores, BatchNorm folded; None
    for the batch size or the workers: chosen for the device)."""
    if out is not None:
        check_output(out, overwrite, "--out")
    config = RuntimeConfig(device=device, precision=precision, batch_size=batch_size,
                           num_workers=num_workers)
    model = load_model(checkpoint, resolve_device(device), trust_code)
    rt = model.inference_runtime(config, sample_load=True)
    apply_runtime(rt)
    result = predict_files(model, collect_images(paths), batch_size, rt, config.fold_bn)
    if out is None:
        write_csv(result.predictions, sys.stdout)
        return result
    write_output(out, lambda f: write_csv(result.predictions, f), overwrite=overwrite,
                 what="--out")
    return result

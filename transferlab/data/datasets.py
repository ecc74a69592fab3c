"""Datasets: image folders, file lists, torchvision datasets and the bundled 5,000 MNIST digits.

Every item has a **key**, its path relative to the data root with '/' separators (never a
bare file name: two folders may both hold ``0001.jpg``). Keys name rows in feature stores and
let an interrupted run skip finished items.

``build_dataset(cfg)`` returns an ``ImageDataset`` whatever the source. Items are decoded by
``transferlab.imageio.load_image``; a file that cannot be decoded does not raise: its sample
carries ``error='reason: detail'`` and a black placeholder image, and
``collate_skip_errors`` drops it from the batch and reports it, so one bad file never kills
a DataLoader worker.

Sources (``DataConfig.source``):

- ``folder``: ``root`` scanned recursively for ``extensions`` (case-insensitive; hidden files
  and folders skipped); keys sorted. When every image lies inside an immediate sub-folder of
  ``root``, the sub-folder names are the classes (sorted, label = position); else labels -1.
- ``list``: ``list_file`` with one path per line (blank and ``#`` lines skipped), or a
  ``.csv``/``.tsv`` with a header naming ``path_column`` and optionally ``label_column``
  (class names or integers). Relative paths are relative to ``root``, or to the list file's
  folder when ``root`` is null. Absolute paths under that base get relative keys. A path
  that escapes the base (absolute elsewhere, or leading out with ``..``) is never read: it
  is a failure ``outside-root``. The check is on the listed text; symlinks inside the base
  are followed (whoever owns the data folder put them there, as with ``folder``). File order
  is kept. The list is read only when it is a regular file (a FIFO or a device is one
  line, never a hang) of at most ``remote.MAX_TEXT_BYTES`` and ``sources.MAX_LIST_LINES``
  lines; a path or a label longer than ``MAX_KEY_CHARS``, an integer label of more than
  ``MAX_LABEL_DIGITS`` digits or a CSV field over ``csv``'s limit is one error naming its
  line.
- ``torchvision``: MNIST, FashionMNIST, KMNIST, CIFAR10, CIFAR100 via ``torchvision.datasets``
  (keys ``train/000123``). MNIST-style datasets are read directly from idx files (``.gz`` or
  not) when ``root`` holds them, e.g. Debian's ``/usr/share/datasets/fashion-mnist`` (used for
  FashionMNIST when ``root`` is null).
- ``mnist-5k``: the bundled ``transferlab/data/mnist_5k.npz``; per class, every fifth digit
  (positions 4, 9, 14, ... within the class, in file order) is test, the rest train:
  4,000 train and 1,000 test. Keys ``mnist-5k/train/00042`` carry the row in the file.

``classes`` keeps only the listed labels (names or integers; labels are not renumbered) and
``limit`` keeps the first N items after that.
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, get_worker_info

from ..errors import DataError
from .imageio import ImageDecodeError, decoding_threads_quiet, load_image

# Limits on what a data source names (issue #24): a key (a listed path, a tar member name) is
# written to a store's index, and a label is an int64 there; longer or wider ones are refused
# where they are read (one line naming the line of a list file, or a failure of the item).
MAX_LABEL_DIGITS = 18  # an integer label has at most 18 digits: |label| < 1e18 fits int64
_LABEL_TEXT = re.compile(rf"-?[0-9]{{1,{MAX_LABEL_DIGITS}}}")

MNIST_5K = Path(__file__).parent / "mnist_5k.npz"
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
PLACEHOLDER_SIZE = (32, 32)

Transform = Callable[[Image.Image], Any]
Item = TypeVar("Item")


def integer_label(text: str) -> int | None:
    """``text`` as an integer label (``-?[0-9]{1,18}``, ASCII digits only), None when it is not
    one: a number of more digits cannot be a class index and would not fit int64."""
    return int(text) if _LABEL_TEXT.fullmatch(text) else None


def label_problem(text: str) -> str | None:
    """Why ``text``, which looks like an integer, cannot be an integer label ("is an integer of
    N digits ..."), or None."""
    digits = len(text) - text.startswith("-")
    if digits > MAX_LABEL_DIGITS and text.lstrip("-").isdigit():
        return f"is an integer of {digits:,} digits (a label has at most {MAX_LABEL_DIGITS})"
    return None


# ---------------------------------------------------------------------------------------
# Readers: how item i becomes a PIL image (files on disk, or rows of an in-memory array)
# ---------------------------------------------------------------------------------------


class FileReader:
    """Decodes ``base / key`` (or the absolute key) with ``load_image``.

    ``rejected`` maps keys that must never be opened (a name that is not UTF-8, a listed path
    outside the data root) to their ``(reason, detail)``: they become failures, and ``path``
    is None for them so no other reader opens them either.
    """

    def __init__(self, base: Path | None, keys: Sequence[str], max_pixels: int | None,
                 rejected: dict[str, tuple[str, str]] | None = None):
        self.base = base
        self.keys = list(keys)
        self.max_pixels = max_pixels
        self.rejected = dict(rejected or {})

    def path(self, i: int) -> Path | None:
        key = self.keys[i]
        if key in self.rejected:
            return None
        return Path(key) if self.base is None or os.path.isabs(key) else self.base / key

    def load(self, i: int, mode: str, draft_size: tuple[int, int] | None) -> Image.Image:
        key = self.keys[i]
        if key in self.rejected:
            raise ImageDecodeError(*self.rejected[key], path=key)
        return load_image(self.path(i), mode, draft_size, self.max_pixels)


class ArrayReader:
    """Rows of a uint8 array, (N, H, W) grey or (N, H, W, 3) colour, as PIL images."""

    def __init__(self, images: np.ndarray):
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise DataError(f"in-memory images must be uint8 (N, H, W[, 3]), got {images.dtype} "
                            f"{images.shape}; convert them with .astype(np.uint8)")
        self.images = images

    def path(self, i: int) -> None:
        return None

    def load(self, i: int, mode: str, draft_size: tuple[int, int] | None) -> Image.Image:
        im = Image.fromarray(np.ascontiguousarray(self.images[i]))
        return im if im.mode == mode else im.convert(mode)


# ---------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------


class ImageDataset(Dataset):
    """Keys, integer labels (-1 unknown) and class names over a reader; see module docstring.

    ``dataset[i]`` is ``dict(image, label, key, index, error)``; ``index`` is the position in
    this dataset (after ``subset``) and ``error`` is None or ``'reason: detail'``.
    """

    def __init__(self, reader: FileReader | ArrayReader, keys: Sequence[str],
                 labels: Sequence[int] | np.ndarray, class_names: list[str] | None = None,
                 transform: Transform | None = None, image_mode: str = "RGB",
                 draft_size: tuple[int, int] | None = None, rows: np.ndarray | None = None):
        self.reader = reader
        self.keys = list(keys)
        self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(self.labels) != len(self.keys):
            raise DataError(f"{len(self.keys)} keys but {len(self.labels)} labels; give one "
                            "label per item (-1 when unknown)")
        self.rows = np.arange(len(self.keys)) if rows is None else np.asarray(rows, np.int64)
        self.class_names = class_names
        self.transform = transform
        self.image_mode = image_mode
        self.draft_size = draft_size

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> dict[str, Any]:
        try:
            image, error = self.load_image(i), None
        except ImageDecodeError as exc:
            image, error = self.placeholder(), exc.short()
        if self.transform is not None:
            image = self.transform(image)
        return {"image": image, "label": int(self.labels[i]), "key": self.keys[i],
                "index": int(i), "error": error}

    def load_image(self, i: int) -> Image.Image:
        """The decoded, untransformed image of item ``i``; raises ``ImageDecodeError``."""
        return self.reader.load(int(self.rows[i]), self.image_mode, self.draft_size)

    def path(self, i: int) -> Path | None:
        """The file of item ``i`` (None for in-memory datasets)."""
        return self.reader.path(int(self.rows[i]))

    def placeholder(self) -> Image.Image:
        """A black image standing in for a file that failed, so transforms still apply."""
        return Image.new(self.image_mode, tuple(self.draft_size or PLACEHOLDER_SIZE))

    def subset(self, indices: Iterable[int] | np.ndarray) -> ImageDataset:
        """The items at ``indices`` (in that order), sharing reader and transform."""
        idx = np.asarray(list(indices) if not isinstance(indices, np.ndarray) else indices,
                         dtype=np.int64).reshape(-1)
        return ImageDataset(self.reader, [self.keys[i] for i in idx], self.labels[idx],
                            self.class_names, self.transform, self.image_mode,
                            self.draft_size, self.rows[idx])

    def pixels(self, size: tuple[int, int]) -> np.ndarray | None:
        """uint8 (N, C, H, W) pixels of the items when they are held in memory at ``size``
        (H, W), untransformed; None for files or another size."""
        images = getattr(self.reader, "images", None)
        if images is None or images.shape[1:3] != tuple(size):
            return None
        arr = images[self.rows]
        return arr[:, None] if arr.ndim == 3 else arr.transpose(0, 3, 1, 2)

    def __repr__(self) -> str:
        classes = f", {len(self.class_names)} classes" if self.class_names else ""
        return f"ImageDataset({len(self)} items{classes}, mode={self.image_mode})"


def from_arrays(images: np.ndarray, labels: Sequence[int] | np.ndarray | None = None,
                keys: Sequence[str] | None = None, class_names: list[str] | None = None,
                transform: Transform | None = None, image_mode: str = "RGB",
                prefix: str = "") -> ImageDataset:
    """An ``ImageDataset`` over in-memory uint8 images (MNIST/CIFAR-style arrays)."""
    images = np.asarray(images)
    n = len(images)
    keys = list(keys) if keys is not None else [f"{prefix}{i:06d}" for i in range(n)]
    labels = np.full(n, -1, np.int64) if labels is None else np.asarray(labels, np.int64)
    return ImageDataset(ArrayReader(images), keys, labels, class_names, transform, image_mode)


# ---------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------


def collate_skip_errors(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Collate good samples; failed ones go to ``failures`` as (key, reason) pairs.

    Returns ``image`` (stacked tensor, a list when images are not tensors, None when every
    sample failed), ``label`` and ``index`` (int64 tensors), ``key`` (list) and ``failures``.
    """
    good = [s for s in batch if s["error"] is None]
    failures = [(s["key"], s["error"]) for s in batch if s["error"] is not None]
    images: Any = [s["image"] for s in good]
    if images and all(isinstance(im, torch.Tensor) for im in images):
        images = torch.stack(images)
    return {"image": images if good else None,
            "label": torch.tensor([s["label"] for s in good], dtype=torch.int64),
            "index": torch.tensor([s["index"] for s in good], dtype=torch.int64),
            "key": [s["key"] for s in good], "failures": failures}


def read_batch(read: Callable[[int], Item], indices: Sequence[int], threads: int) -> list[Item]:
    """``read(i)`` for every index, in the order of ``indices``: the one threaded batch
    decoder (extraction, the fine-tune caching pass, prediction).

    Up to ``threads`` threads share the batch (PIL releases the GIL while it decodes and
    resizes), on the cores the forward pass uses between batches; measured in BENCHMARKS.md.
    Inside a loader worker (its own process) or with ``threads`` < 2 the items are read one by
    one. Only for deterministic reads: threads would reorder a random transform's draws.
    """
    threads = min(threads, len(indices))
    if threads < 2 or get_worker_info() is not None:
        return [read(i) for i in indices]
    with decoding_threads_quiet(), ThreadPoolExecutor(threads, "decode") as pool:
        return list(pool.map(read, indices))


class ThreadedItems(Dataset):
    """A dataset whose DataLoader batches are read by ``threads`` threads (``read_batch``)."""

    def __init__(self, dataset: Any, threads: int):
        self.dataset, self.threads = dataset, threads

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[i]

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        return read_batch(self.dataset.__getitem__, indices, self.threads)


PREFETCH_FACTOR = 4  # batches each worker keeps ready: decoding is bursty, the model is not


def make_loader(dataset: Dataset, batch_size: int | None = None, num_workers: int = 0,
                pin_memory: bool = False, *, batches: Sequence[Sequence[int]] | None = None,
                collate_fn: Callable[[list], dict] = collate_skip_errors,
                generator: torch.Generator | None = None) -> DataLoader:
    """The one DataLoader factory (prediction, extraction, fine-tuning): in dataset order by
    ``batch_size``, or the given ``batches`` of indices; undecodable files are skipped and
    reported by the default collate. Workers prefetch ``PREFETCH_FACTOR`` batches each."""
    if (batch_size is None) == (batches is None):
        raise ValueError("make_loader takes batch_size or batches, not both or neither")
    extra: dict[str, Any] = {"prefetch_factor": PREFETCH_FACTOR} if num_workers > 0 else {}
    if batches is not None:
        extra["batch_sampler"] = [list(b) for b in batches]
    else:
        extra.update(batch_size=batch_size, shuffle=False)
    return DataLoader(dataset, num_workers=num_workers, pin_memory=pin_memory,
                      collate_fn=collate_fn, generator=generator, **extra)

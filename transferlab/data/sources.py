"""Building a dataset from a DataConfig: folder, list, torchvision, mnist-5k, webdataset.

Each value of ``data.source`` is one entry of ``DATA_SOURCES`` (at the end of this module):
how its items are listed, how messages name it and what it adds to the data fingerprint.
A new source is its builder and its entry here, plus its name (and any keys) in
``DataConfig`` (``config.py``).
"""
from __future__ import annotations

import csv
import difflib
import gzip
import io
import logging
import os
import posixpath
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from ..config import MAX_KEY_CHARS, DataConfig, check_range
from ..errors import DataError
from .datasets import (
    DEBIAN_FASHION_MNIST,
    MNIST_5K,
    ArrayReader,
    FileReader,
    ImageDataset,
    Transform,
    integer_label,
    label_problem,
)
from .imageio import BAD_NAME, OUTSIDE_ROOT, escape_name, is_image_file
from .remote import UrlReader, absolute, find_images, is_remote, local_path, read_text

log = logging.getLogger(__name__)

MAX_LIST_LINES = 20_000_000  # lines of data.list_file (ImageNet-21k lists 14M images)
_LINE_BREAK = re.compile(r"\r\n|\r|\n")

# ---------------------------------------------------------------------------------------
# Building from a DataConfig
# ---------------------------------------------------------------------------------------


def build_dataset(cfg: DataConfig, transform: Transform | None = None, image_mode: str = "RGB",
                  draft_size: tuple[int, int] | None = None) -> ImageDataset:
    """The dataset ``cfg`` describes, filtered by ``cfg.classes`` and cut to ``cfg.limit``.

    ``image_mode`` ('RGB' or 'L') is what the model takes; ``draft_size`` (width, height) lets
    big JPEGs decode at reduced scale while staying at least that size.
    """
    if image_mode not in ("RGB", "L"):
        raise DataError(f"image_mode must be 'RGB' or 'L', got {image_mode!r}")
    ds = data_source(cfg.source).build(cfg)
    ds.transform = transform
    ds.image_mode = image_mode
    ds.draft_size = draft_size
    if cfg.classes is not None:
        ds = ds.subset(np.flatnonzero(np.isin(ds.labels, _class_labels(ds, cfg.classes))))
    if cfg.limit is not None:
        check_range(DataConfig, "data.limit", cfg.limit)
        ds = ds.subset(range(min(cfg.limit, len(ds))))
    return ds


def data_source(name: str) -> DataSource:
    """The ``DATA_SOURCES`` entry of ``data.source`` ``name``."""
    if name not in DATA_SOURCES:
        raise DataError(f"unknown data.source {name!r}; choose one of {', '.join(DATA_SOURCES)}")
    return DATA_SOURCES[name]


def describe_data(cfg: DataConfig) -> str:
    """The data of ``cfg`` in a few words, for messages."""
    return data_source(cfg.source).describe(cfg)


def _class_labels(ds: ImageDataset, wanted: list) -> list[int]:
    """Labels named by ``wanted`` (class names or integers); unknown entries are an error."""
    names = ds.class_names or []
    present = sorted({int(v) for v in ds.labels} - {-1})
    available = ", ".join(names) if names else ", ".join(map(str, present)) or "none"
    out = []
    for item in wanted:
        if isinstance(item, str) and item in names:
            out.append(names.index(item))
        elif (isinstance(item, int) and not isinstance(item, bool)) or (
                isinstance(item, str) and item.strip().lstrip("-").isdigit()):
            if int(item) not in present:
                raise DataError(f"data.classes: label {item} matches no item (available "
                                f"classes: {available}); fix data.classes")
            out.append(int(item))
        else:
            close = difflib.get_close_matches(str(item), names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise DataError(f"data.classes: unknown class {item!r}{hint} (available classes: "
                            f"{available}); fix data.classes")
    return out


# ---- folder -----------------------------------------------------------------------------


def _existing_dir(root: str | None, what: str) -> Path:
    if root is None:
        raise DataError(f"data.root is not set; point it to the {what}")
    path = local_path(root)  # a file:// URL is a local path
    if not path.exists():
        raise DataError(f"data.root {str(path)!r} does not exist; point data.root to the {what}")
    if not path.is_dir():
        raise DataError(f"data.root {str(path)!r} is a file, not a folder; point data.root to "
                        f"the {what}")
    return path


def scan_folder(root: Path, extensions: list[str],
                rejected: dict[str, tuple[str, str]] | None = None,
                escape: bool = True) -> list[str]:
    """Sorted keys of the image files under ``root`` (following links, skipping hidden).

    A path that is not valid UTF-8 cannot be a key (stores write UTF-8): it is listed under
    its lossless escape (``imageio.escape_name``) and recorded in ``rejected`` as a failure,
    so the rest of the folder is still read. ``escape=False`` keeps such names as ``os.walk``
    gives them (surrogateescape), for a caller that opens them and escapes what it prints.
    """
    keys, seen = [], set()

    def unreadable(exc: OSError) -> None:
        if Path(exc.filename or "") == root:
            raise DataError(f"cannot list data.root {root}: {exc.strerror}; fix its "
                            "permissions or point data.root elsewhere")
        log.warning("skipping unreadable folder %s (%s)", exc.filename, exc.strerror)

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink loop
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = Path(dirpath).relative_to(root)
        for name in filenames:
            if not name.startswith(".") and is_image_file(name, extensions):
                key = (rel / name).as_posix()
                keys.append(_checked_key(key, rejected) if escape else key)
    return sorted(set(keys))  # set: an escaped name equal to a real one is listed once


def _checked_key(key: str, rejected: dict[str, tuple[str, str]] | None) -> str:
    escaped = escape_name(key)
    if escaped is None:
        return key
    if rejected is not None:
        rejected[escaped] = (BAD_NAME, "file name is not valid UTF-8")
    return escaped


def _folder(cfg: DataConfig) -> ImageDataset:
    if is_remote(cfg.root):  # s3:// gs:// http(s)://: objects under a prefix (data.remote)
        keys = find_images(cfg.root, cfg.extensions)
        if not keys:
            raise DataError(f"no images with extensions {', '.join(cfg.extensions)} under "
                            f"{cfg.root}; check data.root or data.extensions")
        labels, class_names = _labels_from_folders(keys)
        reader = UrlReader(cfg.root, keys, cfg.max_image_pixels)
        return ImageDataset(reader, keys, labels, class_names)
    root = _existing_dir(cfg.root, "image folder")
    rejected: dict[str, tuple[str, str]] = {}
    keys = scan_folder(root, cfg.extensions, rejected)
    if not keys:
        raise DataError(_empty_message(root, cfg.extensions))
    labels, class_names = _labels_from_folders(keys)
    reader = FileReader(root, keys, cfg.max_image_pixels, rejected)
    return ImageDataset(reader, keys, labels, class_names)


def _labels_from_folders(keys: list[str]) -> tuple[np.ndarray, list[str] | None]:
    tops = [key.split("/", 1)[0] if "/" in key else None for key in keys]
    if any(top is None for top in tops):
        return np.full(len(keys), -1, np.int64), None
    names = sorted(set(tops))
    lookup = {name: i for i, name in enumerate(names)}
    return np.array([lookup[t] for t in tops], np.int64), names


def _empty_message(root: Path, extensions: list[str]) -> str:
    others = [p.name for p in root.rglob("*") if p.is_file()][:3]
    found = f" (found other files, e.g. {', '.join(others)})" if others else " (it is empty)"
    return (f"no images with extensions {', '.join(extensions)} under {root}{found}; check "
            "data.root or data.extensions")


# ---- list / CSV ---------------------------------------------------------------------------


def _list(cfg: DataConfig) -> ImageDataset:
    if cfg.list_file is None:
        raise DataError("data.source=list needs data.list_file (a text file of paths or a CSV)")
    if is_remote(cfg.list_file) or is_remote(cfg.root):
        return _url_list(cfg)
    list_file = local_path(cfg.list_file)
    if not list_file.exists():  # a FIFO or a device is refused in one line by read_text
        raise DataError(f"data.list_file {str(list_file)!r} not found; fix data.list_file")
    base = _existing_dir(cfg.root, "folder the listed paths are relative to") \
        if cfg.root is not None else list_file.parent
    paths, raw_labels = _read_list(list_file, cfg)
    keys = [_key_for(p, base) for p in paths]
    _check_unique(keys, list_file)
    rejected = {k: (OUTSIDE_ROOT, f"outside {base}") for k in keys if _escapes(k)}
    _check_some_exist([k for k in keys if k not in rejected], base, list_file)
    labels, class_names = _parse_labels(raw_labels, len(keys))
    reader = FileReader(base, keys, cfg.max_image_pixels, rejected)
    return ImageDataset(reader, keys, labels, class_names)


def _read_list(list_file: Path | str, cfg: DataConfig) -> tuple[list[str], list[str] | None]:
    try:
        if PurePosixPath(str(list_file)).suffix.lower() in (".csv", ".tsv"):
            paths, raw_labels = _read_csv(list_file, cfg.path_column, cfg.label_column)
        else:
            paths, raw_labels = _read_lines(list_file), None
    except UnicodeDecodeError as exc:
        raise DataError(f"data.list_file {list_file} is not UTF-8 (byte {exc.start}); save it "
                        "as UTF-8") from None
    if not paths:
        raise DataError(f"data.list_file {list_file} lists no paths; add one path per line")
    return paths, raw_labels


def _url_list(cfg: DataConfig) -> ImageDataset:
    """A list file whose images are objects under a URL: data.root, or the list file's
    own folder when data.root is null. Keys are the listed paths, normalised; one that
    leaves the base (absolute, or '..' leading out) is a failure ``outside-root``, never read."""
    list_file = cfg.list_file
    base = cfg.root if cfg.root is not None else list_file.rsplit("/", 1)[0]
    if not is_remote(base):
        raise DataError(f"data.list_file {list_file} is a URL: set data.root to the URL its "
                        "paths are relative to (or null: the list file's folder)")
    if not is_remote(list_file) and not local_path(list_file).exists():
        raise DataError(f"data.list_file {list_file!r} not found; fix data.list_file")
    paths, raw_labels = _read_list(list_file, cfg)
    keys = [posixpath.normpath(p.replace("\\", "/")) for p in paths]
    _check_unique(keys, list_file)
    rejected = {k: (OUTSIDE_ROOT, f"outside {base}") for k in keys if _escapes(k)}
    labels, class_names = _parse_labels(raw_labels, len(keys))
    reader = UrlReader(base, keys, cfg.max_image_pixels, rejected)
    return ImageDataset(reader, keys, labels, class_names)


def _list_text(path: Path | str) -> str:
    """The list file's text (at most ``remote.MAX_TEXT_BYTES``) with at most
    ``MAX_LIST_LINES`` lines, counted before any line is split off."""
    text = read_text(path)
    breaks = text.count("\n") + text.count("\r") - text.count("\r\n")
    if breaks > MAX_LIST_LINES:
        raise DataError(f"data.list_file {path} has more than {MAX_LIST_LINES:,} lines; a list "
                        "that long is not read into memory: split the data into tar shards "
                        "(data.source=webdataset) or into several lists")
    return text


def _check_entry(path: Path | str, line: int, value: str, what: str) -> str:
    """``value`` (a path or a label of line ``line``) when it is at most ``MAX_KEY_CHARS``
    long: keys are written to a store's index (csv) and are file paths (PATH_MAX)."""
    if len(value) > MAX_KEY_CHARS:
        raise DataError(f"data.list_file {path} line {line}: the {what} is {len(value):,} "
                        f"characters long, more than {MAX_KEY_CHARS:,}; fix that line")
    return value


def _read_lines(path: Path | str) -> list[str]:
    """Paths of a plain list: one a line (``\\n``, ``\\r\\n`` or ``\\r``), blank and ``#`` lines
    skipped."""
    out = []
    for n, line in enumerate(_LINE_BREAK.split(_list_text(path)), 1):
        entry = line.strip()
        if entry and not entry.startswith("#"):
            out.append(_check_entry(path, n, entry, "path"))
    return out


def _read_csv(path: Path | str, path_column: str, label_column: str | None
              ) -> tuple[list[str], list[str] | None]:
    delimiter = "\t" if PurePosixPath(str(path)).suffix.lower() == ".tsv" else ","
    reader = csv.DictReader(io.StringIO(_list_text(path), newline=""), delimiter=delimiter)
    paths: list[str] = []
    labels: list[str] | None = [] if label_column else None
    try:
        columns = reader.fieldnames or []
        for key, column in (("path_column", path_column), ("label_column", label_column)):
            if column is not None and column not in columns:
                close = difflib.get_close_matches(column, columns, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise DataError(f"{path} has no column {column!r}{hint} (columns: "
                                f"{', '.join(columns)}); set data.{key}")
        for row in reader:
            entry = (row.get(path_column) or "").strip()
            if not entry:
                continue
            line = reader.reader.line_num  # DictReader's own is one row behind on an error
            paths.append(_check_entry(path, line, entry, "path"))
            if labels is not None:
                label = (row.get(label_column) or "").strip()
                problem = label_problem(label)
                if problem is not None:
                    raise DataError(f"data.list_file {path} line {line}: the label {problem}; "
                                    "fix that line")
                labels.append(_check_entry(path, line, label, "label"))
    except csv.Error as exc:
        raise DataError(f"data.list_file {path} line {reader.reader.line_num}: {exc}; fix that line"
                        ) from None
    return paths, labels


def _key_for(path: str, base: Path) -> str:
    """Relative POSIX key; absolute paths under ``base`` become relative too. A key that
    escapes ``base`` (absolute elsewhere, or ``..`` leading out) is kept as written,
    normalised, and never read (``_escapes``). Checked on the text, not on resolved links:
    symlinks the owner of the data folder planted inside it are followed."""
    p = Path(os.path.normpath(Path(path.replace("\\", "/")).expanduser()))
    if p.is_absolute():
        try:
            return p.relative_to(Path(os.path.normpath(base.absolute()))).as_posix()
        except ValueError:
            return p.as_posix()
    return p.as_posix()


def _escapes(key: str) -> bool:
    return os.path.isabs(key) or key == ".." or key.startswith("../")


def _check_unique(keys: list[str], list_file: Path) -> None:
    seen: dict[str, int] = {}
    for i, key in enumerate(keys):
        if key in seen:
            raise DataError(f"{list_file} lists {key!r} twice (entries {seen[key] + 1} and "
                            f"{i + 1}); remove the duplicate")
        seen[key] = i


def _check_some_exist(keys: list[str], base: Path, list_file: Path, sample: int = 50) -> None:
    """Fail early when none of the first paths exist: the base folder is almost surely wrong."""
    if not keys:
        raise DataError(f"every path in {list_file} lies outside {base}; list paths relative "
                        "to data.root (no '..' or other folders), or set data.root to a "
                        "folder that holds them")
    head = keys[:sample]
    if not any((Path(k) if os.path.isabs(k) else base / k).exists() for k in head):
        raise DataError(f"none of the first {len(head)} paths in {list_file} exist under {base} "
                        f"(e.g. {head[0]!r}); set data.root to the folder they are relative to")


def _parse_labels(raw: list[str] | None, n: int) -> tuple[np.ndarray, list[str] | None]:
    """Integer labels stay integers; names become sorted class names; blanks are -1."""
    if raw is None:
        return np.full(n, -1, np.int64), None
    given = [v for v in raw if v != ""]
    if all(integer_label(v) is not None for v in given):
        return np.array([integer_label(v) if v else -1 for v in raw], np.int64), None
    names = sorted(set(given))
    lookup = {name: i for i, name in enumerate(names)}
    return np.array([lookup[v] if v else -1 for v in raw], np.int64), names


# ---- torchvision and idx files ------------------------------------------------------------

IDX_DATASETS = {"mnist": "MNIST", "fashionmnist": "FashionMNIST", "kmnist": "KMNIST"}
ARRAY_DATASETS = {**IDX_DATASETS, "cifar10": "CIFAR10", "cifar100": "CIFAR100"}


def _torchvision(cfg: DataConfig) -> ImageDataset:
    name = _dataset_name(cfg.dataset)
    root = Path(cfg.root).expanduser() if cfg.root is not None else None
    if root is None and name == "FashionMNIST" and DEBIAN_FASHION_MNIST.is_dir():
        root = DEBIAN_FASHION_MNIST
    if name in IDX_DATASETS.values() and root is not None:
        found = find_idx_files(root, name, cfg.split)
        if found is not None:
            images, labels = read_idx(found[0]), read_idx(found[1])
            return _array_dataset(images, labels, _class_names(name), cfg.split)
    return _from_torchvision(name, root, cfg)


def _dataset_name(name: str | None) -> str:
    options = sorted(ARRAY_DATASETS.values())
    if name is None:
        raise DataError(f"data.source=torchvision needs data.dataset (one of {', '.join(options)})")
    key = name.lower().replace("-", "").replace("_", "")
    if key not in ARRAY_DATASETS:
        close = difflib.get_close_matches(name, options, n=1, cutoff=0.4)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise DataError(f"unsupported data.dataset {name!r}{hint} (supported: "
                        f"{', '.join(options)}); use source=folder for other image sets")
    return ARRAY_DATASETS[key]


def find_idx_files(root: Path, name: str, split: str) -> tuple[Path, Path] | None:
    """(images, labels) idx files of ``split`` in ``root`` or torchvision's ``root/NAME/raw``."""
    prefix = "train" if split == "train" else "t10k"
    for folder in (root, root / name / "raw", root / "raw"):
        pair = []
        for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
            hits = [folder / f"{prefix}-{kind}{ext}" for ext in ("", ".gz")]
            pair.append(next((h for h in hits if h.is_file()), None))
        if all(pair):
            return pair[0], pair[1]
    return None


_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (the MNIST format), gzip-compressed or not, with numpy."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read {path}: {exc}; re-copy the dataset files") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise DataError(f"{path} is not an idx file; point data.root to the dataset files")
    ndim = data[3]
    shape = tuple(int(v) for v in np.frombuffer(data, ">u4", ndim, offset=4))
    dtype = np.dtype(_IDX_TYPES[data[2]])
    expected = 4 + 4 * ndim + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise DataError(f"{path} holds {len(data)} bytes, expected {expected} for shape {shape}; "
                        "the file is damaged, re-copy it")
    array = np.frombuffer(data, dtype, offset=4 + 4 * ndim).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


def _class_names(name: str) -> list[str]:
    import torchvision.datasets as tvd
    return list(getattr(tvd, name).classes)


def _array_dataset(images: np.ndarray, labels: np.ndarray, class_names: list[str] | None,
                   split: str, prefix: str = "") -> ImageDataset:
    if len(images) != len(labels):
        raise DataError(f"{len(images)} images but {len(labels)} labels; the dataset files do "
                        "not match, re-copy them")
    keys = [f"{prefix}{split}/{i:06d}" for i in range(len(images))]
    return ImageDataset(ArrayReader(np.asarray(images, np.uint8)), keys,
                        np.asarray(labels, np.int64), class_names)


def _from_torchvision(name: str, root: Path | None, cfg: DataConfig) -> ImageDataset:
    import torchvision.datasets as tvd
    root = root if root is not None else Path("data")
    try:
        ds = getattr(tvd, name)(str(root), train=cfg.split == "train", download=cfg.download)
    except RuntimeError as exc:
        raise DataError(f"{name} not found under {root} ({exc}); set data.download=true or "
                        f"point data.root to the dataset files") from None
    except Exception as exc:
        raise DataError(f"{name} could not be loaded from {root}: {exc}; check data.root or "
                        "set data.download=true with network access") from None
    images = ds.data.numpy() if isinstance(ds.data, torch.Tensor) else np.asarray(ds.data)
    labels = np.asarray(ds.targets.numpy() if isinstance(ds.targets, torch.Tensor)
                        else ds.targets, np.int64)
    return _array_dataset(images, labels, list(ds.classes), cfg.split)


# ---- bundled mnist-5k ---------------------------------------------------------------------


def mnist_5k_split(labels: np.ndarray, split: str) -> np.ndarray:
    """Rows of ``split``: within each class, every fifth item (in file order) is test."""
    is_test = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        is_test[rows[4::5]] = True
    return np.flatnonzero(is_test if split == "test" else ~is_test)


def _mnist_5k(cfg: DataConfig) -> ImageDataset:
    if not MNIST_5K.is_file():
        raise DataError(f"bundled {MNIST_5K} is missing; reinstall transferlab")
    with np.load(MNIST_5K) as data:
        images, labels = data["images"], data["labels"].astype(np.int64)
    rows = mnist_5k_split(labels, cfg.split)
    keys = [f"mnist-5k/{cfg.split}/{r:05d}" for r in rows]
    return ImageDataset(ArrayReader(images), keys, labels[rows], [str(i) for i in range(10)],
                        rows=rows)


# ---- the registry: one entry per data.source ----------------------------------------------


@dataclass(frozen=True)
class DataSource:
    """One value of ``data.source``."""

    build: Callable[[DataConfig], ImageDataset]  # every item, before classes/limit
    describe: Callable[[DataConfig], str]  # the data in a few words, for messages
    # what names the images beyond source/root/list_file/dataset/split (data_fingerprint);
    # None for the sources that need nothing more, whose fingerprints must stay as they were
    fingerprint: Callable[[DataConfig], dict] | None = None
    labels_from_column: bool = False  # labels are read from data.label_column


def _webdataset_fingerprint(cfg: DataConfig) -> dict:
    urls = [cfg.urls] if isinstance(cfg.urls, str) or cfg.urls is None else cfg.urls
    return {"urls": [absolute(u) for u in urls], "label_key": cfg.label_key}


def _build_webdataset(cfg: DataConfig) -> ImageDataset:
    from .webdataset import build_webdataset  # tar reading loads only for tar shards

    return build_webdataset(cfg)


DATA_SOURCES: dict[str, DataSource] = {
    "folder": DataSource(_folder, lambda cfg: f"folder {cfg.root or cfg.list_file}"),
    "list": DataSource(_list, lambda cfg: f"list {cfg.root or cfg.list_file}",
                       labels_from_column=True),
    "torchvision": DataSource(_torchvision,
                              lambda cfg: f"torchvision {cfg.dataset} (root {cfg.root})"),
    "mnist-5k": DataSource(_mnist_5k, lambda cfg: "mnist-5k (the 5,000 bundled MNIST digits, "
                                                  "fixed 80/20 train/test split)"),
    "webdataset": DataSource(_build_webdataset, lambda cfg: f"webdataset {cfg.urls}",
                             _webdataset_fingerprint),
}

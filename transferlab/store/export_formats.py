"""A store in the formats other tools read: Parquet (pandas, polars, DuckDB, Hugging Face
``datasets``), HDF5 (h5py, MATLAB), .npz, the ``{key: vector}`` pickle, and the
``parquet_npy`` layout of embedding-reader and autofaiss (``export_embedding_reader``).

Parquet and HDF5 are written chunk by chunk from the memory-mapped shards (one chunk in RAM
at a time). Every format goes through the output policy of ``runtime.userfiles``: an existing
file is refused unless ``overwrite``, a FIFO or device is refused without being opened, and
the file is written to a temporary sibling (``NAME.PID-TID.tmp``) renamed into place only
when complete, so a killed export never leaves half a file under the final name.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import shutil
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, MissingDependencyError, SettingError, StoreError
from ..runtime.userfiles import check_output, output_file
from .format import read_npy_header

FORMATS = ("parquet", "hdf5", "npz", "pickle")
_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".h5": "hdf5", ".hdf5": "hdf5",
             ".hdf": "hdf5", ".npz": "npz", ".pkl": "pickle", ".pickle": "pickle"}
# One chunk (a Parquet row group, an HDF5 write) holds at most this many bytes of features.
CHUNK_BYTES = 64 << 20
MAX_ROWS_PER_CHUNK = 65536
# to_pandas materialises every row; above this it points to the Parquet export instead.
PANDAS_MAX_BYTES = 2 << 30


def export_format(path: str | os.PathLike, format: str | None = None) -> str:
    """The export format: ``format`` when given, else read from the file suffix."""
    if format is not None:
        if format not in FORMATS:
            raise ConfigError(f"unknown export format {format!r}; use one of {', '.join(FORMATS)}")
        return format
    suffix = Path(path).suffix.lower()
    if suffix not in _SUFFIXES:
        raise SettingError("format", f"is not given and {str(path)!r} does not end in one of "
                           f"{', '.join(_SUFFIXES)}; name one of {'|'.join(FORMATS)}")
    return _SUFFIXES[suffix]


def chunk_rows(store: Any, rows: int | None = None) -> int:
    """Rows per chunk: ``rows`` if given, else as many as fit in ``CHUNK_BYTES``."""
    if rows is not None:
        if rows < 1:
            raise SettingError("rows_per_chunk", f"must be at least 1, got {rows}")
        return rows
    row_bytes = max(1, store.features.shape[1] * store.features.dtype.itemsize)
    return max(1, min(MAX_ROWS_PER_CHUNK, CHUNK_BYTES // row_bytes))


def export_store(store: Any, path: str | os.PathLike, format: str | None = None,
                 overwrite: bool = False, rows_per_chunk: int | None = None) -> Path:
    """Write ``store`` to ``path`` as Parquet, HDF5, .npz or pickle; returns the path.

    An existing ``path`` is refused unless ``overwrite``; the file appears only complete.
    """
    path = Path(path)
    fmt = export_format(path, format)
    if path.is_dir():
        raise StoreError(f"{path} is a directory; pass a file path such as {path / 'store'}"
                         f"{'.' + fmt if fmt != 'hdf5' else '.h5'}")
    check_output(path, overwrite, "the export")  # before any work
    with output_file(path, overwrite, "the export") as tmp:
        if fmt == "parquet":
            write_parquet(store, tmp, rows_per_chunk)
        elif fmt == "hdf5":
            write_hdf5(store, tmp, rows_per_chunk)
        elif fmt == "npz":
            with open(tmp, "xb") as f:  # a file object: np.savez appends no suffix
                write_npz(store, f)
        else:
            with open(tmp, "xb") as f:
                write_pickle(store, f)
    return path


def write_npz(store: Any, f: Any) -> None:
    """``features``, ``paths``, ``labels``, ``views`` as one .npz (no pickles)."""
    np.savez(f, features=np.asarray(store.features), paths=np.array(store.keys, dtype=str),
             labels=store.labels, views=store.views)


def write_pickle(store: Any, f: Any, view: int = 0) -> None:
    """``{key: vector}`` (rows of ``view``), for code that expects the Keras-example dump.
    Export only: transferlab never loads pickles."""
    rows = np.flatnonzero(np.asarray(store.views) == view)
    feats = store.features[rows]
    pickle.dump({store.keys[r]: feats[i] for i, r in enumerate(rows)}, f, protocol=4)


def _pyarrow() -> tuple[Any, Any]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingDependencyError('Parquet export needs pyarrow: pip install '
                                     '"transferlab[parquet]"') from None
    return pa, pq


def parquet_schema(store: Any) -> Any:
    """key, label, class_name, view, embedding (fixed-size list of the store's dtype); the
    store's metadata rides along as JSON under the schema metadata key ``transferlab``."""
    pa, _ = _pyarrow()
    value = pa.float16() if store.features.dtype == np.float16 else pa.float32()
    fields = [("key", pa.string()), ("label", pa.int64()), ("class_name", pa.string()),
              ("view", pa.int64()),
              ("embedding", pa.list_(value, int(store.features.shape[1])))]
    meta = {"transferlab": json.dumps(store.meta, ensure_ascii=False, default=str)}
    return pa.schema(fields, metadata=meta)


def write_parquet(store: Any, path: str | os.PathLike, rows_per_chunk: int | None = None) -> None:
    """One row group per chunk of the memory-mapped shards; never all rows in memory."""
    pa, pq = _pyarrow()
    schema = parquet_schema(store)
    value_type = schema.field("embedding").type.value_type
    names = class_name_column(store)
    step = chunk_rows(store, rows_per_chunk)
    # dictionary encoding only where values repeat: a float (or unique key) dictionary costs
    # memory and time for nothing
    with pq.ParquetWriter(str(path), schema, use_dictionary=["class_name"]) as writer:
        for start, chunk in store.iter_chunks(rows=step):
            stop = start + len(chunk)
            flat = pa.array(np.ascontiguousarray(chunk).reshape(-1), type=value_type)
            columns = [pa.array(store.keys[start:stop], pa.string()),
                       pa.array(store.labels[start:stop], pa.int64()),
                       pa.array(names[start:stop], pa.string()),
                       pa.array(store.views[start:stop], pa.int64()),
                       pa.FixedSizeListArray.from_arrays(flat, int(store.features.shape[1]))]
            writer.write_table(pa.Table.from_arrays(columns, schema=schema),
                               row_group_size=len(chunk))
        if len(store) == 0:
            writer.write_table(schema.empty_table())


def class_name_column(store: Any) -> list[str | None]:
    """Each row's class name (None when unlabelled or the store records no names)."""
    names = store.class_names or []
    return [names[y] if 0 <= y < len(names) else None for y in np.asarray(store.labels).tolist()]


def _h5py() -> Any:
    try:
        import h5py
    except ImportError:
        raise MissingDependencyError('HDF5 export needs h5py: pip install '
                                     '"transferlab[hdf5]"') from None
    return h5py


def write_hdf5(store: Any, path: str | os.PathLike, rows_per_chunk: int | None = None) -> None:
    """Datasets ``features`` (chunked), ``keys``, ``labels``, ``views`` (and ``class_names``);
    the store's metadata as attributes of the file (nested values as JSON strings)."""
    h5py = _h5py()
    rows, dim = store.features.shape
    step = chunk_rows(store, rows_per_chunk)
    with h5py.File(path, "w") as f:
        chunks = (min(step, rows), dim) if rows and dim else None
        feats = f.create_dataset("features", shape=(rows, dim), dtype=store.features.dtype,
                                 chunks=chunks)
        for start, chunk in store.iter_chunks(rows=step):
            feats[start:start + len(chunk)] = chunk
        f.create_dataset("keys", data=np.array(store.keys, dtype=object),
                         dtype=h5py.string_dtype("utf-8"))
        f.create_dataset("labels", data=np.asarray(store.labels, np.int64))
        f.create_dataset("views", data=np.asarray(store.views, np.int64))
        if store.class_names:
            f.create_dataset("class_names", data=np.array(store.class_names, dtype=object),
                             dtype=h5py.string_dtype("utf-8"))
        for key, value in store.meta.items():
            f.attrs[key] = hdf5_attribute(value)


def hdf5_attribute(value: Any) -> Any:
    """Numbers, booleans and strings as themselves; anything else (lists, dicts, None) as a
    JSON string, which every HDF5 reader can show."""
    if isinstance(value, (bool, int, float, str)) and not isinstance(value, np.generic):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


def store_to_pandas(store: Any, max_bytes: int = PANDAS_MAX_BYTES) -> Any:
    """A pandas DataFrame: key, label, class_name, view, embedding (one numpy row each).

    Loads every feature; a store over ``max_bytes`` is refused (export it to Parquet and
    read that lazily with polars, DuckDB or ``pyarrow.dataset`` instead).
    """
    try:
        import pandas as pd
    except ImportError:
        raise MissingDependencyError("to_pandas needs pandas: pip install pandas") from None
    rows, dim = store.features.shape
    size = rows * dim * store.features.dtype.itemsize
    if size > max_bytes:
        raise StoreError(f"the store's features take {size / 2**30:.1f} GiB, too many for one "
                         "DataFrame; export it with `python -m transferlab.export STORE "
                         "OUT.parquet` and read that lazily")
    features = np.asarray(store.features)
    return pd.DataFrame({"key": list(store.keys), "label": np.asarray(store.labels, np.int64),
                         "class_name": class_name_column(store),
                         "view": np.asarray(store.views, np.int64),
                         "embedding": list(features)})


# ---------------------------------------------------------------------------------------
# The embedding-reader / autofaiss layout: DIR/embeddings/NAME.npy beside
# DIR/metadata/NAME.parquet, one pair per shard, same base names, same row order
# ---------------------------------------------------------------------------------------

LAYOUTS = ("embedding-reader",)
EMBEDDINGS, METADATA = "embeddings", "metadata"
EXPORT_MARKER = "transferlab-export.json"  # what lets --overwrite replace an earlier export
METADATA_COLUMNS = ("key", "label", "class_name", "view")
# embedding-reader reads a header from the first line of the file (its first 300 bytes) and
# takes only little-endian floats ('<f2', '<f4'); a shard outside that is copied, not linked
_READER_DTYPES = ("<f2", "<f4")
_NO_LINK = (errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK,
            errno.ENOSYS, errno.EACCES)


@dataclass
class LayoutExport:
    """What ``export_embedding_reader`` wrote: the folders to give ``EmbeddingReader`` and
    how many shards were hard-linked (no copy of the vectors) or copied."""
    path: Path
    embeddings: Path
    metadata: Path
    shards: int
    rows: int
    linked: int
    copied: int


def export_embedding_reader(store: Any, path: str | os.PathLike, overwrite: bool = False,
                            link: bool = True) -> LayoutExport:
    """Write ``store`` as embedding-reader's ``parquet_npy`` layout under the directory
    ``path``: ``embeddings/shard-NNNNN.npy`` (the store's shards, hard-linked when ``link``
    and on the same file system, else copied) and ``metadata/shard-NNNNN.parquet`` (key,
    label, class_name, view; same rows in the same order).

    A hard link shares the bytes, not the name: the store replaces files (never rewrites
    them), so a later run or a deleted store leaves the export as it was. The directory
    appears only complete; an existing one is refused unless empty, or unless ``overwrite``
    and it holds an earlier export of this kind and nothing else.
    """
    pa, pq = _pyarrow()
    path = Path(path)
    replace_old = _check_layout_target(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / EMBEDDINGS).mkdir(parents=True)
    (tmp / METADATA).mkdir()
    try:
        counts = np.diff(store.features.offsets).tolist()
        width = max(5, len(str(len(counts))))  # names sort in row order (the reader sorts)
        names = class_name_column(store)
        schema = pa.schema([("key", pa.string()), ("label", pa.int64()),
                            ("class_name", pa.string()), ("view", pa.int64())],
                           metadata={"transferlab": json.dumps(store.meta, ensure_ascii=False,
                                                               default=str)})
        linked = copied = written = 0
        for s, rows in enumerate(counts):
            if rows == 0:  # embedding-reader skips an empty .npy but not its Parquet
                continue
            stem = f"shard-{written:0{width}d}"
            start = int(store.features.offsets[s])
            target = tmp / EMBEDDINGS / f"{stem}.npy"
            if link and _link_shard(store.features.files[s], target, rows, store.features):
                linked += 1
            else:
                _copy_shard(store.features.shard(s), target)
                copied += 1
            table = pa.Table.from_arrays(
                [pa.array(store.keys[start:start + rows], pa.string()),
                 pa.array(np.asarray(store.labels[start:start + rows]), pa.int64()),
                 pa.array(names[start:start + rows], pa.string()),
                 pa.array(np.asarray(store.views[start:start + rows]), pa.int64())],
                schema=schema)
            pq.write_table(table, str(tmp / METADATA / f"{stem}.parquet"))
            written += 1
        marker = {"layout": "embedding-reader", "store": str(Path(store.dir).resolve()),
                  "fingerprint": store.meta.get("fingerprint"), "rows": len(store),
                  "shards": written, "linked": linked, "copied": copied,
                  "metadata_columns": list(METADATA_COLUMNS)}
        (tmp / EXPORT_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        _publish_dir(tmp, path, replace_old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return LayoutExport(path, path / EMBEDDINGS, path / METADATA, written, len(store), linked,
                        copied)


def _check_layout_target(path: Path, overwrite: bool) -> bool:
    """True when an earlier export at ``path`` is to be replaced; refuses anything else that
    is there (files of the user's are never deleted)."""
    if not os.path.lexists(path):
        return False
    if path.is_symlink() or not path.is_dir():
        raise StoreError(f"{path} exists and is not a directory; choose another directory")
    entries = sorted(os.listdir(path))
    if not entries:
        return False
    if not _is_layout_export(path, entries):
        raise StoreError(f"{path} exists and is not an export of this kind; choose a new or "
                         "empty directory")
    if not overwrite:
        raise SettingError("overwrite", f"is not set and {path} holds an earlier export; "
                           "choose another directory, or set it to replace that export")
    return True


def _is_layout_export(path: Path, entries: list[str]) -> bool:
    """Only what ``export_embedding_reader`` writes: the marker, the two folders of regular
    ``.npy`` / ``.parquet`` files, no links."""
    if set(entries) - {EXPORT_MARKER, EMBEDDINGS, METADATA} or EXPORT_MARKER not in entries:
        return False
    for folder, suffix in ((EMBEDDINGS, ".npy"), (METADATA, ".parquet")):
        sub = path / folder
        if not os.path.lexists(sub):
            continue
        if sub.is_symlink() or not sub.is_dir():
            return False
        for name in os.listdir(sub):
            st = os.lstat(sub / name)
            if not (name.endswith(suffix) and stat.S_ISREG(st.st_mode)):
                return False
    return not (path / EXPORT_MARKER).is_symlink()


def _publish_dir(tmp: Path, path: Path, replace_old: bool) -> None:
    """Move the complete ``tmp`` to ``path``; an earlier export is moved aside first and
    deleted only once the new one is in place."""
    if not replace_old:
        with contextlib.suppress(FileNotFoundError):
            path.rmdir()  # an empty directory (anything else was refused before)
        os.rename(tmp, path)
        return
    old = path.parent / f".{path.name}.{os.getpid()}-old.tmp"
    os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def reader_header_ok(f: Any, rows: int, dim: int) -> bool:
    """Whether embedding-reader reads this .npy as (rows, dim): a header it parses from the
    first line, a little-endian float16/float32 C-order array."""
    f.seek(0)
    shape, dtype, offset = read_npy_header(f)
    f.seek(0)
    first = f.read(300).split(b"\n", 1)[0]
    return (shape == (rows, dim) and dtype.str in _READER_DTYPES
            and offset == len(first) + 1)


def _link_shard(src: Path, target: Path, rows: int, features: Any) -> bool:
    """Hard-link ``src`` as ``target`` when the file system allows it and the linked file is
    the checked regular shard in a form embedding-reader reads; False: copy instead."""
    try:
        before = os.lstat(src)
        if not stat.S_ISREG(before.st_mode):
            return False
        os.link(src, target, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in _NO_LINK:
            return False
        raise
    after = os.lstat(target)
    ok = (after.st_ino, after.st_dev) == (before.st_ino, before.st_dev)
    if ok:
        with open(target, "rb") as f:
            try:
                ok = reader_header_ok(f, rows, features.shape[1])
            except (ValueError, OSError, EOFError, SyntaxError):
                ok = False
    if not ok:
        target.unlink()
    return ok


def _copy_shard(array: np.ndarray, target: Path) -> None:
    """A fresh .npy of the shard's rows, little-endian, C order (numpy's own header)."""
    data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    with os.fdopen(os.open(target, flags, 0o666), "wb") as f:
        np.lib.format.write_array(f, data, allow_pickle=False)

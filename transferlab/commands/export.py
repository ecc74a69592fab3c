"""Write a feature store as Parquet, HDF5, .npz or a ``{key: vector}`` pickle, or as the
sharded layout embedding-reader and autofaiss read.

Command line::

    transferlab export STORE OUT [--format parquet|hdf5|npz|pickle] [--overwrite]
    transferlab export STORE DIR --layout embedding-reader [--copy] [--overwrite]

The format comes from OUT's suffix (.parquet, .h5/.hdf5, .npz, .pkl) unless ``--format``
names it. Parquet and HDF5 are written chunk by chunk, in bounded memory. The
embedding-reader layout is DIR/embeddings/*.npy (the store's shards, hard-linked when DIR is
on the same file system, else copied) beside DIR/metadata/*.parquet (key, label,
class_name, view), one pair per shard in row order.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence

from ..errors import SettingError
from ..store.export_formats import FORMATS, LAYOUTS, export_embedding_reader, export_store
from ..store.reader import FeatureStore
from . import run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="transferlab export",
                                description="Write a feature store in another file format.")
    p.add_argument("store", help="feature store directory")
    p.add_argument("out", help="output file (.parquet, .h5, .hdf5, .npz, .pkl), or the output "
                   "directory with --layout")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="output format (default: from OUT's suffix)")
    p.add_argument("--layout", choices=LAYOUTS, default=None,
                   help="a directory of per-shard .npy + Parquet files (embedding-reader's "
                   "parquet_npy, what autofaiss indexes) instead of one file")
    p.add_argument("--copy", action="store_true",
                   help="with --layout: copy the shards even where a hard link is possible")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.add_argument("--rows-per-chunk", type=int, default=None,
                   help="rows per Parquet row group / HDF5 write (default: 64 MiB of features)")
    return p


def command(argv: Sequence[str] | None = None) -> None:
    """Parse, export, print the path; user mistakes raise TransferlabError."""
    args = build_parser().parse_args(argv)
    if args.layout is None and args.copy:
        raise SettingError("copy", "applies only with --layout embedding-reader")
    if args.layout is not None and (args.format or args.rows_per_chunk):
        raise SettingError("layout", "writes .npy + Parquet per shard; drop --format and "
                           "--rows-per-chunk")
    store = FeatureStore.open(args.store)
    if args.layout is not None:
        done = export_embedding_reader(store, args.out, overwrite=args.overwrite,
                                       link=not args.copy)
        print(f"wrote {done.rows} rows in {done.shards} shards to {done.path} "
              f"({done.linked} hard-linked, {done.copied} copied)")
        print(f"read: EmbeddingReader({str(done.embeddings)!r}, file_format='parquet_npy', "
              f"metadata_folder={str(done.metadata)!r}, meta_columns=['key', 'label', "
              "'class_name', 'view'])")
        return
    path = export_store(store, args.out, args.format, overwrite=args.overwrite,
                        rows_per_chunk=args.rows_per_chunk)
    print(f"wrote {len(store)} rows to {path}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: the exit code (2 with one line on stderr for a user mistake)."""
    return run_cli(command, argv, build_parser())

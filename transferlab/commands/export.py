"""Write a feature store as Parquet, HDF5, .npz or a ``{key: vector}`` pickle.

Command line::

    python -m transferlab.export STORE OUT [--format parquet|hdf5|npz|pickle] [--overwrite]

The format comes from OUT's suffix (.parquet, .h5/.hdf5, .npz, .pkl) unless ``--format``
names it. Parquet and HDF5 are written chunk by chunk, in bounded memory.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence

from ..store.export_formats import FORMATS, export_store
from ..store.reader import FeatureStore
from . import run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="transferlab export",
                                description="Write a feature store in another file format.")
    p.add_argument("store", help="feature store directory")
    p.add_argument("out", help="output file (.parquet, .h5, .hdf5, .npz, .pkl)")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="output format (default: from OUT's suffix)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.add_argument("--rows-per-chunk", type=int, default=None,
                   help="rows per Parquet row group / HDF5 write (default: 64 MiB of features)")
    return p


def command(argv: Sequence[str] | None = None) -> None:
    """Parse, export, print the path; user mistakes raise TransferlabError."""
    args = build_parser().parse_args(argv)
    store = FeatureStore.open(args.store)
    path = export_store(store, args.out, args.format, overwrite=args.overwrite,
                        rows_per_chunk=args.rows_per_chunk)
    print(f"wrote {len(store)} rows to {path}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: the exit code (2 with one line on stderr for a user mistake)."""
    return run_cli(command, argv, build_parser())


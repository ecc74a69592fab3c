"""Build a FAISS index inside a feature store, for fast nearest-neighbour search.

Command line::

    python -m transferlab.index STORE [--kind auto|flat|ivf|hnsw] [--metric cosine|l2]

The index is written to STORE/index/ with what it was built from, tagged with this user's
key (``~/.config/transferlab/index.key`` or ``$TRANSFERLAB_INDEX_KEY_FILE``); ``search`` and
``store_nearest`` use it while the store is unchanged (``--exact`` scans instead) and refuse
it once the store has been rewritten or resumed. An index this user did not build (one that
came with a store) is never read: searches scan exactly until this command replaces it.
``auto``: flat (exact) up to 100,000 rows, IVF above.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence

from ..store.faiss_index import INDEX_METRICS, KINDS, build_index, index_paths
from ..store.reader import FeatureStore
from . import run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="transferlab index",
                                description="Build a FAISS index inside a feature store.")
    p.add_argument("store", help="feature store directory")
    p.add_argument("--kind", choices=KINDS, default="auto",
                   help="flat (exact) | ivf | hnsw | auto (flat up to 100k rows, else ivf)")
    p.add_argument("--metric", choices=(*INDEX_METRICS, "euclidean"), default="cosine")
    p.add_argument("--nlist", type=int, default=None, help="IVF lists (default sqrt(rows))")
    p.add_argument("--nprobe", type=int, default=None,
                   help="IVF lists scanned per query (default nlist/16, at least 8)")
    p.add_argument("--hnsw-m", type=int, default=None, help="HNSW links per node (default 32)")
    p.add_argument("--ef-search", type=int, default=None, help="HNSW search depth (default 128)")
    p.add_argument("--rows-per-chunk", type=int, default=65536,
                   help="rows read from the shards at a time")
    return p


def command(argv: Sequence[str] | None = None) -> None:
    """Parse, build, print a summary; user mistakes raise TransferlabError."""
    args = build_parser().parse_args(argv)
    store = FeatureStore.open(args.store)
    record = build_index(store, args.kind, args.metric, rows_per_chunk=args.rows_per_chunk,
                         nlist=args.nlist, nprobe=args.nprobe, hnsw_m=args.hnsw_m,
                         ef_search=args.ef_search)
    params = "".join(f", {k} {v}" for k, v in record["params"].items())
    print(f"built a {record['kind']} index of {record['rows']} rows (metric {record['metric']}"
          f"{params}) in {record['build_seconds']:.2f} s: {index_paths(store)[0]}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: the exit code (2 with one line on stderr for a user mistake)."""
    return run_cli(command, argv, build_parser())


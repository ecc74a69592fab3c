"""Find the stored images closest to query images.

Query images are embedded through the store's own backbone, cut and preprocessing (read
from its metadata); a query may also be a key of the store, whose stored vector is used.

Command line::

    python -m transferlab.search STORE QUERY_IMAGE... [-k 5] [--metric cosine] [--plot out.png]
        [--exact] [--overwrite]

With a FAISS index built for the metric (``python -m transferlab.index STORE``) by this user
on this machine, the search goes through it while the store is unchanged; an index that came
with the store is ignored (one line on stderr) and every row scanned, as with ``--exact``.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence

from ..analysis.neighbors import METRICS, check_k, query_vectors, store_search
from ..analysis.plots import png_path
from ..analysis.search_report import format_hits, plot_search
from ..runtime.userfiles import check_output
from ..store.reader import FeatureStore
from . import run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="transferlab search",
                                description="Nearest stored images of query images (exact scan, "
                                "or the store's FAISS index when built).")
    p.add_argument("store", help="feature store directory")
    p.add_argument("queries", nargs="+", metavar="QUERY_IMAGE",
                   help="image files (or keys of the store)")
    p.add_argument("-k", type=int, default=5, help="neighbours per query")
    p.add_argument("--metric", choices=METRICS, default="cosine")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when present)")
    p.add_argument("--plot", metavar="PNG", help="write a grid of queries and neighbours")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --plot file (default: refuse it)")
    p.add_argument("--exact", action="store_true",
                   help="scan every row even when the store has a FAISS index")
    p.add_argument("--trust-code", action="store_true",
                   help="let a trusted store's metadata name a module:callable to run")
    return p


def command(argv: Sequence[str] | None = None) -> None:
    """Parse, run, print; user mistakes raise TransferlabError."""
    args = build_parser().parse_args(argv)
    check_k(args.k)
    if args.plot is not None:
        check_output(png_path(args.plot), args.overwrite, "--plot")
    store = FeatureStore.open(args.store)
    vectors = query_vectors(store, args.queries, args.trust_code)
    hits = store_search(store, vectors, args.k, args.metric, device=args.device,
                        exact=args.exact)
    print("\n\n".join(format_hits(store, q, h) for q, h in zip(args.queries, hits)))
    if args.plot:
        print(f"wrote {plot_search(store, args.queries, hits, args.plot)}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: the exit code (2 with one line on stderr for a user mistake)."""
    return run_cli(command, argv, build_parser())

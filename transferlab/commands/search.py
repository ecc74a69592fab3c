"""Find the stored images closest to query images.

Query images are embedded through the store's own backbone, cut and preprocessing (read
from its metadata); a query may also be a key of the store, whose stored vector is used.

Command line::

    python -m transferlab.search STORE QUERY_IMAGE... [-k 5] [--metric cosine] [--plot out.png]
        [--exact] [--overwrite]
    transferlab search STORE --text "a photo of a dog" [--text ...] [-k 10]

``--text`` queries a CLIP-family store (OpenCLIP / Transformers CLIP or SigLIP, cut head)
through the text tower its meta.json records.

With a FAISS index built for the metric (``python -m transferlab.index STORE``) by this user
on this machine, the search goes through it while the store is unchanged; an index that came
with the store is ignored (one line on stderr) and every row scanned, as with ``--exact``.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence

from ..analysis.neighbors import METRICS, check_k, query_vectors, store_search, text_vectors
from ..analysis.plots import png_path
from ..analysis.search_report import format_hits, plot_search
from ..errors import ConfigError
from ..runtime.userfiles import check_output
from ..store.reader import FeatureStore
from . import run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="transferlab search",
                                description="Nearest stored images of query images (exact scan, "
                                "or the store's FAISS index when built).")
    p.add_argument("store", help="feature store directory")
    p.add_argument("queries", nargs="*", metavar="QUERY_IMAGE",
                   help="image files (or keys of the store)")
    p.add_argument("--text", action="append", default=[], metavar="TEXT",
                   help="a text query (CLIP-family stores; repeat for several)")
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
    if not args.queries and not args.text:
        raise ConfigError("name query images or --text \"a photo of a dog\"")
    if args.queries and args.text:
        raise ConfigError("query images and --text go in separate runs")
    if args.text and args.plot:
        raise ConfigError("--plot shows query images; it does not take --text queries")
    store = FeatureStore.open(args.store)
    if args.text:
        vectors = text_vectors(store, args.text, args.trust_code)
    else:
        vectors = query_vectors(store, args.queries, args.trust_code)
    hits = store_search(store, vectors, args.k, args.metric, device=args.device,
                        exact=args.exact)
    labels = [f"text: {t}" for t in args.text] or args.queries
    print("\n\n".join(format_hits(store, q, h) for q, h in zip(labels, hits)))
    if args.plot:
        print(f"wrote {plot_search(store, args.queries, hits, args.plot)}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: the exit code (2 with one line on stderr for a user mistake)."""
    return run_cli(command, argv, build_parser())

"""Curate a feature store: near-duplicate groups, outliers, label issues, leakage.

Command line::

    transferlab curate STORE [--out DIR] [--threshold T] [-k K] [--top N]
        [--against OTHER_STORE] [--no-labels] [--center] [--exact] [--plot] [--overwrite]
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from ..analysis.curation import (
    DEFAULT_FOLDS,
    DEFAULT_K,
    DEFAULT_L2,
    DEFAULT_THRESHOLD,
    DEFAULT_TOP,
    curate,
    summary_table,
    write_report,
)
from ..store.reader import FeatureStore
from . import run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="transferlab curate",
        description="Near-duplicate groups, outliers and label issues of a feature store "
                    "(and its images duplicated in another store), as CSV and Parquet files.")
    p.add_argument("store", help="feature store directory")
    p.add_argument("--out", metavar="DIR",
                   help="folder for the CSV (and Parquet) files (default: STORE/curation)")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help="cosine similarity at or above which two images are near-duplicates "
                        f"(default {DEFAULT_THRESHOLD}: measured for the features of the "
                        "built-in dedup config, `transferlab extract dedup`; other features "
                        "have their own: README, Curating a dataset)")
    p.add_argument("-k", "--k", dest="k", type=int, default=DEFAULT_K,
                   help=f"neighbours per image for the outlier score (default {DEFAULT_K})")
    p.add_argument("--top", type=int, default=DEFAULT_TOP,
                   help=f"outliers listed (default {DEFAULT_TOP})")
    p.add_argument("--against", metavar="OTHER_STORE",
                   help="another store (a test split): list its images that nearly "
                        "duplicate images of STORE")
    p.add_argument("--no-labels", action="store_true", help="skip the label issues")
    p.add_argument("--folds", type=int, default=DEFAULT_FOLDS,
                   help="out-of-fold probe folds for the label issues")
    p.add_argument("--l2", type=float, default=DEFAULT_L2, help="the probe's L2 strength")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--center", action="store_true",
                   help="cosine of features minus the store's mean (for untrained / random-"
                        "weight backbones, whose features share one large direction)")
    p.add_argument("--exact", action="store_true",
                   help="exact search even when the store has a FAISS index")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when present)")
    p.add_argument("--plot", action="store_true",
                   help="also write PNG galleries of each finding into the folder")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing files in an --out folder curate did not create")
    return p


def command(argv: Sequence[str] | None = None) -> None:
    """Parse, run, print; user mistakes raise TransferlabError."""
    args = build_parser().parse_args(argv)
    store = FeatureStore.open(args.store)
    other = FeatureStore.open(args.against) if args.against else None
    report = curate(store, threshold=args.threshold, k=args.k, top=args.top, against=other,
                    labels=not args.no_labels, folds=args.folds, l2=args.l2, seed=args.seed,
                    exact=args.exact, center=args.center, device=args.device)
    out = Path(args.out) if args.out else Path(args.store) / "curation"
    written = write_report(report, out, args.overwrite)
    if args.plot:
        from ..analysis.curation import write_galleries

        written += write_galleries(report, store, out, args.overwrite)
    print(summary_table(report))
    print(f"wrote {len(written)} files into {out}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: the exit code (2 with one line on stderr for a user mistake)."""
    return run_cli(command, argv, build_parser())

"""Zero-shot labels of a CLIP-family store from class names, beside the linear probe.

Command line::

    transferlab zeroshot STORE [--classes cat,dog,...] [--templates DEFAULT|FILE]
        [--out predictions.csv] [--overwrite] [--no-probe] [--trust-code]
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence

from ..analysis.splits import check_fraction
from ..analysis.zeroshot_labels import run_zeroshot, write_predictions, zeroshot_report
from ..runtime.userfiles import check_output, write_output
from ..store.reader import FeatureStore
from . import run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="transferlab zeroshot",
                                description="Zero-shot class of every image of a CLIP-family "
                                "store (its recorded text tower); accuracy beside the linear "
                                "probe's on labelled stores.")
    p.add_argument("store", help="feature store directory (a CLIP-family model, cut head)")
    p.add_argument("--classes", default=None,
                   help="comma-separated class names (default: the store's class names)")
    p.add_argument("--templates", default="DEFAULT",
                   help="DEFAULT (CLIP's 7-template ensemble) or a file, one template a line "
                   "with {} where the class name goes")
    p.add_argument("--out", metavar="CSV", default=None,
                   help="per-image predictions (key, predicted, score, true)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--no-probe", dest="probe", action="store_false",
                   help="skip the linear probe on the validation split")
    p.add_argument("--val-fraction", type=float, default=0.2, help="probe validation share")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation split")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when present)")
    p.add_argument("--trust-code", action="store_true",
                   help="let a trusted store's metadata name a model folder or code to run")
    return p


def command(argv: Sequence[str] | None = None) -> None:
    """Parse, run, print; user mistakes raise TransferlabError."""
    args = build_parser().parse_args(argv)
    check_fraction(args.val_fraction)
    if args.out is not None:
        check_output(args.out, args.overwrite, "--out")
    store = FeatureStore.open(args.store)
    result = run_zeroshot(store, args.classes, args.templates, args.trust_code, args.probe,
                          args.val_fraction, args.seed, args.device)
    print(zeroshot_report(result))
    if args.out is not None:
        path = write_output(args.out, lambda f: write_predictions(result, f),
                            overwrite=args.overwrite, what="--out")
        print(f"wrote {path}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: the exit code (2 with one line on stderr for a user mistake)."""
    return run_cli(command, argv, build_parser())

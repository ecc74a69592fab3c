"""Linear and k-nearest-neighbour probes of a labelled store: how much of a task do frozen
features solve?

Command line::

    python -m transferlab.probe STORE [--test STORE2] [--val-fraction 0.2]
        [--l2 1e-4 1e-3 ...] [--knn 5] [--plot DIR] [--overwrite]
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from ..analysis.linear_probe import DEFAULT_L2
from ..analysis.probe_report import plot_probe, probe_plot_paths, probe_report, run_probe
from ..analysis.projection import MAP_METHODS
from ..analysis.splits import check_fraction
from ..errors import ConfigError
from ..runtime.userfiles import check_output
from ..store.reader import FeatureStore
from . import run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="transferlab probe",
                                description="Linear (L2 sweep) and kNN probes on a feature store.")
    p.add_argument("store", help="feature store directory")
    p.add_argument("--test", metavar="STORE2", help="test store (default: a validation split)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="validation share per class")
    p.add_argument("--l2", dest="l2s", metavar="L2", type=float, nargs="+",  # run_probe's l2s
                   default=list(DEFAULT_L2), help="L2 strengths, all trained together")
    p.add_argument("--knn", type=int, default=5, help="k of the kNN probe (0: skip)")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation split")
    p.add_argument("--max-iter", type=int, default=500, help="L-BFGS iterations at most")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when present)")
    p.add_argument("--plot", metavar="DIR", help="write a map, class-column and sweep plots here")
    p.add_argument("--plot-method", choices=MAP_METHODS, default="pca",
                   help="the 2-D map of --plot")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing --plot files (default: refuse them)")
    return p


def command(argv: Sequence[str] | None = None) -> None:
    """Parse, run, print; user mistakes raise TransferlabError."""
    args = build_parser().parse_args(argv)
    if args.knn < 0:
        raise ConfigError(f"--knn must be 0 (skip) or more, got {args.knn}")
    if args.test is None:  # before any store is read
        check_fraction(args.val_fraction)
    if args.plot is not None:
        if Path(args.plot).exists() and not Path(args.plot).is_dir():
            raise ConfigError(f"--plot {args.plot} is a file; name a directory, e.g. "
                              f"--plot {args.plot}_plots")
        for path in probe_plot_paths(Path(args.plot), args.plot_method):
            check_output(path, args.overwrite, "--plot")
    store = FeatureStore.open(args.store)
    test = FeatureStore.open(args.test) if args.test else None
    report = run_probe(store, test, val_fraction=args.val_fraction, l2s=args.l2s, knn=args.knn,
                       seed=args.seed, device=args.device, max_iter=args.max_iter)
    print(probe_report(report))
    if args.plot:
        for path in plot_probe(store, report, Path(args.plot), args.plot_method):
            print(f"wrote {path}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: the exit code (2 with one line on stderr for a user mistake)."""
    return run_cli(command, argv, build_parser())

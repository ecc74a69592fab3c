"""k-means clustering of a feature store, with purity and NMI against known labels.

Command line::

    python -m transferlab.cluster STORE -k 10 [--n-init 4] [--out assignments.csv] [--plot DIR]
        [--overwrite]
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..analysis.cluster_report import (
    cluster_plot_paths,
    cluster_report,
    plot_clusters,
    run_cluster,
    write_assignments,
)
from ..analysis.projection import MAP_METHODS
from ..errors import ConfigError
from ..runtime.userfiles import check_output
from ..store.reader import FeatureStore
from . import run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="transferlab cluster",
                                description="k-means clustering of a feature store.")
    p.add_argument("store", help="feature store directory")
    p.add_argument("-k", type=int, required=True, help="number of clusters")
    p.add_argument("--n-init", type=int, default=4, help="seeded k-means++ restarts")
    p.add_argument("--max-iter", type=int, default=300, help="Lloyd iterations at most")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--normalize", action="store_true", help="L2-normalise rows first")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when present)")
    p.add_argument("--out", metavar="CSV", help="write key,cluster assignments here")
    p.add_argument("--plot", metavar="DIR", help="write 2-D maps by cluster and label here")
    p.add_argument("--plot-method", choices=MAP_METHODS, default="pca",
                   help="the 2-D map of --plot")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing --out / --plot files (default: refuse them)")
    return p


def command(argv: Sequence[str] | None = None) -> None:
    """Parse, run, print; user mistakes raise TransferlabError."""
    args = build_parser().parse_args(argv)
    _check_outputs(args)
    store = FeatureStore.open(args.store)
    if args.plot is not None:
        labelled = bool((np.asarray(store.labels) >= 0).any())
        for path in cluster_plot_paths(Path(args.plot), args.plot_method, labelled):
            check_output(path, args.overwrite, "--plot")
    report = run_cluster(store, args.k, n_init=args.n_init, seed=args.seed,
                         normalize=args.normalize, max_iter=args.max_iter, device=args.device)
    print(cluster_report(report, args.k))
    if args.out:
        out = write_assignments(args.out, report.keys, report.clusters, args.overwrite)
        print(f"wrote {out}")
    if args.plot:
        for path in plot_clusters(store, report, Path(args.plot), args.plot_method):
            print(f"wrote {path}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: the exit code (2 with one line on stderr for a user mistake)."""
    return run_cli(command, argv, build_parser())


def _check_outputs(args: argparse.Namespace) -> None:
    """Refuse output paths that cannot be written before the store is read and k-means runs
    (the numeric options are checked by kmeans itself): ``runtime.userfiles``' policy."""
    if args.out is not None and Path(args.out).is_dir():
        raise ConfigError(f"--out {args.out} is a directory; name a CSV file in it, e.g. "
                          f"--out {Path(args.out) / 'assignments.csv'}")
    if args.out is not None:
        check_output(args.out, args.overwrite, "--out")
    if args.plot is not None and Path(args.plot).exists() and not Path(args.plot).is_dir():
        raise ConfigError(f"--plot {args.plot} is a file; name a directory, e.g. "
                          f"--plot {args.plot}_plots")

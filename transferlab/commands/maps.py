"""A 2-D map of a store's features, coloured by class: PCA, t-SNE or UMAP.

Command line::

    python -m transferlab.maps STORE OUT.png [--method pca|tsne|umap] [--max-points N]
        [--overwrite]

Large stores are sampled (seeded; only the sampled rows are read) and the title says how
many points of how many are shown. t-SNE needs scikit-learn, UMAP ``transferlab[umap]``.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence

from ..analysis.plots import plot_store_map, png_path
from ..analysis.projection import MAP_MAX_POINTS, MAP_METHODS
from ..errors import ConfigError
from ..runtime.userfiles import check_output
from ..store.reader import FeatureStore
from . import run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="transferlab maps",
                                description="2-D map of a store's features, by class.")
    p.add_argument("store", help="feature store directory")
    p.add_argument("out", help="PNG file to write")
    p.add_argument("--method", choices=MAP_METHODS, default="pca")
    p.add_argument("--max-points", type=int, default=None,
                   help="sample size above which rows are sampled (default "
                        + ", ".join(f"{m} {n}" for m, n in MAP_MAX_POINTS.items()) + ")")
    p.add_argument("--view", type=int, default=0, help="which view's rows to map")
    p.add_argument("--seed", type=int, default=0, help="sampling and embedding seed")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing OUT (default: refuse it)")
    return p


def command(argv: Sequence[str] | None = None) -> None:
    """Parse, draw, print the path; user mistakes raise TransferlabError."""
    args = build_parser().parse_args(argv)
    if args.max_points is not None and args.max_points < 3:
        raise ConfigError(f"--max-points must be at least 3, got {args.max_points}")
    check_output(png_path(args.out), args.overwrite, "OUT")
    store = FeatureStore.open(args.store)
    out = plot_store_map(store, args.out, args.method, args.view, args.max_points, args.seed)
    print(f"wrote {out}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: the exit code (2 with one line on stderr for a user mistake)."""
    return run_cli(command, argv, build_parser())


"""Which backbone and which layer transfer best to this data: every backbone x cut extracted
(one pass per backbone) and probed, into a leaderboard.

Command line::

    transferlab sweep CONFIG [key.sub=value ...] [--plot]

CONFIG is a ``SweepConfig`` (``backbones``, ``cuts``, ``data``, ``probe``, ``output.dir``;
see configs/sweep_mnist.yaml). Rerun the same command after a kill: only what is missing is
extracted and probed.
"""
from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Sequence

from ..analysis.layer_sweep import best_configs, leaderboard_markdown, plot_sweep, run_sweep
from ..config import SweepConfig, load_config
from ..errors import MissingDependencyError
from . import config_parser, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = config_parser("transferlab sweep", "Extract and probe every backbone x cut; a "
                                           "leaderboard of the results.")
    p.add_argument("--plot", action="store_true",
                   help="also write accuracy-by-depth and accuracy-vs-throughput PNGs into "
                        "output.dir")
    return p


def command(argv: Sequence[str] | None = None) -> None:
    """Parse, run, print; user mistakes raise TransferlabError."""
    args = build_parser().parse_args(argv)
    cfg = load_config(args.config, args.overrides, SweepConfig)
    if args.plot and importlib.util.find_spec("matplotlib") is None:  # before the sweep
        raise MissingDependencyError("--plot needs matplotlib: pip install transferlab[plots]")
    result = run_sweep(cfg, progress=cfg.runtime.progress)
    print(leaderboard_markdown(result.rows), end="")
    print("extracted now: " + ", ".join(f"{b} {n} images" for b, n in result.extracted.items())
          + f"; probes computed now: {len(result.probed)} of {len(result.rows)}")
    print(f"wrote {result.out_dir / 'leaderboard.csv'} and {result.out_dir / 'leaderboard.md'}")
    if args.plot:
        for path in plot_sweep(result.rows, result.out_dir):
            print(f"wrote {path}")
    best = result.best
    extract, finetune = best_configs(cfg, best)
    print(f"best: {best['backbone']} at {best['cut']} (probe accuracy {best['probe_acc']:.4f}"
          + (f", kNN {best['knn_acc']:.4f}" if best["knn_acc"] is not None else "") + ")")
    print("extract config (transferlab extract FILE):")
    print(extract, end="")
    print("finetune model section (transferlab finetune FILE):")
    print(finetune, end="")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: the exit code (2 with one line on stderr for a user mistake)."""
    return run_cli(command, argv, build_parser())

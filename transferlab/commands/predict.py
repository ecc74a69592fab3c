"""Classify images with a fine-tuned checkpoint.

Command line::

    python -m transferlab.predict CHECKPOINT PATH... [--out preds.csv] [--overwrite]
        [--batch-size N] [--device auto] [--precision auto] [--workers N]

``PATH`` is an image file or a folder (searched recursively for image files). The CSV has
one row per readable image: ``path,class,probability`` (``models/prediction.py``); files
that cannot be decoded are listed on stderr, not in the CSV. Without ``--out`` the CSV goes
to stdout.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..errors import ConfigError
from ..models.prediction import PredictResult, run_predict
from . import run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="transferlab predict",
                                description="Classify images with a fine-tuned checkpoint.")
    p.add_argument("checkpoint", help="model.safetensors written by transferlab.finetune")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    p.add_argument("--out", help="CSV file to write (default: stdout)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out file (default: refuse it)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="default: extraction's for the device (runtime.batch_size)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast precision (auto: bf16 where the hardware computes it)")
    p.add_argument("--workers", type=int, default=None,
                   help="decoding processes (default: chosen for the machine)")
    p.add_argument("--trust-code", action="store_true",
                   help="let a trusted checkpoint name a module:callable to run")
    return p


def command(argv: Sequence[str] | None = None) -> PredictResult:
    """Parse, predict, write the CSV; user mistakes raise TransferlabError."""
    args = build_parser().parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    result = run_predict(args.checkpoint, args.paths, args.out, args.batch_size, args.device,
                         args.workers, args.trust_code, args.precision, args.overwrite)
    for path, reason in result.failures:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    if args.out:
        print(f"{len(result.predictions)} predictions written to {args.out}"
              + (f" ({len(result.failures)} files skipped)" if result.failures else ""),
              file=sys.stderr)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: the exit code (2 with one line on stderr for a user mistake)."""
    return run_cli(command, argv, build_parser())

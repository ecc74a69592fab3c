"""``transferlab inspect MODEL`` (also ``python -m transferlab.inspect``): the valid cut points
of a model with output shapes."""
from __future__ import annotations

import argparse
from collections.abc import Sequence

from ..models.backbones import SOURCES
from ..models.describe import describe_cuts
from . import run_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="transferlab inspect",
                                     description="List the cut points of a model.")
    parser.add_argument("model",
                        help="timm / torchvision / built-in name, checkpoint or module:callable")
    parser.add_argument("--source", default="auto", choices=SOURCES)
    parser.add_argument("--trust-code", action="store_true",
                        help="let a trusted checkpoint name a module:callable to run")
    parser.add_argument("--all", action="store_true", help="list every module, not only depth <= 2")
    parser.add_argument("--input-size", type=int, nargs="+", help="H W or C H W")
    return parser


def command(argv: Sequence[str] | None = None) -> None:
    """Parse and print the cut points; user mistakes raise TransferlabError."""
    args = build_parser().parse_args(argv)
    print("\n".join(describe_cuts(args.model, args.source, args.all, args.input_size,
                                  args.trust_code)))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: the exit code (2 with one line on stderr for a user mistake)."""
    return run_cli(command, argv, build_parser())

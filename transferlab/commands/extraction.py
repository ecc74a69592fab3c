"""``transferlab extract CONFIG [key=value ...]`` (also ``python -m transferlab.extract``)."""
from __future__ import annotations

import argparse
from collections.abc import Sequence

from ..config import ExtractConfig, load_config
from ..extract.runner import ExtractResult, run_extract
from ..runtime.distributed import dist_info, shutdown
from . import config_parser, run_cli


def build_parser() -> argparse.ArgumentParser:
    return config_parser("transferlab extract",
                         "Extract frozen features of every image into a feature store.")


def command(argv: Sequence[str] | None = None) -> ExtractResult:
    """Parse, extract, print the summary; user mistakes raise TransferlabError."""
    args = build_parser().parse_args(argv)
    cfg = load_config(args.config, args.overrides, ExtractConfig)
    finished = False
    try:
        result = run_extract(cfg, progress=cfg.runtime.progress)
        finished = True
    finally:
        shutdown(finished)
    if dist_info().is_main:
        print(result.summary())
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: the exit code (2 with one line on stderr for a user mistake)."""
    return run_cli(command, argv, build_parser())

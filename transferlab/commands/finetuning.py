"""``transferlab finetune CONFIG [key=value ...]`` (also ``python -m transferlab.finetune``)."""
from __future__ import annotations

import argparse
from collections.abc import Sequence

from ..config import FinetuneConfig, load_config
from ..finetune.outputs import FinetuneResult
from ..finetune.run import run_finetune
from ..runtime.distributed import dist_info, shutdown
from . import config_parser, run_cli


def build_parser() -> argparse.ArgumentParser:
    return config_parser("transferlab finetune",
                         "Fine-tune a head on a frozen, cut backbone (optionally after "
                         "pretraining the backbone), with an optional logistic probe.")


def command(argv: Sequence[str] | None = None) -> FinetuneResult:
    """Parse, fine-tune, print the closing table; user mistakes raise TransferlabError."""
    args = build_parser().parse_args(argv)
    cfg = load_config(args.config, args.overrides, FinetuneConfig)
    finished = False
    try:
        result = run_finetune(cfg)
        finished = True
    finally:
        shutdown(finished)
    if dist_info().is_main:  # under torchrun: rank 0 prints, once
        print(result.data_note)
        print(result.table())
        print(f"checkpoint: {result.checkpoint}   metrics: {result.output_dir / 'metrics.json'}")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: the exit code (2 with one line on stderr for a user mistake)."""
    return run_cli(command, argv, build_parser())

"""``transferlab finetune CONFIG [key=value ...]`` (also ``python -m transferlab.finetune``)."""
from __future__ import annotations

from collections.abc import Sequence

from ..cli import config_parser, load_cli_config, run_cli
from ..config import FinetuneConfig
from ..runtime.distributed import dist_info, shutdown
from .outputs import FinetuneResult
from .run import run_finetune


def command(argv: Sequence[str] | None = None) -> FinetuneResult:
    """Parse, fine-tune, print the closing table; user mistakes raise TransferlabError."""
    parser = config_parser("transferlab finetune",
                           "Fine-tune a head on a frozen, cut backbone (optionally after "
                           "pretraining the backbone), with an optional logistic probe.")
    args = parser.parse_args(argv)
    cfg = load_cli_config(args, FinetuneConfig)
    try:
        result = run_finetune(cfg)
    finally:
        shutdown()
    if dist_info().is_main:  # under torchrun: rank 0 prints, once
        print(result.data_note)
        print(result.table())
        print(f"checkpoint: {result.checkpoint}   metrics: {result.output_dir / 'metrics.json'}")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: the exit code (2 with one line on stderr for a user mistake)."""
    return run_cli(command, argv)


if __name__ == "__main__":
    raise SystemExit(main())

"""``python -m transferlab.finetune CONFIG [key=value ...]``."""
from __future__ import annotations

from collections.abc import Sequence

from ..config import FinetuneConfig
from ..runtime.distributed import dist_info, shutdown
from .outputs import FinetuneResult
from .run import run_finetune


def main(argv: Sequence[str] | None = None) -> FinetuneResult:
    from ..cli import config_parser, load_cli_config

    parser = config_parser("python -m transferlab.finetune",
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


if __name__ == "__main__":
    import sys

    from ..cli import run_cli

    sys.exit(run_cli(main))


"""``transferlab extract CONFIG [key=value ...]`` (also ``python -m transferlab.extract``)."""
from __future__ import annotations

from collections.abc import Sequence

from ..cli import config_parser, run_cli
from ..config import ExtractConfig, load_config
from ..runtime.distributed import dist_info, shutdown
from .run import ExtractResult, run_extract


def command(argv: Sequence[str] | None = None) -> ExtractResult:
    """Parse, extract, print the summary; user mistakes raise TransferlabError."""
    parser = config_parser("transferlab extract",
                           "Extract frozen features of every image into a feature store.")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides, ExtractConfig)
    try:
        result = run_extract(cfg, progress=cfg.runtime.progress)
    finally:
        shutdown()
    if dist_info().is_main:
        print(result.summary())
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: the exit code (2 with one line on stderr for a user mistake)."""
    return run_cli(command, argv)


if __name__ == "__main__":
    raise SystemExit(main())

"""``python -m transferlab.extract CONFIG [key=value ...]``."""
from __future__ import annotations

from collections.abc import Sequence

from ..cli import config_parser, load_cli_config, run_cli
from ..config import ExtractConfig
from ..runtime.distributed import dist_info, shutdown
from .run import run_extract


def main(argv: Sequence[str] | None = None) -> None:
    parser = config_parser("python -m transferlab.extract",
                           "Extract frozen features of every image into a feature store.")
    args = parser.parse_args(argv)
    cfg = load_cli_config(args, ExtractConfig)
    try:
        result = run_extract(cfg, progress=cfg.runtime.progress)
    finally:
        shutdown()
    if dist_info().is_main:
        print(result.summary())


if __name__ == "__main__":
    raise SystemExit(run_cli(main))


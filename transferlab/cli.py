"""Shared command-line plumbing: config path + overrides, one-line errors (exit code 2)."""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from .config import load_config
from .errors import TransferlabError

T = TypeVar("T")


def config_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A parser taking ``CONFIG [key.sub=value ...]``."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="override any config key, e.g. runtime.batch_size=16")
    return parser


def load_cli_config(args: argparse.Namespace, schema: type[T]) -> T:
    return load_config(args.config, args.overrides, schema)


def run_cli(main: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None) -> int:
    """Run ``main``; a user mistake becomes one clear line on stderr and exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        main(argv)
    except TransferlabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished work is kept, rerun the same command to resume",
              file=sys.stderr)
        return 130
    return 0

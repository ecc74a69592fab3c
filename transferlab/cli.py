"""Shared command-line plumbing: config path + overrides, one-line errors.

Exit codes: 2 for a user mistake (TransferlabError), 1 for the environment (OSError: disk
full, read-only or missing directory, a file where a directory belongs), 130 on Ctrl-C.
"""
from __future__ import annotations

import argparse
import errno
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
        print(f"error: {clip_line(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {os_error_message(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; finished work is kept, rerun the same command to resume",
              file=sys.stderr)
        return 130
    return 0


# What to do about the usual environment errors; the rest get the generic advice.
OS_ERROR_FIXES = {
    errno.ENOSPC: "free disk space, then rerun the same command (finished work is kept)",
    errno.EDQUOT: "free space in your quota, then rerun the same command",
    errno.EACCES: "fix the permissions or choose another path (e.g. output.dir=...)",
    errno.EPERM: "fix the permissions or choose another path (e.g. output.dir=...)",
    errno.EROFS: "the file system is read-only: choose another path (e.g. output.dir=...)",
    errno.ENOTDIR: "a file stands where a directory is needed: choose another path",
    errno.EEXIST: "a file stands where a directory is needed: choose another path",
    errno.EISDIR: "a directory stands where a file is needed: choose another path",
    errno.ENOENT: "check that the path exists",
}


def os_error_message(exc: OSError) -> str:
    """One line: what failed on which path, and what to do about it."""
    what = exc.strerror or str(exc) or type(exc).__name__
    paths = [p for p in (exc.filename, exc.filename2) if p is not None]
    where = f": {' -> '.join(str(p) for p in paths)}" if paths else ""
    fix = OS_ERROR_FIXES.get(exc.errno, "check the path, free space and permissions, then rerun")
    return f"{what}{where}; {fix}".replace("\n", "\\n").replace("\r", "\\r")


def clip_line(message: str, limit: int = 2000) -> str:
    """The message on one line and at most ``limit`` characters: a value from a file or an
    argument (a 20,000-character cut name, say) is cut in the middle, not echoed whole."""
    text = " ".join(message.split())
    if len(text) <= limit:
        return text
    keep = (limit - 5) // 2
    return f"{text[:keep]} ... {text[-keep:]}"

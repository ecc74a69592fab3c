"""The command line: ``transferlab COMMAND`` (the console script), ``python -m transferlab
COMMAND`` and ``python -m transferlab.COMMAND`` run the same module of this package.

Each command module has ``build_parser()``, ``command(argv)`` (parses, calls the library,
prints; raises ``TransferlabError`` on a user mistake) and ``main(argv) -> exit code``.
Exit codes: 2 for a user mistake (TransferlabError, one line on stderr), 1 for the
environment (OSError: disk full, read-only or missing directory, a file where a directory
belongs), 130 on Ctrl-C.
"""
from __future__ import annotations

import argparse
import difflib
import errno
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import SettingError, TransferlabError

# name -> (its module in this package, what it does); modules load on use so
# `transferlab --help` starts fast
COMMANDS: dict[str, tuple[str, str]] = {
    "extract": ("extraction", "features of every image into a resumable feature store"),
    "finetune": ("finetuning", "train a head on a frozen, cut backbone"),
    "predict": ("predict", "class predictions of a fine-tuned checkpoint as CSV"),
    "inspect": ("inspection", "valid cut points of a model, with output shapes"),
    "probe": ("probe", "logistic-regression sweep and kNN accuracy on a labelled store"),
    "search": ("search", "nearest stored images of query images"),
    "cluster": ("cluster", "k-means of a store; purity and NMI when labelled"),
    "export": ("export", "a store as Parquet, HDF5, .npz, pickle or embedding-reader shards"),
    "index": ("index", "a FAISS index inside a store for fast search"),
    "maps": ("maps", "a 2-D map of a store by class (PCA, t-SNE, UMAP)"),
    "sweep": ("sweep", "extract and probe every backbone x cut: which layer transfers best"),
    "compare": ("compare", "linear CKA and RSA between stores, layer x layer for multi-cut runs"),
    "curate": ("curate", "near-duplicates, outliers, label issues and leakage of a store"),
    "view": ("view", "a local web page over a store: map, thumbnails, search, galleries"),
    "zeroshot": ("zeroshot", "zero-shot labels of a CLIP-family store, beside the probe"),
    "config": ("configs", "list the built-in example configs, or print one to copy"),
}


def main_of(name: str) -> Callable[[Sequence[str] | None], int]:
    """The ``main`` of command ``name`` (a fixed table, never user input)."""
    return importlib.import_module(f".{COMMANDS[name][0]}", __name__).main


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: transferlab COMMAND [ARGS ...]   (transferlab COMMAND --help for its options)",
             "       transferlab --version",
             "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``transferlab COMMAND [ARGS ...]``: the exit code of the command's ``main``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    if args[0] in ("-V", "--version"):
        from .. import __version__
        print(f"transferlab {__version__}")
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f"did you mean '{close[0]}'?" if close else "see transferlab --help"
        print(f"error: unknown command '{name}'; {hint}", file=sys.stderr)
        return 2
    return main_of(name)(rest)


def config_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A parser taking ``CONFIG [key.sub=value ...]``."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("config", help="YAML config file, or a built-in name "
                        "(transferlab config list)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="override any config key, e.g. runtime.batch_size=16")
    return parser


def run_cli(command: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None,
            parser: argparse.ArgumentParser | None = None) -> int:
    """Run ``command``; a user mistake becomes one clear line on stderr and exit code 2.

    A ``SettingError`` names the library's parameter; the line names the option of
    ``parser`` that sets it instead (``--n-init`` for ``n_init``).
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        command(argv)
    except TransferlabError as exc:
        print(f"error: {clip_line(as_option(exc, parser))}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {os_error_message(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; finished work is kept, rerun the same command to resume",
              file=sys.stderr)
        return 130
    return 0


def as_option(exc: TransferlabError, parser: argparse.ArgumentParser | None) -> str:
    """The message, with a setting named by the option whose ``dest`` it is, when there is one."""
    if not isinstance(exc, SettingError) or parser is None:
        return str(exc)
    for action in parser._actions:  # argparse keeps its options here and nowhere public
        if action.dest == exc.setting and action.option_strings:
            return f"{max(action.option_strings, key=len)} {exc.problem}"
    return str(exc)


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

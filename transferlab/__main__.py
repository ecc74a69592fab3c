"""``transferlab COMMAND [...]`` (the console script) and ``python -m transferlab COMMAND``.

Each command is also ``python -m transferlab.COMMAND``; both spellings run the same ``main``.
"""
from __future__ import annotations

import difflib
import importlib
import sys
from collections.abc import Callable, Sequence
from functools import partial


def _main_of(module: str) -> Callable[[Sequence[str] | None], int]:
    """The ``main`` of one of the command modules below (a fixed table, never user input)."""
    return importlib.import_module(module, __package__).main


# name -> (what it does, its main); mains load on use so `transferlab --help` starts fast
COMMANDS: dict[str, tuple[str, Callable[[], Callable[[Sequence[str] | None], int]]]] = {
    "extract": ("features of every image into a resumable feature store",
                partial(_main_of, ".extract.__main__")),
    "finetune": ("train a head on a frozen, cut backbone",
                 partial(_main_of, ".finetune.__main__")),
    "predict": ("class predictions of a fine-tuned checkpoint as CSV",
                partial(_main_of, ".predict")),
    "inspect": ("valid cut points of a model, with output shapes",
                partial(_main_of, ".inspect")),
    "probe": ("logistic-regression sweep and kNN accuracy on a labelled store",
              partial(_main_of, ".probe")),
    "search": ("nearest stored images of query images",
               partial(_main_of, ".search")),
    "cluster": ("k-means of a store; purity and NMI when labelled",
                partial(_main_of, ".cluster")),
    "export": ("a store as Parquet, HDF5, .npz or pickle",
               partial(_main_of, ".export")),
    "index": ("a FAISS index inside a store for fast search",
              partial(_main_of, ".index")),
    "maps": ("a 2-D map of a store by class (PCA, t-SNE, UMAP)",
             partial(_main_of, ".maps")),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: transferlab COMMAND [ARGS ...]   (transferlab COMMAND --help for its options)",
             "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (text, _) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f"did you mean '{close[0]}'?" if close else "see transferlab --help"
        print(f"error: unknown command '{name}'; {hint}", file=sys.stderr)
        return 2
    return COMMANDS[name][1]()(rest)


if __name__ == "__main__":
    raise SystemExit(main())

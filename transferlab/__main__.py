"""``transferlab COMMAND [...]`` (the console script) and ``python -m transferlab COMMAND``.

Each command is also ``python -m transferlab.COMMAND``; both spellings run the same ``main``.
"""
from __future__ import annotations

import difflib
import sys
from collections.abc import Callable, Sequence


def _extract() -> Callable[[Sequence[str] | None], int]:
    from .extract.__main__ import main
    return main


def _finetune() -> Callable[[Sequence[str] | None], int]:
    from .finetune.__main__ import main
    return main


def _predict() -> Callable[[Sequence[str] | None], int]:
    from .predict import main
    return main


def _inspect() -> Callable[[Sequence[str] | None], int]:
    from .inspect import main
    return main


def _probe() -> Callable[[Sequence[str] | None], int]:
    from .probe import main
    return main


def _search() -> Callable[[Sequence[str] | None], int]:
    from .search import main
    return main


def _cluster() -> Callable[[Sequence[str] | None], int]:
    from .cluster import main
    return main


# name -> (what it does, its main); mains load on use so `transferlab --help` starts fast
COMMANDS: dict[str, tuple[str, Callable[[], Callable[[Sequence[str] | None], int]]]] = {
    "extract": ("features of every image into a resumable feature store", _extract),
    "finetune": ("train a head on a frozen, cut backbone", _finetune),
    "predict": ("class predictions of a fine-tuned checkpoint as CSV", _predict),
    "inspect": ("valid cut points of a model, with output shapes", _inspect),
    "probe": ("logistic-regression sweep and kNN accuracy on a labelled store", _probe),
    "search": ("nearest stored images of query images", _search),
    "cluster": ("k-means of a store; purity and NMI when labelled", _cluster),
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

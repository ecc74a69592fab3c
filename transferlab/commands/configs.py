"""``transferlab config list`` / ``transferlab config show NAME``: the built-in example configs.

``show`` prints the file exactly as shipped, so ``transferlab config show xception > my.yaml``
gives a copy to edit; every command taking a config accepts a built-in name directly
(``transferlab extract xception data.root=photos``).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ..config import builtin_configs, resolve_config
from . import run_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="transferlab config",
                                     description="List or print the built-in example configs.")
    sub = parser.add_subparsers(dest="action", required=True, metavar="{list,show}")
    sub.add_parser("list", help="the built-in config names, what each does, and their files")
    show = sub.add_parser("show", help="print a built-in config (> my.yaml to copy it)")
    show.add_argument("name", help="a built-in name (transferlab config list) or a YAML file")
    return parser


def summary(path: Path, limit: int = 80) -> str:
    """What a config is for: the first sentence of its leading comment, cut to ``limit``."""
    words: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        text = line.lstrip("#").strip()
        if not line.startswith("#") or not text:
            break
        words += text.split()
    sentence = " ".join(words)
    for end in (". ", ": "):
        sentence = sentence.split(end, 1)[0]
    sentence = sentence.rstrip(".:")
    return sentence if len(sentence) <= limit else sentence[:limit - 3] + "..."


def list_lines() -> list[str]:
    configs = builtin_configs()
    width = max(map(len, configs), default=0)
    lines = [f"{name:<{width}}  {summary(path)}" for name, path in configs.items()]
    if configs:
        folder = next(iter(configs.values())).parent
        lines += ["", f"files in {folder}; use a name wherever a config path goes, e.g. "
                  "transferlab finetune mnist_split"]
    return lines


def command(argv: Sequence[str] | None = None) -> None:
    """Parse and print; an unknown name raises ConfigError listing the built-in names."""
    args = build_parser().parse_args(argv)
    if args.action == "list":
        print("\n".join(list_lines()))
    else:
        sys.stdout.write(resolve_config(args.name).read_text(encoding="utf-8"))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: the exit code (2 with one line on stderr for a user mistake)."""
    return run_cli(command, argv, build_parser())

"""``python -m transferlab.inspect MODEL``: the valid cut points of a model with output shapes."""
from __future__ import annotations

import argparse
from collections.abc import Sequence

from torch import nn

from .cli import run_cli
from .config import ModelConfig, PreprocessConfig
from .data.preprocess import resolve_preprocess
from .errors import ConfigError, CutError
from .models.backbones import SOURCES, build_backbone
from .models.cuts import list_cut_points, make_extractor
from .models.extractor import model_in_chans
from .models.multicut import CUT_SETS, named_cuts


def describe_cuts(name: str, source: str = "auto", all_modules: bool = False,
             input_size: list[int] | None = None, trust_code: bool = False) -> list[str]:
    """Lines describing the model's preprocessing and every cut point (random weights)."""
    backbone = build_backbone(ModelConfig(name=name, source=source, trust_code=trust_code))
    spec = resolve_preprocess(backbone.data_config, PreprocessConfig(input_size=input_size),
                              model_in_chans(backbone.model))
    lines = [f"{name} ({backbone.source}), input {spec.input_size}, "
             f"mean {spec.mean}, std {spec.std}, {spec.interpolation}, crop_pct {spec.crop_pct}",
             "", f"{'cut':<40} output shape"]
    points = list_cut_points(backbone.model, spec.input_size, all_modules)
    lines.append(f"{'head':<40} {head_shape(backbone.model, spec.input_size)}")
    for point in points:
        shape = "x".join(map(str, point.shape)) if point.shape else "(not a tensor)"
        label = point.spec if point.spec.startswith("layer:") else f"{point.spec} ({point.module})"
        lines.append(f"{label:<40} {shape}")
    lines += ["", "drop:N equals first:(layers - N); negative stage indices count from the end.",
              *cut_sets(backbone.model, name)]
    return lines


def cut_sets(model: nn.Module, name: str) -> list[str]:
    """What ``all-stages`` / ``all-blocks`` expand to here (several cuts in one pass)."""
    lines = ["Several cuts in one pass (one store each): model.cut=[first:3, head, ...]"]
    for cut_set in CUT_SETS:
        try:
            cuts = named_cuts(model, cut_set, name)
        except ConfigError:
            continue
        shown = ", ".join(map(str, cuts[:6])) + (f", ... ({len(cuts)} cuts)" if len(cuts) > 6
                                                 else "")
        lines.append(f"  {cut_set}: {shown}")
    return lines


def head_shape(model: nn.Module, input_size: Sequence[int]) -> str:
    """Output of the 'head' cut with the default pooling (this modifies ``model``)."""
    try:
        return "x".join(map(str, make_extractor(model, "head", None, input_size).output_shape))
    except CutError as exc:
        return f"(not available: {exc})"


def command(argv: Sequence[str] | None = None) -> None:
    """Parse and print the cut points; user mistakes raise TransferlabError."""
    parser = argparse.ArgumentParser(prog="transferlab inspect",
                                     description="List the cut points of a model.")
    parser.add_argument("model",
                        help="timm / torchvision / built-in name, checkpoint or module:callable")
    parser.add_argument("--source", default="auto", choices=SOURCES)
    parser.add_argument("--trust-code", action="store_true",
                        help="let a trusted checkpoint name a module:callable to run")
    parser.add_argument("--all", action="store_true", help="list every module, not only depth <= 2")
    parser.add_argument("--input-size", type=int, nargs="+", help="H W or C H W")
    args = parser.parse_args(argv)
    print("\n".join(describe_cuts(args.model, args.source, args.all, args.input_size,
                               args.trust_code)))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: the exit code (2 with one line on stderr for a user mistake)."""
    return run_cli(command, argv)


if __name__ == "__main__":
    raise SystemExit(main())

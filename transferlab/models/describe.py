"""A model described for choosing a cut: its preprocessing, every valid cut point with its
output shape, and what the named cut sets expand to (the ``inspect`` command prints it)."""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..config import ModelConfig, PreprocessConfig
from ..data.preprocess import resolve_preprocess
from ..errors import ConfigError, CutError
from .backbones import build_backbone
from .cuts import list_cut_points, make_extractor
from .extractor import model_in_chans
from .multicut import CUT_SETS, named_cuts


def describe_cuts(name: str, source: str = "auto", all_modules: bool = False,
                  input_size: list[int] | None = None, trust_code: bool = False) -> list[str]:
    """Lines describing the model's preprocessing and every cut point (random weights)."""
    backbone = build_backbone(ModelConfig(name=name, source=source, trust_code=trust_code))
    spec = resolve_preprocess(backbone.data_config, PreprocessConfig(input_size=input_size),
                              model_in_chans(backbone.model))
    lines = [(f"{name} ({backbone.source}), input {spec.input_size}, "
              f"mean {spec.mean}, std {spec.std}, {spec.interpolation}, crop_pct {spec.crop_pct}"),
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

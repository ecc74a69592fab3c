"""Preprocessing resolved from the backbone's own pretrained config, with config overrides.

The resolved ``PreprocessSpec`` is what a store records; transforms are built from it with
timm's ``create_transform`` so they match how the weights were evaluated.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..config import PreprocessConfig, check_range
from ..errors import ConfigError
from ..yamlsafe import shown, shown_text

IMAGENET_DEFAULTS = {"input_size": (3, 224, 224), "interpolation": "bicubic",
                     "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
                     "crop_pct": 0.875, "crop_mode": "center"}


@dataclass(frozen=True)
class PreprocessSpec:
    """Fully resolved preprocessing: what every image goes through before the model."""

    input_size: tuple[int, int, int]  # (C, H, W)
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float
    crop_mode: str  # timm crop mode: center | squash | border
    resize: str  # center_crop | squash (as configured)
    window: str = "crop"  # crop: resample only the centre crop's window; image: all, then crop

    @property
    def channels(self) -> int:
        return self.input_size[0]

    @property
    def image_mode(self) -> str:
        """PIL mode the images are decoded to."""
        return "L" if self.channels == 1 else "RGB"

    def scale_size(self) -> tuple[int, int]:
        """(W, H) the image is resized to before cropping; the JPEG draft target."""
        _, h, w = self.input_size
        if self.crop_mode == "squash" and self.crop_pct == 1.0:
            return (w, h)
        short = math.floor(min(h, w) / self.crop_pct)
        return (short, short)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_data_config(self) -> dict:
        """This spec in timm's data-config terms (what a backbone reports)."""
        return {"input_size": self.input_size, "interpolation": self.interpolation,
                "mean": self.mean, "std": self.std, "crop_pct": self.crop_pct,
                "crop_mode": self.crop_mode}


def resolve_preprocess(data_config: dict, cfg: PreprocessConfig | None = None,
                       model_in_chans: int | None = None) -> PreprocessSpec:
    """Merge the backbone's data config (timm style) with the user's overrides; a data
    config a file gave (a model folder's config.json, a checkpoint's data_config) that is
    not usable is one ConfigError line."""
    cfg = cfg or PreprocessConfig()
    try:
        return _resolve(data_config, cfg, model_in_chans)
    except (TypeError, ValueError, KeyError) as exc:
        raise ConfigError(f"the model's preprocessing ({shown(data_config)}) is not usable "
                          f"({shown_text(str(exc))}); set preprocess.input_size, mean, std and "
                          "crop_pct, or fix the file that gave it") from None


def _resolve(data_config: dict, cfg: PreprocessConfig,
             model_in_chans: int | None) -> PreprocessSpec:
    base = {**IMAGENET_DEFAULTS, **{k: v for k, v in data_config.items() if v is not None}}
    size = input_size(cfg.input_size, base["input_size"])
    channels = cfg.channels or model_in_chans or size[0]
    check_range(PreprocessConfig, "preprocess.channels", channels)  # the model's, maybe
    size = (channels, size[1], size[2])
    # the model's own input size too: a model folder's config.json may claim any size
    check_range(PreprocessConfig, "preprocess.input_size", list(size),
                None if cfg.input_size is not None else "the model's pretrained config")
    mean = fit_channels(cfg.mean or base["mean"], channels, "mean")
    std = fit_channels(cfg.std or base["std"], channels, "std")
    check_range(PreprocessConfig, "preprocess.std", list(std))
    crop_pct = float(cfg.crop_pct or base["crop_pct"] or 1.0)
    check_range(PreprocessConfig, "preprocess.crop_pct", crop_pct)
    crop_mode = base.get("crop_mode") or "center"
    if cfg.resize == "squash":
        crop_pct, crop_mode = 1.0, "squash"
    return PreprocessSpec(size, cfg.interpolation or base["interpolation"] or "bilinear",
                          mean, std, crop_pct, crop_mode, cfg.resize, cfg.window)


def input_size(override: Sequence[int] | None, default: Sequence[int]) -> tuple[int, int, int]:
    if override is None:
        c, h, w = default
        return (int(c), int(h), int(w))
    if len(override) == 2:
        return (int(default[0]), int(override[0]), int(override[1]))
    if len(override) == 3:
        return (int(override[0]), int(override[1]), int(override[2]))
    raise ConfigError(f"preprocess.input_size must be [H, W] or [C, H, W], got {list(override)}")


def fit_channels(values: Sequence[float], channels: int, key: str) -> tuple[float, ...]:
    """Adapt per-channel statistics: RGB -> gray averages, gray -> RGB repeats."""
    values = tuple(float(v) for v in values)
    if len(values) == channels:
        return values
    if channels == 1:
        return (sum(values) / len(values),)
    if len(values) == 1:
        return values * channels
    raise ConfigError(f"preprocess.{key} has {len(values)} values for {channels} channels")


def build_transform(spec: PreprocessSpec, normalize: bool = True,
                    augment: bool = False) -> Callable:
    """PIL image -> tensor. ``normalize=False`` gives uint8 CHW (normalise on the device).

    ``augment`` gives timm's training transform (random resized crop, flip, colour jitter)
    at the same size and normalisation, for augmented views. The eval transform resamples
    only the centre crop's window unless ``spec.window`` is 'image' (``data.cropwindow``).
    """
    from timm.data import create_transform

    transform = create_transform(input_size=spec.input_size, is_training=augment,
                                 interpolation=spec.interpolation, mean=spec.mean, std=spec.std,
                                 crop_pct=spec.crop_pct, crop_mode=spec.crop_mode,
                                 normalize=normalize)
    if augment or spec.window != "crop":
        return transform
    from .cropwindow import resample_crop_window

    return resample_crop_window(transform)


class DeviceNormalize(nn.Module):
    """uint8 NCHW -> normalised float on the device (cheap next to decoding on the CPU)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("scale", 1.0 / (255.0 * torch.tensor(std).view(1, -1, 1, 1)))
        self.register_buffer("shift", (torch.tensor(mean) / torch.tensor(std)).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() * self.scale - self.shift

"""The trust boundary for what files record: architectures, preprocessing, paths.

A checkpoint's or a store's metadata can be written by anyone, so what it names is data, never
code: an architecture recorded in a file is rebuilt only from timm, torchvision or the
built-ins (or a Hub name, which timm resolves in its own registry), and a path it names stays
inside the directory the file belongs to. ``trust_code=True`` (``model.trust_code: true``,
``--trust-code``) lifts both rules for a file the user trusts, like Hugging Face's
``trust_remote_code``.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch

from ..config import ModelConfig, PreprocessConfig, check_range
from ..data.preprocess import PreprocessSpec
from ..errors import ConfigError, ModelError
from ..yamlsafe import shown
from . import hub
from .checkpoint import check_witness, one_line
from .library import Backbone, build_library, model_kwargs, resolve_source
from .weights import load_weights_into

RECORDED_SOURCES = ("timm", "torchvision", "builtin")
# factory arguments that make timm / torchvision read a file or fetch weights
FILE_KWARGS = frozenset({"checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay",
                         "cache_dir", "weights", "pretrained"})
OPT_IN = "trust_code=True (model.trust_code: true; --trust-code on the command line)"


def untrusted(origin: str, what: str) -> ModelError:
    return ModelError(f"{origin} {what}; transferlab rebuilds what a file records only from "
                      f"timm, torchvision or the built-ins, inside its own directory: if you "
                      f"trust this file, pass {OPT_IN}")


def checked_model(cfg: ModelConfig, origin: str, trust_code: bool) -> ModelConfig:
    """``cfg`` (read from a file) with its source resolved, refused when it would run code
    or read files the file names, unless ``trust_code``."""
    if not isinstance(cfg.name, str) or not isinstance(cfg.kwargs, dict):
        raise ModelError(f"{origin} records an unreadable architecture (name {cfg.name!r}, "
                         f"kwargs {cfg.kwargs!r}); re-create the file with transferlab")
    try:  # the sizes it claims (num_classes, in_chans, img_size), before anything is built
        model_kwargs(cfg)
    except ModelError as exc:
        raise ModelError(f"{origin}: {exc}") from None
    source = resolve_source(cfg.name, cfg.source)
    if trust_code:
        return dataclasses.replace(cfg, source=source)
    allowed = (source in RECORDED_SOURCES or (source == "hub" and hub.is_hub_name(cfg.name))
               or registry_name(cfg, source))
    if not allowed:
        raise untrusted(origin, f"asks to build its model with '{cfg.name}' (source {source})")
    named = sorted(FILE_KWARGS & set(cfg.kwargs))
    if named:
        raise untrusted(origin, f"passes {', '.join(named)} to the model factory")
    return dataclasses.replace(cfg, source=source, trust_code=False)


def registry_name(cfg: ModelConfig, source: str) -> bool:
    """An OpenCLIP registry name with a pretrained tag (not a file), a Transformers Hub id
    (not a folder), or a Transformers config recorded whole (``kwargs.hf_config``, checked
    when built): nothing read from a path the file names. A folder or file needs
    trust_code, as a timm model folder does."""
    name = cfg.name
    if source == "transformers" and isinstance(cfg.kwargs.get("hf_config"), dict):
        return True
    if source == "open_clip":
        arch, _, tag = name.partition(":")[2].partition("/")
        return not arch.startswith("local-dir:") and not (tag and ("/" in tag or "\\" in tag
                                                                  or "." in tag))
    if source == "transformers":
        from .transformers_source import is_folder_name

        return not is_folder_name(name)
    return False


def recorded_arch(arch: object, origin: str, trust_code: bool) -> ModelConfig:
    """The random-init ModelConfig of an architecture entry of a checkpoint."""
    if not isinstance(arch, dict):
        raise ModelError(f"{origin} records no architecture (got {type(arch).__name__}); "
                         "re-save it with python -m transferlab.finetune")
    try:
        cfg = ModelConfig(**{**arch, "pretrained": False, "weights": None, "trust_code": False})
    except TypeError as exc:
        raise ModelError(f"{origin} records an unreadable architecture ({exc}); was it "
                         "written by an older or newer transferlab?") from None
    return checked_model(cfg, origin, trust_code)


def contained_path(path: str, root: Path | None, origin: str, trust_code: bool) -> str:
    """A path read from a file: as recorded when trusted, else resolved inside ``root``."""
    if trust_code:
        return path
    if root is None or escapes(path):
        raise untrusted(origin, f"names the file '{path}' outside its own directory")
    return str(root / path)


def escapes(key: str) -> bool:
    """Whether a relative path read from a file could leave its directory (absolute, drive,
    UNC, '..' on POSIX or Windows)."""
    posix, win = PurePosixPath(key), PureWindowsPath(key)
    return (not key or posix.is_absolute() or bool(win.drive) or win.is_absolute()
            or ".." in posix.parts or ".." in win.parts)


def claimed_classes(cfg: ModelConfig) -> int | None:
    """The class count a recorded architecture builds its classifier with (None: the
    factory's default)."""
    return cfg.num_classes if cfg.num_classes is not None else cfg.kwargs.get("num_classes")


def rebuild_backbone(path: str | Path, state: dict[str, torch.Tensor], meta: dict,
                     trust_code: bool = False) -> Backbone:
    """The whole model of a backbone checkpoint: its recorded architecture, its weights."""
    origin = f"checkpoint {path}"
    cfg = recorded_arch(meta.get("backbone"), origin, trust_code)
    classes = claimed_classes(cfg)
    if classes:  # the whole model is saved: its classifier's weights are in the file
        check_witness({k: tuple(v.shape) for k, v in state.items()}, classes,
                      "a classifier of num_classes", origin)
    backbone = build_library(cfg, cfg.source)
    load_weights_into(backbone.model, state, path)
    data_config = meta.get("data_config")
    if data_config is not None and not isinstance(data_config, dict):
        raise ModelError(f"{origin} has a data_config of type {type(data_config).__name__}, "
                         "not an object; re-save it with python -m transferlab.finetune")
    return Backbone(backbone.model, str(path), "checkpoint", data_config or backbone.data_config)


def spec_from_meta(data: object, origin: str) -> PreprocessSpec:
    """A recorded preprocessing spec, checked field by field (one ModelError line)."""
    fields = {f.name for f in dataclasses.fields(PreprocessSpec)}
    if isinstance(data, dict) and "window" not in data:  # written before the crop window:
        data = {**data, "window": "image"}  # its images were resized whole, then cropped
    if not isinstance(data, dict) or set(data) != fields:
        raise ModelError(f"{origin}: unreadable preprocessing metadata (expected an object with "
                         f"{', '.join(sorted(fields))}; got {type(data).__name__}); re-save it "
                         "with python -m transferlab.finetune")
    try:
        spec = PreprocessSpec(
            input_size=tuple(int(v) for v in data["input_size"]),
            mean=tuple(float(v) for v in data["mean"]), std=tuple(float(v) for v in data["std"]),
            crop_pct=float(data["crop_pct"]),
            **{k: str(data[k]) for k in ("interpolation", "crop_mode", "resize", "window")})
    except (TypeError, ValueError) as exc:
        raise ModelError(f"{origin}: unreadable preprocessing metadata ({one_line(exc)})") \
            from None
    sizes_ok = len(spec.input_size) == 3 and min(spec.input_size) >= 1
    bounded(spec, origin)
    if spec.window not in ("crop", "image"):
        raise ModelError(f"{origin}: preprocessing window {shown(spec.window)} is neither "
                         "'crop' nor 'image'; re-save the checkpoint with python -m "
                         "transferlab.finetune")
    if not sizes_ok or spec.crop_pct <= 0 or not len(spec.mean) == len(spec.std) == spec.channels:
        raise ModelError(f"{origin}: preprocessing metadata (input_size {spec.input_size}, "
                         f"mean {spec.mean}, std {spec.std}, crop_pct {spec.crop_pct}) is not "
                         "usable; re-save the checkpoint with python -m transferlab.finetune")
    return spec


def bounded(spec: PreprocessSpec, origin: str) -> None:
    """A recorded spec within the BOUNDS a config's preprocessing obeys (input sides, a
    positive std, crop_pct in (0, 1]) and with finite numbers: a checkpoint's std of 0 would
    give NaN probabilities, a side of 12,000 pixels a 1.7 GB input."""
    try:
        check_range(PreprocessConfig, "preprocess.input_size", list(spec.input_size))
        check_range(PreprocessConfig, "preprocess.channels", spec.channels)
        check_range(PreprocessConfig, "preprocess.std", list(spec.std))
        check_range(PreprocessConfig, "preprocess.crop_pct", spec.crop_pct)
    except ConfigError as exc:
        raise ModelError(f"{origin}: preprocessing metadata: {exc}; re-save the checkpoint "
                         "with python -m transferlab.finetune") from None
    if not all(math.isfinite(v) for v in (*spec.mean, *spec.std, spec.crop_pct)):
        raise ModelError(f"{origin}: preprocessing metadata has a mean or std that is not a "
                         f"finite number (mean {spec.mean}, std {spec.std}); re-save the "
                         "checkpoint with python -m transferlab.finetune")

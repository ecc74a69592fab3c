"""The plain library builders: timm, torchvision, the built-ins, the Hub (through timm) and
``package.module:callable``. Nothing here reads a transferlab checkpoint: the dispatcher that
treats a checkpoint as a backbone source (``backbones``) sits above this module.
"""
from __future__ import annotations

import difflib
import functools
import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..config import MAX_CLASSES, MAX_IN_CHANS, MAX_INPUT_SIDE, ModelConfig
from ..errors import ModelError
from ..yamlsafe import shown, shown_text
from . import hub, provenance
from .builtin import BUILTIN_DATA_CONFIGS, BUILTIN_MODELS
from .checkpoint import one_line


@dataclass
class Backbone:
    """A built model and what is known about it (source, data config of its weights)."""

    model: nn.Module
    name: str
    source: str
    # timm-style data config: input_size, interpolation, mean, std, crop_pct, crop_mode
    data_config: dict = field(default_factory=dict)
    # the weights the builder read, by content (``provenance``); None: random initial weights
    weights_digest: dict | None = None
    # the text tower the image embedding pairs with (CLIP-family sources): source, name,
    # embedding, normalized; recorded in a store's meta.json for text queries
    text_tower: dict | None = None


@functools.lru_cache(maxsize=1)
def timm_names() -> frozenset[str]:
    import timm

    return frozenset(timm.list_models())


@functools.lru_cache(maxsize=1)
def torchvision_names() -> frozenset[str]:
    import torchvision

    return frozenset(torchvision.models.list_models())


def resolve_source(name: str, source: str = "auto") -> str:
    """Which library builds ``name``; 'auto' tries built-in, open_clip:, hf: /
    transformers:, checkpoint, hub, callable, timm, torchvision in this order."""
    if source != "auto":
        return source
    if name in BUILTIN_MODELS:
        return "builtin"
    if name.startswith("open_clip:"):  # before paths: its /PRETRAINED may be a file
        return "open_clip"
    if name.startswith(("hf:", "transformers:")):
        return "transformers"
    if name.endswith((".safetensors",)) or Path(name).is_file():
        return "checkpoint"
    if hub.is_hub_name(name) or hub.is_model_folder(name):
        return "hub"
    if ":" in name and "/" not in name.split(":", 1)[0]:
        return "callable"
    if name in timm_names() or is_timm_pretrained_tag(name):
        return "timm"
    if name in torchvision_names():
        return "torchvision"
    raise ModelError(unknown_model_message(name))


def is_timm_pretrained_tag(name: str) -> bool:
    """timm accepts 'arch.tag' names (e.g. resnet50.a1_in1k)."""
    return "." in name and name.split(".", 1)[0] in timm_names()


def unknown_model_message(name: str) -> str:
    candidates = sorted(set(BUILTIN_MODELS) | timm_names() | torchvision_names())
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
    hint = f" Closest names: {', '.join(close)}." if close else ""
    return (f"unknown model '{name}'.{hint} Use a timm name (timm.list_models()), a torchvision "
            f"name (torchvision.models.list_models()), a built-in ({', '.join(BUILTIN_MODELS)}), "
            "a transferlab checkpoint path, or 'package.module:callable'.")


def model_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """The factory's keyword arguments: ``model.kwargs`` with num_classes and in_chans, the
    sizes among them bounded (``check_size_kwargs``) before anything is built."""
    kwargs = dict(cfg.kwargs)
    if cfg.num_classes is not None:
        kwargs["num_classes"] = cfg.num_classes
    if cfg.in_chans is not None:
        kwargs["in_chans"] = cfg.in_chans
    check_size_kwargs(kwargs, cfg.name)
    return kwargs


# factory arguments that size what the model allocates: (smallest, largest)
SIZE_KWARGS = {"num_classes": (0, MAX_CLASSES), "in_chans": (1, MAX_IN_CHANS)}


def check_size_kwargs(kwargs: dict[str, Any], name: str) -> None:
    """ModelError when num_classes, in_chans or img_size (from a config, a store's meta.json,
    a checkpoint or a model folder) is not a whole number in its range: the factory would
    allocate from it (5e6 classes: a 40 GB classifier)."""
    def refuse(key: str, value: Any, valid: str) -> ModelError:
        return ModelError(f"model '{shown_text(name)}': {key}={shown(value)} must be {valid}; fix "
                          "model.kwargs / model.num_classes / model.in_chans, or the file that "
                          "recorded it")

    def whole(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    for key, (low, high) in SIZE_KWARGS.items():
        value = kwargs.get(key)
        if value is not None and not (whole(value) and low <= value <= high):
            raise refuse(key, value, f"a whole number between {low} and {high:,}")
    size = kwargs.get("img_size")
    if size is not None:
        sides = list(size) if isinstance(size, (list, tuple)) else [size]
        if not 1 <= len(sides) <= 2 or not all(whole(v) and 1 <= v <= MAX_INPUT_SIDE
                                               for v in sides):
            raise refuse("img_size", size, f"a side or [H, W] of 1 to {MAX_INPUT_SIDE} pixels")


def factory_refused(exc: TypeError, library: str, name: str, kwargs: dict) -> ModelError:
    """The one line for a factory that does not take an argument it was given (a TypeError:
    ``model.kwargs`` of a config, a store's meta.json or a model folder's model_args)."""
    bad = re.search(r"unexpected keyword argument '([^']+)'", str(exc))
    what = (f"does not take the argument '{shown_text(bad.group(1))}'" if bad else
            f"refused its arguments ({shown(one_line(exc))})")
    given = ", ".join(shown_text(str(k)) for k in sorted(kwargs)) or "none"
    return ModelError(f"{library} model '{shown_text(name)}' {what} (arguments given: {given}); "
                      "remove it from model.kwargs, or from the file that records it")


def fetch_failed(name: str, exc: Exception) -> ModelError:
    return ModelError(
        f"could not fetch the pretrained weights of '{name}' ({type(exc).__name__}: "
        f"{str(exc).splitlines()[0][:200] if str(exc) else ''}). Without network access, "
        f"download the weights file elsewhere and set 'model.weights: PATH' "
        f"(.safetensors, .pth, .pt or .bin) with 'model.pretrained: false'.")


def build_timm(cfg: ModelConfig) -> Backbone:
    import timm

    if cfg.name not in timm_names() and not is_timm_pretrained_tag(cfg.name):
        raise ModelError(unknown_model_message(cfg.name))
    pretrained = cfg.pretrained and not cfg.weights
    kwargs = model_kwargs(cfg)
    try:
        model = timm.create_model(cfg.name, pretrained=pretrained, **kwargs)
    except TypeError as exc:
        raise factory_refused(exc, "timm", cfg.name, kwargs) from None
    except (OSError, RuntimeError, ValueError) as exc:
        if pretrained:
            raise fetch_failed(cfg.name, exc) from None
        raise ModelError(f"timm could not build '{cfg.name}': {exc}") from None
    data_config = dict(timm.data.resolve_model_data_config(model))
    digest = provenance.timm_record(model, cfg.kwargs.get("cache_dir")) if pretrained else None
    return Backbone(model, cfg.name, "timm", data_config, digest)


def build_hub(cfg: ModelConfig) -> Backbone:
    """A Hugging Face Hub repository (hf-hub:ORG/NAME) or a timm model folder, through timm."""
    kwargs = model_kwargs(cfg)
    try:
        model = hub.create(cfg, kwargs)
    except TypeError as exc:  # config.json's model_args or model.kwargs
        raise factory_refused(exc, "timm (Hub / model folder config.json)", cfg.name,
                              kwargs) from None
    digest = provenance.timm_record(model, cfg.kwargs.get("cache_dir"), config_json=True) \
        if hub.reads_weights(cfg) else None
    return Backbone(model, cfg.name, "hub", hub.data_config(model), digest)


def build_torchvision(cfg: ModelConfig) -> Backbone:
    import torchvision

    if cfg.name not in torchvision_names():
        raise ModelError(unknown_model_message(cfg.name))
    kwargs = model_kwargs(cfg)
    kwargs.pop("in_chans", None)
    weights = "DEFAULT" if cfg.pretrained and not cfg.weights else None
    try:
        model = torchvision.models.get_model(cfg.name, weights=weights, **kwargs)
    except TypeError as exc:
        raise factory_refused(exc, "torchvision", cfg.name, kwargs) from None
    except (OSError, RuntimeError) as exc:
        if weights:
            raise fetch_failed(cfg.name, exc) from None
        raise ModelError(f"torchvision could not build '{cfg.name}': {exc}") from None
    digest = provenance.torchvision_record(cfg.name, model) if weights else None
    return Backbone(model, cfg.name, "torchvision", torchvision_data_config(cfg.name), digest)


def torchvision_data_config(name: str) -> dict:
    """The eval preprocessing of the model's default weights, in timm's data-config terms."""
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
        tf = weights.transforms()
    except (ValueError, AttributeError, TypeError):
        return {}
    crop = tf.crop_size[0]
    resize = tf.resize_size[0] if tf.resize_size else crop
    return {"input_size": (3, crop, crop), "interpolation": tf.interpolation.value,
            "mean": tuple(tf.mean), "std": tuple(tf.std), "crop_pct": crop / resize,
            "crop_mode": "center"}


def build_builtin(cfg: ModelConfig) -> Backbone:
    if cfg.name not in BUILTIN_MODELS:
        raise ModelError(unknown_model_message(cfg.name))
    if cfg.pretrained and not cfg.weights:
        raise ModelError(f"built-in model '{cfg.name}' has no published weights: train it "
                         "(python -m transferlab.finetune) or set 'model.weights: PATH'")
    kwargs = model_kwargs(cfg)
    try:
        model = BUILTIN_MODELS[cfg.name](**kwargs)
    except TypeError as exc:
        raise factory_refused(exc, "built-in", cfg.name, kwargs) from None
    data_config = dict(BUILTIN_DATA_CONFIGS.get(cfg.name, {}))
    if cfg.in_chans:
        data_config["input_size"] = (cfg.in_chans, *data_config["input_size"][1:])
    return Backbone(model, cfg.name, "builtin", data_config)


def build_callable(cfg: ModelConfig) -> Backbone:
    module_name, _, attr = cfg.name.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ModelError(f"cannot import '{cfg.name}' ({exc}); write it as "
                         "'package.module:callable' with the module on PYTHONPATH") from None
    kwargs = model_kwargs(cfg)
    try:
        model = factory(**kwargs)
    except TypeError as exc:
        raise factory_refused(exc, "callable", cfg.name, kwargs) from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"'{cfg.name}' returned {type(model).__name__}, not a torch.nn.Module")
    data_config = dict(getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
                       or {})
    # what the factory loaded is known only by what it built
    digest = provenance.state_record(model) if cfg.pretrained and not cfg.weights else None
    return Backbone(model, cfg.name, "callable", data_config, digest)


def build_open_clip(cfg: ModelConfig) -> Backbone:
    """``open_clip:ARCH[/PRETRAINED]`` (the optional clip extra, imported only when named)."""
    from .openclip_source import openclip_parts as build

    model, data_config, digest, text = build(cfg)
    return Backbone(model, cfg.name, "open_clip", data_config, digest, text)


def build_transformers(cfg: ModelConfig) -> Backbone:
    """``hf:ORG/NAME`` / ``hf:/folder`` (the optional transformers extra)."""
    from .transformers_source import transformers_parts as build

    model, data_config, digest, text = build(cfg)
    return Backbone(model, cfg.name, "transformers", data_config, digest, text)


# One entry per model.source a library builds (a new source: its builder here, its rule in
# resolve_source when 'auto' should find it, and its name in ModelConfig.source).
LIBRARY_BUILDERS: dict[str, Callable[[ModelConfig], Backbone]] = {
    "timm": build_timm,
    "torchvision": build_torchvision,
    "builtin": build_builtin,
    "hub": build_hub,
    "callable": build_callable,
    "open_clip": build_open_clip,
    "transformers": build_transformers,
}


def build_library(cfg: ModelConfig, source: str) -> Backbone:
    """``cfg`` built by the library of ``source`` (no checkpoint, no weights file)."""
    builder = LIBRARY_BUILDERS.get(source)
    if builder is None:
        raise ModelError(f"unknown model source '{source}'; use one of "
                         f"{', '.join(LIBRARY_BUILDERS)} or checkpoint")
    return builder(cfg)

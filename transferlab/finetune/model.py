"""Model resolution: the architecture and weights a fine-tuning run starts from."""
from __future__ import annotations

import dataclasses
from typing import Any

from ..config import ModelConfig
from ..data.preprocess import PreprocessSpec
from ..errors import ModelError
from ..models import hub
from ..models.backbones import Backbone, resolve_source
from ..models.checkpoint import read_meta
from ..models.extractor import load_backbone

# ---------------------------------------------------------------------------------------
# Model resolution
# ---------------------------------------------------------------------------------------


def resolve_arch(cfg: ModelConfig) -> dict:
    """The architecture (ModelConfig dict, random init) that rebuilds the backbone offline."""
    source = resolve_source(cfg.name, cfg.source)
    if source == "checkpoint":
        meta = read_meta(cfg.name) or {}
        arch = dict(meta.get("backbone") or {})
    elif source == "hub":  # timm's registry name and config.json's arguments: no Hub needed
        arch = {**dataclasses.asdict(cfg), **hub.recorded_architecture(cfg)}
    elif source == "transformers":  # the config itself: no folder or Hub needed
        from ..models.transformers_source import recorded_hf_architecture

        arch = {**dataclasses.asdict(cfg), **recorded_hf_architecture(cfg)}
    else:
        arch = {**dataclasses.asdict(cfg), "source": source}
    return {**arch, "pretrained": False, "weights": None}


def check_weights_file(cfg: ModelConfig) -> None:
    """A transferlab checkpoint given as ``model.weights`` must be of the same model."""
    if not cfg.weights or not str(cfg.weights).endswith(".safetensors"):
        return
    meta = read_meta(cfg.weights)
    if not meta:
        return
    if meta.get("format") == "transferlab.classifier":
        raise ModelError(f"model.weights {cfg.weights} is a fine-tuned classifier checkpoint "
                         f"(base + head of '{meta.get('arch', {}).get('name')}'); load it "
                         "with transferlab.load_model or python -m transferlab.predict")
    arch = meta.get("backbone") or {}
    if arch.get("name") and arch["name"] != cfg.name:
        raise ModelError(f"model.weights {cfg.weights} is a checkpoint of model "
                         f"'{arch['name']}', not '{cfg.name}'; set model.name to its path with "
                         "model.source: checkpoint to reuse it, or give weights of "
                         f"'{cfg.name}'")


def build_model(cfg: ModelConfig, preprocess: Any) -> tuple[Backbone, PreprocessSpec]:
    check_weights_file(cfg)
    return load_backbone(cfg, preprocess)




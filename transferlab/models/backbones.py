"""Build a backbone from any source and load its weights.

Sources: timm (any ``timm.list_models()`` name), torchvision (``get_model`` names),
built-in models (``lenet``), the Hub through timm, ``package.module:callable`` returning an
``nn.Module`` (the plain builders of ``library``), or a transferlab checkpoint (``.safetensors``
written by transferlab): this dispatcher sits above the builders and the classifier format, so
imports run one way (library <- recorded <- classifier <- backbones).
"""
from __future__ import annotations

from ..config import ModelConfig
from ..errors import ModelError
from .library import LIBRARY_BUILDERS, Backbone, build_library, resolve_source
from .weights import load_state_dict_file, load_weights_into

# every value of model.source: auto, each library builder, a transferlab checkpoint
# (``inspect --source`` takes them from here; ModelConfig.source lists the same names)
SOURCES = ("auto", *LIBRARY_BUILDERS, "checkpoint")

__all__ = ["SOURCES", "Backbone", "build_backbone", "build_from_checkpoint", "resolve_source"]


def build_backbone(cfg: ModelConfig) -> Backbone:
    """Build the model of ``cfg`` with its weights (hub download, local file or random).

    A checkpoint's recorded architecture runs code only with ``cfg.trust_code``."""
    source = resolve_source(cfg.name, cfg.source)
    if source == "checkpoint":
        backbone = build_from_checkpoint(cfg.name, cfg.trust_code)
    else:
        backbone = build_library(cfg, source)
    if cfg.weights:
        load_weights_into(backbone.model, load_state_dict_file(cfg.weights), cfg.weights)
    return backbone


def build_from_checkpoint(path: str, trust_code: bool = False) -> Backbone:
    """A transferlab checkpoint: a backbone (rebuild the recorded architecture, load its
    weights) or a fine-tuned classifier (its ``base`` then ``head``; cut ``head`` gives the
    base's features)."""
    # loaded here: a run from a library name never needs the checkpoint formats
    from .checkpoint import CLASSIFIER_FORMAT, read_checkpoint
    from .classifier import classifier_from_checkpoint
    from .recorded import rebuild_backbone

    state, meta = read_checkpoint(path)
    if meta.get("format") == CLASSIFIER_FORMAT:
        model = classifier_from_checkpoint(path, state, meta, trust_code)
        return Backbone(model, path, "checkpoint", model.preprocess.to_data_config())
    if not isinstance(meta.get("backbone"), dict):
        raise ModelError(f"{path} is not a transferlab backbone or classifier checkpoint "
                         "(no 'backbone' entry in its metadata); load plain weights with "
                         "'model.weights: PATH'")
    return rebuild_backbone(path, state, meta, trust_code)

"""transferlab: reuse trained networks — frozen feature extraction and head-only fine-tuning."""
from __future__ import annotations

from .config import ExtractConfig, load_config, save_config
from .cuts import CutSpec, FrozenExtractor, list_cut_points, parse_cut
from .errors import (ConfigError, CutError, DataError, ModelError, StoreError,
                     TransferlabError)
from .extractor import ExtractorBundle, build_extractor, extractor_from_config
from .preprocess import PreprocessSpec, build_transform, resolve_preprocess

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "CutError", "CutSpec", "DataError", "ExtractConfig", "ExtractorBundle",
    "FrozenExtractor", "ModelError", "PreprocessSpec", "StoreError", "TransferlabError",
    "build_extractor", "build_transform", "extractor_from_config", "list_cut_points",
    "load_config", "parse_cut", "resolve_preprocess", "save_config",
]

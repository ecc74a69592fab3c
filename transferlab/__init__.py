"""transferlab: reuse trained networks — frozen feature extraction and head-only fine-tuning.

The public API, for notebooks and scripts; each command-line module
(``python -m transferlab.extract`` ...) is a thin wrapper over these functions.
"""
from __future__ import annotations

from . import plots
from .backbones import Backbone, build_backbone
from .config import ExtractConfig, load_config, save_config
from .cluster import KMeansResult, kmeans, run_cluster
from .cuts import CutSpec, FrozenExtractor, list_cut_points, parse_cut
from .datasets import ImageDataset, build_dataset
from .errors import (ConfigError, CutError, DataError, ModelError, StoreError,
                     TransferlabError)
from .extract import ExtractResult, embed_images, run_extract
from .extractor import ExtractorBundle, build_extractor, extractor_from_config
from .neighbors import nearest
from .preprocess import PreprocessSpec, build_transform, resolve_preprocess
from .probe import ProbeResult, fit_logistic, knn_accuracy, run_probe
from .store import FeatureStore, StoreWriter

__version__ = "0.1.0"

__all__ = [
    "Backbone", "ConfigError", "CutError", "CutSpec", "DataError", "ExtractConfig",
    "ExtractResult", "ExtractorBundle", "FeatureStore", "FrozenExtractor", "ImageDataset",
    "ModelError", "PreprocessSpec", "StoreError", "StoreWriter", "TransferlabError",
    "build_backbone", "build_dataset", "build_extractor", "build_transform", "embed_images",
    "extractor_from_config", "list_cut_points", "load_config", "parse_cut",
    "resolve_preprocess", "run_extract", "save_config",
    "KMeansResult", "ProbeResult", "fit_logistic", "kmeans", "knn_accuracy", "nearest",
    "plots", "run_cluster", "run_probe",
]

"""transferlab: reuse trained networks — frozen feature extraction and head-only fine-tuning.

The public API, for notebooks and scripts; each command (``transferlab/commands/``, run as
``transferlab extract`` or ``python -m transferlab.extract`` ...) is a thin wrapper over
these functions. Names are imported on first use, so ``python -m transferlab.X`` starts
without loading every module.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the same names, typed, for mypy and IDEs (tests/test_typing.py)
    from .analysis import plots
    from .analysis.cluster_report import run_cluster
    from .analysis.kmeans import KMeansResult, kmeans
    from .analysis.linear_probe import ProbeResult, fit_logistic
    from .analysis.neighbors import knn_accuracy, nearest, store_nearest
    from .analysis.plots import plot_map
    from .analysis.probe_report import run_probe
    from .config import ExtractConfig, FinetuneConfig, load_config, save_config
    from .data.datasets import ImageDataset
    from .data.preprocess import PreprocessSpec, build_transform, resolve_preprocess
    from .data.sources import build_dataset
    from .errors import (
        ConfigError,
        CutError,
        DataError,
        HeadError,
        ModelError,
        StoreError,
        TransferlabError,
    )
    from .extract.queries import embed_images
    from .extract.runner import ExtractResult, run_extract
    from .finetune.outputs import FinetuneResult
    from .finetune.run import run_finetune
    from .models.backbones import Backbone, build_backbone
    from .models.classifier import Classifier, load_model
    from .models.cuts import CutOutput, CutSpec, FrozenExtractor, list_cut_points, parse_cut
    from .models.engine import FeatureComputer
    from .models.extractor import (
        ExtractorBundle,
        build_extractor,
        extractor_from_config,
        load_backbone,
    )
    from .models.multicut import MultiCutExtractor
    from .store.export_formats import export_store
    from .store.faiss_index import build_index
    from .store.reader import FeatureStore
    from .store.writer import StoreWriter

__version__ = "0.1.0"  # the one source: pyproject.toml reads it, the CLI prints it

# public name -> module that defines it
_EXPORTS = {
    # configs and errors
    "ExtractConfig": "config", "FinetuneConfig": "config", "load_config": "config",
    "save_config": "config",
    "TransferlabError": "errors", "ConfigError": "errors", "ModelError": "errors",
    "CutError": "errors", "DataError": "errors", "StoreError": "errors",
    # backbones, cuts, preprocessing
    "Backbone": "models.backbones", "build_backbone": "models.backbones",
    "CutSpec": "models.cuts", "CutOutput": "models.cuts", "FrozenExtractor": "models.cuts",
    "list_cut_points": "models.cuts", "parse_cut": "models.cuts",
    "MultiCutExtractor": "models.multicut",
    # one builder for one cut (a tensor) or several (a list of tensors, one base pass)
    "ExtractorBundle": "models.extractor", "build_extractor": "models.extractor",
    "extractor_from_config": "models.extractor", "load_backbone": "models.extractor",
    "FeatureComputer": "models.engine",
    "PreprocessSpec": "data.preprocess", "build_transform": "data.preprocess",
    "resolve_preprocess": "data.preprocess",
    # data and stores
    "ImageDataset": "data.datasets", "build_dataset": "data.sources",
    "FeatureStore": "store.reader", "StoreWriter": "store.writer",
    # runners
    "ExtractResult": "extract.runner", "run_extract": "extract.runner",
    "embed_images": "extract.queries",
    "run_finetune": "finetune.run", "FinetuneResult": "finetune.outputs",
    "load_model": "models.classifier", "Classifier": "models.classifier", "HeadError": "errors",
    # downstream
    "ProbeResult": "analysis.linear_probe", "fit_logistic": "analysis.linear_probe",
    "knn_accuracy": "analysis.neighbors", "run_probe": "analysis.probe_report",
    "KMeansResult": "analysis.kmeans", "kmeans": "analysis.kmeans",
    "run_cluster": "analysis.cluster_report", "nearest": "analysis.neighbors",
    "store_nearest": "analysis.neighbors", "export_store": "store.export_formats",
    "build_index": "store.faiss_index", "plot_map": "analysis.plots",
}
# public submodule name -> module
_SUBMODULES = {"plots": "analysis.plots"}

__all__ = sorted([*_EXPORTS, *_SUBMODULES])


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{_SUBMODULES[name]}", __name__)
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'transferlab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])

"""Fine-tuned classifiers: checkpoint format, ``load_model`` and prediction helpers.

A classifier checkpoint is a transferlab checkpoint (safetensors + JSON metadata, written
atomically) holding ``base.*`` (the cut backbone) and ``head.*`` tensors. Its metadata
(``format: transferlab.classifier``) records everything needed to rebuild the module without
pickle or network: ``arch`` (the backbone's ModelConfig, random-init), ``cut``, ``pool``,
``head`` (HeadConfig + sizes), ``class_names``, ``preprocess`` (the resolved spec), the full
``config``, and the stage/epoch/metrics it was saved at.

``load_model`` also accepts the backbone checkpoints written by the pretrain stage (a whole
model with its own classifier and class names). The format constants and the metadata reading
live in ``checkpoint``; what the metadata names is rebuilt within the rules of ``recorded``.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from ..config import HeadConfig
from ..data.imageio import load_image
from ..data.preprocess import DeviceNormalize, PreprocessSpec, build_transform, resolve_preprocess
from ..errors import ModelError
from .checkpoint import CLASSIFIER_FORMAT, read_checkpoint, save_checkpoint
from .heads import cut_with_head
from .library import build_library
from .recorded import rebuild_backbone, recorded_arch, spec_from_meta
from .weights import load_weights_into

ImageLike = Image.Image | str | os.PathLike


class Classifier(nn.Module):
    """``head(base(x))`` on normalised input, with its class names and preprocessing.

    ``forward`` takes what ``transform()`` makes (normalised float NCHW); ``predict`` and
    ``predict_proba`` take PIL images, image paths, or a uint8 NCHW tensor of raw pixels.
    """

    def __init__(self, base: nn.Module, head: nn.Module, class_names: Sequence[str],
                 preprocess: PreprocessSpec, meta: dict | None = None):
        super().__init__()
        self.base = base
        self.head = head
        self.class_names = list(class_names)
        self.preprocess = preprocess
        self.meta = meta or {}
        self.normalize = DeviceNormalize(preprocess.mean, preprocess.std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.base(x))

    def transform(self) -> Callable:
        """PIL image -> the normalised tensor ``forward`` expects."""
        return build_transform(self.preprocess)

    @property
    def device(self) -> torch.device:
        return self.normalize.scale.device

    def pixels(self, images: Sequence[ImageLike] | torch.Tensor) -> torch.Tensor:
        """uint8 NCHW pixels at the model's input size (images decoded and resized)."""
        if isinstance(images, torch.Tensor):
            if images.dtype != torch.uint8 or images.ndim != 4:
                raise ModelError(f"predict takes PIL images, paths, or a uint8 (N, C, H, W) "
                                 f"tensor; got a {images.dtype} tensor of shape "
                                 f"{tuple(images.shape)} (call the model itself on normalised "
                                 "float input)")
            return images
        tf = build_transform(self.preprocess, normalize=False)
        mode, draft = self.preprocess.image_mode, self.preprocess.scale_size()
        out = []
        for im in images:
            if not isinstance(im, Image.Image):
                im = load_image(im, mode, draft)
            elif im.mode != mode:
                im = im.convert(mode)
            out.append(tf(im))
        return torch.stack(out) if out else torch.zeros(0, *self.preprocess.input_size,
                                                        dtype=torch.uint8)

    @torch.inference_mode()
    def predict_proba(self, images: Sequence[ImageLike] | torch.Tensor,
                      batch_size: int = 32) -> torch.Tensor:
        """(N, classes) softmax probabilities, on the CPU."""
        self.eval()
        pixels = self.pixels(images)
        probs = [self(self.normalize(pixels[s:s + batch_size].to(self.device))).float()
                 .softmax(1).cpu() for s in range(0, len(pixels), batch_size)]
        return torch.cat(probs) if probs else torch.zeros(0, len(self.class_names))

    def predict(self, images: Sequence[ImageLike] | torch.Tensor,
                batch_size: int = 32) -> list[tuple[str, float]]:
        """(class name, probability) of the most likely class of each image."""
        probs = self.predict_proba(images, batch_size)
        best, idx = probs.max(1) if len(probs) else (torch.zeros(0), torch.zeros(0, dtype=int))
        return [(self.class_names[int(i)], float(p)) for p, i in zip(best, idx)]


# ---------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------


def classifier_meta(arch: dict, cut: str, pool: str | None, head_cfg: HeadConfig,
                    in_features: int, class_names: Sequence[str], spec: PreprocessSpec,
                    **extra: Any) -> dict:
    """Metadata of a classifier checkpoint (see the module docstring)."""
    return {"format": CLASSIFIER_FORMAT, "arch": arch, "cut": str(cut), "pool": pool,
            "head": {**dataclasses.asdict(head_cfg), "in_features": in_features,
                     "num_classes": len(class_names)},
            "class_names": list(class_names), "preprocess": spec.to_dict(), **extra}


def save_classifier(path: str | Path, base: nn.Module, head: nn.Module, meta: dict) -> Path:
    """Atomic write of ``base.*`` and ``head.*`` tensors with ``meta``."""
    state = {f"base.{k}": v for k, v in base.state_dict().items()}
    state.update({f"head.{k}": v for k, v in head.state_dict().items()})
    return save_checkpoint(path, state, meta)


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------


def load_model(path: str | Path, device: str | torch.device = "cpu",
               trust_code: bool = False) -> Classifier:
    """Rebuild a fine-tuned classifier (or a pretrain-stage backbone) in eval mode.

    The architecture the file records is rebuilt only from timm, torchvision or the built-ins;
    ``trust_code=True`` lets a trusted file name a ``module:callable`` to run."""
    state, meta = read_checkpoint(path)
    return classifier_from_checkpoint(path, state, meta, trust_code).to(device).eval()


def classifier_from_checkpoint(path: str | Path, state: dict[str, torch.Tensor], meta: dict,
                               trust_code: bool = False) -> Classifier:
    """The classifier of an already read checkpoint (tensors and metadata)."""
    if meta.get("format") == CLASSIFIER_FORMAT:
        return _load_classifier(Path(path), state, meta, trust_code)
    if isinstance(meta.get("backbone"), dict):
        return _load_backbone_classifier(Path(path), state, meta, trust_code)
    raise ModelError(f"{path} is a transferlab checkpoint but not a classifier (format "
                     f"{meta.get('format')!r}); load_model reads the model.safetensors "
                     "written by python -m transferlab.finetune")


def _head_meta(meta: dict, path: Path) -> tuple[HeadConfig, int, list[str], str]:
    """(head config, class count, class names, cut) of a classifier's metadata."""
    try:
        head_meta = dict(meta["head"])
        num_classes = int(head_meta.pop("num_classes"))
        head_meta.pop("in_features", None)
        names = meta["class_names"]
        if not isinstance(names, list) or not isinstance(meta["cut"], str):
            raise TypeError("class_names must be a list and cut a string")
        return HeadConfig(**head_meta), num_classes, [str(n) for n in names], meta["cut"]
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{path}: incomplete classifier metadata ({exc}); was it written by "
                         "an older or newer transferlab?") from None


def _load_classifier(path: Path, state: dict[str, torch.Tensor], meta: dict,
                     trust_code: bool) -> Classifier:
    arch = recorded_arch(meta.get("arch"), f"checkpoint {path}", trust_code)
    head_cfg, num_classes, class_names, cut = _head_meta(meta, path)
    spec = spec_from_meta(meta.get("preprocess"), str(path))
    backbone = build_library(arch, arch.source)
    base, head = cut_with_head(backbone.model, cut, meta.get("pool"), spec.input_size,
                               head_cfg, num_classes, arch.name)
    load_part(base, state, "base.", path, arch.name)
    load_part(head, state, "head.", path, arch.name)
    return Classifier(base, head, class_names, spec, meta)


def load_part(module: nn.Module, state: dict[str, torch.Tensor], prefix: str, path: Path,
              model_name: str) -> None:
    """Strictly load ``prefix*`` tensors; a mismatch means the checkpoint is of another model."""
    part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    try:
        load_weights_into(module, part, path)
    except ModelError as exc:
        raise ModelError(f"checkpoint {path} does not hold the weights of the model its "
                         f"metadata names ('{model_name}', {prefix.rstrip('.')}): it comes "
                         f"from another model or was altered. {exc}") from None


def _load_backbone_classifier(path: Path, state: dict[str, torch.Tensor], meta: dict,
                              trust_code: bool) -> Classifier:
    names = meta.get("class_names")
    if not names or not isinstance(names, list):
        raise ModelError(f"{path} is a backbone checkpoint without class names; fine-tune a "
                         "head on it (model.name: PATH, model.source: checkpoint) to get a "
                         "classifier")
    backbone = rebuild_backbone(path, state, meta, trust_code)
    spec = (spec_from_meta(meta["preprocess"], str(path)) if meta.get("preprocess") is not None
            else resolve_preprocess(backbone.data_config))
    return Classifier(nn.Identity(), backbone.model, [str(n) for n in names], spec, meta)

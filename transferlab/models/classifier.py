"""The classifier (normalise -> base -> head): trained, saved, loaded (``load_model``), used.

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
import itertools
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from PIL import Image
from torch import nn

from ..config import MAX_CLASSES, HeadConfig, RuntimeConfig
from ..data.datasets import read_batch
from ..data.imageio import load_image
from ..data.preprocess import DeviceNormalize, PreprocessSpec, build_transform, resolve_preprocess
from ..errors import ConfigError, ModelError
from ..runtime.device import Runtime, resolve_runtime
from ..runtime.untrusted import claimed_size
from ..yamlsafe import shown
from .checkpoint import CLASSIFIER_FORMAT, read_checkpoint, save_checkpoint
from .engine import FeatureComputer, Pending, engine_batch_size
from .heads import cut_with_head
from .library import build_library
from .recorded import rebuild_backbone, recorded_arch, spec_from_meta
from .weights import load_weights_into

ImageLike = Image.Image | str | os.PathLike
Tag = TypeVar("Tag")


class Classifier(nn.Module):
    """normalise -> base -> head, with its class names and preprocessing: the one network
    that fine-tuning trains and saves and ``load_model`` rebuilds.

    ``base`` None: ``head`` is a whole model (the pretrain stage, a backbone checkpoint). A
    frozen base (a ``FrozenExtractor``) stays in eval mode and runs through the frozen-forward
    engine (``models.engine``); ``unfreeze_last`` lets its last layers train. ``runtime`` is
    the resolved runtime of a training run (None: ``inference_runtime()``). ``forward`` takes
    what ``transform()`` makes (normalised float NCHW); ``logits`` takes uint8 images or base
    features (training); ``predict`` and ``predict_proba`` take PIL images, image paths, or
    a uint8 NCHW tensor of raw pixels.
    """

    def __init__(self, base: nn.Module | None, head: nn.Module, class_names: Sequence[str],
                 preprocess: PreprocessSpec, meta: dict | None = None,
                 runtime: Runtime | None = None):
        super().__init__()
        self.base = base
        self.head = head
        self.class_names = list(class_names)
        self.preprocess = preprocess
        self.meta = meta or {}
        self.normalize = DeviceNormalize(preprocess.mean, preprocess.std)
        self.runtime = runtime
        self.base_trainable = False  # True in the partial-unfreeze phase
        self.unfrozen: list[nn.Module] = []  # base modules that train (train mode) with it
        self._frozen_base: FeatureComputer | None = None  # the base's engine, on first use

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.base(x) if self.base is not None else x)

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)  # a FrozenExtractor base stays in eval mode
        for module in self.unfrozen:
            module.train(mode)
        return self

    def transform(self) -> Callable:
        """PIL image -> the normalised tensor ``forward`` expects."""
        return build_transform(self.preprocess)

    @property
    def device(self) -> torch.device:
        return self.normalize.scale.device

    def inference_runtime(self, config: RuntimeConfig | None = None,
                          sample_load: bool = False) -> Runtime:
        """``config`` (default: the defaults on the model's device: precision auto, threads
        of the free cores) resolved for this model as extraction resolves it (channels_last
        for conv nets). Nothing is applied to the process (``runtime.device.apply_runtime``
        does that for a command)."""
        config = config or RuntimeConfig(device=str(self.device))
        conv_net = any(isinstance(m, nn.Conv2d) for m in self.modules())
        return resolve_runtime(config, conv_net, sample_load)

    def base_engine(self, runtime: Runtime | None = None,
                    fold_bn: bool = False) -> FeatureComputer:
        """The engine over the base: uint8 images -> base outputs (``fold_bn``: over a folded
        copy, for passes that only read it, such as the fine-tune cache). The modes are left
        as they are (a training step runs it): call ``eval()`` first where layers were
        unfrozen."""
        base = self.base if self.base is not None else nn.Identity()
        return FeatureComputer(base, self.preprocess, runtime or self.default_runtime(),
                               fold_bn=fold_bn)

    def engine(self, runtime: Runtime | None = None, fold_bn: bool = True) -> FeatureComputer:
        """The engine over the whole classifier: uint8 images -> class scores. Where nothing
        is folded the engine runs this module itself, moved to the runtime's device and
        layout (channels_last: the same weights, another memory order)."""
        self.eval()
        return FeatureComputer(self, self.preprocess, runtime or self.default_runtime(),
                               fold_bn=fold_bn)

    def batch_size(self, runtime: Runtime, requested: int | None = None) -> int:
        """``requested``, else the automatic batch of this network's passes without
        gradients with ``runtime`` (extraction's rule: ``engine.engine_batch_size``)."""
        return engine_batch_size(self, self.preprocess.input_size, runtime, requested)

    def default_runtime(self) -> Runtime:
        """The training run's ``runtime``, else ``inference_runtime()``."""
        return self.runtime if self.runtime is not None else self.inference_runtime()

    # -- training -------------------------------------------------------------------------

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Base output for uint8 images; a frozen base runs through its engine (no autograd)."""
        if self.base is not None and not self.base_trainable:
            if self._frozen_base is None:
                self._frozen_base = self.base_engine()
            return self._frozen_base.forward(images)[0].clone()  # a tensor autograd may save
        x = self.normalize(images)
        if self.runtime is not None and self.runtime.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.base(x) if self.base is not None else x

    def logits(self, x: torch.Tensor, kind: str = "images") -> torch.Tensor:
        """Class scores of uint8 images (``kind`` 'images') or of base outputs ('features')."""
        return self.head(self.features(x) if kind == "images" else x)

    def base_layers(self) -> list[tuple[str, nn.Module]]:
        """Top-level layers of the cut base that hold parameters, in call order (what
        ``unfreeze.layers`` counts from the end); the cut knows its layers."""
        layers = self.base.layers(self.preprocess.input_size)
        if layers is None:
            raise ConfigError("unfreeze.layers is not available for a layer cut at a graph "
                              "node; cut at a module name (layer:NAME) or use first:N / head")
        return [(n, m) for n, m in layers if any(True for _ in m.parameters())]

    def unfreeze_last(self, layers: Sequence[tuple[str, nn.Module]], count: int,
                      train_bn: bool) -> list[str]:
        """Make the last ``count`` of ``layers`` trainable; returns their names."""
        chosen = list(layers)[-count:] if count > 0 else []
        for _, module in chosen:
            module.requires_grad_(True)
        self.base_trainable = bool(chosen)
        self.unfrozen = []
        for _, module in chosen:
            for sub in module.modules():
                is_bn = isinstance(sub, nn.modules.batchnorm._BatchNorm)
                if not list(sub.children()) and (train_bn or not is_bn):
                    self.unfrozen.append(sub)
        return [name for name, _ in chosen]

    # -- prediction -----------------------------------------------------------------------

    def pixel_batches(self, images: Iterable[ImageLike] | torch.Tensor, batch_size: int,
                      threads: int = 1) -> Iterator[torch.Tensor]:
        """uint8 NCHW batches at the model's input size, each decoded (by ``threads``
        threads, ``read_batch``) only when the one before it has been taken."""
        if isinstance(images, torch.Tensor):
            if images.dtype != torch.uint8 or images.ndim != 4:
                raise ModelError(f"predict takes PIL images, paths, or a uint8 (N, C, H, W) "
                                 f"tensor; got a {images.dtype} tensor of shape "
                                 f"{tuple(images.shape)} (call the model itself on normalised "
                                 "float input)")
            yield from images.split(batch_size)
            return
        tf = build_transform(self.preprocess, normalize=False)
        mode, draft = self.preprocess.image_mode, self.preprocess.scale_size()

        def pixels(im: ImageLike) -> torch.Tensor:
            if not isinstance(im, Image.Image):
                im = load_image(im, mode, draft)
            elif im.mode != mode:
                im = im.convert(mode)
            return tf(im)

        items = iter(images)
        while chunk := list(itertools.islice(items, batch_size)):
            yield torch.stack(read_batch(lambda i: pixels(chunk[i]), range(len(chunk)),
                                         threads))

    def proba_batches(self, batches: Iterable[tuple[torch.Tensor, Tag]],
                      engine: FeatureComputer) -> Iterator[tuple[torch.Tensor, Tag]]:
        """(softmax probabilities on the CPU, tag) of each (uint8 batch, tag), computed by
        ``engine`` (``engine()``); batch i + 1 is started before batch i is finished, and
        only the probabilities are kept."""
        pending = None
        for pixels, tag in batches:
            started = engine.start(pixels), tag
            if pending is not None:
                yield probabilities(engine, *pending)
            pending = started
        if pending is not None:
            yield probabilities(engine, *pending)

    def predict_proba(self, images: Iterable[ImageLike] | torch.Tensor,
                      batch_size: int | None = None, runtime: Runtime | None = None,
                      fold_bn: bool = True) -> torch.Tensor:
        """(N, classes) softmax probabilities, on the CPU. Images are decoded (by the
        runtime's threads) and run a batch at a time through the engine with ``runtime``
        (default ``default_runtime()``; the batch size by default extraction's for it);
        ``fold_bn`` runs a copy with its BatchNorms folded, made once per call."""
        rt = runtime or self.default_runtime()
        batches = self.pixel_batches(images, self.batch_size(rt, batch_size), rt.threads)
        probs = [p for p, _ in self.proba_batches(((b, None) for b in batches),
                                                   self.engine(rt, fold_bn))]
        return torch.cat(probs) if probs else torch.zeros(0, len(self.class_names))

    def predict(self, images: Iterable[ImageLike] | torch.Tensor,
                batch_size: int | None = None, runtime: Runtime | None = None,
                fold_bn: bool = True) -> list[tuple[str, float]]:
        """(class name, probability) of the most likely class of each image."""
        probs = self.predict_proba(images, batch_size, runtime, fold_bn)
        best, idx = probs.max(1) if len(probs) else (torch.zeros(0), torch.zeros(0, dtype=int))
        return [(self.class_names[int(i)], float(p)) for p, i in zip(best, idx)]


def probabilities(engine: FeatureComputer, pending: Pending, tag: Tag) -> tuple[torch.Tensor,
                                                                                Tag]:
    """Softmax probabilities of a started batch of class scores, and its tag."""
    return torch.from_numpy(engine.finish(pending)[0]).softmax(1), tag


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
    check_head_sizes(state, head_cfg, num_classes, class_names, path)
    backbone = build_library(arch, arch.source)
    base, head = cut_with_head(backbone.model, cut, meta.get("pool"), spec.input_size,
                               head_cfg, num_classes, arch.name)
    load_part(base, state, "base.", path, arch.name)
    load_part(head, state, "head.", path, arch.name)
    return Classifier(base, head, class_names, spec, meta)


def _module_order(key: str) -> list[tuple[int, int | str]]:
    """Sort key of a state-dict name in module order ('head.10' after 'head.2')."""
    return [(0, int(p)) if p.isdigit() else (1, p) for p in key.split(".")]


def check_head_sizes(state: dict[str, torch.Tensor], head_cfg: HeadConfig, num_classes: int,
                     class_names: Sequence[str], path: Path) -> None:
    """The head sizes the metadata claims (class count, class names, mlp hidden sizes)
    against the shapes of the head's own tensors, before anything is built from them: a
    claim of 5,000,000 classes in the metadata of a 2-class checkpoint is one line, not a
    40 GB allocation."""
    origin = f"checkpoint {path}"
    fix = "it was altered or not written by transferlab (re-save it with python -m " \
          "transferlab.finetune)"
    claimed_size(num_classes, MAX_CLASSES, f"{origin}: head num_classes", ModelError, 2)
    if len(class_names) != num_classes:
        raise ModelError(f"{origin} names {len(class_names):,} classes but its head has "
                         f"{num_classes:,}; {fix}")
    weights = sorted((k for k, v in state.items() if k.startswith("head.")
                      and k.endswith(".weight") and v.ndim == 2), key=_module_order)
    outs = [int(state[k].shape[0]) for k in weights]
    if head_cfg.type in ("linear", "mlp"):
        hidden = list(head_cfg.hidden) if head_cfg.type == "mlp" else []
        expected = [*hidden, num_classes]
    else:  # keep: the model's own layers; the last Linear gives the classes
        expected = [*outs[:-1], num_classes]
    if outs != expected:
        raise ModelError(f"{origin}: its metadata claims a {head_cfg.type} head of output "
                         f"sizes {shown(expected)}, its head weights have {shown(outs)}; {fix}")


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
    return Classifier(None, backbone.model, [str(n) for n in names], spec, meta)

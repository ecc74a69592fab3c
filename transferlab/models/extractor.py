"""One call from a model name (or config) to a frozen extractor and its preprocessing."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from torch import nn

from ..config import ModelConfig, PreprocessConfig
from ..data.preprocess import PreprocessSpec, build_transform, resolve_preprocess
from .backbones import Backbone, build_backbone
from .cuts import FrozenExtractor, make_extractor


@dataclass
class ExtractorBundle:
    """What a runner needs: the frozen extractor, its preprocessing, the backbone it came from."""

    extractor: FrozenExtractor
    spec: PreprocessSpec
    backbone: Backbone

    def transform(self, normalize: bool = True, augment: bool = False) -> Callable:
        return build_transform(self.spec, normalize=normalize, augment=augment)


def model_in_chans(model: nn.Module) -> int | None:
    """Input channels of the first conv/linear-on-image layer, when it can be seen."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    return None


def extractor_from_config(model_cfg: ModelConfig,
                          preprocess_cfg: PreprocessConfig | None = None) -> ExtractorBundle:
    """Build backbone + weights, resolve preprocessing, cut and freeze (validated)."""
    backbone = build_backbone(model_cfg)
    spec = resolve_preprocess(backbone.data_config, preprocess_cfg,
                              model_in_chans(backbone.model))
    extractor = make_extractor(backbone.model, model_cfg.cut, model_cfg.pool, spec.input_size,
                               model_cfg.name)
    return ExtractorBundle(extractor, spec, backbone)


@dataclass(frozen=True)
class BuiltExtractor:
    """What ``build_extractor`` returns: unpacks as ``extractor, transform``; ``spec`` is the
    resolved preprocessing (declared here rather than set on the module)."""

    extractor: FrozenExtractor
    transform: Callable
    spec: PreprocessSpec

    def __iter__(self) -> Iterator:
        return iter((self.extractor, self.transform))


def build_extractor(name: str, cut: str = "head", pool: str | None = None,
                    pretrained: bool = False, weights: str | None = None, source: str = "auto",
                    preprocess: PreprocessConfig | dict | None = None, trust_code: bool = False,
                    **model_kwargs) -> BuiltExtractor:
    """Notebook entry point: ``extractor, transform = build_extractor("legacy_xception")``.

    ``extractor`` is an ``nn.Module`` whose parameters are frozen and which stays in eval
    mode; ``transform`` maps a PIL image to the normalised tensor the weights expect.
    ``model_kwargs`` (num_classes, in_chans, or factory kwargs) go to the model factory.
    ``trust_code`` lets a trusted checkpoint named by ``name`` run the code it records.
    """
    known = {k: model_kwargs.pop(k) for k in ("num_classes", "in_chans") if k in model_kwargs}
    model_cfg = ModelConfig(name=name, source=source, pretrained=pretrained, weights=weights,
                            cut=cut, pool=pool, kwargs=model_kwargs, trust_code=trust_code,
                            **known)
    if isinstance(preprocess, dict):
        preprocess = PreprocessConfig(**preprocess)
    bundle = extractor_from_config(model_cfg, preprocess)
    return BuiltExtractor(bundle.extractor, bundle.transform(), bundle.spec)

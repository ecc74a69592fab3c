"""One call from a model name (or config) to a frozen extractor and its preprocessing, for
one cut or several (as timm's ``features_only`` and torchvision's
``create_feature_extractor``: one builder, a list of cuts gives a list of outputs)."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..config import ModelConfig, PreprocessConfig
from ..data.preprocess import PreprocessSpec, build_transform, resolve_preprocess
from .backbones import Backbone, build_backbone
from .cuts import CutOutput, FrozenExtractor, make_extractor
from .multicut import MultiCutExtractor, cut_dirs, is_multi_cut, make_multi_extractor

# one cut: a FrozenExtractor (one tensor; BatchNorm foldable by torch.fx, compilable);
# a list of cuts or a named set: a MultiCutExtractor (a list of tensors, one base pass,
# hooks). Both list their outputs (``outputs``, ``feature_dims``) alike.
Extractor = FrozenExtractor | MultiCutExtractor


@dataclass
class ExtractorBundle:
    """What a runner needs: the frozen extractor, its preprocessing, the backbone it came from."""

    extractor: Extractor
    spec: PreprocessSpec
    backbone: Backbone

    @property
    def outputs(self) -> list[CutOutput]:
        return self.extractor.outputs

    @property
    def dirs(self) -> list[str]:
        """The store directory name of each cut (several cuts: one store per cut)."""
        return cut_dirs([o.cut for o in self.outputs])

    def transform(self, normalize: bool = True, augment: bool = False) -> Callable:
        return build_transform(self.spec, normalize=normalize, augment=augment)


def model_in_chans(model: nn.Module) -> int | None:
    """Input channels of the first conv/linear-on-image layer, when it can be seen."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    return None


def load_backbone(model_cfg: ModelConfig, preprocess_cfg: PreprocessConfig | None = None
                  ) -> tuple[Backbone, PreprocessSpec]:
    """The backbone with its weights and the preprocessing resolved for it (the config's
    choices over the model's own data config)."""
    backbone = build_backbone(model_cfg)
    spec = resolve_preprocess(backbone.data_config, preprocess_cfg,
                              model_in_chans(backbone.model))
    return backbone, spec


def extractor_from_config(model_cfg: ModelConfig,
                          preprocess_cfg: PreprocessConfig | None = None) -> ExtractorBundle:
    """Build backbone + weights, resolve preprocessing, cut and freeze (validated by one
    dummy pass). ``model_cfg.cut`` a list or a named set: one output per cut."""
    backbone, spec = load_backbone(model_cfg, preprocess_cfg)
    make = make_multi_extractor if is_multi_cut(model_cfg.cut) else make_extractor
    extractor = make(backbone.model, model_cfg.cut, model_cfg.pool, spec.input_size,
                     model_cfg.name)
    return ExtractorBundle(extractor, spec, backbone)


@dataclass(frozen=True)
class BuiltExtractor:
    """What ``build_extractor`` returns: unpacks as ``extractor, transform``; ``spec`` is the
    resolved preprocessing (declared here rather than set on the module)."""

    extractor: Extractor
    transform: Callable
    spec: PreprocessSpec

    def __iter__(self) -> Iterator:
        return iter((self.extractor, self.transform))


def build_extractor(name: str, cut: Any = "head", pool: Any = None,
                    pretrained: bool = False, weights: str | None = None, source: str = "auto",
                    preprocess: PreprocessConfig | dict | None = None, trust_code: bool = False,
                    **model_kwargs) -> BuiltExtractor:
    """Notebook entry point: ``extractor, transform = build_extractor("legacy_xception")``.

    ``extractor`` is an ``nn.Module`` whose parameters are frozen and which stays in eval
    mode; ``transform`` maps a PIL image to the normalised tensor the weights expect.
    ``cut`` one cut (``"head"``, ``"stage:2"``): ``extractor(x)`` is one tensor. A list of
    cuts or a named set (``["stage:1", "head"]``, ``"all-stages"``): one pass of the base,
    ``extractor(x)`` a list of tensors, one per cut; ``pool`` then is one pool for all, a
    list, or a mapping from cut to pool. ``extractor.outputs`` describes each output.
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

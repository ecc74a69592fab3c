"""The trained network: normalisation, (frozen) base and head together."""
from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..data.preprocess import DeviceNormalize, PreprocessSpec
from ..errors import ConfigError
from ..runtime.device import frozen_forward

# ---------------------------------------------------------------------------------------
# The trained network
# ---------------------------------------------------------------------------------------


class Network(nn.Module):
    """normalise -> base -> head. ``base`` None trains a whole model (the pretrain stage)."""

    def __init__(self, base: nn.Module | None, head: nn.Module, spec: PreprocessSpec,
                 channels_last: bool = False):
        super().__init__()
        self.base = base
        self.head = head
        self.normalize = DeviceNormalize(spec.mean, spec.std)
        self.input_size = tuple(spec.input_size)  # (C, H, W) the base sees
        self.channels_last = channels_last
        self.base_trainable = False  # True in the partial-unfreeze phase
        self.unfrozen: list[nn.Module] = []  # base modules that train (train mode) with it

    def train(self, mode: bool = True) -> Network:
        super().train(mode)  # a FrozenExtractor base stays in eval mode
        for module in self.unfrozen:
            module.train(mode)
        return self

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        x = self.normalize(images)
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Base output for uint8 images; no autograd through a frozen base."""
        x = self.prepare(images)
        if self.base is None:
            return x
        if self.base_trainable:
            return self.base(x)
        with frozen_forward():  # under the caller's autocast
            out = self.base(x)
        return out.clone()  # a normal tensor the head may save for backward

    def forward(self, x: torch.Tensor, kind: str = "images") -> torch.Tensor:
        return self.head(self.features(x) if kind == "images" else x)



def state_digest(module: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """A short hash of a module's weights (or of a state dict): cached features belong to
    exactly these weights; processes that trained together hold the same ones."""
    h = hashlib.sha256()
    state = module.state_dict() if isinstance(module, nn.Module) else module
    for name, tensor in sorted(state.items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def unfreeze_last(net: Network, layers: Sequence[tuple[str, nn.Module]], count: int,
                  train_bn: bool) -> list[str]:
    """Make the last ``count`` of ``layers`` trainable; returns their names."""
    chosen = list(layers)[-count:] if count > 0 else []
    for _, module in chosen:
        module.requires_grad_(True)
    net.base_trainable = bool(chosen)
    net.unfrozen = []
    for _, module in chosen:
        for sub in module.modules():
            is_bn = isinstance(sub, nn.modules.batchnorm._BatchNorm)
            if not list(sub.children()) and (train_bn or not is_bn):
                net.unfrozen.append(sub)
    return [name for name, _ in chosen]


def base_layers(base: nn.Module, input_size: Sequence[int]) -> list[tuple[str, nn.Module]]:
    """Top-level layers of a cut base that hold parameters, in call order (what
    ``unfreeze.layers`` counts from the end); the cut knows its layers."""
    layers = base.layers(input_size)
    if layers is None:
        raise ConfigError("unfreeze.layers is not available for a layer cut at a graph node; "
                          "cut at a module name (layer:NAME) or use first:N / head")
    return [(n, m) for n, m in layers if any(True for _ in m.parameters())]

"""Hook-based cuts as ``torch.fx`` graphs, for ``torch.compile``.

A ``TapModule`` stops the forward pass with a hook that raises; compiling that means graph
breaks at every call (an eager fallback, or recompiles). The same cut as an fx graph that
ends at the cut module computes the same values and compiles as one graph.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .cuts import TapModule


class GraphTap(nn.Module):
    """The model's graph up to (and returning) the output of ``module_name``."""

    def __init__(self, tap: TapModule):
        super().__init__()
        from timm.models._features_fx import create_feature_extractor  # timm's leaf rules

        self.module_name = tap.module_name
        self.graph = create_feature_extractor(tap.model, {tap.module_name: "out"})

    def forward(self, x: torch.Tensor) -> Any:
        return self.graph(x)["out"]


def compilable(extractor: nn.Module) -> nn.Module:
    """``extractor``, or a shallow copy whose ``TapModule`` body is its fx graph; a model
    fx cannot trace is a one-line ConfigError (the hook cut cannot be compiled)."""
    body = getattr(extractor, "body", None)
    if not isinstance(body, TapModule):
        return extractor
    try:
        graph = GraphTap(body)
    except Exception as exc:
        raise ConfigError(f"runtime.compile cannot compile the cut at '{body.module_name}' "
                          f"(torch.fx cannot trace this model: {type(exc).__name__}); set "
                          "runtime.compile=false or choose model.cut=head") from None
    out = copy.copy(extractor)
    out._modules = dict(extractor._modules)  # the copy gets its own body, the original keeps its
    out.body = graph
    return out

"""Fold frozen BatchNorm layers into the convolution before them: the same function with
one pass over the activations less (7-10% faster CPU forward passes, BENCHMARKS.md)."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

# exact types only (as torch.fx's fuse matches them): timm's BatchNormAct2d subclasses
# BatchNorm2d but also applies an activation, which folding would drop
FOLDABLE = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def fold_batchnorm(model: nn.Module, input_size: Sequence[int], rtol: float = 1e-4
                   ) -> nn.Module:
    """A copy of eval-mode ``model`` whose BatchNorms that only follow a conv (or linear)
    layer are folded into its weights, or ``model`` itself when there is nothing to fold,
    its forward cannot be traced by ``torch.fx``, or the copy's output on a random input of
    ``input_size`` differs from the model's by more than ``rtol`` of its largest value."""
    if model.training or not any(type(m) in FOLDABLE for m in model.modules()):
        return model
    from torch.fx.experimental.optimization import fuse

    try:
        folded = fuse(model, inplace=False)
    except Exception as exc:
        log.debug("BatchNorm not folded (%s: %s)", type(exc).__name__, exc)
        return model
    device = next(model.parameters()).device
    x = torch.randn(1, *input_size, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.inference_mode():
        want, got = model(x), folded(x)
    if not _close(want, got, rtol):
        log.debug("BatchNorm not folded: the folded model's output differs")
        return model
    return folded


def _close(want: Any, got: Any, rtol: float) -> bool:
    """One output or a list of them (several cuts), each within ``rtol`` of its largest."""
    if isinstance(want, torch.Tensor):
        want, got = [want], [got] if isinstance(got, torch.Tensor) else None
    if not isinstance(got, (list, tuple)) or len(got) != len(want):
        return False
    for w, g in zip(want, got):
        scale = float(w.abs().max()) if w.numel() else 0.0
        if g.shape != w.shape or not torch.allclose(g, w, rtol=0.0, atol=rtol * scale + 1e-6):
            return False
    return True

"""Built-in models, by name. Each factory takes ``num_classes`` and ``in_chans``."""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .lenet import LENET_DATA_CONFIG, lenet

BUILTIN_MODELS: dict[str, Callable[..., nn.Module]] = {"lenet": lenet}
BUILTIN_DATA_CONFIGS: dict[str, dict] = {"lenet": LENET_DATA_CONFIG}

__all__ = ["BUILTIN_MODELS", "BUILTIN_DATA_CONFIGS", "lenet"]

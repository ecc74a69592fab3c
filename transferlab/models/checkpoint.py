"""transferlab checkpoints: one .safetensors file of tensors plus JSON metadata.

The metadata records how to rebuild the module (``backbone``: a ModelConfig dict; other
entries such as cut, head and config are added by the fine-tune runner), so no pickle is
ever needed to restore it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import ModelError
from ..runtime.atomicfile import replaced

META_KEY = "transferlab"


def save_checkpoint(path: str | Path, state: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write atomically: a killed run leaves the previous checkpoint intact."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    with replaced(path) as tmp:
        save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta)})
    return path


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a transferlab checkpoint."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types
        raise ModelError(f"cannot read checkpoint {path}: {exc}") from None
    if raw is None:
        raise ModelError(f"{path} is a safetensors file but not a transferlab checkpoint; "
                         "use it as 'model.weights: PATH' instead")
    return state, json.loads(raw)

"""Read weights files safely (safetensors or ``torch.load(weights_only=True)``) and load them
into a model, accepting the key layouts timm and torchvision write."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..errors import ModelError
from .checkpoint import one_line

PICKLE_SUFFIXES = (".pkl", ".pickle")
# Checkpoint dicts nest the state dict under one of these keys (timm train.py, DDP, lightning...)
NESTED_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model", "module", "net")
STRIPPED_PREFIXES = ("module.", "_orig_mod.", "model.")


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} dict from a .safetensors / .pth / .pt / .bin file; never unpickles."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"weights file not found: {path}")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelError(f"{path} is a pickle file, which transferlab never loads (unpickling "
                         "runs code); save the weights with safetensors (save_file("
                         "model.state_dict(), 'w.safetensors')) or torch.save(state_dict)")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise ModelError(f"cannot read safetensors file {path}: {one_line(exc)}") from None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling refused or corrupt file; torch's message spans lines
        raise ModelError(f"cannot read weights file {path} with weights_only=True "
                         f"({one_line(exc)}); save plain tensors (model.state_dict()) or "
                         "convert it to .safetensors") from None
    return unwrap_state_dict(data, path)


def unwrap_state_dict(data: object, path: Path | str) -> dict[str, torch.Tensor]:
    for key in NESTED_KEYS:
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
            break
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ModelError(f"{path} holds no state dict of tensors")
    return dict(data)


def strip_prefixes(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Drop wrapper prefixes ('module.' of DDP, '_orig_mod.' of torch.compile) when needed."""
    for prefix in STRIPPED_PREFIXES:
        if state and not (set(state) & expected) and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_weights_into(model: nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> None:
    """Load ``state`` strictly; mismatches raise a ModelError that lists them."""
    expected = model.state_dict()
    state = strip_prefixes(state, set(expected))
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            parts.append("shape mismatch " + "; ".join(shapes[:3]))
        raise ModelError(f"weights in {source} do not fit the model: {'; '.join(parts)}. "
                         "Check model.name, model.num_classes and model.in_chans.")
    model.load_state_dict(state, strict=True)

"""transferlab checkpoints: one .safetensors file of tensors plus JSON metadata.

The metadata records how to rebuild the module (``backbone``: a ModelConfig dict; other
entries such as cut, head and config are added by the fine-tune runner), so no pickle is
ever needed to restore it. Metadata is data written by anyone: it is parsed here into a dict
(or a one-line ModelError), and what it names is rebuilt within the trust rules of
``recorded``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import ModelError
from ..runtime.atomicfile import replaced

META_KEY = "transferlab"
CLASSIFIER_FORMAT = "transferlab.classifier"  # base.* + head.* of a fine-tuned classifier
BACKBONE_FORMAT = "transferlab.backbone"  # a whole model (pretrain stage), ``backbone`` arch


def save_checkpoint(path: str | Path, state: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write atomically: a killed run leaves the previous checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    with replaced(path) as tmp:
        save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta)})
    return path


def parse_meta(raw: str, path: str | Path) -> dict:
    """The metadata JSON as a dict; anything else is one ModelError line."""
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        raise ModelError(f"checkpoint {path} has unreadable metadata (not JSON: {exc}); it "
                         "was altered or not written by transferlab: re-save it with "
                         "python -m transferlab.finetune") from None
    if not isinstance(meta, dict):
        raise ModelError(f"checkpoint {path} has metadata of type {type(meta).__name__}, not "
                         "a JSON object; it was altered or not written by transferlab: "
                         "re-save it with python -m transferlab.finetune")
    return meta


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a transferlab checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types
        raise ModelError(f"cannot read checkpoint {path}: {one_line(exc)}") from None
    if raw is None:
        raise ModelError(f"{path} is a safetensors file but not a transferlab checkpoint; "
                         "use it as 'model.weights: PATH' instead")
    return state, parse_meta(raw, path)


def read_meta(path: str | Path) -> dict | None:
    """The transferlab metadata of a safetensors file without loading its tensors (None when
    it has none or is not a safetensors file)."""
    if not Path(path).is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
    except Exception:
        return None
    return parse_meta(raw, path) if raw else None


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message (library messages span lines)."""
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__

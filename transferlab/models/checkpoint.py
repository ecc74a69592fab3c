"""transferlab checkpoints: one .safetensors file of tensors plus JSON metadata.

The metadata records how to rebuild the module (``backbone``: a ModelConfig dict; other
entries such as cut, head and config are added by the fine-tune runner), so no pickle is
ever needed to restore it. Metadata is data written by anyone: it is parsed here into a dict
(or a one-line ModelError), and what it names is rebuilt within the trust rules of
``recorded``.
"""
from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import ModelError
from ..runtime.atomicfile import replaced
from ..runtime.untrusted import file_size, open_untrusted
from ..yamlsafe import loads_json

META_KEY = "transferlab"
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the JSON header
CLASSIFIER_FORMAT = "transferlab.classifier"  # base.* + head.* of a fine-tuned classifier
BACKBONE_FORMAT = "transferlab.backbone"  # a whole model (pretrain stage), ``backbone`` arch


def save_checkpoint(path: str | Path, state: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write atomically: a killed run leaves the previous checkpoint intact. The metadata
    gains ``versions`` (transferlab's and the libraries') as every store's does."""
    from ..store.format import library_versions

    meta = {**meta, "versions": {**library_versions(), **meta.get("versions", {})}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    with replaced(path) as tmp:
        save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta)})
    return path


def parse_meta(raw: str, path: str | Path) -> dict:
    """The metadata JSON as a dict; anything else (not JSON, nested deeper than metadata
    can need) is one ModelError line."""
    fix = ("it was altered or not written by transferlab: re-save it with python -m "
           "transferlab.finetune")
    meta = loads_json(raw, f"checkpoint {path}: the metadata", ModelError)
    if not isinstance(meta, dict):
        raise ModelError(f"checkpoint {path} has metadata of type {type(meta).__name__}, not "
                         f"a JSON object; {fix}")
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


def safetensors_shapes(path: str | Path, root: str | Path | None = None
                       ) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} of a safetensors file, read from its JSON header alone (nothing
    loaded, nothing mapped; a regular file only, a link leaving ``root`` refused)."""
    what = "weights file"
    with open_untrusted(path, what, ModelError, root) as f:
        size = file_size(f)
        head = f.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < length <= min(MAX_HEADER_BYTES, size - 8):
            raise ModelError(f"{what} {path} is not a safetensors file (its header claims "
                             f"{length:,} bytes of a {size:,}-byte file)")
        header = loads_json(f.read(length), f"{what} {path}: the header", ModelError)
    if not isinstance(header, dict):
        raise ModelError(f"{what} {path} has an unreadable safetensors header")
    shapes = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not isinstance(shape, list) or not all(isinstance(n, int) for n in shape):
            raise ModelError(f"{what} {path} has an unreadable safetensors header (tensor "
                             f"{str(name)[:80]!r})")
        shapes[name] = tuple(shape)
    return shapes


def check_witness(shapes: Mapping[str, Sequence[int]], rows: int, what: str,
                  origin: str) -> None:
    """ModelError unless a classifier weight of the file has ``rows`` outputs (a Linear's
    (rows, in) or a 1x1 convolution's (rows, in, 1, 1)): a size the metadata claims for a
    layer must be one the file's own tensors hold (checked on their shapes, before the model
    that would allocate it is built)."""
    def fits(shape: Sequence[int]) -> bool:
        return (len(shape) == 2 or (len(shape) == 4 and tuple(shape[2:]) == (1, 1))) \
            and shape[0] == rows

    if not any(fits(shape) for shape in shapes.values()):
        raise ModelError(f"{origin} claims {what} {rows:,}, but none of its weights has "
                         f"{rows:,} rows; it was altered or not written by transferlab or "
                         "timm")

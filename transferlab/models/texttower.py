"""The text tower a CLIP-family image embedding pairs with (``Backbone.text_tower``, a
store's ``meta.json`` ``text_tower``): rebuilt from the same source and name as the image
tower, so text and image vectors share one space."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from ..config import ModelConfig
from ..errors import ModelError

TEXT_SOURCES = ("open_clip", "transformers")


class TextTower(Protocol):
    def encode(self, texts: Sequence[str]) -> torch.Tensor: ...


def no_text_tower(what: str) -> ModelError:
    return ModelError(f"{what} has no text tower: text queries and zero-shot labels need a "
                      "store of a CLIP-family model's image embedding (model.name "
                      "open_clip:ARCH/TAG or hf:ORG/NAME of CLIP / SigLIP, cut: head, no pool)")


def build_text_tower(cfg: ModelConfig, record: dict | None) -> TextTower:
    """The text tower of ``cfg`` (weights as the image tower's: seed the RNG first when they
    are random). ``record``: the Backbone's / store's text_tower entry."""
    if not isinstance(record, dict) or record.get("source") not in TEXT_SOURCES:
        raise no_text_tower(f"model '{cfg.name}'")
    if record["source"] == "open_clip":
        from .openclip_source import OpenClipText

        return OpenClipText(cfg, normalize=bool(record.get("normalized", False)))
    from .transformers_source import TransformersText

    return TransformersText(cfg)


def encode_texts(tower: TextTower, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """(len(texts), D) float32 text embeddings, ``batch_size`` texts per call."""
    texts = [str(t) for t in texts]
    if not texts:
        raise ModelError("no texts given; pass at least one query text")
    return torch.cat([tower.encode(texts[i:i + batch_size])
                      for i in range(0, len(texts), batch_size)])

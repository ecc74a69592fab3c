"""Hugging Face Transformers backbones: ``hf:ORG/NAME[@REV]``, ``hf:/path/to/folder``
(``transformers:`` also) through ``AutoModel`` / ``AutoImageProcessor``
(``pip install "transferlab[transformers]"``).

- A folder is what ``save_pretrained`` writes; a Hub id goes through the library's own cache
  (``HF_HOME``; ``HF_HUB_OFFLINE=1`` reads only the cache). Weights are read only from
  safetensors (``use_safetensors=True``): a folder holding only ``.bin`` pickles is refused.
- Code is never run: a config naming its own code (``auto_map``) or a ``model_type``
  Transformers does not know is refused in one line unless the user's config says
  ``model.trust_code: true`` (then ``trust_remote_code=True``).
- The image side of CLIP / SigLIP (and their ``*VisionModel`` forms), DINOv2, ViT and
  other vision encoders: ``cut: head`` is the model's image embedding (CLIP:
  ``get_image_features`` = projected pooled output; SigLIP: its pooled output; DINOv2:
  the class token after the final norm; ViT: its pooler output), ``cut: head`` with
  ``pool: token | avg | tokenavg`` pools the last hidden state (``tokenavg``: class token and
  mean of patch tokens concatenated, DINOv2's linear evaluation), ``stage:I`` the hidden
  state after block I (``hidden_states[I + 1]``), ``all-blocks`` all of them.
- The preprocessing is the image processor's (shortest edge + centre crop, or a straight
  resize to height x width; its mean / std and resample filter).
- ``pretrained: false`` with a Hub id: the architecture of its config.json with random
  weights (seeded by ``runtime.seed``); a folder always brings its weights.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import MAX_IN_CHANS, MAX_INPUT_SIDE, ModelConfig
from ..errors import CutError, ModelError
from ..runtime.untrusted import claimed_size, read_bounded
from ..yamlsafe import loads_json, shown_text
from . import provenance
from .checkpoint import one_line

PREFIXES = ("hf:", "transformers:")
INSTALL = 'pip install "transferlab[transformers]"'
MAX_CONFIG_BYTES = 1 << 20
SAFETENSORS = ("model.safetensors", "model.safetensors.index.json")
PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# PIL resample codes (what image processors store) -> transferlab's interpolation names
RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}
# model types whose text tower pads to a fixed length (as their processors do)
MAX_LENGTH_PADDING = ("siglip", "siglip2")


def is_transformers_name(name: str) -> bool:
    return isinstance(name, str) and name.startswith(PREFIXES)


def import_transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ModelError(f"Hugging Face Transformers models need the transformers package: "
                         f"{INSTALL}") from None
    return transformers


def target(name: str) -> tuple[str, Path | None, str | None]:
    """(hub id or folder string, the folder or None, revision) of an ``hf:`` name."""
    rest = name.split(":", 1)[1] if is_transformers_name(name) else name
    if rest.startswith(("/", ".", "~")) or Path(rest).expanduser().is_dir() or \
            rest.count("/") != 1:
        folder = Path(rest).expanduser()
        if not folder.is_dir():
            raise ModelError(f"'{name}': no folder {rest} and not a Hub id; write "
                             "hf:ORG/NAME (e.g. hf:facebook/dinov2-small) or hf:/path/to/folder "
                             "(what save_pretrained writes)")
        return str(folder.resolve()), folder.resolve(), None
    repo, _, rev = rest.partition("@")
    if not all(repo.split("/")):
        raise ModelError(f"'{name}' is not a Hub id; write hf:ORG/NAME[@REVISION]")
    return repo, None, rev or None


def is_folder_name(name: str) -> bool:
    """Whether an ``hf:`` name reads a local folder (a path a store must not name)."""
    try:
        return target(name)[1] is not None
    except ModelError:
        return True


def config_path(name: str, cache_dir: str | None = None) -> tuple[Path, Path | None]:
    source, folder, rev = target(name)
    if folder is not None:
        return folder / "config.json", folder
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(source, "config.json", revision=rev,
                                    cache_dir=cache_dir)), None
    except Exception as exc:
        from .hub import is_fetch_error, not_fetched

        if is_fetch_error(exc):
            raise not_fetched(name, exc) from None
        raise ModelError(f"could not read the config of '{name}' ({one_line(exc)})") from None


def check_hf_config(name: str, trust_code: bool, cache_dir: str | None = None) -> dict:
    """config.json read bounded and checked (``check_config_data``); a folder must hold
    safetensors weights (pickled ``.bin`` files are never loaded)."""
    path, folder = config_path(name, cache_dir)
    raw = read_bounded(path, MAX_CONFIG_BYTES, "model config", ModelError, folder)
    data = loads_json(raw, f"model config {path}", ModelError)
    check_config_data(data, f"'{name}': config.json", trust_code)
    if folder is not None:
        files = os.listdir(folder)
        if not any(f in files for f in SAFETENSORS):
            pickled = sorted(f for f in files if f.endswith(PICKLES))
            what = (f"only {', '.join(pickled[:3])} (pickles, never loaded)" if pickled
                    else "no weights")
            raise ModelError(f"the model folder {folder} holds {what}; it needs "
                             "model.safetensors: re-save it with save_pretrained("
                             "safe_serialization=True)")
    return data


# sizes a config claims that the model allocates from (a crafted file: a 1e9-wide layer)
SIZE_LIMITS = (("image_size", MAX_INPUT_SIDE, 1), ("num_channels", MAX_IN_CHANS, 1),
               ("hidden_size", 1 << 16, 1), ("intermediate_size", 1 << 18, 1),
               ("num_hidden_layers", 1024, 0), ("num_attention_heads", 1024, 1),
               ("vocab_size", 1 << 22, 1), ("max_position_embeddings", 1 << 20, 1),
               ("patch_size", MAX_INPUT_SIDE, 1), ("projection_dim", 1 << 16, 1))


def check_config_data(data: Any, origin: str, trust_code: bool) -> None:
    """A Transformers config (from a folder, the Hub or a checkpoint) refused when it names
    code (auto_map, a model_type Transformers does not know) unless ``trust_code``, and
    every size it claims bounded before anything is allocated from it."""
    transformers = import_transformers()
    if not isinstance(data, dict):
        raise ModelError(f"{origin} is not a Transformers config (an object)")
    model_type = data.get("model_type")
    known = isinstance(model_type, str) and model_type in transformers.CONFIG_MAPPING
    if not trust_code and ("auto_map" in data or not known):
        why = ("names its own code (auto_map)" if "auto_map" in data else
               f"has model_type {shown_text(str(model_type))}, which Transformers "
               f"{transformers.__version__} does not know")
        raise ModelError(f"{origin} {why}; transferlab runs no code from a model folder, "
                         "repository or file unless model.trust_code: true (only for models "
                         "you trust)")
    for part in (data, data.get("vision_config"), data.get("text_config")):
        if not isinstance(part, dict):
            continue
        for key, limit, low in SIZE_LIMITS:
            value = part.get(key)
            if value is not None:
                for side in value if isinstance(value, (list, tuple)) else [value]:
                    claimed_size(side, limit, f"{origin}: {key}", ModelError, low)


def recorded_hf_architecture(cfg: ModelConfig) -> dict:
    """The architecture a checkpoint records to rebuild this model offline: its config
    (``kwargs.hf_config``), never the folder or Hub files (a fine-tuned checkpoint holds the
    weights)."""
    data = check_hf_config(cfg.name, cfg.trust_code, cfg.kwargs.get("cache_dir"))
    return {"name": cfg.name, "source": "transformers",
            "kwargs": {**cfg.kwargs, "hf_config": data}}


def from_recorded_config(cfg: ModelConfig) -> nn.Module:
    """AutoModel.from_config of a recorded config (random weights; checked first)."""
    transformers = import_transformers()
    data = dict(cfg.kwargs["hf_config"])
    check_config_data(data, f"the architecture recorded for '{cfg.name}'", cfg.trust_code)
    model_type = data.pop("model_type")
    try:
        config = transformers.AutoConfig.for_model(model_type, **data)
        return transformers.AutoModel.from_config(
            config, trust_remote_code=bool(cfg.trust_code)).eval()
    except Exception as exc:
        raise ModelError(f"Transformers could not rebuild the recorded architecture of "
                         f"'{cfg.name}' ({type(exc).__name__}: {one_line(exc)})") from None


def load_auto_model(cfg: ModelConfig) -> nn.Module:
    """AutoModel of ``cfg.name`` (weights from safetensors only; random when a Hub id has
    ``pretrained: false``); errors become one ModelError line."""
    transformers = import_transformers()
    transformers.utils.logging.disable_progress_bar()  # library code prints nothing
    if isinstance(cfg.kwargs.get("hf_config"), dict):  # a checkpoint's recorded config
        return from_recorded_config(cfg)
    source, folder, rev = target(cfg.name)
    cache_dir = cfg.kwargs.get("cache_dir")
    check_hf_config(cfg.name, cfg.trust_code, cache_dir)
    common = {"trust_remote_code": bool(cfg.trust_code), "revision": rev, "cache_dir": cache_dir}
    try:
        if folder is None and not (cfg.pretrained and not cfg.weights):
            config = transformers.AutoConfig.from_pretrained(source, **common)
            model = transformers.AutoModel.from_config(
                config, trust_remote_code=bool(cfg.trust_code))
        else:
            model = transformers.AutoModel.from_pretrained(source, use_safetensors=True,
                                                           **common)
    except Exception as exc:
        from .hub import is_fetch_error, not_fetched

        if folder is None and is_fetch_error(exc):
            raise not_fetched(cfg.name, exc) from None
        raise ModelError(f"Transformers could not build '{cfg.name}' ({type(exc).__name__}: "
                         f"{one_line(exc)})") from None
    return model.eval()


def _get(size: Any, key: str) -> Any:
    if size is None:
        return None
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def processor_data_config(cfg: ModelConfig, vision_config: Any) -> dict:
    """The image processor's preprocessing in timm's data-config terms; without a processor
    config, the model's image size (ImageNet statistics)."""
    transformers = import_transformers()
    try:
        if "hf_config" in cfg.kwargs:  # a checkpoint records its own preprocessing
            raise LookupError
        source, _, rev = target(cfg.name)
        proc = transformers.AutoImageProcessor.from_pretrained(
            source, revision=rev, cache_dir=cfg.kwargs.get("cache_dir"),
            trust_remote_code=bool(cfg.trust_code))
    except Exception:  # no preprocessor_config.json: the model's own size
        side = getattr(vision_config, "image_size", 224)
        h, w = (side, side) if isinstance(side, int) else tuple(side)
        return {"input_size": (3, int(h), int(w)), "crop_pct": 1.0, "crop_mode": "squash"}
    out: dict[str, Any] = {}
    size, crop = getattr(proc, "size", None), getattr(proc, "crop_size", None)
    short = _get(size, "shortest_edge")
    if getattr(proc, "do_center_crop", False) and crop is not None and short:
        h, w = _get(crop, "height"), _get(crop, "width")
        out.update(input_size=(3, int(h), int(w)), crop_pct=min(h, w) / float(short),
                   crop_mode="center")
    elif _get(size, "height"):
        out.update(input_size=(3, int(_get(size, "height")), int(_get(size, "width"))),
                   crop_pct=1.0, crop_mode="squash")
    elif short:
        out.update(input_size=(3, int(short), int(short)), crop_pct=1.0, crop_mode="center")
    resample = getattr(proc, "resample", None)
    try:
        out["interpolation"] = RESAMPLE.get(int(resample), "bilinear")
    except (TypeError, ValueError):
        pass
    if getattr(proc, "do_normalize", True) and getattr(proc, "image_mean", None) is not None:
        out["mean"], out["std"] = tuple(proc.image_mean), tuple(proc.image_std)
    elif not getattr(proc, "do_normalize", True):
        out["mean"], out["std"] = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return out


class HiddenState(nn.Identity):
    """A named point the hidden state after one block passes through (what ``stage:I``
    cuts and hooks see): Transformers' layer modules differ between versions, its
    ``hidden_states`` output does not."""


class TransformersImage(nn.Module):
    """A Transformers vision encoder with timm's feature API: ``forward_features`` gives
    the last hidden state (and passes each block's hidden state through ``blocks.I``),
    ``forward_head`` the image embedding of the same pass."""

    def __init__(self, vision: nn.Module, projection: nn.Module | None, layers: int,
                 width: int, patch: int, prefix: int):
        super().__init__()
        self.vision = vision
        self.projection = projection
        self.blocks = nn.ModuleList(HiddenState() for _ in range(layers))
        self.num_prefix_tokens = prefix
        self.feature_info = [{"module": f"blocks.{i}", "num_chs": width, "reduction": patch}
                             for i in range(layers)]
        self._pooled: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def cut_blocks(self) -> list[str]:
        """The block cuts of ``all-blocks``."""
        return [f"blocks.{i}" for i in range(len(self.blocks))]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.vision(pixel_values=x, output_hidden_states=True, return_dict=True)
        states = out.hidden_states[1:] if out.hidden_states is not None else ()
        for block, state in zip(self.blocks, states):
            block(state)
        last = out.last_hidden_state
        # the model's own pooling of this pass (SigLIP's attention head, ViT's pooler ...)
        self._pooled = (last, getattr(out, "pooler_output", None))
        return last

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        stash, self._pooled = self._pooled, None
        if stash is None or stash[0] is not x:
            raise CutError("forward_head takes the output of forward_features of the same pass")
        pooled = stash[1] if stash[1] is not None else x[:, 0]
        return self.projection(pooled) if self.projection is not None else pooled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def vision_parts(model: nn.Module) -> tuple[nn.Module, nn.Module | None, Any]:
    """(vision encoder, projection into the joint space or None, its config)."""
    vision = getattr(model, "vision_model", None)
    vision = model if vision is None else vision
    projection = getattr(model, "visual_projection", None)
    config = getattr(vision, "config", None) or model.config
    config = getattr(config, "vision_config", None) or config
    return vision, projection, config


def prefix_tokens(tower: TransformersImage, config: Any) -> int:
    """Tokens before the patch tokens (class, registers): from one dummy pass."""
    side, patch = getattr(config, "image_size", None), getattr(config, "patch_size", None)
    if not isinstance(side, int) or not isinstance(patch, int) or patch < 1:
        return 1
    channels = int(getattr(config, "num_channels", 3) or 3)
    with torch.no_grad():
        last = tower.forward_features(torch.zeros(1, channels, side, side))
    tower._pooled = None
    return max(0, int(last.shape[1]) - (side // patch) ** 2) if last.ndim == 3 else 0


def transformers_parts(cfg: ModelConfig) -> tuple[nn.Module, dict, dict | None, dict | None]:
    """(wrapped image tower, data config, weights digest, text tower record) of an ``hf:`` /
    ``transformers:`` name (``library.build_transformers`` makes the Backbone of them)."""
    model = load_auto_model(cfg)
    vision, projection, config = vision_parts(model)
    layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    width = int(getattr(config, "hidden_size", 0) or 0)
    patch = getattr(config, "patch_size", 1)
    tower = TransformersImage(vision, projection, layers, width,
                              patch if isinstance(patch, int) else 1, 1).eval()
    tower.num_prefix_tokens = prefix_tokens(tower, config)
    reads = folder_or_pretrained(cfg) and "hf_config" not in cfg.kwargs
    digest = provenance.state_record(model) if reads else None
    text = {"source": "transformers", "name": cfg.name, "embedding": "get_image_features",
            "normalized": False} if hf_has_text(model) else None
    return tower, processor_data_config(cfg, config), digest, text


def folder_or_pretrained(cfg: ModelConfig) -> bool:
    """Whether weights were read (a folder always; a Hub id with pretrained: true)."""
    return not cfg.weights and (is_folder_name(cfg.name) or cfg.pretrained)


def hf_has_text(model: nn.Module) -> bool:
    return hasattr(model, "get_text_features") and hasattr(model, "text_model")


class TransformersText:
    """The text tower: ``encode(texts)`` is ``get_text_features(**tokenizer(texts))``."""

    def __init__(self, cfg: ModelConfig):
        transformers = import_transformers()
        self.model = load_auto_model(cfg)
        if not hf_has_text(self.model):
            raise ModelError(f"'{cfg.name}' has no text tower")
        source, _, rev = target(cfg.name)
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(
                source, revision=rev, cache_dir=cfg.kwargs.get("cache_dir"),
                trust_remote_code=bool(cfg.trust_code))
        except Exception as exc:
            raise ModelError(f"could not load the tokenizer of '{cfg.name}' "
                             f"({type(exc).__name__}: {one_line(exc)})") from None
        self.model_type = getattr(self.model.config, "model_type", "")

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        padding = "max_length" if self.model_type in MAX_LENGTH_PADDING else True
        text_cfg = getattr(self.model.config, "text_config", None)
        length = getattr(text_cfg, "max_position_embeddings", None)
        batch = self.tokenizer(list(texts), padding=padding, truncation=True,
                               max_length=length, return_tensors="pt")
        keep = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        if self.model_type in MAX_LENGTH_PADDING:
            keep.pop("attention_mask", None)  # SigLIP is trained without one
        out = self.model.get_text_features(**keep)
        out = getattr(out, "pooler_output", out)  # Transformers 5 returns the output object
        return out.float()

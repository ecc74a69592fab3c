"""OpenCLIP backbones: ``open_clip:ARCH[/PRETRAINED]`` (``pip install "transferlab[clip]"``).

The image tower (``model.visual``) wrapped so that every transferlab cut applies:

- ``cut: head`` is OpenCLIP's ``encode_image`` (pooled, projected into the joint image-text
  space). It is **not** L2-normalised by default, as ``encode_image`` returns it;
  ``model.kwargs: {normalize: true}`` gives ``encode_image(normalize=True)``. Which one is
  recorded in the store's ``meta.json`` (``text_tower.normalized``). ``cut: head`` with a
  ``pool`` (token | avg | tokenavg | max) pools the final tokens instead (before projection).
- ``stage:I`` / ``all-blocks``: the blocks of the visual transformer
  (``visual.transformer.resblocks.I``; a timm tower: its own stages), token sequences pooled
  by ``pool: token`` (the class token), ``avg`` (mean of patch tokens) or ``tokenavg``.

``ARCH`` is an OpenCLIP registry name (``open_clip.list_models()``) or ``hf-hub:ORG/NAME``;
``PRETRAINED`` a pretrained tag (``laion2b_s34b_b79k``) or a local weights file, read only with
``model.pretrained: true`` (as timm names with a tag: without it the weights are random, seeded
by ``runtime.seed``, so a store's text tower rebuilt later is the same model). Downloads go to
OpenCLIP's own cache (the Hugging Face cache), and ``HF_HUB_OFFLINE=1`` reads only that.
The preprocessing is the model's own (image size, mean / std, interpolation, resize mode).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..errors import ModelError
from . import provenance
from .checkpoint import one_line

PREFIX = "open_clip:"
INSTALL = 'pip install "transferlab[clip]"'
# how OpenCLIP's resize_mode maps onto timm's crop modes (shortest side + centre crop,
# straight resize, longest side + pad)
RESIZE_MODES = {"shortest": "center", "squash": "squash", "longest": "border"}


def is_open_clip_name(name: str) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def import_open_clip() -> Any:
    try:
        import open_clip
    except ImportError:
        raise ModelError(f"OpenCLIP models need the open_clip package: {INSTALL}") from None
    return open_clip


def split_name(name: str) -> tuple[str, str | None]:
    """``open_clip:ARCH[/PRETRAINED]`` -> (ARCH, PRETRAINED or None); ``hf-hub:`` archs whole."""
    rest = name[len(PREFIX):] if is_open_clip_name(name) else name
    if rest.startswith(("hf-hub:", "local-dir:")):
        return rest, None
    arch, _, pretrained = rest.partition("/")
    if not arch:
        raise ModelError(f"'{name}' names no OpenCLIP architecture; write it as "
                         "open_clip:ARCH[/PRETRAINED], e.g. open_clip:ViT-B-32/laion2b_s34b_b79k")
    return arch, pretrained or None


def create_full(cfg: ModelConfig) -> nn.Module:
    """The whole OpenCLIP model (image and text towers) of ``cfg``; random weights (seeded by
    the caller) unless ``cfg.pretrained``."""
    open_clip = import_open_clip()
    arch, tag = split_name(cfg.name)
    if not arch.startswith(("hf-hub:", "local-dir:")) and arch not in open_clip.list_models():
        import difflib

        close = difflib.get_close_matches(arch, open_clip.list_models(), n=4, cutoff=0.6)
        hint = f" Closest: {', '.join(close)}." if close else ""
        raise ModelError(f"unknown OpenCLIP architecture '{arch}'.{hint} See "
                         "open_clip.list_models() (or use open_clip:hf-hub:ORG/NAME)")
    kwargs = {k: v for k, v in cfg.kwargs.items() if k != "normalize"}
    pretrained = tag if cfg.pretrained and not cfg.weights else None
    if cfg.pretrained and not tag and not arch.startswith(("hf-hub:", "local-dir:")):
        raise ModelError(f"'{cfg.name}' names no pretrained weights; write "
                         f"open_clip:{arch}/TAG (open_clip.list_pretrained_tags_by_model"
                         f"('{arch}') lists them) or set model.pretrained: false")
    if not cfg.pretrained and arch.startswith("hf-hub:"):
        kwargs.setdefault("load_weights", False)
    import inspect

    if "weights_only" in inspect.signature(open_clip.create_model).parameters:
        kwargs["weights_only"] = True  # a .bin / .pt file is never unpickled
    try:
        model = open_clip.create_model(arch, pretrained=pretrained, **kwargs)
    except TypeError as exc:
        raise ModelError(f"OpenCLIP model '{cfg.name}' refused its arguments "
                         f"({one_line(exc)}); fix model.kwargs") from None
    except Exception as exc:  # download / cache / file errors, one line naming the way out
        from .hub import hub_cache, is_fetch_error, offline

        if is_fetch_error(exc) or "download" in str(exc).lower():
            mode = "offline (HF_HUB_OFFLINE=1) and " if offline() else ""
            raise ModelError(
                f"could not fetch the weights of '{cfg.name}' ({type(exc).__name__}: "
                f"{one_line(exc)[:160]}); {mode}no copy in the cache {hub_cache()}: set HF_HOME "
                "or HF_HUB_CACHE to the cache that holds them, or download the weights file "
                f"elsewhere and name it: open_clip:{arch}//path/to/open_clip_model.safetensors "
                "with model.pretrained: true") from None
        raise ModelError(f"OpenCLIP could not build '{cfg.name}' ({type(exc).__name__}: "
                         f"{one_line(exc)})") from None
    return model.eval()


def openclip_data_config(visual: nn.Module) -> dict:
    """OpenCLIP's preprocess cfg in timm's data-config terms (what ``resolve_preprocess``
    takes): the whole short side kept (crop_pct 1) as OpenCLIP's eval transform does."""
    pp = dict(getattr(visual, "preprocess_cfg", None) or {})
    size = pp.get("size", getattr(visual, "image_size", 224))
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    mode = pp.get("resize_mode", "shortest")
    if mode not in RESIZE_MODES:
        raise ModelError(f"OpenCLIP resize mode '{mode}' is not supported; set "
                         "preprocess.resize: squash or center_crop")
    out = {"input_size": (3, int(h), int(w)), "interpolation": pp.get("interpolation", "bicubic"),
           "crop_pct": 1.0, "crop_mode": RESIZE_MODES[mode]}
    if pp.get("mean") is not None:
        out["mean"], out["std"] = tuple(pp["mean"]), tuple(pp["std"])
    return out


class ContiguousAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` with ``batch_first`` run on contiguous (L, N, E) copies of
    its inputs: the same arithmetic, but under CPU bf16 autocast PyTorch turns the
    projection of the transposed (non-contiguous) view into a batched matmul that copies the
    weight per sample, which ran OpenCLIP's ViT-B/16 at 1.6 img/s against 15.7 (batch 8,
    BENCHMARKS.md section 17). Only the class changes: parameters and state-dict keys stay."""

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not (self.batch_first and self._qkv_same_embed_dim and query.dim() == 3):
            return super().forward(query, key, value, key_padding_mask=key_padding_mask,
                                   need_weights=need_weights, attn_mask=attn_mask,
                                   average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        # nothing on the module changes (it may run in several threads): the (L, N, E)
        # copies go straight to the functional form the module itself calls
        q = query.transpose(0, 1).contiguous()
        # self-attention passes one tensor three times: keep it one (the packed projection)
        k = q if key is query else key.transpose(0, 1).contiguous()
        v = k if value is key else value.transpose(0, 1).contiguous()
        out, weights = F.multi_head_attention_forward(
            q, k, v, self.embed_dim, self.num_heads, self.in_proj_weight, self.in_proj_bias,
            self.bias_k, self.bias_v, self.add_zero_attn, self.dropout, self.out_proj.weight,
            self.out_proj.bias, training=self.training, key_padding_mask=key_padding_mask,
            need_weights=need_weights, attn_mask=attn_mask,
            average_attn_weights=average_attn_weights, is_causal=is_causal)
        return out.transpose(0, 1), weights


def contiguous_attention(module: nn.Module) -> nn.Module:
    """Every batch-first ``nn.MultiheadAttention`` of ``module`` as ``ContiguousAttention``."""
    for m in module.modules():
        if type(m) is nn.MultiheadAttention and m.batch_first:
            m.__class__ = ContiguousAttention
    return module


class OpenClipImage(nn.Module):
    """OpenCLIP's image tower with timm's feature API: ``forward_features`` gives the final
    token sequence, ``forward_head`` the image embedding (``encode_image``), ``feature_info``
    the blocks, so head, stage and block cuts and token pooling all apply."""

    def __init__(self, visual: nn.Module, normalize: bool = False):
        super().__init__()
        self.visual = contiguous_attention(visual)
        self.normalize = normalize
        trunk = getattr(visual, "trunk", None)
        if all(hasattr(visual, a) for a in ("_embeds", "transformer", "_pool")):
            self.kind = "vit"
            self.num_prefix_tokens = 1  # _embeds prepends the class token
            patch = visual.patch_size[0] if hasattr(visual, "patch_size") else 1
            self.feature_info = [
                {"module": f"visual.transformer.resblocks.{i}", "num_chs": visual.transformer.width,
                 "reduction": patch} for i in range(len(visual.transformer.resblocks))]
        elif trunk is not None and hasattr(trunk, "forward_features"):
            self.kind = "timm"
            self.num_prefix_tokens = int(getattr(trunk, "num_prefix_tokens", 0) or 0)
            self.feature_info = [{**entry, "module": f"visual.trunk.{entry['module']}"}
                                 for entry in getattr(trunk, "feature_info", None) or []]
        else:  # a ResNet tower: the head cut and layer: cuts
            self.kind = "other"
            self.num_prefix_tokens = 0
            self.feature_info = []

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        visual = self.visual
        if self.kind == "vit":
            return visual.transformer(visual._embeds(x))
        if self.kind == "timm":
            return visual.trunk.forward_features(x)
        return visual(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        visual = self.visual
        if self.kind == "vit":
            x, _ = visual._pool(x)
            if visual.proj is not None:
                x = x @ visual.proj
        elif self.kind == "timm":
            x = visual.head(visual.trunk.forward_head(x))
        return F.normalize(x, dim=-1) if self.normalize else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def openclip_parts(cfg: ModelConfig) -> tuple[nn.Module, dict, dict | None, dict | None]:
    """(wrapped image tower, data config, weights digest, text tower record) of an
    ``open_clip:`` name (``library.build_open_clip`` makes the Backbone of them)."""
    model = create_full(cfg)
    normalize = bool(cfg.kwargs.get("normalize", False))
    tower = OpenClipImage(model.visual, normalize).eval()
    digest = provenance.state_record(model) if cfg.pretrained and not cfg.weights else None
    text = {"source": "open_clip", "name": cfg.name, "embedding": "encode_image",
            "normalized": normalize} if openclip_has_text(model) else None
    return tower, openclip_data_config(model.visual), digest, text


def openclip_has_text(model: nn.Module) -> bool:
    return hasattr(model, "encode_text") and (hasattr(model, "text") or
                                              hasattr(model, "token_embedding"))


class OpenClipText:
    """OpenCLIP's text tower: ``encode(texts)`` is ``encode_text(tokenizer(texts))``."""

    def __init__(self, cfg: ModelConfig, normalize: bool = False):
        open_clip = import_open_clip()
        self.model = create_full(cfg)
        if not openclip_has_text(self.model):
            raise ModelError(f"'{cfg.name}' has no text tower")
        arch, _ = split_name(cfg.name)
        try:
            self.tokenizer = open_clip.get_tokenizer(arch)
        except Exception as exc:
            raise ModelError(f"could not load the tokenizer of '{cfg.name}' "
                             f"({type(exc).__name__}: {one_line(exc)})") from None
        self.normalize = normalize

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(texts))
        return self.model.encode_text(tokens, normalize=self.normalize).float()

"""The compute engine: a frozen extractor prepared for the runtime, rows off the device."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import ExtractConfig, ModelConfig, RuntimeConfig, from_dict
from ..data.imageio import load_image
from ..data.preprocess import DeviceNormalize, PreprocessSpec, build_transform
from ..errors import ComputeError
from ..models.extractor import ExtractorBundle, extractor_from_config
from ..models.recorded import checked_model, contained_path
from ..runtime.device import (
    DTYPES,
    Runtime,
    frozen_forward,
    resolve_precision,
    resolve_runtime,
    seed_everything,
    without_autotuning,
)
from .reduce import reduction_from_record


def prepare_model(extractor: nn.Module, rt: Runtime, compile_model: bool = False) -> nn.Module:
    """The (already folded, see ``FeatureComputer``) extractor ready to run: on the device,
    channels_last, compiled."""
    model = extractor.to(rt.device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile_model:
        from ..models.graph import compilable

        model = torch.compile(compilable(model))
    return model



Pending = tuple[torch.Tensor, Any]  # feature rows (on the host once ready), CUDA event or None


class FeatureComputer:
    """uint8 batches -> float32 feature rows on the host (normalise on the device, AMP).

    ``start`` launches a batch and, on CUDA, queues the copy of its rows into pinned host
    memory; ``finish`` waits for them. The runner starts batch i + 1 before finishing batch i,
    so the GPU computes while the host stores rows and fetches the next batch.
    """

    def __init__(self, extractor: nn.Module, spec: PreprocessSpec, rt: Runtime,
                 compile_model: bool = False, fold_bn: bool = False):
        from ..models.fusion import fold_batchnorm

        self.rt, self.spec = rt, spec
        self.model_width = int(getattr(extractor, "feature_dim", 0) or 0)  # before output.reduce
        folded = fold_batchnorm(extractor, spec.input_size) if fold_bn else extractor
        self.folded = folded is not extractor  # False also where nothing could be folded
        self.model = prepare_model(folded, rt, compile_model)
        self.normalize = DeviceNormalize(spec.mean, spec.std).to(rt.device)
        self.reduce: nn.Module | None = None  # output.reduce: rows projected on the device
        self.widest = 0  # the largest batch so far: smaller ones skip cuDNN autotuning

    def set_reduce(self, reduce: nn.Module | None) -> None:
        """Project every row with ``reduce`` (outside ``torch.compile``), or stop doing so."""
        self.reduce = None if reduce is None else reduce.to(self.rt.device)

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        return self.finish(self.start(images))

    def start(self, images: torch.Tensor) -> Pending:
        short = self.rt.is_cuda and len(images) < self.widest
        self.widest = max(self.widest, len(images))
        with frozen_forward(self.rt), without_autotuning(short):
            return self._start(images)

    def _start(self, images: torch.Tensor) -> Pending:
        x = images.to(self.rt.device, non_blocking=True)
        x = self.normalize(x)
        if self.rt.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        rows = self.model(x).float().flatten(1)
        return copy_to_host(rows if self.reduce is None else self.reduce(rows))

    def finish(self, pending: Pending) -> np.ndarray:
        """The rows of a started batch; inf/NaN rows are refused (fp16 overflows silently)."""
        rows, ready = pending
        if ready is not None:
            ready.synchronize()
        out = rows.numpy()
        if not np.isfinite(out).all():
            hint = ("fp16 overflowed: set runtime.precision=bf16 or fp32" if
                    self.rt.precision == "fp16" else "check the weights and the input")
            raise ComputeError(f"the model gave inf/NaN features in {self.rt.precision}; "
                               f"{hint} (finished shards are kept)")
        return out


def copy_to_host(out: torch.Tensor) -> Pending:
    """``out`` itself on the CPU; on CUDA a queued copy into pinned host memory and the event
    that marks it done, recorded on the stream of ``out``'s own device (with
    ``runtime.device: cuda:1`` the current device may be another one)."""
    if not out.is_cuda:
        return out, None
    host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
    host.copy_(out, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record(torch.cuda.current_stream(out.device))
    return host, ready



# ---------------------------------------------------------------------------------------
# Embedding a few images with a store's own model (search queries, notebooks)
# ---------------------------------------------------------------------------------------


def store_model(meta: dict, root: Path | None, trust_code: bool) -> tuple[ExtractConfig,
                                                                          ModelConfig]:
    """A store's config and its model config checked at the trust boundary: the architecture
    from timm / torchvision / the built-ins, a weights path inside the store ``root``."""
    cfg = from_dict(ExtractConfig, meta.get("config"), "store metadata")
    if "window" not in (meta.get("preprocess") or {}):  # written before the crop window:
        cfg = replace(cfg, preprocess=replace(cfg.preprocess, window="image"))  # whole image
    origin = f"the store {root}" if root is not None else "the store metadata"
    model = checked_model(cfg.model, origin, trust_code)
    if model.weights:
        model = replace(model, weights=contained_path(model.weights, root, origin, trust_code))
    return cfg, replace(model, trust_code=trust_code)


def bundle_from_meta(meta: dict, root: Path | None = None,
                     trust_code: bool = False) -> ExtractorBundle:
    """Rebuild the extractor a store was written with, from its metadata."""
    cfg, model = store_model(meta, root, trust_code)
    seed_everything(cfg.runtime.seed)  # same random-init weights as the run that wrote it
    return extractor_from_config(model, cfg.preprocess)


def store_runtime(meta: dict, cfg: ExtractConfig) -> tuple[Runtime, bool]:
    """(runtime, fold_bn) the store's rows were computed with, on this machine's device.

    ``meta["compute"]`` (precision, fold_bn, channels_last) is what extraction records; older
    stores give the resolved ``meta["runtime"]``, then the configured runtime."""
    local = resolve_runtime(RuntimeConfig(precision="fp32"))
    recorded = meta.get("compute") or meta.get("runtime") or {}
    if not isinstance(recorded, dict):
        recorded = {}
    precision = recorded.get("precision", cfg.runtime.precision)
    if precision not in DTYPES:  # 'auto' of an old store: as this machine would resolve it
        precision = resolve_precision(cfg.runtime.precision, local.device)
    channels_last = recorded.get("channels_last", local.channels_last)
    fold_bn = recorded.get("fold_bn", cfg.runtime.fold_bn)
    rt = replace(local, precision=precision, channels_last=bool(channels_last))
    return rt, bool(fold_bn)


def embed_images(meta: dict, paths: Sequence[str | Path], batch_size: int = 16,
                 root: str | Path | None = None, trust_code: bool = False) -> np.ndarray:
    """Features of image files, computed exactly as the store of ``meta`` computed its rows
    (same model, precision, BatchNorm folding, layout; this machine's device).

    ``root`` is the store directory: a weights file the metadata names must lie inside it.
    The store's model is rebuilt only from timm, torchvision or the built-ins unless
    ``trust_code`` (a store's meta.json can be written by anyone)."""
    root = Path(root) if root is not None else None
    bundle = bundle_from_meta(meta, root, trust_code)
    cfg = from_dict(ExtractConfig, meta["config"], "store metadata")
    rt, fold_bn = store_runtime(meta, cfg)
    compute = FeatureComputer(bundle.extractor, bundle.spec, rt, fold_bn=fold_bn)
    compute.set_reduce(reduction_from_record(meta.get("reduce"), root))  # as the rows were
    transform = build_transform(bundle.spec, normalize=False)
    spec = bundle.spec
    rows = []
    for chunk in chunks(list(paths), batch_size):
        images = [transform(load_image(p, spec.image_mode, spec.scale_size(),
                                       cfg.data.max_image_pixels)) for p in chunk]
        rows.append(compute(torch.stack(images)))
    width = compute.reduce.dim if compute.reduce is not None else bundle.extractor.feature_dim
    return np.concatenate(rows) if rows else np.zeros((0, width), np.float32)


def chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]




"""Optional batched JPEG decoding (``runtime.gpu_decode: true``).

Data-loading workers only read file bytes. JPEGs are decoded a batch at a time by
TorchCodec's ``decode_jpeg`` when it is installed (torchvision's image decoding, deprecated
since 0.29, otherwise) on the run's device (nvJPEG on CUDA), then resized and centre-cropped
there to exactly the ``PreprocessSpec`` geometry, so the CPU does almost nothing per image.
On CUDA the decoding runs on a stream of its own, so it overlaps the previous batch's
forward pass, a chunk of images at a time so that only one chunk of full-resolution
decodes is alive at once. Without a GPU the same code is the fallback: libjpeg-turbo decodes the
batch inside the workers (``BatchDecoder.collate``).

Anything the batched decoder cannot take as is goes through the normal PIL path
(``imageio.load_image`` + the timm transform), item by item, so results and failure reasons
stay those of the PIL path:

- files that do not start with a JPEG marker or do not end with one (cut short?),
- CMYK JPEGs, JPEGs above ``data.max_image_pixels``, and JPEGs whose EXIF orientation is
  not 1 (the decoder would ignore it); the header is parsed without decoding pixels,
- JPEGs the decoder rejects (the PIL path then decodes them or names the failure).

Features are close to, not identical with, the PIL path's: resize kernels and IDCTs differ
slightly and large JPEGs are not draft-decoded. The store's fingerprint records the decode
path, so the two are never mixed in one store.
"""
from __future__ import annotations

import io
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import ComputeError, ConfigError
from .datasets import ImageDataset
from .imageio import ImageDecodeError, check_resized, load_image, open_image_file
from .preprocess import PreprocessSpec, build_transform

JPEG_START, JPEG_END = b"\xff\xd8\xff", b"\xff\xd9"
ORIENTATION = 0x0112
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
DECODE_CHUNK = 16  # full-resolution decodes alive at once


def _decoders() -> list[tuple[str, Any]]:
    """TorchCodec's ``decode_jpeg`` (maintained) if it loads, then torchvision's
    (deprecated since 0.29)."""
    found = []
    try:
        from torchcodec.decoders import decode_jpeg
        found.append(("torchcodec", decode_jpeg))
    except (ImportError, OSError, RuntimeError):  # absent, or a build this torch cannot load
        pass
    from torchvision.io import decode_jpeg as torchvision_decode_jpeg

    found.append(("torchvision", torchvision_decode_jpeg))
    return found


def _probe_jpeg() -> torch.Tensor:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 120, 200)).save(buf, "JPEG")
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def jpeg_decoder(device: torch.device) -> tuple[Any, str]:
    """(decode_jpeg, its name): the first of TorchCodec's and torchvision's decoders that
    decodes a small JPEG on ``device``. Checked once here, so a decoder that cannot run
    there (a CPU-only build, no nvJPEG) is never mistaken for a batch of bad files, which
    would quietly send every image through PIL."""
    errors, probe = [], _probe_jpeg()
    for name, decode in _decoders():
        try:
            with warnings.catch_warnings():  # a probe: the run's own decodes still warn
                warnings.simplefilter("ignore", DeprecationWarning)
                decode([probe], mode="RGB", device=device)
        except torch.OutOfMemoryError:
            raise ComputeError("out of GPU memory before decoding the first JPEG; set "
                               "runtime.gpu_decode=false") from None
        except Exception as exc:
            errors.append(f"{name}: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}")
            continue
        return decode, name
    raise ComputeError(f"runtime.gpu_decode: no JPEG decoder runs on {device} ("
                       + "; ".join(errors) + '); pip install "transferlab[gpu]" (TorchCodec) '
                       "or set runtime.gpu_decode=false")


def check_spec(spec: PreprocessSpec) -> None:
    """ConfigError unless the spec's geometry can be reproduced on tensors."""
    _, h, w = spec.input_size
    if spec.interpolation not in INTERPOLATIONS:
        raise ConfigError(f"runtime.gpu_decode supports interpolation {', '.join(INTERPOLATIONS)}"
                          f", not {spec.interpolation!r}; set preprocess.interpolation or "
                          "runtime.gpu_decode=false")
    square = math.floor(h / spec.crop_pct) == math.floor(w / spec.crop_pct)
    if spec.crop_mode not in ("center", "squash") or (spec.crop_mode == "center" and not square):
        raise ConfigError(f"runtime.gpu_decode supports square center crops and squash resizes, "
                          f"not crop_mode={spec.crop_mode!r} at {h}x{w}; set "
                          "preprocess.resize=squash or runtime.gpu_decode=false")


def read_jpeg(path: str | Path, max_pixels: int | None,
              draft_size: tuple[int, int] | None = None) -> torch.Tensor | None:
    """The file's bytes when the batched decoder can take them as they are, else None (also
    for anything but a regular file, and for an image whose resize to cover ``draft_size``
    would exceed ``max_pixels``: the PIL path names the reason)."""
    try:
        with open_image_file(path) as f:  # a FIFO named x.jpg never blocks
            data = f.read()
    except (OSError, ImageDecodeError):
        return None
    if not data.startswith(JPEG_START) or not data.endswith(JPEG_END):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:  # parses the header, decodes no pixels
                width, height = im.size
                if im.format != "JPEG" or im.mode not in ("RGB", "L"):
                    return None
                if max_pixels is not None and width * height > max_pixels:
                    return None
                check_resized((width, height), draft_size, max_pixels)
                if int(im.getexif().get(ORIENTATION, 1) or 1) != 1:
                    return None
    except Exception:
        return None
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


class RawJpegDataset(Dataset):
    """Item ``raw``: JPEG bytes for the batched decoder; otherwise ``image``: the PIL path's
    uint8 (C, H, W) tensor (or ``error``). ``path`` is kept for a later PIL fallback."""

    def __init__(self, base: ImageDataset, spec: PreprocessSpec, max_pixels: int | None):
        self.base = base
        self.plain = build_transform(spec, normalize=False)
        self.max_pixels = max_pixels
        self.draft_size = spec.scale_size()

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, Any]:
        path = self.base.path(i)
        raw = read_jpeg(path, self.max_pixels, self.draft_size) if path is not None else None
        if raw is not None:
            item = {"image": None, "label": int(self.base.labels[i]), "key": self.base.keys[i],
                    "index": int(i), "error": None}
        else:
            item = self.base[i]
            if item["error"] is None:
                item["image"] = self.plain(item["image"])
        item.update(raw=raw, path=None if path is None else str(path))
        return item


def collate_raw(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Good samples in order (``items``: raw bytes or image tensors); failures apart."""
    good = [s for s in batch if s["error"] is None]
    return {"items": [s["raw"] if s["raw"] is not None else s["image"] for s in good],
            "raw": [s["raw"] is not None for s in good], "path": [s["path"] for s in good],
            "key": [s["key"] for s in good],
            "label": torch.tensor([s["label"] for s in good], dtype=torch.int64),
            "failures": [(s["key"], s["error"]) for s in batch if s["error"] is not None]}


class BatchDecoder:
    """A ``collate_raw`` batch -> the runner's batch: ``image`` (B, 1, C, H, W) uint8 on
    ``device`` (None when every item failed), ``key``, ``label``, ``failures``."""

    def __init__(self, spec: PreprocessSpec, device: torch.device | str,
                 max_pixels: int | None):
        from torchvision.transforms import InterpolationMode

        check_spec(spec)
        self.spec = spec
        self.device = torch.device(device)
        self.max_pixels = max_pixels
        self.mode = "GRAY" if spec.channels == 1 else "RGB"
        self._decode_jpeg, self.decoder_name = jpeg_decoder(self.device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.interpolation = {"nearest": InterpolationMode.NEAREST_EXACT,  # as PIL's nearest
                              "bilinear": InterpolationMode.BILINEAR,
                              "bicubic": InterpolationMode.BICUBIC}[spec.interpolation]
        self._plain: Any = None

    def collate(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        """``collate_raw`` then decode: for CPU runs, where the workers do the decoding."""
        return self(collate_raw(batch))

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        if self.stream is None:
            return self._finish(batch)
        # nvJPEG writes on its own stream into blocks allocated on the current one without
        # waiting for it (pytorch/vision PR 9606): on a stream of our own, whose previous
        # work is drained first, no recycled block is still being read, while the compute
        # stream goes on with the previous batch.
        self.stream.synchronize()
        with torch.cuda.stream(self.stream):
            out = self._finish(batch)
        compute = torch.cuda.current_stream(self.device)
        compute.wait_stream(self.stream)
        if out["image"] is not None:
            out["image"].record_stream(compute)  # not recycled while compute still reads it
        return out

    def _finish(self, batch: dict[str, Any]) -> dict[str, Any]:
        items, is_raw = batch["items"], batch["raw"]
        ready = iter(self.decode_resized([x for x, r in zip(items, is_raw) if r]))
        images, keep, failures = [], [], list(batch["failures"])
        for i, (item, raw) in enumerate(zip(items, is_raw)):
            image = next(ready) if raw else item.to(self.device, non_blocking=True)
            if raw and image is None:  # the decoder rejected it: PIL decodes or names why
                try:
                    image = self.pil_fallback(batch["path"][i])
                except ImageDecodeError as exc:
                    failures.append((batch["key"][i], exc.short()))
                    continue
            images.append(image)
            keep.append(i)
        return {"image": torch.stack(images).unsqueeze(1) if images else None,
                "key": [batch["key"][i] for i in keep], "label": batch["label"][keep],
                "failures": failures}

    def decode_resized(self, data: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Each JPEG decoded and brought to the spec's geometry, a chunk at a time (None for
        files the decoder rejects)."""
        out: list[torch.Tensor | None] = []
        for start in range(0, len(data), DECODE_CHUNK):
            out += [None if image is None else self.resize_crop(image)
                    for image in self.decode(data[start:start + DECODE_CHUNK])]
        return out

    def decode(self, data: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Decode a batch at once; if that fails, one by one (None for rejected files).
        Running out of GPU memory is reported, not retried image by image."""
        if not data:
            return []
        try:
            return list(self._decode_jpeg(data, mode=self.mode, device=self.device))
        except torch.OutOfMemoryError:
            raise ComputeError(f"out of GPU memory decoding {len(data)} JPEGs; lower "
                               "runtime.batch_size or set runtime.gpu_decode=false") from None
        except Exception:
            out: list[torch.Tensor | None] = []
            for one in data:
                try:
                    out.append(self._decode_jpeg(one, mode=self.mode, device=self.device))
                except torch.OutOfMemoryError:
                    raise ComputeError("out of GPU memory decoding a JPEG; lower "
                                       "runtime.batch_size or set runtime.gpu_decode=false"
                                       ) from None
                except Exception:
                    out.append(None)
            return out

    def resize_crop(self, image: torch.Tensor) -> torch.Tensor:
        """timm's eval geometry on a uint8 (C, H, W) tensor: resize (short side, or both
        sides for squash, to size / crop_pct) with antialiasing, then centre crop."""
        from torchvision.transforms.v2 import functional as F

        _, h, w = self.spec.input_size
        scale = [math.floor(h / self.spec.crop_pct), math.floor(w / self.spec.crop_pct)]
        size = scale if self.spec.crop_mode == "squash" else scale[:1]
        image = F.resize(image, size, interpolation=self.interpolation, antialias=True)
        return F.center_crop(image, [h, w])

    def pil_fallback(self, path: str) -> torch.Tensor:
        if self._plain is None:
            self._plain = build_transform(self.spec, normalize=False)
        image = load_image(path, self.spec.image_mode, self.spec.scale_size(), self.max_pixels)
        return self._plain(image).to(self.device)

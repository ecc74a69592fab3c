"""The frozen-forward engine: uint8 images in, float32 features out, for every command that
runs a frozen network on images (extraction, search queries, the fine-tune caching pass and
a frozen base in training, the probe's features, ``Classifier.predict`` and ``predict``).

One path: normalise on the device, BatchNorm folded where it applies, channels_last,
autocast by the resolved precision, ``inference_mode`` (``runtime.device.frozen_forward``).
A model gives one tensor or a list of tensors (several cuts); the engine always answers
with a list, one entry per output. ``runtime.backend`` (``models.backends``) picks what runs
the (folded) model: PyTorch eager, ``torch.compile``, or its exported ONNX graph run by ONNX
Runtime or OpenVINO; normalisation and ``output.reduce`` stay in PyTorch either way.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data.preprocess import DeviceNormalize, PreprocessSpec
from ..errors import ComputeError
from ..runtime.device import Runtime, default_batch_size, frozen_forward, without_autotuning
from .backends import (
    EXPORTED,
    Calibration,
    Prepared,
    calibration_digest,
    exported_graph,
    resolve_backend,
)
from .cuts import activation_elements
from .fusion import fold_batchnorm

# rows per output (on the host once ready) and the event that marks them ready; or, for an
# exported graph, the future of the rows (its runtime computes while the caller goes on)
Pending = tuple[list[torch.Tensor] | Future, Any]


def prepare_model(extractor: nn.Module, rt: Runtime, compile_model: bool = False,
                  freeze: bool = False) -> nn.Module:
    """The (already folded, see ``FeatureComputer``) extractor ready to run: on the device,
    channels_last, compiled (``freeze``: inductor's freezing, weights as constants: the
    ``compile`` backend)."""
    model = extractor.to(rt.device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile_model:
        from .graph import compilable

        options = {"freezing": True} if freeze else None
        model = torch.compile(compilable(model), options=options)
    return model


def feature_dims(extractor: nn.Module) -> list[int]:
    """The flattened width of each output of an extractor that declares them
    (``feature_dims``), [] for a module that does not."""
    return [int(d) for d in getattr(extractor, "feature_dims", None) or ()]


def engine_batch_size(extractor: nn.Module, input_size: Sequence[int], rt: Runtime,
                      requested: int | None = None) -> int:
    """``requested``, else the automatic batch size of ``extractor`` run by this engine with
    ``rt`` (``runtime.device.default_batch_size``: the backend ``rt.backend`` resolves to and,
    on a CPU, the model's activations per image, counted in one dummy forward)."""
    if requested is not None or rt.is_cuda:
        return default_batch_size(rt, requested)
    exported = resolve_backend(rt.backend, extractor, rt) in EXPORTED
    return default_batch_size(rt, None, activation_elements(extractor, input_size), exported)


class FeatureComputer:
    """uint8 batches -> float32 features, one array per output of the model.

    - ``forward(images)``: float32 tensors on the device, shaped as the model gives them
      (for callers that keep features there, e.g. the fine-tune cache);
    - ``start(images)`` / ``finish(pending)``: flattened rows (projected by ``set_reduce``)
      copied to the host. On CUDA ``start`` queues the copy into pinned host memory and
      ``finish`` waits for it, so the runner starts batch i + 1 before finishing batch i
      and the GPU computes while the host stores rows and fetches the next batch; an
      exported graph (ONNX Runtime, OpenVINO) gets the batch in this engine's own thread,
      so its runtime computes while the runner decodes the next batch;
    - ``__call__(images)``: ``finish(start(images))``.

    ``backend`` is ``runtime.backend`` resolved for this model (what the rows' fingerprint
    records); ``prepared`` says how an exported graph got ready (export seconds, cached).

    ``runtime.precision`` int8 (ONNX Runtime) needs ``calibration``: the uint8 images the
    graph is quantised on (extraction: the run's first images), or only their digest
    (``calibration_digest``, a search query: the quantised graph must be in the cache);
    ``self.calibration`` is what the rows' fingerprint records (None for other precisions).
    """

    def __init__(self, extractor: nn.Module, spec: PreprocessSpec, rt: Runtime,
                 compile_model: bool = False, fold_bn: bool = False,
                 calibration: torch.Tensor | None = None,
                 calibration_digest: str | None = None, calibration_count: int = 0):
        self.rt, self.spec = rt, spec
        self.model_dims = feature_dims(extractor)  # per output, before output.reduce
        folded = fold_batchnorm(extractor, spec.input_size) if fold_bn else extractor
        self.folded = folded is not extractor  # False also where nothing could be folded
        # the family from the model as built: a folded one is a torch.fx GraphModule
        self.backend = resolve_backend(rt.backend, extractor, rt)
        self.graph: Any = None  # an exported graph's runner (onnxruntime, openvino)
        self.prepared = Prepared(self.backend)
        self.normalize = DeviceNormalize(spec.mean, spec.std).to(rt.device)
        self.calibration = (self._calibration(calibration, calibration_digest,
                                              calibration_count)
                            if rt.precision == "int8" else None)
        self._worker: ThreadPoolExecutor | None = None
        if self.backend in EXPORTED:
            self.graph, self.prepared = exported_graph(folded, self.backend, rt,
                                                       tuple(spec.input_size), self.calibration)
            self.model = folded
            # ONNX Runtime and OpenVINO release the GIL while they run: batches go to them
            # from one thread of this engine, so the caller decodes the next batch meanwhile
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="transferlab-graph")
        else:
            compiled = compile_model or self.backend == "compile"
            self.model = prepare_model(folded, rt, compiled, self.backend == "compile")
        self.reduces: list[nn.Module | None] = []  # none set: every output as it is
        self.widest = 0  # the largest batch so far: smaller ones skip cuDNN autotuning
        # output.hflip: every output the mean of the image's and its mirror image's
        self.hflip = False

    def _calibration(self, images: torch.Tensor | None, digest: str | None,
                     count: int) -> Calibration | None:
        if images is None:
            return Calibration(digest, count) if digest else None
        with torch.inference_mode():  # the graph's input: normalised as every batch is
            inputs = self.normalize(images.to(self.rt.device)).float().cpu()
        return Calibration(calibration_digest(images), len(images), inputs)

    def set_reduce(self, reduces: Sequence[nn.Module | None]) -> None:
        """Project the rows of output i with ``reduces[i]`` on the device (outside
        ``torch.compile``); None keeps that output's rows as they are."""
        if len(reduces) != len(self.model_dims):
            raise ValueError(f"{len(reduces)} reductions for {len(self.model_dims)} outputs")
        self.reduces = [None if r is None else r.to(self.rt.device) for r in reduces]

    @property
    def out_dims(self) -> list[int]:
        """The width of each output's rows after its reduction."""
        reduces = self.reduces or [None] * len(self.model_dims)
        return [d if r is None else int(r.dim) for d, r in zip(self.model_dims, reduces)]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """float32 outputs on the device, each shaped as the model gives it (no reduce)."""
        with self._running(images):
            return [out.float() for out in self._outputs(images)]

    def __call__(self, images: torch.Tensor) -> list[np.ndarray]:
        return self.finish(self.start(images))

    def start(self, images: torch.Tensor) -> Pending:
        if self._worker is not None:  # inference_mode is per thread: entered in the worker
            return self._worker.submit(self._started, images), None
        return self._started(images)

    def _started(self, images: torch.Tensor) -> Pending:
        with self._running(images):
            return self._start(images)

    @contextlib.contextmanager
    def _running(self, images: torch.Tensor) -> Iterator[None]:
        short = self.rt.is_cuda and len(images) < self.widest
        self.widest = max(self.widest, len(images))
        with frozen_forward(self.rt), without_autotuning(short):
            yield

    def _outputs(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = images.to(self.rt.device, non_blocking=True)
        x = self.normalize(x)
        out = self._run(x)
        if self.hflip:  # one pass at a time: the activation memory of one batch
            mirrored = self._run(x.flip(-1))
            out = [(a.float() + b.float()) * 0.5 for a, b in zip(out, mirrored, strict=True)]
        return out

    def _run(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The model's outputs for a normalised batch (eager / compiled, or the graph)."""
        if self.graph is not None:
            return list(self.graph(x))
        if self.rt.channels_last and x.ndim == 4:  # a flip gives a contiguous NCHW copy too
            x = x.contiguous(memory_format=torch.channels_last)
        out = self.model(x)
        return [out] if isinstance(out, torch.Tensor) else list(out)

    def _start(self, images: torch.Tensor) -> Pending:
        rows = [out.float().flatten(1) for out in self._outputs(images)]
        if self.reduces:
            rows = [r if m is None else m(r) for r, m in zip(rows, self.reduces, strict=True)]
        return copy_to_host(rows)

    def finish(self, pending: Pending) -> list[np.ndarray]:
        """The rows of a started batch, one array per output; inf/NaN rows are refused
        (fp16 overflows silently)."""
        rows, ready = pending
        if isinstance(rows, Future):
            rows, ready = rows.result()
        if ready is not None:
            ready.synchronize()
        out = [r.numpy() for r in rows]
        if not all(np.isfinite(o).all() for o in out):
            hint = ("fp16 overflowed: set runtime.precision=bf16 or fp32" if
                    self.rt.precision == "fp16" else "check the weights and the input")
            raise ComputeError(f"the model gave inf/NaN features in {self.rt.precision}; "
                               f"{hint}")
        return out


def copy_to_host(outs: Sequence[torch.Tensor]) -> Pending:
    """``outs`` themselves on the CPU; on CUDA queued copies into pinned host memory and the
    event that marks them done, recorded on the stream of the outputs' own device (with
    ``runtime.device: cuda:1`` the current device may be another one)."""
    outs = list(outs)
    if not outs or not outs[0].is_cuda:
        return outs, None
    hosts = []
    for out in outs:
        host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
        host.copy_(out, non_blocking=True)
        hosts.append(host)
    ready = torch.cuda.Event()
    ready.record(torch.cuda.current_stream(outs[0].device))
    return hosts, ready

"""Device, precision, threads and seeding: the hardware choices shared by every runner."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ..config import RuntimeConfig, check_range
from ..errors import ConfigError
from .cores import affinity_cores, usable_cores

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = (*DTYPES, "int8")  # int8: ONNX Runtime's quantised graph (models.backends)


@dataclass(frozen=True)
class Runtime:
    """Resolved runtime settings (no 'auto' left)."""

    device: torch.device
    precision: str  # fp32 | bf16 | fp16 | int8 (an ONNX Runtime graph quantised statically)
    channels_last: bool
    num_workers: int
    threads: int
    tune_malloc: bool = False  # CPU only: keep freed activation memory in the heap
    # runtime.backend as configured: 'auto' is resolved per model by the engine
    # (models.backends.resolve_backend), which records what it chose
    backend: str = "eager"

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def amp_dtype(self) -> torch.dtype | None:
        # int8: the quantised graph decides; what runs in PyTorch around it runs in fp32
        return DTYPES.get(self.precision) if self.precision != "fp32" else None

    def autocast(self) -> contextlib.AbstractContextManager:
        """AMP autocast for bf16/fp16, a no-op for fp32."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def to_dict(self) -> dict:
        return {"device": str(self.device), "precision": self.precision,
                "channels_last": self.channels_last, "num_workers": self.num_workers,
                "threads": self.threads, "tune_malloc": self.tune_malloc,
                **({"backend": self.backend} if self.backend != "eager" else {})}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"runtime.device '{name}' is not a device "
                          "(auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("runtime.device asks for CUDA but no GPU is visible to PyTorch; "
                          "set runtime.device=cpu (or auto)")
    return device


@functools.cache  # the CPU does not change while the process runs
def cpu_bf16_units() -> str | None:
    """The bf16 matrix units this CPU offers this process: ``"AMX"`` (Intel Xeon 4th
    generation and later), ``"AVX512-BF16"`` (AMD Zen 4 and later, Intel Cooper Lake: bf16
    dot products in the vector units), or None. With either, oneDNN runs bf16 autocast conv
    nets 1.8-3x faster than fp32; without them bf16 is emulated and 2-3x slower
    (BENCHMARKS.md, sections 5 and 11)."""
    for name, check in (("AMX", "_is_amx_tile_supported"),
                        ("AVX512-BF16", "_is_avx512_bf16_supported")):
        if _cpu_supports(check):
            return name
    return None


def _cpu_supports(check: str) -> bool:
    probe = getattr(torch.cpu, check, None)  # private: may go away
    try:
        return bool(probe()) if probe is not None else False
    except Exception:
        return False


def cpu_has_bf16_units() -> bool:
    """True when this CPU multiplies bf16 matrices in hardware (``cpu_bf16_units``)."""
    return cpu_bf16_units() is not None


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto': bf16 autocast on CUDA GPUs that compute bf16 natively (fp16 on older ones:
    torch counts bf16 emulated on a T4 or V100 as supported unless told not to) and on CPUs
    with bf16 matrix units; fp32 elsewhere."""
    if precision == "auto":
        if device.type == "cuda":
            native = torch.cuda.is_bf16_supported(including_emulation=False)
            return "bf16" if native else "fp16"
        return "bf16" if cpu_has_bf16_units() else "fp32"
    if device.type == "cuda" and precision == "int8":
        raise ConfigError("runtime.precision=int8 runs on the CPU (ONNX Runtime); set "
                          "runtime.device=cpu, or precision bf16 or fp16 on a GPU")
    if device.type == "cpu" and precision == "fp16":
        raise ConfigError("runtime.precision=fp16 needs CUDA; use fp32 (or bf16) on the CPU")
    return precision


def resolve_runtime(cfg: RuntimeConfig, conv_net: bool = True,
                    sample_load: bool = True) -> Runtime:
    """Fill in every 'auto' choice for this machine (``sample_load``: count the cores other
    processes keep busy now, see ``runtime.cores``)."""
    device = resolve_device(cfg.device)
    # ONNX Runtime computes in fp32: 'auto' precision means fp32 there
    auto_fp32 = cfg.backend == "onnxruntime" and cfg.precision == "auto"
    precision = resolve_precision("fp32" if auto_fp32 else cfg.precision, device)
    cores = len(affinity_cores())
    if device.type == "cuda":
        workers = cfg.num_workers if cfg.num_workers is not None else min(16, max(1, cores - 1))
        threads = cfg.threads or max(1, min(4, cores))
    else:
        # decoding workers and the forward pass share the cores: one worker per 4 cores;
        # the threads take what is left of the cores nobody else is using now
        workers = cfg.num_workers if cfg.num_workers is not None else max(0, cores // 4)
        threads = cfg.threads or max(1, usable_cores(sample_load) - workers)
    channels_last = conv_net if cfg.channels_last is None else cfg.channels_last
    malloc = cfg.tune_malloc and device.type == "cpu"
    return Runtime(device, precision, channels_last, workers, threads, malloc, cfg.backend)


def tune_malloc(threshold: int = 1 << 30) -> bool:
    """glibc only: serve big blocks from the heap and never trim it (``mallopt``).

    By default glibc maps every block above a (dynamic, <= 32 MiB) threshold with ``mmap``
    and unmaps it on free, so each batch's activation tensors are page-faulted in (and zeroed
    by the kernel) again: 20-45% of a CPU forward pass on the 2-core machine of
    BENCHMARKS.md. The cost: freed memory stays with the process until it exits. Returns
    False where it cannot be applied (not glibc).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, threshold)) and bool(mallopt(m_trim_threshold,
                                                                       threshold))


def apply_runtime(rt: Runtime) -> None:
    """Process-wide settings: CPU threads and allocator; on CUDA the device, cuDNN autotuning
    and TF32, which only mixed-precision runs get: ``precision: fp32`` means full fp32."""
    if rt.device.type == "cpu":
        torch.set_num_threads(rt.threads)
        if rt.tune_malloc:
            tune_malloc()
        return
    if rt.device.index is not None:  # events, streams and "cuda" then mean this GPU
        torch.cuda.set_device(rt.device)
    torch.backends.cudnn.benchmark = True
    set_tf32(rt.precision != "fp32")


def set_tf32(enabled: bool) -> None:
    """TF32 for CUDA fp32 matmuls and convolutions, through the ``fp32_precision`` API only
    (torch raises when it is mixed with the legacy ``allow_tf32`` flags)."""
    mode = "tf32" if enabled else "ieee"
    torch.backends.cuda.matmul.fp32_precision = mode
    torch.backends.cudnn.conv.fp32_precision = mode


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """Full fp32 (no TF32) for the math whose answer is the result: the probe's solver,
    kNN distances, k-means. Restores the previous settings."""
    before = (torch.backends.cuda.matmul.fp32_precision,
              torch.backends.cudnn.conv.fp32_precision)
    set_tf32(False)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = \
            before


@contextlib.contextmanager
def without_autotuning(skip: bool = True) -> Iterator[None]:
    """cuDNN's autotuner (``cudnn.benchmark``) off for this block when ``skip``: it times
    every algorithm for each new input shape, which pays for the shape every batch has but
    not for a run's one short last batch (or a batch that lost failed images)."""
    if not skip or not torch.backends.cudnn.benchmark:
        yield
        return
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = True


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; returns a generator for samplers and splits."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def derive_seed(seed: int, *stream: int | str) -> int:
    """The seed of one random stream of a run (a process, a pass): one rule everywhere, so
    streams never collide (``seed + rank`` of one stream would be another run's seed)."""
    if not stream:
        return seed
    key = repr((seed, *stream)).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1  # fits int64


@contextlib.contextmanager
def frozen_forward(rt: Runtime | None = None) -> Iterator[None]:
    """How a frozen base runs: no autograd record (``inference_mode``) under ``rt``'s AMP
    autocast (None: the caller's autocast, if any, applies)."""
    with torch.inference_mode(), (rt.autocast() if rt is not None else contextlib.nullcontext()):
        yield


# Elements of activations per image of resnet50 @224 (``models.cuts.activation_elements``):
# the model the CPU batch sizes were measured on (BENCHMARKS.md, sections 11 and 18)
REFERENCE_ACTIVATIONS = 34_800_000
EXPORTED_BATCH = 8  # ONNX Runtime / OpenVINO graphs on a CPU (BENCHMARKS.md, section 18)


def default_batch_size(rt: Runtime, requested: int | None, activations: int = 0,
                       exported: bool = False) -> int:
    """The batch size: ``requested``, else automatic. Large batches feed a GPU (256). On a
    CPU, for resnet50 @224: 16 in fp32 (larger ones were slower there); 32 with bf16 units,
    where resnet50's whole run was 1.05-1.12x faster than at 16 (section 11); 8 for an
    exported graph (``exported``: ONNX Runtime, OpenVINO), whose forward ran as fast at any
    batch from 1 to 32 while the whole run at 8 was 1.08-1.27x that at 32 (fewer new shapes,
    more overlap of decoding with the graph; section 18). A model whose ``activations`` per
    image are k times resnet50's gets that batch / k (the nearest power of two, at least 1):
    legacy_xception @299 moves 2.1x resnet50's; its whole run in bf16 at 16 was 1.00-1.11x
    that at 32 (section 18), and its fp32 forward on AVX2 was fastest at 8 (issue #30); a
    large input keeps a batch's activation memory bounded."""
    if requested is not None:
        check_range(RuntimeConfig, "runtime.batch_size", requested)
        return requested
    if rt.is_cuda:
        return 256
    top = EXPORTED_BATCH if exported else 32 if rt.precision == "bf16" else 16
    if activations <= 0:
        return top
    scaled = top * REFERENCE_ACTIVATIONS / activations
    return max(1, min(top, 2 ** round(math.log2(scaled)))) if scaled >= 1 else 1

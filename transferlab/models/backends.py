"""Runtimes for the frozen-forward engine (``runtime.backend``, issue #30).

- ``eager``: PyTorch as it is (what every run did before);
- ``compile``: ``torch.compile`` (inductor) with frozen weights (``freezing``: constants
  folded into the graph), compiled on the first batch (inductor keeps its own code cache);
- ``onnxruntime`` / ``openvino``: the engine's model (after BatchNorm folding, up to the
  cut(s), before ``output.reduce``: reductions stay in PyTorch) exported once to ONNX with a
  dynamic batch dimension, kept in the user's cache folder (``runtime.graphcache``: rebuilt
  when the weights or the library versions change, never read unless this user's
  transferlab wrote it) and run by that runtime on the CPU. ONNX Runtime computes in fp32,
  or in int8 (``runtime.precision: int8``: that graph quantised statically, calibrated on
  the run's first images, cached under their digest too); OpenVINO in the run's precision
  (``INFERENCE_PRECISION_HINT`` f32 or bf16);
- ``auto``: what measured fastest for this kind of CPU, precision and model family with a
  gain of at least ``AUTO_MIN_GAIN`` and features within ``TOLERANCE`` of eager
  (``AUTO_TABLE``, BENCHMARKS.md section "(#30)"); eager for everything else.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, MissingDependencyError, StoreError
from ..runtime import graphcache
from ..runtime.device import Runtime, cpu_bf16_units

BACKENDS = ("auto", "eager", "compile", "onnxruntime", "openvino")
EXPORTED = ("onnxruntime", "openvino")  # run from an exported ONNX graph
_EXTRA = {"onnxruntime": ("onnxruntime", "onnx"), "openvino": ("openvino", "openvino")}
ONNX_OPSET = 17

# Agreement with eager fp32 a backend must show to be picked by ``auto`` (and what the tests
# check on tiny models): fp32 backends compute the same arithmetic in another order, so
# their rows differ by rounding only; bf16 ones by bf16 rounding, as eager bf16 does.
TOLERANCE = {"fp32": {"max_abs_rel": 1e-4, "min_cosine": 0.99999},
             "bf16": {"max_abs_rel": 0.02, "min_cosine": 0.999}}
AUTO_MIN_GAIN = 1.2
# (CPU kind, precision, model family) -> backend, only where it measured >= AUTO_MIN_GAIN
# faster than eager in that precision and within TOLERANCE (BENCHMARKS.md, section "(#30)").
# Zen 4 (AVX512-BF16), quiet: OpenVINO bf16 ran resnet50's forward at 1.14-1.28x eager bf16's
# best (median 1.20 of seven measurements in two sessions) and its whole process at 1.09-1.60x
# per round (416 images, batch 8), rows within 3.5e-3 of eager fp32 (cosine 0.999995);
# ViT-B/16 (eager's attention is slow here): OpenVINO bf16 1.33x eager bf16 (3 quiet rounds,
# 1.32-1.36; 1.43x in one round a session before), OpenVINO fp32 2.14x eager fp32 (2.19x);
# ConvNeXt-T: OpenVINO fp32 1.87x (1.74x), bf16 1.03-1.09x. Rows: fp32 within 2e-6, bf16
# within 9e-3 of eager fp32. legacy_xception 1.07-1.12x, and the fp32 runtimes on ResNet /
# Xception 1.0-1.26x: not clearly >= AUTO_MIN_GAIN, so eager there. AMX, AVX512 without bf16
# units: not measured, eager.
AUTO_TABLE: dict[tuple[str, str, str], str] = {
    ("AVX2", "fp32", "resnet"): "onnxruntime",  # Zen 3 (issue #30): 1.27x, largest diff 1e-7
    ("AVX512-BF16", "bf16", "resnet"): "openvino",  # Zen 4: above
    ("AVX512-BF16", "bf16", "vit"): "openvino",
    ("AVX512-BF16", "fp32", "vit"): "openvino",
    ("AVX512-BF16", "fp32", "convnext"): "openvino",
}
_FAMILIES = (("ResNet", "resnet"), ("Xception", "xception"), ("VisionTransformer", "vit"),
             ("ConvNeXt", "convnext"))


@dataclass(frozen=True)
class Prepared:
    """How the engine's backend got ready: export or compile seconds, from the cache or not."""

    backend: str
    seconds: float = 0.0
    cached: bool = False
    where: str = ""
    quantized: bool = False  # int8: the seconds are the export's and the quantisation's

    def summary(self) -> str:
        if self.backend not in EXPORTED:
            return f"backend {self.backend}"
        if self.quantized:
            how = "from the cache" if self.cached else "exported and quantised"
            return (f"backend {self.backend} int8 (graph {how}; its export and quantisation "
                    f"took {self.seconds:.1f} s, once: kept in {self.where})")
        if self.cached:
            return (f"backend {self.backend} (graph from the cache {self.where}; its export "
                    f"took {self.seconds:.1f} s)")
        return (f"backend {self.backend} (graph exported in {self.seconds:.1f} s, once: kept "
                f"in {self.where})")


def cpu_kind() -> str:
    """``AMX`` | ``AVX512-BF16`` (bf16 units) | ``AVX512`` | ``AVX2`` (what oneDNN uses)."""
    units = cpu_bf16_units()
    if units:
        return units
    capability = str(torch.backends.cpu.get_cpu_capability())
    return "AVX512" if capability.startswith("AVX512") else "AVX2"


def model_family(model: nn.Module) -> str | None:
    """resnet | xception | vit | convnext for those timm/torchvision architectures (the first
    module whose class names one), None for any other."""
    for module in model.modules():
        name = type(module).__name__
        for marker, family in _FAMILIES:
            if marker in name:
                return family
    return None


def backend_available(backend: str) -> bool:
    """Whether the optional runtime ``backend`` needs can be imported."""
    if backend not in _EXTRA:
        return True
    try:
        __import__(_EXTRA[backend][0])
        import onnx  # noqa: F401  (the exported graph's protobuf, for both runtimes)
    except ImportError:
        return False
    return True


def require_backend(backend: str) -> None:
    """MissingDependencyError (one line) when ``backend``'s extra is not installed."""
    if not backend_available(backend):
        extra = _EXTRA[backend][1]
        raise MissingDependencyError(f'runtime.backend={backend} needs {_EXTRA[backend][0]} '
                                     f'and onnx: pip install "transferlab[{extra}]"')


def resolve_backend(name: str, model: nn.Module, rt: Runtime) -> str:
    """The backend a run uses (``auto`` resolved for this CPU, precision and model); a
    one-line ConfigError for a backend that cannot run with these settings."""
    if name not in BACKENDS:
        raise ConfigError(f"runtime.backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    if rt.precision == "int8":  # only ONNX Runtime's quantised graph computes in int8
        if name not in ("auto", "onnxruntime"):
            raise ConfigError(f"runtime.precision=int8 runs on ONNX Runtime only; set "
                              f"runtime.backend=onnxruntime (or auto), not {name}")
        name = "onnxruntime"
    if name == "auto":
        if rt.is_cuda:
            return "eager"
        chosen = AUTO_TABLE.get((cpu_kind(), rt.precision, model_family(model) or ""), "eager")
        return chosen if backend_available(chosen) else "eager"  # auto never asks for an install
    if name in EXPORTED:
        if rt.is_cuda:
            raise ConfigError(f"runtime.backend={name} runs on the CPU; set runtime.device=cpu, "
                              "or backend eager or compile on a GPU")
        supported = ("fp32", "int8") if name == "onnxruntime" else ("fp32", "bf16")
        if rt.precision not in supported:
            raise ConfigError(f"runtime.backend={name} computes in {' or '.join(supported)}; "
                              f"set runtime.precision={supported[0]} (or auto)")
        require_backend(name)
    return name


# ---------------------------------------------------------------------------------------
# Exported graphs: ONNX once per (architecture, cut, input size, weights, versions)
# ---------------------------------------------------------------------------------------


def graph_fields(model: nn.Module, backend: str, input_size: tuple[int, ...]) -> dict:
    """What an exported graph depends on: the cache key's fields."""
    import onnx

    names = sorted({str(getattr(m, "module_name", "")) for m in model.modules()} - {""})
    structure = repr(model) + repr(names) + repr(getattr(model, "feature_dims", None))
    return {"backend": backend, "input": [int(d) for d in input_size], "batch": "dynamic",
            "structure": graphcache.cache_key({"repr": structure}),
            "weights": weights_digest(model), "opset": ONNX_OPSET,
            "versions": {"torch": torch.__version__, "onnx": onnx.__version__,
                         backend: _version(backend), "transferlab": _own_version()}}


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of every parameter and buffer (names, dtypes, shapes, values)."""
    import hashlib

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _version(backend: str) -> str:
    return str(getattr(__import__(_EXTRA[backend][0]), "__version__", "?"))


def _own_version() -> str:
    from .. import __version__

    return __version__


def export_onnx(model: nn.Module, input_size: tuple[int, ...]) -> bytes:
    """``model`` (eval, CPU, fp32) as an ONNX graph with a dynamic batch dimension: input
    ``x`` (normalised NCHW), outputs ``out0``.. (one per output of the model).

    The TorchScript tracer is used: it follows hook cuts (``TapModule``, several cuts) as
    they run, which ``torch.export`` cannot."""
    example = torch.zeros((2, *input_size))
    with torch.inference_mode():
        outs = model(example)
    count = 1 if isinstance(outs, torch.Tensor) else len(outs)
    names = [f"out{i}" for i in range(count)]
    axes = {"x": {0: "batch"}, **{n: {0: "batch"} for n in names}}
    buf = io.BytesIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), buf, input_names=["x"], output_names=names,
                          dynamic_axes=axes, opset_version=ONNX_OPSET, dynamo=False,
                          do_constant_folding=True)
    return buf.getvalue()


def cached_graph(model: nn.Module, backend: str,
                 input_size: tuple[int, ...]) -> tuple[bytes, Prepared]:
    """The ONNX graph of ``model`` from the cache, exported (and cached) when missing."""
    fields = graph_fields(model, backend, input_size)
    found = graphcache.load_graph(fields)
    where = str(graphcache.graph_cache_dir())
    if found is not None:
        return found.data, Prepared(backend, found.seconds, True, where)
    started = time.perf_counter()
    data = export_onnx(model, input_size)
    made = graphcache.store_graph(fields, data, time.perf_counter() - started)
    return made.data, Prepared(backend, made.seconds, False, where)


class OnnxRuntimeGraph:
    """An ONNX graph run by ONNX Runtime's CPU provider: normalised images -> outputs."""

    def __init__(self, data: bytes, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        # its threads sleep between runs instead of spinning: the engine decodes the next
        # batch meanwhile, on the same cores (whole runs of int8 resnet50: loop 8% shorter)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = self.session.run(None, {"x": x.float().contiguous().numpy()})
        return [torch.from_numpy(o) for o in outs]


class OpenVinoGraph:
    """An ONNX graph compiled by OpenVINO for this CPU in ``precision`` (fp32 | bf16)."""

    def __init__(self, data: bytes, threads: int, precision: str):
        import openvino as ov

        core = ov.Core()
        # f32 must be asked for: on CPUs with bf16 units OpenVINO's default is bf16
        hint = "bf16" if precision == "bf16" else "f32"
        compiled = core.compile_model(core.read_model(model=data), "CPU", {
            "INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": max(1, threads),
            "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"})
        self.outputs = list(compiled.outputs)
        self.request = compiled.create_infer_request()

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        result = self.request.infer({0: x.float().contiguous().numpy()})
        # the request reuses its output buffers on the next call: copy
        return [torch.from_numpy(result[o].copy()) for o in self.outputs]


def exported_graph(model: nn.Module, backend: str, rt: Runtime, input_size: tuple[int, ...],
                   calibration: Calibration | None = None) -> tuple[Any, Prepared]:
    """A callable running ``model``'s exported graph with ``backend``, and how it was made
    (``rt.precision`` int8: the quantised graph of ``calibration``)."""
    model = model.to("cpu").eval()
    if rt.precision == "int8":
        if calibration is None:
            raise ConfigError("runtime.precision=int8 is calibrated on the first images of an "
                              "extraction; set runtime.precision=fp32 here")
        data, prepared = cached_int8_graph(model, input_size, calibration)
    else:
        data, prepared = cached_graph(model, backend, input_size)
    if backend == "onnxruntime":
        return OnnxRuntimeGraph(data, rt.threads), prepared
    return OpenVinoGraph(data, rt.threads, rt.precision), prepared


# ---------------------------------------------------------------------------------------
# int8: the exported graph quantised statically by ONNX Runtime (BENCHMARKS.md, "(#30)")
# ---------------------------------------------------------------------------------------

# what the quantised graph depends on beyond the fp32 graph and the calibration images
QUANTIZER = {"tool": "onnxruntime.quantization.quantize_static", "format": "QDQ",
             "per_channel": True, "weights": "QInt8", "activations": "QUInt8",
             "calibration": "MinMax", "pre_process": "quant_pre_process"}


@dataclass(frozen=True)
class Calibration:
    """The images an int8 graph is calibrated on: ``images`` (N, C, H, W) normalised float32
    inputs of the graph (None: not at hand, e.g. a search query: the graph must be in the
    cache), and ``digest``, the SHA-256 of the uint8 images they came from
    (``calibration_digest``), which names the graph in the cache and the rows' fingerprint."""

    digest: str
    count: int
    images: torch.Tensor | None = None

    def record(self) -> dict:
        return {"images": self.count, "sha256": self.digest}


def calibration_digest(images: torch.Tensor) -> str:
    """SHA-256 of uint8 images' shape and bytes (what the decoder gave, before
    normalisation): the same files decoded alike give the same digest on a resume."""
    t = images.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}:{tuple(t.shape)}\n".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def quantize_int8(data: bytes, calibration: torch.Tensor) -> bytes:
    """ONNX graph ``data`` quantised statically (``QUANTIZER``) on ``calibration`` inputs.

    ``quant_pre_process`` first: without it the quantiser finds the exporter's conv biases
    as Constant nodes, leaves them in fp32 and the graph ran at 0.49x the fp32 one."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    inputs = calibration.float().contiguous().numpy()

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"x": inputs[i:i + 8]} for i in range(0, len(inputs), 8)])

        def get_next(self) -> dict | None:
            return next(self.items, None)

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), \
            contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        raw, src, dst = (f"{tmp}/{n}.onnx" for n in ("raw", "fp32", "int8"))
        with open(raw, "wb") as f:
            f.write(data)
        quant_pre_process(raw, src, skip_symbolic_shape=True)
        quantize_static(src, dst, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
        with open(dst, "rb") as f:
            return f.read()


def cached_int8_graph(model: nn.Module, input_size: tuple[int, ...],
                      calibration: Calibration) -> tuple[bytes, Prepared]:
    """The int8 graph of ``model`` calibrated on ``calibration`` from the cache; made (the
    fp32 graph exported or read from the cache, then quantised) and cached when missing and
    the images are at hand; a one-line StoreError when they are not."""
    fields = {**graph_fields(model, "onnxruntime", input_size), "precision": "int8",
              "quantizer": QUANTIZER, "calibration": calibration.record()}
    found = graphcache.load_graph(fields)
    where = str(graphcache.graph_cache_dir())
    if found is not None:
        return found.data, Prepared("onnxruntime", found.seconds, True, where, True)
    if calibration.images is None:
        raise StoreError(f"the int8 graph of these rows (calibration {calibration.digest[:12]}) "
                         f"is not in the graph cache {where}: re-run the extract config that "
                         "wrote the store (same data: it rebuilds the graph and skips done rows)")
    started = time.perf_counter()
    data, _ = cached_graph(model, "onnxruntime", input_size)
    data = quantize_int8(data, calibration.images)
    made = graphcache.store_graph(fields, data, time.perf_counter() - started)
    return made.data, Prepared("onnxruntime", made.seconds, False, where, True)

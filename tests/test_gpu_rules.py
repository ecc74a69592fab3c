"""Issue #17: the GPU rules decided without a GPU (device counts, flags and CUDA calls
mocked at the boundary)."""
from __future__ import annotations

import pytest
import torch

from transferlab.errors import ConfigError
from transferlab.runtime import device as device_mod
from transferlab.runtime.device import Runtime, apply_runtime, exact_fp32, resolve_precision
from transferlab.runtime.distributed import DistInfo, local_gpu


@pytest.fixture
def flags():
    """Leave the process-wide CUDA flags as the test found them."""
    before = (torch.backends.cuda.matmul.fp32_precision,
              torch.backends.cudnn.conv.fp32_precision, torch.backends.cudnn.benchmark)
    yield
    (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision,
     torch.backends.cudnn.benchmark) = before


def test_more_local_ranks_than_gpus_is_one_line_naming_the_fix(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert local_gpu(DistInfo(1, 4, 1), "auto") == 1
    with pytest.raises(ConfigError) as info:
        local_gpu(DistInfo(2, 4, 2), "cuda")
    message = str(info.value)
    assert "--nproc_per_node=2" in message and "runtime.device=cpu" in message
    assert "\n" not in message


def test_an_explicit_gpu_index_under_torchrun_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    with pytest.raises(ConfigError, match="every process on one GPU.*runtime.device=cuda"):
        local_gpu(DistInfo(0, 2, 0), "cuda:3")


@pytest.mark.parametrize("device, backend", [("auto", "nccl"), ("cuda", "nccl"),
                                             ("cpu", "gloo")])
def test_torchrun_processes_join_nccl_on_their_own_gpu(monkeypatch, device, backend):
    """From torchrun's environment alone: LOCAL_RANK 3 of a 4-GPU machine is cuda:3 for
    set_device and for NCCL's ``device_id`` (eager, bound communicators); device=cpu: gloo."""
    import torch.distributed as dist

    from transferlab.runtime import distributed

    for name, value in {"RANK": "7", "WORLD_SIZE": "8", "LOCAL_RANK": "3",
                        "LOCAL_WORLD_SIZE": "4"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    chosen, joined = [], []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group",
                        lambda backend, **kwargs: joined.append((backend, kwargs)))
    info = distributed.init_distributed(device)
    assert (info.rank, info.world_size, info.local_rank) == (7, 8, 3)
    assert [b for b, _ in joined] == [backend]
    if backend == "nccl":
        assert chosen == [torch.device("cuda", 3)]
        assert joined[0][1]["device_id"] == torch.device("cuda", 3)
    else:
        assert chosen == [] and "device_id" not in joined[0][1]


def cuda_runtime(precision: str, index: int | None = None) -> Runtime:
    return Runtime(torch.device("cuda", index) if index is not None else torch.device("cuda"),
                   precision, channels_last=True, num_workers=0, threads=1)


@pytest.mark.parametrize("precision, mode", [("fp32", "ieee"), ("bf16", "tf32"),
                                             ("fp16", "tf32")])
def test_tf32_only_for_mixed_precision_runs(flags, precision, mode):
    apply_runtime(cuda_runtime(precision))
    assert torch.backends.cuda.matmul.fp32_precision == mode
    assert torch.backends.cudnn.conv.fp32_precision == mode
    assert torch.backends.cudnn.benchmark


def test_exact_fp32_turns_tf32_off_and_restores_it(flags):
    apply_runtime(cuda_runtime("bf16"))
    with exact_fp32():
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
        assert torch.backends.cudnn.conv.fp32_precision == "ieee"
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"


def test_an_indexed_device_is_made_current(flags, monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    apply_runtime(cuda_runtime("fp32", index=1))
    apply_runtime(cuda_runtime("fp32"))
    assert chosen == [torch.device("cuda", 1)]


def test_auto_precision_is_fp16_on_gpus_without_bf16(monkeypatch):
    """A T4 or V100 emulates bf16 (slowly): torch calls that supported unless asked about
    native support, so ``auto`` must ask and pick fp16 there."""
    cuda = torch.device("cuda")

    def gpu(native: bool):
        return lambda including_emulation=True: including_emulation or native

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", gpu(native=False))
    assert resolve_precision("auto", cuda) == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", gpu(native=True))
    assert resolve_precision("auto", cuda) == "bf16"
    monkeypatch.setattr(device_mod, "cpu_has_bf16_units", lambda: False)
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"


def test_tests_run_on_the_cpu_unless_they_ask_for_cuda():
    assert not torch.cuda.is_available()
    assert device_mod.resolve_device("auto") == torch.device("cpu")


def test_the_ready_event_is_recorded_on_the_rows_own_device(monkeypatch):
    from transferlab.models import engine

    class FakeCudaRows:
        is_cuda, shape, dtype = True, (2, 3), torch.float32
        device = torch.device("cuda", 1)

    streams, recorded, copies = [], [], []

    class Event:
        def record(self, stream=None):
            recorded.append(stream)

    class Host:
        def copy_(self, src, non_blocking=False):
            copies.append((src, non_blocking))

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream",
                        lambda device=None: streams.append(device) or f"stream of {device}")
    monkeypatch.setattr(torch, "empty", lambda *a, **k: Host() if k.get("pin_memory") else None)
    rows, more = FakeCudaRows(), FakeCudaRows()
    hosts, _ = engine.copy_to_host([rows, more])  # one event after the copies of every output
    assert streams == [torch.device("cuda", 1)] and recorded == ["stream of cuda:1"]
    assert copies == [(rows, True), (more, True)] and all(isinstance(h, Host) for h in hosts)


@pytest.mark.parametrize("precision, hint", [("fp16", "runtime.precision=bf16"),
                                             ("fp32", "check the weights")])
def test_non_finite_rows_are_refused(precision, hint):
    from transferlab.errors import ComputeError
    from transferlab.models.engine import FeatureComputer

    computer = FeatureComputer.__new__(FeatureComputer)  # finish() needs only the runtime
    computer.rt = Runtime(torch.device("cpu"), precision, False, 0, 1)
    good = torch.ones(2, 3)
    assert [o.tolist() for o in computer.finish(([good, good[:, :1]], None))] == \
        [good.tolist(), good[:, :1].tolist()]
    bad = torch.tensor([[1.0, float("inf")], [float("nan"), 0.0]])
    with pytest.raises(ComputeError, match=f"inf/NaN features in {precision}; .*{hint}"):
        computer.finish(([good, bad], None))  # any output


def test_processes_of_one_machine_share_its_loader_workers_and_threads(monkeypatch):
    from transferlab.config import RuntimeConfig
    from transferlab.runtime.distributed import share_runtime

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    rt = Runtime(torch.device("cpu"), "fp32", False, num_workers=8, threads=16)
    shared = share_runtime(rt, RuntimeConfig(), DistInfo(1, 8, 1))
    assert (shared.num_workers, shared.threads) == (2, 4)
    asked = share_runtime(rt, RuntimeConfig(num_workers=8, threads=16), DistInfo(1, 8, 1))
    assert (asked.num_workers, asked.threads) == (8, 16)  # what the user set is kept
    assert share_runtime(rt, RuntimeConfig(), DistInfo()) == rt  # a single process


def test_solver_math_runs_without_tf32(flags, monkeypatch):
    """The probe's L-BFGS, kNN and k-means see full fp32 even after a bf16 run set TF32."""
    import numpy as np

    from transferlab.analysis import kmeans, linear_probe, neighbors

    apply_runtime(cuda_runtime("bf16"))
    seen = []

    def spy(module, name):
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            seen.append((name, torch.backends.cuda.matmul.fp32_precision))
            return real(*args, **kwargs)
        monkeypatch.setattr(module, name, wrapper)

    spy(linear_probe, "_lbfgs")
    spy(neighbors, "nearest")
    spy(kmeans, "_lloyd")
    x = np.random.default_rng(0).standard_normal((40, 4)).astype(np.float32)
    y = np.arange(40) % 2
    linear_probe.fit_logistic(x, y, l2s=[1e-2], device="cpu", max_iter=5)
    neighbors.knn_predict(x, y, x[:5], k=3, device="cpu")
    kmeans.kmeans(x, 2, n_init=1, max_iter=3, device="cpu")
    assert {name for name, _ in seen} == {"_lbfgs", "nearest", "_lloyd"}
    assert {mode for _, mode in seen} == {"ieee"}
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"  # restored afterwards


def jpeg_bytes(tmp_path, n: int) -> list[torch.Tensor]:
    from tests.imagegen import random_image, save

    out = []
    for i in range(n):
        path = save(random_image(60, 40, seed=i), tmp_path / f"{i}.jpg", quality=90)
        out.append(torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8))
    return out


def decoder_for_tests():
    from transferlab.config import PreprocessConfig
    from transferlab.data.gpudecode import BatchDecoder
    from transferlab.data.preprocess import resolve_preprocess

    spec = resolve_preprocess({}, PreprocessConfig(input_size=[32, 32]))
    return BatchDecoder(spec, "cpu", None)


def test_jpegs_are_decoded_a_chunk_at_a_time_by_the_maintained_decoder(tmp_path, monkeypatch):
    from transferlab.data import gpudecode

    decoder = decoder_for_tests()
    pytest.importorskip("torchcodec")
    assert decoder.decoder_name == "torchcodec"  # not torchvision's deprecated decoder
    sizes = []
    real = decoder.decode
    monkeypatch.setattr(decoder, "decode", lambda data: sizes.append(len(data)) or real(data))
    monkeypatch.setattr(gpudecode, "DECODE_CHUNK", 4)
    images = decoder.decode_resized(jpeg_bytes(tmp_path, 10))
    assert sizes == [4, 4, 2]  # never a whole batch of full-resolution decodes alive
    assert [tuple(im.shape) for im in images] == [(3, 32, 32)] * 10


def test_a_decoder_that_cannot_run_on_the_device_is_passed_over_once(monkeypatch):
    """A TorchCodec that loads but cannot decode on the device (a CPU-only build on a GPU
    machine) would reject every image, and every image would quietly go through PIL:
    each decoder is tried once on a small JPEG, the first that works is used."""
    from transferlab.data import gpudecode
    from transferlab.errors import ComputeError

    real = dict(gpudecode._decoders())["torchvision"]

    def broken(data, **kwargs):
        raise RuntimeError("Unsupported device: cuda (this build has no CUDA support)")

    monkeypatch.setattr(gpudecode, "_decoders",
                        lambda: [("torchcodec", broken), ("torchvision", real)])
    with pytest.warns(DeprecationWarning):  # the fallback is torchvision's deprecated API
        decoder = decoder_for_tests()
        assert decoder.decoder_name == "torchvision"
        assert decoder.decode([gpudecode._probe_jpeg()])[0].shape == (3, 16, 16)
    monkeypatch.setattr(gpudecode, "_decoders", lambda: [("torchcodec", broken)])
    with pytest.raises(ComputeError) as err:
        decoder_for_tests()
    message = str(err.value)
    assert "\n" not in message and "Unsupported device" in message
    assert message.endswith("or set runtime.gpu_decode=false")


def test_a_torchcodec_that_does_not_import_leaves_torchvision(monkeypatch):
    import sys

    from transferlab.data import gpudecode

    monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)  # import raises
    assert [name for name, _ in gpudecode._decoders()] == ["torchvision"]


def test_out_of_gpu_memory_while_decoding_is_reported_not_retried(tmp_path, monkeypatch):
    from transferlab.errors import ComputeError

    decoder = decoder_for_tests()
    calls = []

    def oom(data, **kwargs):
        calls.append(data)
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(decoder, "_decode_jpeg", oom)
    with pytest.raises(ComputeError, match="out of GPU memory decoding 3 JPEGs; lower "
                                           "runtime.batch_size"):
        decoder.decode(jpeg_bytes(tmp_path, 3))
    assert len(calls) == 1  # not image by image


@pytest.mark.parametrize("name, cut", [("test_resnet", "stage:1"), ("test_vit", "layer:blocks.0")])
def test_hook_cuts_compile_as_a_graph_with_the_same_values(monkeypatch, name, cut):
    from transferlab.models.cuts import TapModule
    from transferlab.models.engine import prepare_model
    from transferlab.models.extractor import build_extractor

    built = build_extractor(name, cut=cut)
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compiled.append(model) or model)
    rt = Runtime(torch.device("cpu"), "fp32", False, 0, 1)
    model = prepare_model(built.extractor, rt, compile_model=True)
    assert compiled == [model] and not any(isinstance(m, TapModule) for m in model.modules())
    assert isinstance(built.extractor.body, TapModule)  # the caller's extractor is untouched
    x = torch.randn(2, *built.spec.input_size)
    with torch.inference_mode():
        assert torch.equal(model(x), built.extractor(x))


def test_a_hook_cut_fx_cannot_trace_is_one_line(monkeypatch):
    from transferlab.models import graph
    from transferlab.models.extractor import build_extractor

    def untraceable(*args, **kwargs):
        raise RuntimeError("dynamic control flow")

    monkeypatch.setattr("timm.models._features_fx.create_feature_extractor", untraceable)
    with pytest.raises(ConfigError, match=r"cannot compile the cut at 'layer1'.*"
                                          r"runtime.compile=false"):
        graph.compilable(build_extractor("test_resnet", cut="stage:1").extractor)


def test_a_short_batch_skips_cudnn_autotuning(flags, monkeypatch):
    """cuDNN times every algorithm for each new shape: worth it for the full batches only."""
    from transferlab.models.engine import FeatureComputer

    computer = FeatureComputer.__new__(FeatureComputer)
    computer.rt, computer.widest = Runtime(torch.device("cuda"), "fp32", False, 0, 1), 0
    seen = []
    computer.reduces, computer._worker = [], None  # eager: no graph thread
    monkeypatch.setattr(computer, "_outputs",
                        lambda x: seen.append(torch.backends.cudnn.benchmark) or [x.float()])
    torch.backends.cudnn.benchmark = True
    for size, run in zip((8, 8, 3, 8, 5, 2), ("start", "forward") * 3):  # both entry points
        getattr(computer, run)(torch.zeros(size, 3, 4, 4, dtype=torch.uint8))
    assert seen == [True, True, False, True, False, False]
    assert torch.backends.cudnn.benchmark is True  # restored after each short batch

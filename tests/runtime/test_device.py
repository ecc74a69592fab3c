"""Runtime resolution: what 'auto' becomes on this machine, and the CPU allocator switch."""
from __future__ import annotations

import ctypes.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from transferlab.config import RuntimeConfig
from transferlab.errors import ConfigError
from transferlab.runtime import device as runtime
from transferlab.runtime.device import default_batch_size, resolve_runtime


def test_cpu_auto_choices(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_has_bf16_units", lambda: False)
    rt = resolve_runtime(RuntimeConfig(device="cpu"))
    assert rt.device == torch.device("cpu")
    assert rt.precision == "fp32"
    assert rt.channels_last is True
    assert rt.tune_malloc is True
    assert rt.num_workers + rt.threads >= 1
    assert default_batch_size(rt, None) == 16
    assert default_batch_size(rt, 3) == 3
    with pytest.raises(ConfigError, match=r"^runtime.batch_size must be at least 1 .*, got 0$"):
        default_batch_size(rt, 0)


def test_cpu_auto_precision_is_bf16_with_bf16_matrix_units(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_has_bf16_units", lambda: True)
    rt = resolve_runtime(RuntimeConfig(device="cpu"))
    assert rt.precision == "bf16"
    assert default_batch_size(rt, None) == 32  # bf16 units: batch 32 (BENCHMARKS.md, 11)
    assert default_batch_size(rt, 8) == 8
    fp32 = resolve_runtime(RuntimeConfig(device="cpu", precision="fp32"))
    assert fp32.precision == "fp32" and default_batch_size(fp32, None) == 16


@pytest.mark.parametrize("precision, exported, ratio, want", [
    ("bf16", False, 1.0, 32), ("fp32", False, 1.0, 16), ("bf16", True, 1.0, 8),
    ("bf16", False, 2.1, 16), ("fp32", False, 2.1, 8), ("bf16", True, 2.1, 4),  # xception
    ("bf16", False, 4.0, 8), ("fp32", False, 1000.0, 1),  # a large input: bounded memory
    ("bf16", False, 0.01, 32), ("fp32", False, 0.0, 16)])  # tiny models; 0: not counted
def test_the_cpu_batch_follows_the_backend_and_the_activations_per_image(
        precision, exported, ratio, want):
    """resnet50's measured batch per precision / exported graph, divided by how many times
    resnet50's activations per image the model moves (nearest power of two, 1 at least)."""
    rt = runtime.Runtime(torch.device("cpu"), precision, True, 0, 2)
    activations = int(ratio * runtime.REFERENCE_ACTIVATIONS)
    assert default_batch_size(rt, None, activations, exported) == want
    assert default_batch_size(rt, 5, activations, exported) == 5  # asked for: kept


def test_extraction_counts_the_activations_of_its_model(tmp_path, monkeypatch):
    """The wiring: a model with 4x the reference's activations per image gets a quarter of
    the batch in run_extract (recorded in meta.json), and an explicit batch is kept."""
    from tests.helpers import make_cfg, make_tree
    from transferlab.extract.runner import run_extract
    from transferlab.models.cuts import activation_elements
    from transferlab.models.extractor import build_extractor

    b = build_extractor("test_resnet", cut="head", preprocess={"input_size": [32, 32]})
    elements = activation_elements(b.extractor, b.spec.input_size)
    assert elements > 0
    monkeypatch.setattr(runtime, "REFERENCE_ACTIVATIONS", elements / 4)
    data = tmp_path / "data"
    make_tree(data, 6)
    for batch, want in (("null", 4), ("3", 3)):  # fp32: 16 / 4
        cfg = make_cfg(data, tmp_path / f"out{batch}", f"runtime.batch_size={batch}")
        res = run_extract(cfg)
        meta = json.loads((Path(res.out_dir) / "meta.json").read_text())
        assert meta["runtime"]["batch_size"] == want


def test_bf16_units_are_only_claimed_on_a_cpu_with_amx_or_avx512_bf16():
    """AMX shows as amx_tile, AVX512-BF16 as avx512_bf16 in /proc/cpuinfo (Linux). The
    reverse need not hold: a kernel may refuse the process the AMX state, and then bf16 is
    not chosen for AMX."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8").split()
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    units = runtime.cpu_bf16_units()
    assert units in (None, "AMX", "AVX512-BF16")
    assert units != "AMX" or "amx_tile" in flags
    assert units != "AVX512-BF16" or "avx512_bf16" in flags


@pytest.mark.parametrize("amx, avx512_bf16, want", [
    (True, True, "AMX"), (False, True, "AVX512-BF16"), (False, False, None)])
def test_bf16_units_amx_first_then_avx512_bf16(monkeypatch, amx, avx512_bf16, want):
    """A Zen 4 EPYC has avx512_bf16 but no AMX: bf16 autocast ran resnet50 1.8x and
    legacy_xception 1.9x faster than fp32 there (BENCHMARKS.md, section 11), so it counts."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    runtime.cpu_bf16_units.cache_clear()
    try:
        assert runtime.cpu_bf16_units() == want
        expected = "bf16" if want else "fp32"
        assert runtime.resolve_precision("auto", torch.device("cpu")) == expected
    finally:
        runtime.cpu_bf16_units.cache_clear()


def test_tune_malloc_switch_off():
    rt = resolve_runtime(RuntimeConfig(device="cpu", tune_malloc=False, channels_last=False))
    assert rt.tune_malloc is False and rt.channels_last is False
    assert rt.to_dict()["tune_malloc"] is False


def test_fp16_on_cpu_is_refused():
    with pytest.raises(ConfigError, match="fp16 needs CUDA"):
        resolve_runtime(RuntimeConfig(device="cpu", precision="fp16"))


FAULTS = """
import json, resource, torch
from transferlab.config import RuntimeConfig
from transferlab.runtime.device import apply_runtime, resolve_runtime

def faults_per_batch():
    for _ in range(8):  # the heap settles after a few rounds
        x = torch.ones(16 << 20)  # 64 MiB, above glibc's largest mmap threshold (32 MiB)
        del x
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        x = torch.ones(16 << 20)
        del x
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5

plain = faults_per_batch()
apply_runtime(resolve_runtime(RuntimeConfig(device="cpu", threads=1)))
print(json.dumps({"plain": plain, "tuned": faults_per_batch()}))
"""


@pytest.mark.skipif(not ctypes.util.find_library("c") or sys.platform != "linux",
                    reason="mallopt is glibc-only")
def test_apply_runtime_keeps_big_blocks_in_the_heap():
    """A 64 MiB tensor freed and allocated again is page-faulted in each time by default
    (16384 pages of 4 KiB); after apply_runtime on CPU the settled heap block is reused."""
    out = subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True,
                         check=True)
    faults = json.loads(out.stdout.strip().splitlines()[-1])
    assert faults["plain"] > 8000, faults
    assert faults["tuned"] < 0.1 * faults["plain"], faults

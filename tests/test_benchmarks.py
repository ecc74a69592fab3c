"""Every benchmark script runs in its --quick mode and prints its table (no speed asserted)."""
from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest

SCRIPTS = ["extract_efficiency", "vs_baselines", "memory", "cpu_defaults", "finetune_cache",
           "store_open", "bench_index", "whole_process", "contention", "multicut",
           "webdataset_sources", "similarity_scale", "curate_scale", "curate_quality",
           "view_scale"]
# the optional third-party module a script's quick mode needs (an extra of pyproject.toml);
# anything else missing, our own modules above all, fails the test
OPTIONAL = {"bench_index": "faiss"}


@pytest.mark.parametrize("name", SCRIPTS)
def test_quick_mode_prints_a_table(name, tmp_path, capsys):
    if name in OPTIONAL:
        pytest.importorskip(OPTIONAL[name])
    module = importlib.import_module(f"benchmarks.{name}")
    results = module.main(["--quick", "--device", "cpu", "--bench-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "machine:" in out
    assert "### " in out
    tables = [block.splitlines() for block in out.split("### ")[1:]]
    for lines in tables:  # every table: a header, at least one measured row, same columns
        rows = [line for line in lines if line.startswith("| ")]
        assert len(rows) >= 2, out
        assert {row.count("|") for row in rows} == {rows[0].count("|")}, out
    assert results


def test_runtimes_quick_mode_prints_a_table_in_its_own_process(tmp_path):
    """benchmarks/runtimes.py (issue #30) in a child process: OpenVINO's and ONNX Runtime's
    thread pools, with the threads and allocator settings it applies, stay out of this
    process (in-process, a later test's subprocess wait crashed here)."""
    import subprocess
    import sys

    pytest.importorskip("onnxruntime")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "benchmarks/runtimes.py", "--quick", "--bench-dir",
                           str(tmp_path)], cwd=root, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(root)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert "machine:" in proc.stdout and len(rows) >= 3
    assert any(line.startswith("| eager fp32") for line in rows)


def test_decode_candidates_run_the_shipped_command(tmp_path):
    """Each candidate is the extract command as a whole process (``pil``: as without
    simplejpeg installed, which the child checks); ``run_command`` fails unless every image
    is written."""
    from benchmarks import decode_candidates, whole_process
    from benchmarks.common import jpeg_folder

    data = jpeg_folder(tmp_path, 4, size=(96, 72))
    config = whole_process.write_config(tmp_path / "whole.yaml", data, tmp_path / "store",
                                        "test_resnet")
    for candidate in decode_candidates.CANDIDATES:
        whole_process.run_command(config, 4, ["runtime.device=cpu"], candidate=candidate)
    with pytest.raises(SystemExit, match="unknown candidate 'dct'; one of pil, image"):
        decode_candidates.main("dct")


def gpu_suite_steps() -> list[tuple[int, list[str]]]:
    """(time limit, argv) of every ``step`` of benchmarks/gpu_suite.sh."""
    import shlex

    text = (Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.sh").read_text()
    steps = []
    for command in text.replace("\\\n", " ").splitlines():
        if command.startswith("step "):
            _, _title, limit, *argv = shlex.split(command)
            steps.append((int(limit), argv))
    return steps


def test_the_gpu_suite_fits_8_minutes_and_its_flags_parse(monkeypatch):
    """The suite runs on a lent GPU with minutes of budget: a typo in a flag must show here,
    not there. Each benchmark step's flags go through that script's own parser."""
    import argparse

    steps = gpu_suite_steps()
    assert len(steps) == 5
    assert sum(limit for limit, _ in steps) + 5 * len(steps) <= 8 * 60  # 5 s kill grace each

    class Parsed(Exception):
        pass

    class Parser(argparse.ArgumentParser):
        def parse_args(self, args=None, namespace=None):
            raise Parsed(super().parse_args(args, namespace))

    scripts = [argv for _, argv in steps if argv[1].startswith("benchmarks/")]
    assert {Path(a[1]).stem for a in scripts} == {
        "extract_efficiency", "whole_process", "vs_baselines", "finetune_cache"}
    for argv in scripts:
        module = importlib.import_module(f"benchmarks.{Path(argv[1]).stem}")
        real = module.base_parser

        def parser(description, real=real):
            p = real(description)
            p.__class__ = Parser
            return p

        monkeypatch.setattr(module, "base_parser", parser)
        with pytest.raises(Parsed) as parsed:
            module.main(argv[2:])
        assert parsed.value.args[0].device == "cuda"
    assert any("-m" in argv and "gpu" in argv for _, argv in steps)  # the CUDA tests

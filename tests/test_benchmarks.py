"""Every benchmark script runs in its --quick mode and prints its table (no speed asserted)."""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest

SCRIPTS = ["extract_efficiency", "vs_baselines", "memory", "cpu_defaults", "finetune_cache",
           "store_open", "bench_index", "whole_process", "contention", "multicut",
           "webdataset_sources"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_quick_mode_prints_a_table(name, tmp_path, capsys):
    try:
        module = importlib.import_module(f"benchmarks.{name}")
    except ModuleNotFoundError as exc:  # finetune_cache needs transferlab.finetune
        pytest.skip(f"benchmarks.{name} cannot be imported here: {exc}")
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

"""Every benchmark script runs in its --quick mode and prints its table (no speed asserted)."""
from __future__ import annotations

import importlib

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

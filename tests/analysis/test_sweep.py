"""Issue #28: ``transferlab sweep``: three timm test-size models x all stages on bundled
digits, the leaderboard, and a killed sweep redoing only what is missing."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import yaml

from transferlab.analysis.layer_sweep import backbone_dir, check_backbones, run_sweep
from transferlab.analysis.probe_report import run_probe
from transferlab.commands import main
from transferlab.config import ExtractConfig, SweepConfig, load_config
from transferlab.errors import ConfigError
from transferlab.store.reader import FeatureStore

BACKBONES = ["test_resnet", "test_efficientnet", "test_vit"]
STAGES = {"test_resnet": 5, "test_efficientnet": 5, "test_vit": 6}


def sweep_config(out, *extra):
    return load_config(None, [
        f"backbones={BACKBONES}", "cuts=all-stages", "data.source=mnist-5k",
        "data.split=test", "data.classes=[3, 8]", "probe.l2=[1e-3, 1e-1]", "probe.max_iter=100",
        "runtime.progress=false", "runtime.device=cpu", f"output.dir={out}", *extra],
        SweepConfig)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    cfg = sweep_config(tmp_path_factory.mktemp("sweep") / "out")
    return cfg, run_sweep(cfg)


def read_csv(path):
    return list(csv.DictReader(path.open(encoding="utf-8")))


def test_every_backbone_and_stage_is_extracted_once_and_probed(swept):
    cfg, result = swept
    assert result.extracted == {b: 200 for b in BACKBONES}  # 100 test digits each of 3 and 8
    assert [r["backbone"] for r in result.rows] == [b for b in BACKBONES
                                                    for _ in range(STAGES[b])]
    assert len(result.probed) == len(result.rows) == 16
    for b in BACKBONES:
        mine = [r for r in result.rows if r["backbone"] == b]
        assert [r["cut"] for r in mine] == [f"stage:{i}" for i in range(STAGES[b])]
        assert mine[0]["relative_depth"] == 0 and mine[-1]["relative_depth"] == 1
        assert len({r["images_per_second"] for r in mine}) == 1 and mine[0]["images_per_second"] > 0
    # each row is the probe of its own store, on the held-out split fixed by the seed
    row = result.rows[7]
    store = FeatureStore.open(row["store"])
    report = run_probe(store, l2s=[1e-3, 1e-1], knn=5, seed=0, device="cpu", max_iter=100)
    assert row["probe_acc"] == pytest.approx(report.test_acc[report.best], abs=1e-6)
    assert row["knn_acc"] == pytest.approx(report.knn_acc, abs=1e-6)
    assert row["dim"] == store.features.shape[1] and report.n_test == 40
    # the leaderboard: best first; the best row is the sweep's best
    board = read_csv(cfg_out(cfg) / "leaderboard.csv")
    assert len(board) == 16 and list(board[0]) == [
        "backbone", "cut", "relative_depth", "dim", "probe_acc", "best_l2", "knn_acc",
        "images_per_second", "store_mb"]
    accs = [float(r["probe_acc"]) for r in board]
    assert accs == sorted(accs, reverse=True) and accs[0] == result.best["probe_acc"]
    assert (board[0]["backbone"], board[0]["cut"]) == (result.best["backbone"],
                                                       result.best["cut"])
    md = (cfg_out(cfg) / "leaderboard.md").read_text()
    assert md.count("\n") == 18 and md.startswith("| rank | backbone | cut |")


def cfg_out(cfg):
    return Path(cfg.output.dir)


def shard_times(directory):
    return {p: p.stat().st_mtime_ns for p in sorted(directory.rglob("*.npy"))}


def test_a_killed_sweep_redoes_only_what_is_missing(swept):
    cfg, first = swept
    out = cfg_out(cfg)
    before = (out / "leaderboard.csv").read_text()
    # the leaderboard lost: nothing is extracted or probed again, the same leaderboard
    (out / "leaderboard.csv").unlink()
    again = run_sweep(cfg)
    assert again.extracted == {b: 0 for b in BACKBONES} and again.probed == []
    assert (out / "leaderboard.csv").read_text() == before
    # one backbone's stores and one probe of another lost (a sweep killed at that point)
    kept = {b: shard_times(out / b) for b in ("test_resnet", "test_efficientnet")}
    shutil.rmtree(out / "test_vit")
    (out / "test_resnet" / "probe-stage-1.json").unlink()
    # a kept probe result that is not what the sweep writes is computed again, not trusted
    damaged = out / "test_efficientnet" / "probe-stage-2.json"
    record = json.loads(damaged.read_text())
    record["result"]["probe_acc"] = "1.0"
    damaged.write_text(json.dumps(record))
    again = run_sweep(cfg)
    assert again.extracted == {"test_resnet": 0, "test_efficientnet": 0, "test_vit": 200}
    assert again.probed == [("test_resnet", "stage-1"), ("test_efficientnet", "stage-2")] + [
        ("test_vit", f"stage-{i}") for i in range(6)]
    assert {b: shard_times(out / b) for b in kept} == kept  # their stores were not rewritten
    # the same leaderboard, but for the speed re-measured by the extraction that ran again
    now = read_csv(out / "leaderboard.csv")
    then = read_csv_text(before)
    assert [{k: v for k, v in r.items() if k != "images_per_second"} for r in now] == \
        [{k: v for k, v in r.items() if k != "images_per_second"} for r in then]
    assert [r["images_per_second"] for r in now if r["backbone"] != "test_vit"] == \
        [r["images_per_second"] for r in then if r["backbone"] != "test_vit"]


def read_csv_text(text):
    return list(csv.DictReader(text.splitlines()))


def test_the_command_prints_the_best_and_a_config_that_loads(swept, capsys, tmp_path):
    pytest.importorskip("matplotlib")
    cfg, first = swept
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"backbones": BACKBONES, "cuts": "all-stages",
                                    "data": {"source": "mnist-5k", "split": "test",
                                             "classes": [3, 8]},
                                    "probe": {"l2": [1e-3, 1e-1], "max_iter": 100},
                                    "runtime": {"progress": False, "device": "cpu"},
                                    "output": {"dir": str(cfg_out(cfg))}}))
    assert main(["sweep", str(path), "--plot"]) == 0
    out = capsys.readouterr().out
    assert "probes computed now: 0 of 16" in out
    best = first.best
    assert f"best: {best['backbone']} at {best['cut']}" in out
    snippet = out.split("extract config (transferlab extract FILE):\n")[1].split(
        "finetune model section")[0]
    (tmp_path / "best.yaml").write_text(snippet)
    ext = load_config(tmp_path / "best.yaml", [], ExtractConfig)
    assert (ext.model.name, ext.model.cut, ext.model.pool) == (best["backbone"], best["cut"],
                                                               "avg")
    assert ext.data.classes == [3, 8] and ext.data.split == "test"
    for name in ("accuracy_by_depth.png", "accuracy_vs_throughput.png"):
        assert (cfg_out(cfg) / name).read_bytes()[:4] == b"\x89PNG"


def test_bad_sweep_configs_are_refused_in_one_line(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text("cuts: all-stages\n")
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err
    assert "backbones must be a non-empty list of model names" in err and err.count("\n") == 1
    with pytest.raises(ConfigError, match="would share the directory"):
        check_backbones(SweepConfig(backbones=["hf-hub:a/b", "hf-hub:a_b"]))
    assert backbone_dir("hf-hub:timm/resnet18.a1_in1k") == "hf-hub_timm_resnet18.a1_in1k"


@pytest.mark.parametrize("name", ["sweep_mnist.yaml", "sweep_lenet_split.yaml"])
def test_the_example_sweep_configs_load(name):
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / name, [], SweepConfig)
    assert cfg.backbones and cfg.probe.knn == 5

"""Fine-tuning under real ``torchrun`` launches: gloo, two CPU processes, the bundled digits."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO, env
from tests.helpers import torchrun as torchrun_command
from transferlab.config import FinetuneConfig, load_config
from transferlab.finetune.run import run_finetune
from transferlab.models.checkpoint import read_checkpoint
from transferlab.training.sync import state_digest

pytestmark = pytest.mark.slow

# LeNet cut after its 7th layer, an MLP head on digits 5-9 of the bundled MNIST digits (2,000
# training and 500 test digits), cached features, a validation split and a small probe.
CONFIG = {
    "model": {"name": "lenet", "cut": "first:7"},
    "data": {"source": "mnist-5k", "classes": [5, 6, 7, 8, 9]},
    "test": {"split": "test"},
    "head": {"type": "mlp", "hidden": [64], "dropout": 0.2},
    "train": {"epochs": 3, "batch_size": 32, "optimizer": "adam", "lr": 0.002,
              "schedule": "cosine", "val_split": 0.1},
    "probe": {"samples": 300},
    "runtime": {"threads": 1, "num_workers": 0, "progress": False, "seed": 0,
                "device": "cpu"},
}
# before the head: LeNet trained whole on digits 0-4, then the last base layer unfrozen
PRETRAIN = ["pretrain.enabled=true", "pretrain.classes=[0, 1, 2, 3, 4]",
            "pretrain.train.epochs=2", "pretrain.train.optimizer=adam",
            "pretrain.train.lr=0.003", "pretrain.train.schedule=cosine", "head.type=keep",
            "unfreeze.layers=1", "unfreeze.epochs=1", "train.cache=disk", "probe.samples=0"]
# .lock: held by rank 0 while the run writes (a second run into the directory fails at once)
OUTPUTS = {".lock", "config.yaml", "model.safetensors", "metrics.json", "metrics.jsonl",
           "confusion.json", "confusion.csv"}
DIGEST = re.compile(r"rank (\d) of 2: (.+) weights sha256 (\S+)")


def write_config(tmp_path: Path) -> Path:
    path = tmp_path / "finetune.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return path


def torchrun(tmp_path: Path, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = torchrun_command("-m", "transferlab.finetune", str(write_config(tmp_path)),
                               f"output.dir={out}", *overrides)
    proc = subprocess.run(command, env=env(), cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def single_process(tmp_path: Path, out: Path, *overrides: str) -> dict[str, float]:
    cfg = load_config(write_config(tmp_path), [f"output.dir={out}", *overrides], FinetuneConfig)
    return {s.stage: s.accuracy for s in run_finetune(cfg).stages}


def logged_digests(stderr: str) -> dict[str, dict[int, str]]:
    """{what: {rank: digest}} from the line every process logs after training."""
    found: dict[str, dict[int, str]] = {}
    for rank, what, digest in DIGEST.findall(stderr):
        found.setdefault(what, {})[int(rank)] = digest
    return found


def stage_accuracies(out: Path) -> dict[str, float]:
    summary = json.loads((out / "metrics.json").read_text())
    return {s["stage"]: s["accuracy"] for s in summary["stages"]}


def test_two_process_finetune_matches_one_process_and_writes_once(tmp_path):
    out = tmp_path / "dist"
    proc = torchrun(tmp_path, out)
    assert proc.stdout.count("held-out acc") == 1  # rank 0 prints the table, once
    # rank 0 wrote everything, once; no part, cache or rank-suffixed file of another rank
    assert {p.name for p in out.iterdir()} == OUTPUTS
    assert len(list(tmp_path.rglob("*.safetensors"))) == 1
    assert len(list(tmp_path.rglob("metrics.json*"))) == 2  # metrics.json + metrics.jsonl
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3]
    # both processes ended with the same head, the one in the checkpoint
    digests = logged_digests(proc.stderr)["trained"]
    assert set(digests) == {0, 1} and digests[0] == digests[1]
    tensors, meta = read_checkpoint(out / "model.safetensors")
    head = {k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")}
    assert state_digest(head) == digests[0]
    summary = json.loads((out / "metrics.json").read_text())
    details = summary["stages"][0]["details"]
    assert details["processes"] == 2 and details["weights_sha256"] == digests[0]
    assert details["cache"] == "cpu"
    # the same data and accuracy as one process (other batches: within a few points)
    one = single_process(tmp_path, tmp_path / "single")
    two = stage_accuracies(out)
    assert [s["train_samples"] for s in summary["stages"]] == [1800, 300]
    assert abs(two["head-only"] - one["head-only"]) <= 0.03, (one, two)
    assert abs(two["probe"] - one["probe"]) <= 0.03, (one, two)
    conf = json.loads((out / "confusion.json").read_text())
    assert sum(map(sum, conf["matrix"])) == 500  # every test digit, evaluated once


def test_two_process_pretrain_unfreeze_and_disk_cache(tmp_path):
    out = tmp_path / "dist"
    proc = torchrun(tmp_path, out, *PRETRAIN)
    assert proc.stdout.count("held-out acc") == 1
    assert {p.name for p in out.iterdir()} == OUTPUTS | {"pretrain.safetensors", "cache"}
    # each process cached the features of its own share only, beside the other's
    parts = sorted(p.relative_to(out).as_posix() for p in out.glob("cache/ranks/*/*/*"))
    assert parts == [f"cache/ranks/world-2/rank-0000{r}/{s}" for r in (0, 1)
                     for s in ("test", "train")]
    rows = [sum(1 for _ in open(out / p / "index.csv")) - 1 for p in parts]
    assert rows[1] + rows[3] == 2000 and rows[0] + rows[2] == 500
    digests = logged_digests(proc.stderr)
    for what in ("pretrained model", "trained"):
        assert set(digests[what]) == {0, 1} and len(set(digests[what].values())) == 1, digests
    state, _ = read_checkpoint(out / "pretrain.safetensors")
    assert state_digest(state) == digests["pretrained model"][0]
    summary = json.loads((out / "metrics.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == ["pretrain", "fine-tune"]
    phases = [json.loads(x)["phase"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert phases == ["pretrain"] * 2 + ["head"] * 3 + ["unfreeze"]
    one = single_process(tmp_path, tmp_path / "single", *PRETRAIN)
    two = stage_accuracies(out)
    for stage in ("pretrain", "fine-tune"):
        assert abs(two[stage] - one[stage]) <= 0.03, (one, two)


GRAD_SCRIPT = """
import torch, torch.distributed as dist
from transferlab.runtime.distributed import init_distributed
from transferlab.training.sync import GradSync

info = init_distributed("cpu")
torch.manual_seed(0)
layer = torch.nn.Linear(6, 3)
x, y = torch.randn(7, 6), torch.randint(0, 3, (7,))
for share in ([0, 4, 7], [0, 7, 7], [0, 0, 7]):  # uneven, then rank 1 or rank 0 empty
    mine = slice(share[info.rank], share[info.rank + 1])
    layer.zero_grad(set_to_none=True)
    if len(x[mine]):
        (torch.nn.functional.cross_entropy(layer(x[mine]), y[mine], reduction="sum") / 4).backward()
    assert GradSync(list(layer.parameters()), 4.0)(len(x[mine]))
    got = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(layer(x), y).backward()
    for g, p in zip(got, layer.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7)
print(f"rank {info.rank} ok")
dist.destroy_process_group()
"""


def test_gradients_summed_over_uneven_and_empty_shares_equal_one_process(tmp_path):
    script = tmp_path / "grads.py"
    script.write_text(textwrap.dedent(GRAD_SCRIPT))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", str(script)], env=env(), cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0 ok" in proc.stdout and "rank 1 ok" in proc.stdout

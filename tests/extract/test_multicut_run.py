"""Issue #13 item 2, the runner: several cuts in one pass, one store per cut, each identical
to a single-cut run, the base run once per batch, kill + resume identical."""
from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import cli, make_cfg, same_store, write_config
from tests.imagegen import make_image_tree
from transferlab.extract.runner import run_extract
from transferlab.store.reader import FeatureStore

CUTS = "model.cut=[stage:0, stage:2, head]"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi") / "data"
    make_image_tree(root, per_class=5)
    return root


def single(data, out, cut, *extra):
    return run_extract(make_cfg(data, out, f"model.cut={cut}", "runtime.fold_bn=false",
                                *extra)).store


@pytest.mark.parametrize("model", ["test_resnet", "test_vit"])
def test_each_per_cut_store_equals_its_single_cut_run(data, tmp_path, model):
    cuts = ["stage:0", "stage:2", "head"] if model == "test_resnet" else \
        ["layer:blocks.0", "layer:blocks.3", "head"]
    extra = [f"model.name={model}"] + (["preprocess.input_size=[32, 32]"]
                                      if model == "test_resnet" else [])
    result = run_extract(make_cfg(data, tmp_path / "multi", f"model.cut={cuts}",
                                  "output.shard_size=4", *extra))
    assert sorted(result.stores) == sorted(p.name for p in (tmp_path / "multi").iterdir())
    for (name, store), cut in zip(result.stores.items(), cuts):
        want = single(data, tmp_path / name, cut, "output.shard_size=4", *extra)
        same_store(store, want)
        assert store.meta["fingerprint"] == want.meta["fingerprint"]
        assert store.meta["cut"] == want.meta["cut"] and store.meta["compute"]["fold_bn"] is False


def test_the_base_runs_once_per_batch(data, tmp_path, monkeypatch):
    import torch

    calls = []
    real = torch.nn.Conv2d.forward

    def counted(self, x):
        if getattr(self, "_is_stem", False):
            calls.append(len(x))
        return real(self, x)

    from transferlab.extract import runner as run
    build = run.extractor_from_config

    def marked(*args, **kwargs):
        bundle = build(*args, **kwargs)
        first = next(m for m in bundle.extractor.modules() if isinstance(m, torch.nn.Conv2d))
        first._is_stem = True
        return bundle

    monkeypatch.setattr(torch.nn.Conv2d, "forward", counted)
    monkeypatch.setattr(run, "extractor_from_config", marked)
    result = run_extract(make_cfg(data, tmp_path / "m", CUTS, "runtime.batch_size=4"))
    n = len(result.store)
    assert len(result.stores) == 3
    # one dummy pass to validate the cuts, one folding check at most, then one per batch
    batches = [c for c in calls if c == 4 or c == n % 4]
    assert sum(batches) == n and len(batches) == -(-n // 4)


def test_killed_multi_cut_run_resumes_identically(data, tmp_path):
    whole = run_extract(make_cfg(data, tmp_path / "whole", CUTS, "runtime.batch_size=2",
                                 "output.shard_size=2"))

    def stop(done):
        if done >= 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_extract(make_cfg(data, tmp_path / "part", CUTS, "runtime.batch_size=2",
                             "output.shard_size=2"), on_batch=stop)
    for name in whole.stores:
        with pytest.raises(Exception, match="unfinished"):
            FeatureStore.open(tmp_path / "part" / name)
    resumed = run_extract(make_cfg(data, tmp_path / "part", CUTS, "runtime.batch_size=2",
                                   "output.shard_size=2"))
    assert resumed.skipped >= 4
    for name, store in whole.stores.items():
        same_store(resumed.stores[name], store)


def test_a_single_cut_run_resumes_a_per_cut_store(data, tmp_path):
    """The per-cut store records a single-cut run: that run finds everything done."""
    result = run_extract(make_cfg(data, tmp_path / "m", CUTS))
    again = run_extract(make_cfg(data, tmp_path / "m" / "stage-2", "model.cut=stage:2",
                                 "runtime.fold_bn=false"))
    assert again.written == 0 and again.skipped == len(result.store)
    np.testing.assert_array_equal(np.asarray(again.store.features),
                                  np.asarray(result.stores["stage-2"].features))


def test_cli_prints_every_store_and_refuses_compile(data, tmp_path):
    config = write_config(tmp_path / "cfg.yaml")
    args = [config, f"data.root={data}", f"output.dir={tmp_path / 'o'}", CUTS]
    code, out, err = cli(*args)
    assert code == 0, err
    assert "3 stores in" in out and "stage-0/" in out and "head/" in out
    code, _, err = cli(*args, "runtime.compile=true")
    assert code == 2 and "runtime.compile=false" in err and err.count("\n") == 1

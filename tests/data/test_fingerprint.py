"""Rows never mix (#11 "Stores that lie", #12 one data fingerprint): a rerun that would give
stored labels another meaning, or compute rows with other numerics, is refused with the
difference named; queries are embedded as the store computed its rows; views are computed in
chunks of the batch size; extraction and the fine-tune cache describe the data alike."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import cli, make_cfg, same_store, summary_counts, write_config
from tests.imagegen import make_image_tree, random_image, save
from transferlab.config import DataConfig, ExtractConfig, load_config
from transferlab.data.fingerprint import data_fingerprint
from transferlab.errors import StoreError
from transferlab.extract.queries import embed_images
from transferlab.extract.runner import run_extract
from transferlab.models.engine import FeatureComputer
from transferlab.runtime.device import Runtime, resolve_precision
from transferlab.runtime.record import compute_record
from transferlab.store.reader import FeatureStore

AUTO = resolve_precision("auto", torch.device("cpu"))  # bf16 on AMX CPUs, fp32 elsewhere


def interrupted(cfg: ExtractConfig, after: int = 9) -> None:
    """A run stopped once ``after`` items are done (a finished 8-row shard stays)."""
    def stop(n_done: int) -> None:
        if n_done >= after:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_extract(cfg, on_batch=stop)
    assert not (Path(cfg.output.dir) / "meta.json").exists()
    assert list((Path(cfg.output.dir) / "shards").glob("shard-*.json"))


def store_files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def refused(code: int, err: str, *named: str) -> None:
    """Exit 2, one line naming the difference and both ways out."""
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for word in (*named, "output.overwrite=true", "output.dir"):
        assert word in lines[0], (word, err)


def stored_fingerprint(out: Path) -> dict:
    data = json.loads((out / "fingerprint.json").read_text(encoding="utf-8"))
    return data.get("fingerprint", data)


# ---------------------------------------------------------------------------------------
# 1. Class names give labels their meaning
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("first_run", ["finished", "interrupted"])
def test_an_added_class_folder_is_refused_not_renumbered(tmp_path, first_run):
    """cat/dog then ant/ added: resuming would read every old cat row as ant."""
    root, out = tmp_path / "data", tmp_path / "s"
    make_image_tree(root, per_class=6)
    config = write_config(tmp_path / "cfg.yaml")
    args = [config, f"data.root={root}", f"output.dir={out}"]
    if first_run == "finished":
        assert cli(*args)[0] == 0
    else:
        interrupted(make_cfg(root, out))
    before = store_files(out)
    for i in range(2):
        save(random_image(30, 26, seed=50 + i), root / "ant" / f"{i:04d}.png")
    refused(*cli(*args)[::2], "class_names", "ant")
    assert store_files(out) == before  # nothing written, nothing wiped
    code, _, err = cli(*args, "output.overwrite=true")
    assert code == 0, err
    store = FeatureStore.open(out)
    names = store.meta["class_names"]
    assert names == ["ant", "cat", "dog"]
    assert [names[label] for label in store.labels] == [k.split("/")[0] for k in store.keys]


def test_a_store_of_some_classes_grows_into_one_of_more(tmp_path):
    """data.classes picks items, it does not renumber them: the store resumes."""
    root, out = tmp_path / "data", tmp_path / "s"
    make_image_tree(root, per_class=3)
    config = write_config(tmp_path / "cfg.yaml")
    args = [config, f"data.root={root}", f"output.dir={out}"]
    code, stdout, err = cli(*args, "data.classes=[cat]")
    assert code == 0, err
    cats = summary_counts(stdout)[0]
    code, stdout, err = cli(*args, "data.classes=[cat, dog]")
    assert code == 0, err
    assert summary_counts(stdout) == (3, 0, cats)
    store = FeatureStore.open(out)
    assert [store.meta["class_names"][label] for label in store.labels] == [
        k.split("/")[0] for k in store.keys]


# ---------------------------------------------------------------------------------------
# 2. Compute settings that change the numbers
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("first,resume,named", [
    ("runtime.precision=fp32", "runtime.precision=bf16", "compute.precision"),
    ("runtime.fold_bn=true", "runtime.fold_bn=false", "compute.fold_bn"),
    ("runtime.channels_last=true", "runtime.channels_last=false", "compute.channels_last"),
])
def test_a_resume_with_other_compute_settings_is_refused(tmp_path, first, resume, named):
    root, out = tmp_path / "data", tmp_path / "s"
    make_image_tree(root, per_class=6)
    interrupted(make_cfg(root, out, first))
    before = store_files(out)
    config = write_config(tmp_path / "cfg.yaml")
    refused(*cli(config, f"data.root={root}", f"output.dir={out}", resume)[::2], named)
    assert store_files(out) == before
    assert stored_fingerprint(out)["compute"]["device"] == "cpu"


def test_fp32_then_the_default_precision_is_refused_where_the_default_is_not_fp32(tmp_path):
    """The issue's case: started with runtime.precision=fp32, resumed with the default."""
    root, out = tmp_path / "data", tmp_path / "s"
    make_image_tree(root, per_class=6)
    interrupted(make_cfg(root, out, "runtime.precision=fp32"))
    config = write_config(tmp_path / "cfg.yaml")
    code, _, err = cli(config, f"data.root={root}", f"output.dir={out}",
                       "runtime.precision=auto")
    if AUTO == "fp32":  # 'auto' is fp32 here: the same numbers, so it resumes
        assert code == 0, err
    else:
        refused(code, err, "compute.precision", "fp32", AUTO)


def test_auto_and_the_precision_it_resolves_to_resume_each_other(tmp_path):
    """Resolved values are compared: 'auto' on this machine is its explicit choice."""
    root = tmp_path / "data"
    make_image_tree(root, per_class=6)
    interrupted(make_cfg(root, tmp_path / "s", "runtime.precision=auto"))
    resumed = run_extract(make_cfg(root, tmp_path / "s", f"runtime.precision={AUTO}"))
    assert resumed.skipped >= 8
    whole = run_extract(make_cfg(root, tmp_path / "ref", f"runtime.precision={AUTO}"))
    same_store(resumed.store, whole.store)
    assert resumed.store.meta["compute"]["precision"] == AUTO


def test_the_device_is_recorded_by_type_not_index():
    def record(device: str) -> dict:
        return compute_record(Runtime(torch.device(device), "bf16", True, 0, 1), True)

    assert record("cuda:1") == record("cuda:0") == {
        "precision": "bf16", "fold_bn": True, "channels_last": True, "device": "cuda"}
    assert record("cpu")["device"] == "cpu"


def test_fold_bn_of_a_model_without_batchnorm_changes_nothing_and_resumes(tmp_path):
    root = tmp_path / "data"
    make_image_tree(root, per_class=6)
    lenet = ["model.name=lenet", "preprocess.input_size=null"]
    interrupted(make_cfg(root, tmp_path / "s", *lenet, "runtime.fold_bn=true"))
    resumed = run_extract(make_cfg(root, tmp_path / "s", *lenet, "runtime.fold_bn=false"))
    assert resumed.skipped >= 8 and resumed.store.meta["compute"]["fold_bn"] is False


# ---------------------------------------------------------------------------------------
# 3. meta["compute"]: queries are embedded as the store computed its rows
# ---------------------------------------------------------------------------------------


def test_an_fp32_store_records_its_compute_and_queries_are_embedded_in_fp32(tmp_path):
    root, out = tmp_path / "data", tmp_path / "s"
    keys = make_image_tree(root, per_class=2, unicode_name=False)
    store = run_extract(make_cfg(root, out, "output.dtype=float32",
                                 "runtime.precision=fp32")).store
    wanted = {"precision": "fp32", "fold_bn": True, "channels_last": True, "device": "cpu"}
    assert store.meta["compute"] == wanted
    assert stored_fingerprint(out)["compute"] == wanted
    meta = json.loads(json.dumps(store.meta))
    meta["config"]["runtime"]["precision"] = "auto"  # the recorded computation wins
    meta["config"]["runtime"]["channels_last"] = False
    got = embed_images(meta, [root / k for k in keys], root=out)
    rows = np.stack([np.asarray(store.get(k), np.float32).reshape(-1) for k in keys])
    np.testing.assert_allclose(got, rows, rtol=1e-5, atol=1e-6)
    if AUTO != "fp32":  # the check can fail: bf16 queries are further off than that
        meta["compute"]["precision"] = AUTO
        other = embed_images(meta, [root / k for k in keys], root=out)
        assert not np.allclose(other, rows, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------
# 4. Views in chunks of the batch size
# ---------------------------------------------------------------------------------------


def test_views_go_through_the_model_at_most_a_batch_at_a_time(tmp_path, monkeypatch):
    root = tmp_path / "data"
    make_image_tree(root, per_class=3)
    sizes: list[int] = []
    start = FeatureComputer.start
    monkeypatch.setattr(FeatureComputer, "start",
                        lambda self, images: (sizes.append(len(images)), start(self, images))[1])
    common = ["model.name=lenet", "preprocess.input_size=null", "output.views=3",
              "output.dtype=float32", "runtime.precision=fp32"]
    small = run_extract(make_cfg(root, tmp_path / "b2", *common, "runtime.batch_size=2"))
    assert max(sizes) == 2 and sum(sizes) == 4 * 7  # 7 images, 1 + 3 views each
    sizes.clear()
    large = run_extract(make_cfg(root, tmp_path / "b64", *common, "runtime.batch_size=64"))
    assert sizes == [4 * 7]  # 7 images with 1 + 3 views each, one forward
    assert small.store.keys == large.store.keys and len(small.store) == 4 * 7
    np.testing.assert_array_equal(small.store.views, large.store.views)
    np.testing.assert_allclose(np.asarray(small.store.features),
                               np.asarray(large.store.features), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------
# 5. One description of the data (#12)
# ---------------------------------------------------------------------------------------


# Fingerprints as stores written before the data-source registry recorded them: a store
# resumes only when its fingerprint is equal, key order included (json of the dict).
_COMMON = {"root": None, "list_file": None, "dataset": None, "split": "train"}
WRITTEN_BEFORE = [
    (DataConfig(root="/data/photos", label_column="y"),
     {"source": "folder", **_COMMON, "root": "/data/photos"}, None),
    (DataConfig(root="s3://bucket/photos/"),
     {"source": "folder", **_COMMON, "root": "s3://bucket/photos/"}, None),
    (DataConfig(source="list", list_file="/data/l.csv", label_column="label", split="test"),
     {"source": "list", **_COMMON, "list_file": "/data/l.csv", "split": "test"}, "label"),
    (DataConfig(source="list", list_file="https://h/l.txt", root="https://h/img/"),
     {"source": "list", **_COMMON, "root": "https://h/img/", "list_file": "https://h/l.txt"},
     None),
    (DataConfig(source="torchvision", dataset="MNIST", root="/data/mnist", split="test",
                label_column="z"),
     {"source": "torchvision", **_COMMON, "root": "/data/mnist", "dataset": "MNIST",
      "split": "test"}, None),
    (DataConfig(source="mnist-5k"), {"source": "mnist-5k", **_COMMON}, None),
    (DataConfig(source="webdataset", urls="s3://b/t-{0..3}.tar", label_key="cls"),
     {"source": "webdataset", **_COMMON, "urls": ["s3://b/t-{0..3}.tar"], "label_key": "cls"},
     None),
    (DataConfig(source="webdataset", urls=["/data/a.tar", "file:///data/b.tar"],
                label_key="json", root="/data"),
     {"source": "webdataset", **_COMMON, "root": "/data",
      "urls": ["/data/a.tar", "file:///data/b.tar"], "label_key": "json"}, None),
]


@pytest.mark.parametrize("cfg, data, label_column", WRITTEN_BEFORE)
def test_every_source_fingerprints_its_data_as_stores_written_before(cfg, data, label_column):
    from transferlab.data.fingerprint import label_fingerprint

    assert json.dumps(data_fingerprint(cfg)) == json.dumps(data)
    assert json.dumps(label_fingerprint(cfg, ["a", "b"])) == json.dumps(
        {"class_names": ["a", "b"], "label_column": label_column})


def test_every_source_has_a_fingerprint_case_above():
    from transferlab.data.sources import DATA_SOURCES

    assert {cfg.source for cfg, _, _ in WRITTEN_BEFORE} == set(DATA_SOURCES)


def test_extraction_and_the_finetune_cache_describe_the_data_alike(tmp_path, monkeypatch):
    from tests.helpers import write_digit_folder
    from transferlab.config import FinetuneConfig
    from transferlab.finetune.run import run_finetune

    monkeypatch.chdir(tmp_path)
    write_digit_folder(tmp_path / "digits", per_class=4)
    described = data_fingerprint(DataConfig(root=str(tmp_path / "digits")))
    assert described["root"] == str((tmp_path / "digits").resolve())
    cfg = load_config(None, ["model.name=lenet", "model.cut=first:7", "data.root=digits",
                             "train.epochs=1", "train.cache=disk", "runtime.precision=fp32",
                             "runtime.progress=false", "output.dir=ft"], FinetuneConfig)
    run_finetune(cfg)
    cached = stored_fingerprint(tmp_path / "ft" / "cache" / "train")
    assert cached["data"] == described
    assert cached["compute"] == {"precision": "fp32", "fold_bn": False,
                                 "channels_last": True, "device": "cpu"}
    run_extract(make_cfg(Path("digits"), Path("store"), "model.name=lenet",
                         "preprocess.input_size=null"))
    assert stored_fingerprint(tmp_path / "store")["data"] == described


def test_a_refused_store_keeps_its_rows_readable(tmp_path):
    """After a refusal the finished store still opens as it was (nothing half-wiped)."""
    root, out = tmp_path / "data", tmp_path / "s"
    make_image_tree(root, per_class=2)
    first = run_extract(make_cfg(root, out)).store
    with pytest.raises(StoreError, match="compute.precision"):
        run_extract(make_cfg(root, out, "runtime.precision=bf16"))
    same_store(FeatureStore.open(out), first)

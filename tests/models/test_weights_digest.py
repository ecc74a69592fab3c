"""Rows from two models never in one store (#24): a store's fingerprint names its weights
by content (the digest of the files read: a timm model folder, the Hub cache, a timm or
torchvision download), so new weights saved where the old ones were are refused on resume,
and a query embedded by other weights than the store's is refused too. All offline: the
tests write the folder, the Hub cache entry and the torch hub download themselves."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

timm = pytest.importorskip("timm")
pytest.importorskip("huggingface_hub")
from huggingface_hub import constants  # noqa: E402
from timm.models import save_for_hf  # noqa: E402

from tests.helpers import cli, make_cfg, write_config, write_digit_folder  # noqa: E402
from tests.imagegen import random_image, save  # noqa: E402
from transferlab.config import FinetuneConfig, ModelConfig, load_config  # noqa: E402
from transferlab.errors import ModelError, StoreError  # noqa: E402
from transferlab.extract.queries import embed_images  # noqa: E402
from transferlab.extract.runner import run_extract  # noqa: E402
from transferlab.models import provenance  # noqa: E402
from transferlab.models.backbones import build_backbone  # noqa: E402
from transferlab.store.reader import FeatureStore  # noqa: E402

COMMIT = "c" * 40
TIMM_HUB_ID = "timm/test_resnet.r160_in1k"  # where timm takes test_resnet's weights from


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_folder(folder: Path, seed: int) -> torch.nn.Module:
    """A timm model folder (config.json + model.safetensors) of test_resnet, weights from
    ``seed``: saving with another seed is 'new weights saved into the folder'."""
    torch.manual_seed(seed)
    model = timm.create_model("test_resnet", pretrained=False)
    save_for_hf(model, str(folder), safe_serialization=True, model_args={})
    return model


@pytest.fixture()
def images(tmp_path):
    root = tmp_path / "img"
    for i in range(10):
        save(random_image(40, 36, seed=i), root / f"{i}.png")
    return root


def extract(images: Path, out: Path, *overrides: str) -> FeatureStore:
    return run_extract(make_cfg(images, out, "output.dtype=float32", *overrides)).store


def stored_weights(out: Path) -> object:
    return json.loads((out / "fingerprint.json").read_text())["fingerprint"]["weights"]


@pytest.mark.parametrize("pretrained", ["true", "false"])  # a folder always reads its weights
def test_new_weights_in_a_model_folder_are_refused_on_resume_and_overwrite_rebuilds(
        tmp_path, images, pretrained):
    folder, out = tmp_path / "folder", tmp_path / "store"
    save_folder(folder, seed=0)
    args = (f"model.name={folder}", f"model.pretrained={pretrained}")
    first = extract(images, out, *args)
    old_rows = np.asarray(first.features).copy()
    assert stored_weights(out) == {"files": {"config.json": sha256(folder / "config.json"),
                                             "model.safetensors":
                                                 sha256(folder / "model.safetensors")}}
    save_folder(folder, seed=1)  # new weights, same folder, same command
    with pytest.raises(StoreError) as info:
        extract(images, out, *args)
    message = str(info.value)
    assert "\n" not in message and "model.safetensors" in message
    assert "output.overwrite=true" in message
    kept = FeatureStore.open(out)  # no row of the new weights joined the old ones
    np.testing.assert_array_equal(np.asarray(kept.features), old_rows)
    rebuilt = extract(images, out, *args, "output.overwrite=true")
    fresh = extract(images, tmp_path / "fresh", *args)
    np.testing.assert_array_equal(np.asarray(rebuilt.features), np.asarray(fresh.features))
    assert not np.allclose(np.asarray(rebuilt.features), old_rows)


def test_the_command_says_so_in_one_line_with_exit_2(tmp_path, images):
    folder = tmp_path / "folder"
    save_folder(folder, seed=0)
    config = write_config(tmp_path / "c.yaml")
    args = (config, f"model.name={folder}", f"data.root={images}",
            f"output.dir={tmp_path / 'store'}")
    assert cli(*args)[0] == 0
    save_folder(folder, seed=1)
    code, _, err = cli(*args)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "weights" in err and "output.overwrite=true" in err


def test_unchanged_weights_resume_even_when_the_file_is_rewritten(tmp_path, images):
    folder, out = tmp_path / "folder", tmp_path / "store"
    save_folder(folder, seed=0)
    first = extract(images, out, f"model.name={folder}")
    rows = np.asarray(first.features).copy()
    save_folder(folder, seed=0)  # the same bytes written again (new mtime and inode)
    again = run_extract(make_cfg(images, out, "output.dtype=float32",
                                 f"model.name={folder}"))
    np.testing.assert_array_equal(np.asarray(again.store.features), rows)
    assert again.store.meta["counts"]["skipped_this_run"] == len(rows)


def test_a_store_that_records_only_pretrained_is_refused_naming_the_fix(tmp_path, images):
    """Stores written before weights were named by content say ``"pretrained"``: whether
    their rows come from the weights read now cannot be checked, so they are refused."""
    folder, out = tmp_path / "folder", tmp_path / "store"
    save_folder(folder, seed=0)
    extract(images, out, f"model.name={folder}", "model.pretrained=true")
    path = out / "fingerprint.json"
    record = json.loads(path.read_text())
    record["fingerprint"]["weights"] = "pretrained"
    path.write_text(json.dumps(record))
    with pytest.raises(StoreError, match="only as 'pretrained'.*output.overwrite=true"):
        extract(images, out, f"model.name={folder}", "model.pretrained=true")
    extract(images, out, f"model.name={folder}", "model.pretrained=true",
            "output.overwrite=true")
    assert provenance.has_digest(stored_weights(out))


def test_random_initial_weights_are_still_named_by_their_seed(tmp_path, images):
    extract(images, tmp_path / "store")
    assert stored_weights(tmp_path / "store") == {"random_init_seed": 0}


def test_a_folder_store_recorded_as_random_init_is_refused_in_words(tmp_path, images):
    """Before #24 a folder with pretrained: false (its weights read all the same) recorded
    random initial weights."""
    folder, out = tmp_path / "folder", tmp_path / "store"
    save_folder(folder, seed=0)
    extract(images, out, f"model.name={folder}")
    path = out / "fingerprint.json"
    record = json.loads(path.read_text())
    record["fingerprint"]["weights"] = {"random_init_seed": 0}
    path.write_text(json.dumps(record))
    with pytest.raises(StoreError, match=r"random initial weights \(seed 0\), this run's "
                                         "from weights it reads.*output.overwrite=true"):
        extract(images, out, f"model.name={folder}")


def test_a_callable_with_pretrained_names_its_tensors(tmp_path):
    backbone = build_backbone(ModelConfig(name="torch.nn:Linear", pretrained=True,
                                          kwargs={"in_features": 3, "out_features": 2}))
    assert set(backbone.weights_digest) == {"state_sha256"}
    other = build_backbone(ModelConfig(name="torch.nn:Linear", pretrained=True,
                                       kwargs={"in_features": 3, "out_features": 2}))
    assert other.weights_digest != backbone.weights_digest  # other random weights
    assert build_backbone(ModelConfig(name="torch.nn:Linear", kwargs={
        "in_features": 3, "out_features": 2})).weights_digest is None


# ---------------------------------------------------------------------------------------
# The Hub cache and downloads (timm names, hf-hub names, torchvision)
# ---------------------------------------------------------------------------------------


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch):
    """An offline Hub cache; ``put(repo, seed)`` writes a snapshot of test_resnet."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def put(repo: str, seed: int) -> Path:
        entry = cache / f"models--{repo.replace('/', '--')}"
        save_folder(entry / "snapshots" / COMMIT, seed)
        (entry / "refs").mkdir(parents=True, exist_ok=True)
        (entry / "refs" / "main").write_text(COMMIT)
        return entry / "snapshots" / COMMIT

    return put


def test_a_timm_name_records_the_hub_revision_and_file_digest(hub_cache):
    snapshot = hub_cache(TIMM_HUB_ID, seed=0)
    backbone = build_backbone(ModelConfig(name="test_resnet", pretrained=True))
    assert backbone.weights_digest == {
        "hub": TIMM_HUB_ID, "revision": COMMIT,
        "files": {"model.safetensors": sha256(snapshot / "model.safetensors")}}
    hub_cache(TIMM_HUB_ID, seed=1)  # the cached file replaced
    again = build_backbone(ModelConfig(name="test_resnet", pretrained=True))
    assert again.weights_digest["files"] != backbone.weights_digest["files"]


def test_an_hf_hub_name_records_its_config_and_weights(hub_cache):
    snapshot = hub_cache("me/tiny", seed=0)
    backbone = build_backbone(ModelConfig(name="hf-hub:me/tiny", pretrained=True))
    assert backbone.weights_digest == {
        "hub": "me/tiny", "revision": COMMIT,
        "files": {"model.safetensors": sha256(snapshot / "model.safetensors"),
                  "config.json": sha256(snapshot / "config.json")}}
    assert build_backbone(ModelConfig(name="hf-hub:me/tiny")).weights_digest is None


def test_a_torchvision_download_records_the_cached_files_digest(tmp_path, monkeypatch):
    torchvision = pytest.importorskip("torchvision")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch-hub"))
    url = torchvision.models.get_model_weights("squeezenet1_0").DEFAULT.url
    cached = tmp_path / "torch-hub" / "checkpoints" / os.path.basename(url)
    cached.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.squeezenet1_0().state_dict(), cached)
    backbone = build_backbone(ModelConfig(name="squeezenet1_0", pretrained=True))
    assert backbone.weights_digest == {"weights_file": cached.name, "sha256": sha256(cached)}


def test_queries_are_refused_when_the_weights_are_not_the_stores(tmp_path, images, hub_cache):
    snapshot = hub_cache("me/tiny", seed=0)
    out = tmp_path / "store"
    store = extract(images, out, "model.name=hf-hub:me/tiny", "model.pretrained=true")
    query = [str(images / "3.png")]
    rows = embed_images(store.meta, query, root=out)
    np.testing.assert_allclose(rows[0], np.asarray(store.features)[store.keys.index("3.png")],
                               rtol=1e-5, atol=1e-5)
    hub_cache("me/tiny", seed=1)  # the cached weights changed under the store
    assert sha256(snapshot / "model.safetensors") != \
        store.meta["fingerprint"]["weights"]["files"]["model.safetensors"]
    with pytest.raises(ModelError) as info:
        embed_images(store.meta, query, root=out)
    assert "\n" not in str(info.value) and "other weights" in str(info.value)


def test_a_folder_query_with_trust_code_is_checked_too(tmp_path, images):
    folder, out = tmp_path / "folder", tmp_path / "store"
    save_folder(folder, seed=0)
    store = extract(images, out, f"model.name={folder}")
    embed_images(store.meta, [str(images / "0.png")], root=out, trust_code=True)
    save_folder(folder, seed=1)
    with pytest.raises(ModelError, match="other weights"):
        embed_images(store.meta, [str(images / "0.png")], root=out, trust_code=True)


# ---------------------------------------------------------------------------------------
# The fine-tune feature cache and the digest memo
# ---------------------------------------------------------------------------------------


def test_the_finetune_disk_cache_is_rebuilt_for_new_folder_weights(tmp_path):
    from transferlab.finetune.run import run_finetune

    folder = tmp_path / "folder"
    root = write_digit_folder(tmp_path / "digits", per_class=4)
    cfg = load_config(None, [f"model.name={folder}", "preprocess.input_size=[32, 32]",
                             f"data.root={root}", "train.epochs=1", "train.cache=disk",
                             "runtime.precision=fp32", "runtime.progress=false",
                             f"output.dir={tmp_path / 'ft'}"], FinetuneConfig)
    cache = tmp_path / "ft" / "cache" / "train"
    save_folder(folder, seed=0)
    run_finetune(cfg)
    before = FeatureStore.open(cache)
    old = (before.meta["fingerprint"]["base"], np.asarray(before.features).copy())
    save_folder(folder, seed=1)
    run_finetune(cfg)
    after = FeatureStore.open(cache)
    assert after.meta["fingerprint"]["base"] != old[0]
    assert not np.allclose(np.asarray(after.features), old[1])


def test_a_file_is_hashed_once_until_it_changes(tmp_path, monkeypatch):
    path = tmp_path / "w.bin"
    path.write_bytes(b"a" * 1000)
    changed = hashlib.sha256(b"b" * 1000).hexdigest()
    calls = []
    real = provenance.hashlib.sha256
    monkeypatch.setattr(provenance.hashlib, "sha256", lambda: calls.append(1) or real())
    first = provenance.file_digest(path)
    assert provenance.file_digest(path) == first and len(calls) == 1
    stat = path.stat()
    path.write_bytes(b"b" * 1000)  # same size, mtime put back: the ctime still moves
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert provenance.file_digest(path) == changed != first and len(calls) == 2


def test_a_fifo_as_weights_file_is_one_line_not_a_hang(tmp_path):
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(ModelError, match="FIFO"):
        provenance.file_digest(fifo)

"""The trust boundary of checkpoints: recorded architectures never run code unless opted in;
malformed metadata and pickle files are one-line errors."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from transferlab.config import HeadConfig, ModelConfig
from transferlab.data.preprocess import resolve_preprocess
from transferlab.errors import ModelError
from transferlab.inspect import main as inspect_main
from transferlab.models.backbones import build_backbone
from transferlab.models.checkpoint import META_KEY, save_checkpoint
from transferlab.models.classifier import classifier_meta, load_model, save_classifier
from transferlab.models.heads import cut_with_head
from transferlab.models.lenet import LENET_DATA_CONFIG, lenet
from transferlab.predict import main as predict_main

EVIL = '''
from pathlib import Path
from transferlab.models.lenet import lenet

def make(marker, num_classes=10, in_chans=1):
    Path(marker).write_text("ran")
    return lenet(num_classes, in_chans)
'''


@pytest.fixture
def evil(tmp_path, monkeypatch):
    """A module on sys.path whose callable would create a marker file."""
    (tmp_path / "evilmod_trust.py").write_text(EVIL)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path / "marker"
    sys.modules.pop("evilmod_trust", None)


def rewrite_meta(path, change) -> None:
    """Rewrite a checkpoint's metadata with safetensors itself (as an attacker would)."""
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()[META_KEY])
    raw = change(meta)
    save_file(tensors, str(path), metadata={META_KEY: raw if isinstance(raw, str)
                                            else json.dumps(raw)})


def classifier_checkpoint(path):
    spec = resolve_preprocess(LENET_DATA_CONFIG)
    base, head = cut_with_head(lenet(), "first:7", None, spec.input_size, HeadConfig(), 2)
    meta = classifier_meta({"name": "lenet", "source": "builtin"}, "first:7", None,
                           HeadConfig(), base.feature_dim, ["a", "b"], spec)
    return save_classifier(path, base, head, meta)


def backbone_checkpoint(path):
    return save_checkpoint(path, lenet().state_dict(),
                           {"format": "transferlab.backbone", "class_names": [str(i) for i in
                                                                           range(10)],
                            "backbone": {"name": "lenet", "source": "builtin"}})


def evil_arch(marker):
    return {"name": "evilmod_trust:make", "source": "auto", "kwargs": {"marker": str(marker)}}


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "img.png"
    Image.new("L", (28, 28), 128).save(path)
    return path


def one_line_exit_2(code, capsys) -> str:
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    return err


def test_classifier_naming_a_callable_is_refused_everywhere(tmp_path, evil, image, capsys):
    ckpt = classifier_checkpoint(tmp_path / "model.safetensors")
    rewrite_meta(ckpt, lambda m: {**m, "arch": evil_arch(evil)})
    with pytest.raises(ModelError, match="trust_code=True") as exc:
        load_model(ckpt)
    assert "evilmod_trust:make" in str(exc.value) and "\n" not in str(exc.value)
    err = one_line_exit_2(predict_main([str(ckpt), str(image)]), capsys)
    assert "--trust-code" in err
    one_line_exit_2(inspect_main([str(ckpt)]), capsys)
    with pytest.raises(ModelError, match="trust_code"):
        build_backbone(ModelConfig(name=str(ckpt)))
    assert not evil.exists()
    # the explicit opt-in runs it
    assert load_model(ckpt, trust_code=True).class_names == ["a", "b"]
    assert evil.exists()


def test_backbone_checkpoint_naming_a_callable_is_refused(tmp_path, evil, image, capsys):
    ckpt = backbone_checkpoint(tmp_path / "pretrain.safetensors")
    rewrite_meta(ckpt, lambda m: {**m, "backbone": evil_arch(evil)})
    one_line_exit_2(predict_main([str(ckpt), str(image)]), capsys)
    one_line_exit_2(inspect_main([str(ckpt)]), capsys)
    with pytest.raises(ModelError, match="trust_code"):
        build_backbone(ModelConfig(name=str(ckpt), cut="head"))
    assert not evil.exists()
    assert inspect_main([str(ckpt), "--trust-code", "--input-size", "28", "28"]) == 0
    assert evil.exists()


def test_trusted_config_flag_runs_a_recorded_callable(tmp_path, evil):
    ckpt = backbone_checkpoint(tmp_path / "pretrain.safetensors")
    rewrite_meta(ckpt, lambda m: {**m, "backbone": evil_arch(evil)})
    build_backbone(ModelConfig(name=str(ckpt), trust_code=True))
    assert evil.exists()


def test_recorded_file_arguments_are_refused(tmp_path):
    ckpt = backbone_checkpoint(tmp_path / "pretrain.safetensors")
    arch = {"name": "test_resnet", "source": "timm",
            "kwargs": {"checkpoint_path": str(tmp_path / "elsewhere.pth")}}
    rewrite_meta(ckpt, lambda m: {**m, "backbone": arch})
    with pytest.raises(ModelError, match="checkpoint_path"):
        load_model(ckpt)


def test_a_callable_named_in_the_users_own_config_still_runs(tmp_path, evil):
    build_backbone(ModelConfig(name="evilmod_trust:make", kwargs={"marker": str(evil)}))
    assert evil.exists()


@pytest.mark.parametrize("raw, words", [
    ("{not json", "not JSON"), ("[1, 2]", "type list"), ("null", "type NoneType"),
    (json.dumps("text"), "type str")])
def test_malformed_metadata_is_one_line(tmp_path, image, capsys, raw, words):
    ckpt = classifier_checkpoint(tmp_path / "model.safetensors")
    rewrite_meta(ckpt, lambda m: raw)
    assert words in one_line_exit_2(predict_main([str(ckpt), str(image)]), capsys)
    assert words in one_line_exit_2(inspect_main([str(ckpt)]), capsys)


@pytest.mark.parametrize("preprocess", ["bicubic", [1, 2], {"input_size": "big"}, None])
def test_malformed_preprocess_is_one_line(tmp_path, image, capsys, preprocess):
    ckpt = classifier_checkpoint(tmp_path / "model.safetensors")
    rewrite_meta(ckpt, lambda m: {**m, "preprocess": preprocess})
    err = one_line_exit_2(predict_main([str(ckpt), str(image)]), capsys)
    assert "preprocessing metadata" in err
    one_line_exit_2(inspect_main([str(ckpt)]), capsys)


@pytest.mark.parametrize("suffix", [".pkl", ".pickle", ".pth"])
def test_pickle_refusal_is_one_line(tmp_path, suffix):
    path = tmp_path / f"evil{suffix}"
    torch.save({"model": torch.nn.Linear(2, 2)}, path)  # a whole module needs unpickling
    with pytest.raises(ModelError) as exc:
        build_backbone(ModelConfig(name="lenet", weights=str(path)))
    message = str(exc.value)
    assert "\n" not in message and ("safetensors" in message)


# ---------------------------------------------------------------------------------------
# Stores: meta.json names the model the queries are embedded with
# ---------------------------------------------------------------------------------------


def copy_store(lenet_store, tmp_path, change):
    import shutil

    tmp, keys = lenet_store
    store_dir = shutil.copytree(tmp / "store", tmp_path / "store")
    meta_path = store_dir / "meta.json"
    meta = json.loads(meta_path.read_text())
    change(meta)
    meta_path.write_text(json.dumps(meta))
    return store_dir, [str(tmp / "data" / k) for k in keys]


def test_store_naming_a_callable_is_refused(lenet_store, tmp_path, evil, capsys):
    from transferlab.analysis.neighbors import store_nearest
    from transferlab.commands.search import main as search_main
    from transferlab.extract.queries import embed_images
    from transferlab.store.reader import FeatureStore

    def change(meta):
        meta["config"]["model"].update(name="evilmod_trust:make", kwargs={"marker": str(evil)})
        meta["config"]["preprocess"]["input_size"] = [1, 28, 28]  # a callable has no data config

    store_dir, images = copy_store(lenet_store, tmp_path, change)
    err = one_line_exit_2(search_main([str(store_dir), images[0]]), capsys)
    assert "evilmod_trust:make" in err and "--trust-code" in err
    store = FeatureStore.open(store_dir)
    with pytest.raises(ModelError, match="trust_code=True"):
        store_nearest(store, [images[0]], k=1)
    with pytest.raises(ModelError, match="trust_code=True"):
        embed_images(store.meta, [images[0]])
    assert not evil.exists()
    assert search_main([str(store_dir), images[0], "--trust-code", "-k", "1"]) == 0
    assert evil.exists()


@pytest.mark.parametrize("weights", ["/etc/hostname", "../outside.safetensors"])
def test_store_weights_path_outside_the_store_is_refused(lenet_store, tmp_path, capsys, weights):
    from transferlab.commands.search import main as search_main

    store_dir, images = copy_store(lenet_store, tmp_path,
                                   lambda m: m["config"]["model"].update(weights=weights))
    err = one_line_exit_2(search_main([str(store_dir), images[0]]), capsys)
    assert weights in err and "outside its own directory" in err


def test_queries_are_embedded_as_the_store_computed_its_rows(lenet_store, tmp_path):
    """fp32 store: a query of its own image is its stored row (fp32 tolerance), even where
    this machine's default precision is bf16 (AMX CPUs)."""
    from transferlab.analysis.neighbors import store_nearest
    from transferlab.extract.queries import embed_images
    from transferlab.runtime.device import resolve_precision
    from transferlab.store.reader import FeatureStore

    def change(meta):  # the recorded compute settings win over the configured 'auto'
        meta["config"]["runtime"]["precision"] = "auto"
        meta["compute"] = {"precision": "fp32", "fold_bn": True, "channels_last": False,
                           "device": "cpu"}

    store_dir, images = copy_store(lenet_store, tmp_path, change)
    store = FeatureStore.open(store_dir)
    got = embed_images(store.meta, images[:2], root=store_dir)
    for image, vec in zip(images[:2], got):
        row = store.get(str(Path(image).relative_to(lenet_store[0] / "data")))
        assert np.allclose(vec, np.asarray(row).reshape(-1), rtol=1e-5, atol=1e-6)
    hits = store_nearest(store, images[:1], k=1)
    assert hits[0][0][1] == pytest.approx(0.0, abs=1e-6)
    if resolve_precision("auto", torch.device("cpu")) == "bf16":
        store.meta["compute"]["precision"] = "bf16"
        bf16 = embed_images(store.meta, images[:1], root=store_dir)
        assert not np.allclose(bf16[0], got[0], rtol=1e-5, atol=1e-6)  # the test can fail


def test_plot_never_opens_keys_outside_the_data_root(tmp_path, monkeypatch):
    from PIL import Image as PILImage

    from transferlab.analysis.search_report import plot_search
    from transferlab.store.writer import StoreWriter

    root = tmp_path / "data"
    root.mkdir()
    PILImage.new("RGB", (8, 8)).save(root / "in.png")
    secret = tmp_path / "secret.png"
    PILImage.new("RGB", (8, 8)).save(secret)
    (root / "link.png").symlink_to(secret)
    keys = ["in.png", "../secret.png", str(secret), "C:/secret.png", "link.png"]
    with StoreWriter(tmp_path / "s", {"t": 1}, dtype="float32", shard_size=8) as writer:
        writer.add(keys, [-1] * 5, np.eye(5, dtype=np.float32))
        store = writer.close({"data_root": str(root)})
    opened = []
    real_open = PILImage.open
    monkeypatch.setattr(PILImage, "open", lambda p, *a, **k: opened.append(str(p))
                        or real_open(p, *a, **k))
    plot_search(store, [str(root / "in.png")], [[(r, 0.0) for r in range(5)]],
                tmp_path / "grid.png")
    assert (tmp_path / "grid.png").is_file()
    assert str(root / "in.png") in opened
    assert not [p for p in opened if "secret" in p or "link" in p]

"""Hugging Face Hub names and timm model folders, offline: the tests write the Hub cache entry
and the folder themselves (random weights saved with timm's own save_for_hf)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

timm = pytest.importorskip("timm")
pytest.importorskip("huggingface_hub")
from huggingface_hub import constants  # noqa: E402
from timm.models import save_for_hf  # noqa: E402

from tests.imagegen import random_image, save  # noqa: E402
from transferlab.config import ExtractConfig, ModelConfig, load_config  # noqa: E402
from transferlab.errors import ModelError  # noqa: E402
from transferlab.extract.runner import run_extract  # noqa: E402
from transferlab.models.backbones import build_backbone, resolve_source  # noqa: E402
from transferlab.models.extractor import build_extractor  # noqa: E402

REPO = "me/tiny_vit"
COMMIT = "a" * 40
# preprocessing unlike timm's defaults for test_vit, so reading it from config.json shows
DATA_CONFIG = {"input_size": (3, 64, 64), "interpolation": "bilinear", "crop_pct": 0.8,
               "crop_mode": "center", "mean": (0.1, 0.2, 0.3), "std": (0.4, 0.5, 0.6)}


def saved_model(folder: Path) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, num_classes=7, img_size=64)
    save_for_hf(model, str(folder), safe_serialization=True,
                model_args={"num_classes": 7, "img_size": 64}, data_config=DATA_CONFIG)
    return model


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch):
    """A Hub cache holding REPO, the Hub library in offline mode (as HF_HUB_OFFLINE=1 sets)."""
    cache = tmp_path / "hf-cache"
    repo = cache / f"models--{REPO.replace('/', '--')}"
    model = saved_model(repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache, model


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("prefix", ["hf-hub:", "hf_hub:"])
def test_hub_name_loads_the_cached_weights_and_preprocessing(hub_cache, prefix):
    _, model = hub_cache
    assert resolve_source(f"{prefix}{REPO}") == "hub"
    backbone = build_backbone(ModelConfig(name=f"{prefix}{REPO}", pretrained=True))
    assert same_weights(backbone.model, model)
    assert backbone.data_config["mean"] == pytest.approx(DATA_CONFIG["mean"])
    assert tuple(backbone.data_config["input_size"]) == (3, 64, 64)
    assert backbone.data_config["crop_pct"] == pytest.approx(0.8)


def test_hub_name_without_pretrained_is_the_architecture_with_random_weights(hub_cache):
    _, model = hub_cache
    backbone = build_backbone(ModelConfig(name=f"hf-hub:{REPO}", pretrained=False))
    assert backbone.model.state_dict().keys() == model.state_dict().keys()
    assert not same_weights(backbone.model, model)


def test_head_cut_of_a_hub_model_equals_timm_and_uses_its_preprocessing(hub_cache):
    _, model = hub_cache
    extractor, transform = build_extractor(f"hf-hub:{REPO}", cut="head", pretrained=True)
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.inference_mode():
        want = model.forward_head(model.forward_features(x), pre_logits=True)
        torch.testing.assert_close(extractor(x), want)
    normalize = [t for t in transform.transforms if type(t).__name__ == "Normalize"][0]
    assert tuple(normalize.mean) == pytest.approx(DATA_CONFIG["mean"])


def test_hub_name_not_in_the_cache_is_one_line_naming_the_cache(hub_cache):
    cache, _ = hub_cache
    with pytest.raises(ModelError) as err:
        build_backbone(ModelConfig(name="hf-hub:me/not_cached", pretrained=True))
    text = str(err.value)
    assert "\n" not in text and "could not fetch" in text
    assert str(cache) in text and "model.weights" in text and "HF_HUB_OFFLINE" in text


def test_malformed_hub_names_are_refused():
    with pytest.raises(ModelError, match="hf-hub:ORG/NAME"):
        build_backbone(ModelConfig(name="hf-hub:no_org", pretrained=False))


def test_model_folder_loads_offline_with_its_weights(tmp_path):
    model = saved_model(tmp_path / "folder")
    assert resolve_source(str(tmp_path / "folder")) == "hub"
    backbone = build_backbone(ModelConfig(name=str(tmp_path / "folder")))
    assert same_weights(backbone.model, model)
    assert backbone.data_config["mean"] == pytest.approx(DATA_CONFIG["mean"])


def test_extract_and_inspect_take_a_hub_name(hub_cache, tmp_path):
    cache, model = hub_cache
    for i in range(3):
        save(random_image(40, 30, seed=i), tmp_path / "img" / f"{i}.png")
    cfg = load_config(None, [f"model.name=hf-hub:{REPO}", "model.pretrained=true",
                             f"data.root={tmp_path / 'img'}", f"output.dir={tmp_path / 'out'}",
                             "runtime.device=cpu", "runtime.precision=fp32",
                             "runtime.progress=false"], ExtractConfig)
    store = run_extract(cfg).store
    assert store.features.shape == (3, model.num_features)
    assert store.meta["preprocess"]["mean"] == pytest.approx(list(DATA_CONFIG["mean"]))
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "transferlab.inspect", f"hf-hub:{REPO}"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "stage:" in proc.stdout and "64" in proc.stdout


def test_finetuned_hub_model_reloads_offline_without_the_hub(hub_cache, tmp_path, monkeypatch):
    """The checkpoint records timm's architecture and config.json's arguments, not the hub
    name: it loads (and predicts the same) with an empty Hub cache."""
    from tests.imagegen import make_image_tree
    from transferlab.config import FinetuneConfig
    from transferlab.finetune.run import run_finetune
    from transferlab.models.classifier import load_model

    make_image_tree(tmp_path / "img", classes=("cat", "dog"), per_class=4)
    cfg = load_config(None, [f"model.name=hf-hub:{REPO}", "model.pretrained=true",
                             f"data.root={tmp_path / 'img'}", "head.type=linear",
                             "train.epochs=1", "train.batch_size=4", "runtime.device=cpu",
                             "runtime.precision=fp32", "runtime.progress=false",
                             f"output.dir={tmp_path / 'ft'}"], FinetuneConfig)
    result = run_finetune(cfg)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    clf = load_model(result.checkpoint)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert clf(x).shape == (2, 2)
    assert tuple(clf.preprocess.mean) == pytest.approx(DATA_CONFIG["mean"])

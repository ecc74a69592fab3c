"""Backbones from every source, weights files, and the errors users meet."""
import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from transferlab.config import ModelConfig
from transferlab.errors import ModelError
from transferlab.models.backbones import build_backbone, resolve_source
from transferlab.models.checkpoint import save_checkpoint


def same_outputs(a: nn.Module, b: nn.Module, shape) -> bool:
    x = torch.randn(2, *shape)
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


def test_sources_resolve():
    assert resolve_source("lenet") == "builtin"
    assert resolve_source("test_resnet") == "timm"
    assert resolve_source("resnet50.a1_in1k") == "timm"
    assert resolve_source("squeezenet1_0") == "torchvision"
    assert resolve_source("mypkg.models:make") == "callable"


def test_unknown_model_lists_closest_names():
    with pytest.raises(ModelError) as err:
        build_backbone(ModelConfig(name="resnett50"))
    assert "unknown model 'resnett50'" in str(err.value)
    assert "resnet50" in str(err.value)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_file_reproduces_model_exactly(tmp_path, suffix):
    torch.manual_seed(0)
    source = timm.create_model("test_resnet")
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file(source.state_dict(), str(path))
    else:  # timm train.py layout: nested under 'state_dict', DDP 'module.' prefix
        torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()},
                    "epoch": 3}, path)
    loaded = build_backbone(ModelConfig(name="test_resnet", weights=str(path))).model
    assert same_outputs(source, loaded, (3, 64, 64))


def test_torchvision_weights_file(tmp_path):
    import torchvision

    source = torchvision.models.get_model("squeezenet1_0", num_classes=7)
    torch.save(source.state_dict(), tmp_path / "sq.pt")
    loaded = build_backbone(ModelConfig(name="squeezenet1_0", num_classes=7,
                                        weights=str(tmp_path / "sq.pt"))).model
    assert same_outputs(source, loaded, (3, 64, 64))


def test_pickled_object_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": nn.Linear(2, 2)}, path)  # a whole module needs unpickling
    with pytest.raises(ModelError, match="weights_only=True"):
        build_backbone(ModelConfig(name="lenet", weights=str(path)))


def test_mismatched_weights_name_keys(tmp_path):
    save_file(timm.create_model("test_resnet").state_dict(), str(tmp_path / "w.safetensors"))
    with pytest.raises(ModelError, match="do not fit the model"):
        build_backbone(ModelConfig(name="test_vit", weights=str(tmp_path / "w.safetensors")))


def test_missing_weights_file():
    with pytest.raises(ModelError, match="weights file not found"):
        build_backbone(ModelConfig(name="lenet", weights="nope.safetensors"))


@pytest.mark.parametrize("name", ["test_resnet", "legacy_xception", "resnet18"])
def test_pretrained_offline_points_to_weights(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = "torchvision" if name == "resnet18" else "auto"
    with pytest.raises(ModelError) as err:
        build_backbone(ModelConfig(name=name, source=source, pretrained=True))
    msg = str(err.value)
    assert f"could not fetch the pretrained weights of '{name}'" in msg
    assert "model.weights: PATH" in msg


def test_builtin_lenet_and_its_data_config():
    backbone = build_backbone(ModelConfig(name="lenet"))
    assert backbone.data_config["input_size"] == (1, 28, 28)
    assert backbone.model(torch.zeros(1, 1, 28, 28)).shape == (1, 10)


def tiny_net(num_classes: int = 3) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(num_classes))


def not_a_module():
    return 42


def test_callable_source():
    name = "tests.models.test_backbones:tiny_net"
    backbone = build_backbone(ModelConfig(name=name, num_classes=5))
    assert backbone.source == "callable"
    assert backbone.model(torch.zeros(1, 3, 8, 8)).shape == (1, 5)
    with pytest.raises(ModelError, match="not a torch.nn.Module"):
        build_backbone(ModelConfig(name="tests.models.test_backbones:not_a_module"))
    with pytest.raises(ModelError, match="cannot import"):
        build_backbone(ModelConfig(name="tests.nope:thing"))


def test_checkpoint_source_round_trip(tmp_path):
    torch.manual_seed(1)
    model = build_backbone(ModelConfig(name="lenet")).model
    path = save_checkpoint(tmp_path / "lenet.safetensors", model.state_dict(),
                           {"backbone": {"name": "lenet", "num_classes": 10}})
    loaded = build_backbone(ModelConfig(name=str(path)))
    assert loaded.source == "checkpoint"
    assert same_outputs(model, loaded.model, (1, 28, 28))


def test_plain_safetensors_is_not_a_checkpoint(tmp_path):
    save_file({"w": torch.zeros(1)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(ModelError, match="not a transferlab checkpoint"):
        build_backbone(ModelConfig(name=str(tmp_path / "w.safetensors"), source="checkpoint"))


def test_finetuned_classifier_checkpoint_as_backbone(tmp_path):
    """A fine-tune's model.safetensors is a backbone: cut 'head' gives its base features."""
    from transferlab.config import HeadConfig
    from transferlab.data.preprocess import resolve_preprocess
    from transferlab.models.classifier import classifier_meta, save_classifier
    from transferlab.models.extractor import extractor_from_config
    from transferlab.models.heads import cut_with_head

    torch.manual_seed(0)
    arch = build_backbone(ModelConfig(name="lenet"))
    spec = resolve_preprocess(arch.data_config)
    base, head = cut_with_head(arch.model, "first:7", None, spec.input_size,
                               HeadConfig(type="linear"), 3, "lenet")
    meta = classifier_meta({"name": "lenet"}, "first:7", None, HeadConfig(type="linear"), 800,
                           ["a", "b", "c"], spec)
    path = save_classifier(tmp_path / "model.safetensors", base, head, meta)
    bundle = extractor_from_config(ModelConfig(name=str(path), cut="head"))
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(bundle.extractor(x), base(x))
    assert bundle.spec == spec

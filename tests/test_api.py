"""The public API: every exported name is the documented class, function or module of that
name; command modules start without warnings; ``build_extractor`` gives timm's own features
and preprocessing."""
import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.data import create_transform, resolve_data_config
from torch import nn

import transferlab

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", transferlab.__all__)
def test_exported_name_is_the_documented_definition(name):
    value = getattr(transferlab, name)
    assert inspect.getdoc(value), f"transferlab.{name} has no docstring"
    if inspect.ismodule(value):  # a submodule, imported on first use
        assert value.__name__.startswith("transferlab.")
        assert value is importlib.import_module(value.__name__)
        assert value.__name__.rsplit(".", 1)[1] == name
        return
    assert inspect.isclass(value) or inspect.isfunction(value)
    # the definition itself under its own name, not an alias or a wrapper
    assert value.__name__ == name and value.__module__.startswith("transferlab.")
    assert getattr(sys.modules[value.__module__], name) is value
    assert name in dir(transferlab)


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        transferlab.nope


def test_command_module_runs_without_import_warnings():
    proc = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m",
                           "transferlab.inspect", "lenet"], capture_output=True, text=True,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "first:7 (6)" in proc.stdout


def test_build_extractor_unpacks_and_declares_its_preprocessing():
    built = transferlab.build_extractor("lenet", cut="first:7")
    extractor, transform = built
    assert isinstance(built.spec, transferlab.PreprocessSpec)
    assert built.spec.input_size == (1, 28, 28)
    assert not hasattr(extractor, "preprocess")  # no undeclared attribute on the module
    from PIL import Image

    assert extractor(transform(Image.new("L", (28, 28)))[None]).shape == (1, 800)


@pytest.fixture(scope="module")
def resnet18_weights(tmp_path_factory):
    """timm's resnet18 with random weights (BatchNorm statistics moved off their initial
    0 and 1, so that they count), and the same weights as a safetensors file."""
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("weights") / "resnet18.safetensors"
    save_file(model.state_dict(), str(path))
    return model, path


def test_build_extractor_head_is_timms_pre_logits(resnet18_weights):
    model, path = resnet18_weights
    built = transferlab.build_extractor("resnet18", cut="head", weights=str(path))
    x = torch.randn(2, *built.spec.input_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model.forward_head(model.forward_features(x), pre_logits=True)
    got = built.extractor(x)
    assert got.shape == want.shape == (2, 512)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert not any(p.requires_grad for p in built.extractor.parameters())


def test_build_extractor_preprocessing_is_timms(resnet18_weights):
    """The spec is timm's data config; ``window: image`` is timm's transform, pixel for
    pixel."""
    model, path = resnet18_weights
    data_config = resolve_data_config(model=model)
    built = transferlab.build_extractor("resnet18", weights=str(path),
                                        preprocess={"window": "image"})
    spec = built.spec
    assert (spec.input_size, spec.interpolation, spec.mean, spec.std, spec.crop_pct,
            spec.crop_mode) == tuple(data_config[k] for k in (
                "input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode"))
    pixels = np.random.default_rng(0).integers(0, 256, (375, 500, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    assert torch.equal(built.transform(image), create_transform(**data_config)(image))

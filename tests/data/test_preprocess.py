"""Preprocessing resolved from the backbone's config; overrides; Xception's [-1, 1] squash."""
import numpy as np
import pytest
import timm
import torch
from PIL import Image

import transferlab
from transferlab.config import ModelConfig, PreprocessConfig
from transferlab.data.preprocess import DeviceNormalize, build_transform, resolve_preprocess
from transferlab.errors import ConfigError
from transferlab.models.backbones import build_backbone


def photo(w=500, h=375, mode="RGB"):
    rng = np.random.default_rng(0)
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


def test_legacy_xception_head_and_squash_preprocessing():
    extractor, transform = transferlab.build_extractor("legacy_xception", cut="head",
                                                       pool="avg", preprocess={"resize": "squash"})
    assert extractor.output_shape == (2048,)
    img = photo()
    expected = np.asarray(img.resize((299, 299), Image.BICUBIC), dtype=np.float32) / 127.5 - 1
    got = transform(img)
    assert got.shape == (3, 299, 299)
    assert torch.allclose(got, torch.from_numpy(expected).permute(2, 0, 1), atol=1e-6)


def test_center_crop_matches_timm_eval_transform():
    model = timm.create_model("test_vit")
    data_config = timm.data.resolve_model_data_config(model)
    spec = resolve_preprocess(data_config)
    img = photo()
    reference = timm.data.create_transform(**data_config)(img)
    exact = resolve_preprocess(data_config, PreprocessConfig(window="image"))
    assert torch.equal(build_transform(exact)(img), reference)
    # the default crop window: the same pixels to within rounding (tests/data/test_cropwindow.py)
    one_level = 1 / 255 / min(spec.std) + 1e-5
    assert float((build_transform(spec)(img) - reference).abs().max()) <= 2 * one_level
    assert spec.scale_size() == (int(160 / 0.95),) * 2


def test_torchvision_weights_transforms_are_used():
    import torchvision

    backbone = build_backbone(ModelConfig(name="resnet18", source="torchvision"))
    spec = resolve_preprocess(backbone.data_config)
    reference = torchvision.models.ResNet18_Weights.DEFAULT.transforms()
    assert spec.input_size == (3, 224, 224)
    assert spec.mean == tuple(reference.mean) and spec.std == tuple(reference.std)
    img = photo()
    exact = resolve_preprocess(backbone.data_config, PreprocessConfig(window="image"))
    assert torch.allclose(build_transform(exact)(img), reference(img), atol=1e-6)
    one_level = 1 / 255 / min(spec.std) + 1e-5  # the crop window: within rounding
    assert float((build_transform(spec)(img) - reference(img)).abs().max()) <= 2 * one_level


def test_overrides_and_grayscale_conversion():
    spec = resolve_preprocess({"input_size": (3, 224, 224), "mean": (0.5, 0.4, 0.3),
                               "std": (0.2, 0.2, 0.2)},
                              PreprocessConfig(input_size=[64, 48], channels=1))
    assert spec.input_size == (1, 64, 48) and spec.image_mode == "L"
    assert spec.mean == pytest.approx((0.4,))
    out = build_transform(spec)(photo(mode="L"))
    assert out.shape == (1, 64, 48)


def test_lenet_reads_grayscale_digits_in_unit_range():
    built = transferlab.build_extractor("lenet", cut="first:7")
    _, transform = built
    digit = Image.fromarray(np.full((28, 28), 255, np.uint8), "L")
    assert torch.equal(transform(digit), torch.ones(1, 28, 28))
    assert built.spec.channels == 1  # the declared preprocessing of build_extractor's result


def test_uint8_transform_plus_device_normalize_equals_float_transform():
    spec = resolve_preprocess({"input_size": (3, 32, 32), "mean": (0.485, 0.456, 0.406),
                               "std": (0.229, 0.224, 0.225)})
    img = photo(64, 48)
    raw = build_transform(spec, normalize=False)(img)
    assert raw.dtype == torch.uint8
    got = DeviceNormalize(spec.mean, spec.std)(raw[None])[0]
    assert torch.allclose(got, build_transform(spec)(img), atol=1e-5)


@pytest.mark.parametrize("cfg, message", [
    (PreprocessConfig(input_size=[1, 2, 3, 4]), "input_size must be"),
    (PreprocessConfig(std=[0.0, 1.0, 1.0]), "std must be positive"),
    (PreprocessConfig(crop_pct=1.5), "crop_pct must be in"),
    (PreprocessConfig(mean=[0.1, 0.2]), "has 2 values for 3 channels"),
])
def test_bad_preprocess_values(cfg, message):
    with pytest.raises(ConfigError, match=message):
        resolve_preprocess({}, cfg)

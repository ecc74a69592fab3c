"""``preprocess.window: crop`` (issue #16): the centre crop resampled directly gives timm's
pixels to within the documented rounding; ``window: image`` gives them exactly."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from timm.data import create_transform

from tests.imagegen import random_image
from transferlab.config import PreprocessConfig
from transferlab.data.cropwindow import CropWindowResize
from transferlab.data.preprocess import build_transform, resolve_preprocess
from transferlab.errors import ModelError
from transferlab.models.recorded import spec_from_meta

SIZES = [(500, 375), (375, 500), (640, 480), (1000, 300), (333, 333), (257, 900), (90, 61)]


def timm_eval(spec) -> object:
    """timm's own eval transform (resize the whole image, then crop): the reference."""
    return create_transform(input_size=spec.input_size, interpolation=spec.interpolation,
                            crop_pct=spec.crop_pct, crop_mode=spec.crop_mode, normalize=False)


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "lanczos"])
@pytest.mark.parametrize("size, crop_pct", [((3, 224, 224), 0.875), ((3, 299, 299), 0.8975),
                                            ((1, 64, 64), 0.95)])
def test_the_crop_window_gives_timms_pixels_to_within_rounding(interpolation, size, crop_pct):
    spec = resolve_preprocess({"input_size": size, "crop_pct": crop_pct,
                               "interpolation": interpolation})
    fast, reference = build_transform(spec, normalize=False), timm_eval(spec)
    assert isinstance(fast.transforms[0], CropWindowResize)
    differing = values = 0
    for seed, (w, h) in enumerate(SIZES):
        image = random_image(w, h, seed=seed).convert(spec.image_mode)
        a, b = fast(image).int(), reference(image).int()
        assert a.shape == b.shape == size
        assert int((a - b).abs().max()) <= 2
        differing, values = differing + int((a != b).sum()), values + a.numel()
    assert differing / values < 2e-3  # measured: 0.6e-4 to 1.2e-3


def test_no_resize_needed_and_very_tall_images_are_exact():
    spec = resolve_preprocess({"input_size": (3, 224, 224), "crop_pct": 0.875})
    fast, reference = build_transform(spec, normalize=False), timm_eval(spec)
    short = spec.scale_size()[0]  # 256: the resize is a no-op, only the crop is left
    for w, h in [(short, 300), (400, short), (100, 900)]:  # 100x900: Pillow goes vertical first
        image = random_image(w, h, seed=w)
        assert torch.equal(fast(image), reference(image)), (w, h)


def test_window_image_is_timms_transform_exactly_and_other_modes_are_untouched():
    exact = resolve_preprocess({"input_size": (3, 224, 224)}, PreprocessConfig(window="image"))
    image = random_image(500, 375, seed=1)
    assert torch.equal(build_transform(exact, normalize=False)(image),
                       timm_eval(exact)(image))
    squash = resolve_preprocess({"input_size": (3, 224, 224)}, PreprocessConfig(resize="squash"))
    assert not isinstance(build_transform(squash).transforms[0], CropWindowResize)
    crop = resolve_preprocess({"input_size": (3, 224, 224)})
    assert not any(isinstance(t, CropWindowResize)
                   for t in build_transform(crop, augment=True).transforms)
    normalized = build_transform(crop)  # the float, normalised variant gets the window too
    assert isinstance(normalized.transforms[0], CropWindowResize)
    want = timm_eval(crop)(image).float() / 255
    got = normalized(image) * torch.tensor(crop.std).view(3, 1, 1) + \
        torch.tensor(crop.mean).view(3, 1, 1)
    assert float((got - want).abs().max()) <= 2 / 255 + 1e-5


def test_the_spec_records_the_window_and_old_records_mean_the_whole_image():
    spec = resolve_preprocess({"input_size": (3, 224, 224)})
    assert spec.window == "crop" and spec.to_dict()["window"] == "crop"
    recorded = spec.to_dict()
    del recorded["window"]  # a checkpoint written before the window existed
    assert spec_from_meta(recorded, "x").window == "image"
    with pytest.raises(ModelError, match="window 'sideways' is neither 'crop' nor 'image'"):
        spec_from_meta({**spec.to_dict(), "window": "sideways"}, "x")


def test_the_window_box_matches_torchvisions_resize_and_crop_arithmetic():
    from transferlab.data.cropwindow import crop_window, resized_size

    assert resized_size(500, 375, 256) == (341, 256)
    assert resized_size(375, 500, 333) == (333, 444)
    box = np.array(crop_window(500, 375, 256, (224, 224)))
    np.testing.assert_allclose(box, [58 * 500 / 341, 16 * 375 / 256, 282 * 500 / 341,
                                     240 * 375 / 256])
    assert crop_window(100, 100, 80, (90, 90)) is None  # the crop would pad: not a window


def test_a_store_written_before_the_window_embeds_queries_with_the_whole_image(tmp_path):
    from tests.helpers import make_cfg
    from tests.imagegen import make_image_tree
    from transferlab.extract.queries import bundle_from_meta
    from transferlab.extract.runner import run_extract
    from transferlab.store.reader import FeatureStore

    make_image_tree(tmp_path / "data", per_class=1)
    run_extract(make_cfg(tmp_path / "data", tmp_path / "s"))
    meta = FeatureStore.open(tmp_path / "s").meta
    assert meta["preprocess"]["window"] == "crop"
    assert bundle_from_meta(meta, tmp_path / "s").spec.window == "crop"
    old = {**meta, "preprocess": {k: v for k, v in meta["preprocess"].items() if k != "window"}}
    assert bundle_from_meta(old, tmp_path / "s").spec.window == "image"

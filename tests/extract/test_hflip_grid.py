"""output.hflip (each row the mean of the image's and its mirror's features) and the grid
pools (model.pool grid2 / grid4): the settings of configs/dedup.yaml."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torch import nn

from tests.helpers import make_cfg
from transferlab.config import load_config
from transferlab.errors import CutError, StoreError
from transferlab.extract.runner import run_extract
from transferlab.models.cuts import Pool
from transferlab.models.extractor import extractor_from_config
from transferlab.runtime.device import seed_everything


def test_grid_pool_is_the_cell_means_channel_major():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    out = Pool("grid2")(x)
    assert out.shape == (2, 3 * 4)
    # channel 1, cell (row 1, col 0): rows 2-3, cols 0-1
    assert out[0, 1 * 4 + 2] == x[0, 1, 2:, :2].mean()
    assert torch.equal(Pool("grid4")(x), x.flatten(1))
    with pytest.raises(CutError, match="feature map"):
        Pool("grid2")(torch.zeros(2, 5, 8))  # tokens
    # the head cut of a timm CNN with a grid pool: its last feature map, pooled by the grid
    cfg = make_cfg(Path("."), Path("."), "model.cut=head", "model.pool=grid2")
    seed_everything(0)
    bundle = extractor_from_config(cfg.model, cfg.preprocess)
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        got = bundle.extractor(x)
        fmap = bundle.extractor.body.model.forward_features(x)
    assert torch.allclose(got, nn.functional.adaptive_avg_pool2d(fmap, 2).flatten(1))


def test_hflip_rows_are_mirror_invariant_and_equal_a_direct_computation(tmp_path):
    root = tmp_path / "img"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        im = Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
        im.save(root / f"a{i}.png")
        ImageOps.mirror(im).save(root / f"a{i}_mirror.png")
    over = ["model.cut=stage:1", "model.pool=grid4", "preprocess.resize=squash"]
    store = run_extract(make_cfg(root, tmp_path / "s", *over, "output.hflip=true",
                                 "output.dtype=float32")).store
    plain = run_extract(make_cfg(root, tmp_path / "p", *over, "output.dtype=float32")).store
    rows, base = np.asarray(store.features), np.asarray(plain.features)
    assert rows.shape == base.shape and rows.shape[1] % 16 == 0
    row = {k: r for k, r in zip(store.keys, rows)}
    prow = {k: r for k, r in zip(plain.keys, base)}
    for i in range(3):  # the mirror image gives the same row; without hflip it does not
        a, b = row[f"a{i}.png"], row[f"a{i}_mirror.png"]
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(a).max())
        assert np.abs(prow[f"a{i}.png"] - prow[f"a{i}_mirror.png"]).max() > 1e-2
    # the row is the mean of the image's features and its mirror's, computed by hand
    cfg = load_config(store.dir / "config.yaml", [], type(make_cfg(root, tmp_path)))
    seed_everything(cfg.runtime.seed)
    bundle = extractor_from_config(cfg.model, cfg.preprocess)
    with Image.open(root / "a0.png") as im:
        x = bundle.transform()(im.convert("RGB"))[None]
    with torch.inference_mode():
        direct = ((bundle.extractor(x) + bundle.extractor(x.flip(-1))) / 2).numpy()[0]
    np.testing.assert_allclose(row["a0.png"], direct, rtol=1e-3, atol=1e-3 * np.abs(direct).max())
    # a store of the other setting is not resumed into: its rows differ
    with pytest.raises(StoreError):
        run_extract(make_cfg(root, tmp_path / "p", *over, "output.hflip=true",
                             "output.dtype=float32"))

"""Fixtures the model tests share."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def lenet_store(tmp_path_factory):
    """A tiny fp32 LeNet store of its own images (float32 rows): (folder, keys)."""
    from tests.imagegen import make_image_tree
    from transferlab.config import ExtractConfig, load_config
    from transferlab.extract.runner import run_extract

    tmp = tmp_path_factory.mktemp("store")
    keys = make_image_tree(tmp / "data", per_class=2)
    cfg = load_config(None, [f"data.root={tmp / 'data'}", "model.name=lenet",
                             f"output.dir={tmp / 'store'}", "runtime.num_workers=0",
                             "runtime.progress=false", "output.dtype=float32",
                             "runtime.precision=fp32"], ExtractConfig)
    run_extract(cfg)
    return tmp, keys

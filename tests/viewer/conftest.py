"""A small real store for the viewer's tests, built once: 24 generated images in three
class folders, extracted with timm's test_resnet (so an uploaded image can be embedded as
the store embedded its rows), its curation findings, k-means clusters and a confusion
matrix beside it."""
from __future__ import annotations

import shutil

import numpy as np
import pytest


@pytest.fixture(scope="session")
def built_store(tmp_path_factory):
    from tests.helpers import extract
    from tests.imagegen import make_image_tree
    from transferlab.analysis.cluster_report import run_cluster, write_assignments
    from transferlab.analysis.curation import curate, write_report
    from transferlab.finetune.outputs import write_confusion

    tmp = tmp_path_factory.mktemp("viewer")
    make_image_tree(tmp / "images", classes=("cat", "dog", "fox"), per_class=8,
                    unicode_name=False)
    store = extract(tmp, "store", {"root": str(tmp / "images")})
    write_report(curate(store, k=3, top=5, folds=2), store.dir / "curation")
    report = run_cluster(store, 3, n_init=1)
    write_assignments(store.dir / "clusters.csv", report.keys, report.clusters)
    write_confusion(store.dir, np.array([[5, 2, 1], [0, 8, 0], [1, 1, 6]]),
                    ["cat", "dog", "fox"], "validation")
    return tmp


@pytest.fixture
def view_store(built_store, tmp_path):
    """A fresh copy of the built store and its images (tests may change them)."""
    from transferlab.store.reader import FeatureStore

    shutil.copytree(built_store / "images", tmp_path / "images")
    shutil.copytree(built_store / "store", tmp_path / "store")
    return FeatureStore.open(tmp_path / "store")

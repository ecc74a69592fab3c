"""k-means, purity and NMI."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.helpers import blobs, make_store
from transferlab.analysis.kmeans import _lloyd, kmeans, nmi, purity
from transferlab.errors import SettingError


def test_kmeans_recovers_separated_clusters():
    x, y = blobs()
    res = kmeans(x, 5, n_init=2, seed=0)
    assert nmi(y, res.labels) == pytest.approx(1.0)
    assert purity(y, res.labels) == 1.0
    # inertia is the sum of squared distances to the returned centres
    ref = ((x - res.centers[res.labels]) ** 2).sum()
    assert res.inertia == pytest.approx(float(ref), rel=1e-4)
    # each centre is the mean of its members
    for c in range(5):
        np.testing.assert_allclose(res.centers[c], x[res.labels == c].mean(0), atol=1e-3)


def test_kmeans_is_seeded_and_restarts_never_hurt():
    x, _ = blobs(n_per=60, k=8, d=4, sep=3.0, seed=1)  # overlapping: local minima exist
    a, b = kmeans(x, 8, n_init=1, seed=3), kmeans(x, 8, n_init=1, seed=3)
    assert np.array_equal(a.labels, b.labels) and a.inertia == b.inertia
    many = kmeans(x, 8, n_init=6, seed=3)  # first restart is the n_init=1 run
    assert many.inertia <= a.inertia


def numpy_lloyd(x, centers, iters):
    x, centers = x.astype(np.float64), centers.astype(np.float64)
    for _ in range(iters):
        d2 = ((x[:, None, :] - centers[None]) ** 2).sum(-1)
        labels = d2.argmin(1)
        centers = np.stack([x[labels == c].mean(0) for c in range(len(centers))])
    return ((x[:, None, :] - centers[None]) ** 2).sum(-1).argmin(1), centers


def test_lloyd_matches_numpy_reference_from_same_start():
    x, _ = blobs(n_per=50, k=4, d=3, sep=2.5, seed=2)
    start = x[[0, 1, 2, 3]]
    xt = torch.from_numpy(x)
    labels, _, centers, n_iter = _lloyd(xt, (xt * xt).sum(1), torch.from_numpy(start), 300, 0.0)
    ref_labels, ref_centers = numpy_lloyd(x, start, n_iter)
    np.testing.assert_array_equal(labels.numpy(), ref_labels)
    np.testing.assert_allclose(centers.numpy(), ref_centers, atol=1e-4)


def test_kmeans_with_fewer_distinct_points_than_k():
    x = np.repeat(np.eye(3, dtype=np.float32), 4, axis=0)
    res = kmeans(x, 5, n_init=2)
    assert res.inertia == pytest.approx(0.0, abs=1e-6)
    assert nmi(np.repeat(np.arange(3), 4), res.labels) > 0.8


def test_kmeans_errors():
    # the library names its parameters; the command names its flags (test_cluster_cli_errors)
    with pytest.raises(SettingError, match="^k must be between 1 and the number of rows"):
        kmeans(np.zeros((3, 2)), 4)
    with pytest.raises(SettingError, match="^n_init must be at least 1"):
        kmeans(np.zeros((3, 2)), 2, n_init=0)
    with pytest.raises(SettingError, match="^max_iter must be at least 1"):
        kmeans(np.zeros((3, 2)), 2, max_iter=0)


def test_nmi_and_purity_hand_computed():
    true = [0, 0, 0, 1, 1, 1]
    pred = [0, 0, 1, 1, 2, 2]
    # MI = 2/3 ln 2, H(true) = ln 2, H(pred) = ln 3, arithmetic mean normaliser
    expected = (2 / 3 * math.log(2)) / ((math.log(2) + math.log(3)) / 2)
    assert nmi(true, pred) == pytest.approx(expected, rel=1e-12)
    assert nmi(pred, true) == pytest.approx(expected, rel=1e-12)
    assert purity(true, pred) == pytest.approx(5 / 6)
    # relabelling clusters changes nothing; identical partitions score 1
    assert nmi(true, [7, 7, 3, 3, 9, 9]) == pytest.approx(expected, rel=1e-12)
    assert nmi(true, [5, 5, 5, 2, 2, 2]) == pytest.approx(1.0)
    assert purity([1, 1, 2, 2], [0, 0, 0, 0]) == 0.5


def test_nmi_edge_cases():
    assert nmi([0, 0, 0], [1, 1, 1]) == 1.0  # both single clusters
    assert nmi([0, 0, 1, 1], [0, 0, 0, 0]) == 0.0  # one cluster carries no information
    assert nmi([0, 1, 0, 1], [0, 0, 1, 1]) == 0.0  # independent


# ---------------------------------------------------------------------------------------
# Store level and command line
# ---------------------------------------------------------------------------------------


def test_cluster_cli_writes_assignments_and_scores(tmp_path, capsys):
    import csv

    from transferlab.commands.cluster import main

    x, y = blobs(n_per=20, k=3, d=6)
    store = make_store(tmp_path / "s", x, y)
    out_csv = tmp_path / "out" / "assign.csv"
    assert main([str(tmp_path / "s"), "-k", "3", "--n-init", "2", "--out", str(out_csv),
                 "--plot", str(tmp_path / "plots"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "k-means: k=3, 60 rows, inertia" in out
    assert "purity 1.0000  NMI 1.0000 (over 60 labelled rows)" in out
    with open(out_csv, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["key", "cluster"] and len(rows) == 61
    assert [r[0] for r in rows[1:]] == store.keys
    assert nmi(y, [int(r[1]) for r in rows[1:]]) == pytest.approx(1.0)
    for name in ("clusters_pca.png", "labels_pca.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:4] == b"\x89PNG"


def test_cluster_uses_plain_views_and_handles_unlabelled(tmp_path, capsys):
    from transferlab.analysis.cluster_report import run_cluster
    from transferlab.commands.cluster import main

    x, _ = blobs(n_per=10, k=2, d=4)
    keys = [f"img{i}.png" for i in range(20)]
    store = make_store(tmp_path / "v", np.concatenate([x, x + 0.1]), np.full(40, -1),
                       keys=keys + keys, views=[0] * 20 + [1] * 20)
    report = run_cluster(store, 2, n_init=1)
    assert report.keys == keys and len(report.clusters) == 20
    assert report.purity is None and report.nmi is None
    assert main([str(tmp_path / "v"), "-k", "2"]) == 0
    assert "purity/NMI: n/a (store has no labels)" in capsys.readouterr().out


def test_cluster_cli_errors_exit_2(tmp_path, capsys):
    from transferlab.commands.cluster import main

    x, y = blobs(n_per=3, k=2, d=4)
    make_store(tmp_path / "s", x, y)
    assert main([str(tmp_path / "s"), "-k", "7"]) == 2
    assert "-k must be between 1 and the number of rows (6)" in capsys.readouterr().err
    assert main([str(tmp_path / "nope"), "-k", "2"]) == 2
    assert capsys.readouterr().err.startswith("error: no feature store")


def test_cluster_plot_method_tsne(tmp_path, capsys):
    pytest.importorskip("sklearn")
    from transferlab.commands.cluster import main

    x, y = blobs(n_per=10, k=3, d=6)
    make_store(tmp_path / "s", x, y)
    assert main([str(tmp_path / "s"), "-k", "3", "--plot", str(tmp_path / "p"),
                 "--plot-method", "tsne", "--device", "cpu"]) == 0
    for name in ("clusters_tsne.png", "labels_tsne.png"):
        assert (tmp_path / "p" / name).read_bytes()[:4] == b"\x89PNG"

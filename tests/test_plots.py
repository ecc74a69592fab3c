"""Every plot writes a real, non-empty PNG; PCA matches an SVD reference."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from PIL import Image

from transferlab import plots
from transferlab.errors import DataError, TransferlabError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path, min_size=(100, 100)):
    assert path.is_file() and path.suffix == ".png"
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as im:
        im.load()
        assert im.size[0] >= min_size[0] and im.size[1] >= min_size[1]
        # not a blank canvas: more than one colour drawn
        assert len(im.convert("RGB").getcolors(maxcolors=1 << 20) or [0, 0]) > 1


def features(n_per=30, d=12, k=3, seed=0):
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(loc=3 * c, size=(n_per, d)) for c in range(k)])
    return x.astype(np.float32), np.repeat(np.arange(k), n_per)


def test_class_columns(tmp_path):
    x, y = features(k=12)
    out = plots.plot_class_columns(x, y, tmp_path / "sub" / "cols.png",
                                   class_names=[f"c{i}" for i in range(12)])
    assert out == tmp_path / "sub" / "cols.png"
    assert_png(out)


def test_pca_matches_svd_and_scatter(tmp_path):
    x, y = features()
    pts = plots.pca_2d(x)
    xc = x.astype(np.float64) - x.mean(0)
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    ref = xc @ vt[:2].T
    for j in range(2):  # equal up to the sign of each component
        assert min(np.abs(pts[:, j] - ref[:, j]).max(), np.abs(pts[:, j] + ref[:, j]).max()) < 1e-6
    assert np.array_equal(pts, plots.pca_2d(x))
    labels = y.copy()
    labels[:5] = -1  # unlabelled rows are drawn grey
    assert_png(plots.plot_pca(x, labels, tmp_path / "pca.png", class_names=["a", "b", "c"]))
    assert_png(plots.plot_pca(x, None, tmp_path / "nolabels"))  # suffix added


def test_pca_randomized_for_wide_features():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 5000)) + np.outer(rng.normal(size=60) * 30, rng.normal(size=5000))
    pts = plots.pca_2d(x)
    xc = x - x.mean(0)
    ref = xc @ np.linalg.svd(xc, full_matrices=False)[2][0]
    assert abs(np.corrcoef(pts[:, 0], ref)[0, 1]) > 0.999


def test_neighbors_grid(tmp_path):
    paths = []
    for n in range(4):
        p = tmp_path / f"img{n}.png"
        Image.fromarray((np.random.default_rng(n).random((40, 50, 3)) * 255).astype(np.uint8)).save(p)
        paths.append(p)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    out = plots.plot_neighbors([paths[0], paths[1]], [[paths[1], paths[2], bad], [paths[3]]],
                               [[0.1, 0.25, 0.5], [0.3]], tmp_path / "nn.png",
                               names=[["a/1.png", "b/2.png", "c/3.jpg"], ["d/4.png"]])
    assert_png(out)
    with pytest.raises(DataError):
        plots.plot_neighbors([paths[0]], [], [], tmp_path / "x.png")


def test_training_curves_from_list_and_jsonl(tmp_path):
    hist = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "val_acc": 1 - 0.5 / e,
             "lr": 0.1, "note": "text"} for e in range(1, 6)]
    assert_png(plots.plot_training_curves(hist, tmp_path / "a.png"))
    f = tmp_path / "metrics.jsonl"
    f.write_text("\n".join(json.dumps(h) for h in hist) + "\n\n")
    assert_png(plots.plot_training_curves(f, tmp_path / "b.png"))
    assert plots.read_history(f) == hist
    f.write_text('{"epoch": 1}\nnot json\n')
    with pytest.raises(DataError, match="metrics.jsonl:2"):
        plots.plot_training_curves(f, tmp_path / "c.png")
    with pytest.raises(DataError, match="no numeric metrics"):
        plots.plot_training_curves([{"epoch": 1}], tmp_path / "d.png")


def test_missing_matplotlib_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    x, y = features()
    with pytest.raises(TransferlabError, match=r"pip install transferlab\[plots\]") as info:
        plots.plot_pca(x, y, tmp_path / "p.png")
    assert isinstance(info.value, ImportError)
    assert not (tmp_path / "p.png").exists()

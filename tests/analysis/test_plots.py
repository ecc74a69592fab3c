"""Every plot writes a real, non-empty PNG; PCA matches an SVD reference; `transferlab.plots` is
the plots module the README names."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from PIL import Image

from transferlab.analysis import plots, projection
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


def test_the_public_plots_name_is_the_plots_module():
    import transferlab

    assert transferlab.plots is plots and callable(transferlab.plots.plot_neighbors)


def test_class_columns(tmp_path):
    x, y = features(k=12)
    out = plots.plot_class_columns(x, y, tmp_path / "sub" / "cols.png",
                                   class_names=[f"c{i}" for i in range(12)])
    assert out == tmp_path / "sub" / "cols.png"
    assert_png(out)


def test_pca_matches_svd_and_scatter(tmp_path):
    x, y = features()
    pts = projection.pca_2d(x)
    xc = x.astype(np.float64) - x.mean(0)
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    ref = xc @ vt[:2].T
    for j in range(2):  # equal up to the sign of each component
        assert min(np.abs(pts[:, j] - ref[:, j]).max(), np.abs(pts[:, j] + ref[:, j]).max()) < 1e-6
    assert np.array_equal(pts, projection.pca_2d(x))
    labels = y.copy()
    labels[:5] = -1  # unlabelled rows are drawn grey
    assert_png(plots.plot_pca(x, labels, tmp_path / "pca.png", class_names=["a", "b", "c"]))
    assert_png(plots.plot_pca(x, None, tmp_path / "nolabels"))  # suffix added


def test_pca_randomized_for_wide_features():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 5000)) + np.outer(rng.normal(size=60) * 30, rng.normal(size=5000))
    pts = projection.pca_2d(x)
    xc = x - x.mean(0)
    ref = xc @ np.linalg.svd(xc, full_matrices=False)[2][0]
    assert abs(np.corrcoef(pts[:, 0], ref)[0, 1]) > 0.999


def test_neighbors_grid(tmp_path):
    paths = []
    for n in range(4):
        p = tmp_path / f"img{n}.png"
        pixels = (np.random.default_rng(n).random((40, 50, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(p)
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


# UMAP's first call compiles its numba kernels (~7 s here), hence slow
@pytest.mark.parametrize("method", ["pca", "tsne", pytest.param("umap", marks=pytest.mark.slow)])
def test_maps_per_method(tmp_path, method):
    if method == "tsne":
        pytest.importorskip("sklearn", reason="t-SNE needs scikit-learn")
    if method == "umap":
        pytest.importorskip("umap", reason="UMAP needs umap-learn (pip install transferlab[umap])")
    x, y = features(n_per=20)
    pts = projection.embed_2d(x, method)
    assert pts.shape == (60, 2) and np.isfinite(pts).all()
    assert np.array_equal(pts, projection.embed_2d(x, method))  # seeded
    # well-separated classes stay apart: each point's nearest map neighbour shares its class
    d = np.linalg.norm(pts[:, None] - pts[None], axis=2) + np.eye(60) * 1e9
    assert (y[d.argmin(1)] == y).mean() > 0.95
    assert_png(plots.plot_map(x, y, tmp_path / f"{method}.png", method, ["a", "b", "c"]))
    assert plots.plot_map(x, y, tmp_path / "s.png", method, max_points=30) == tmp_path / "s.png"


def test_store_map_samples_with_the_size_in_the_title(tmp_path, monkeypatch):
    from transferlab.store.writer import StoreWriter

    x, y = features(n_per=40)
    keys = [f"c{c}/{i}.png" for i, c in enumerate(y)]
    with StoreWriter(tmp_path / "s", {"t": 1}, dtype="float16", shard_size=16) as writer:
        writer.add(keys, y, x)
        writer.add(keys[:10], y[:10], x[:10] + 1, views=[1] * 10)  # views are left out
        store = writer.close({"class_names": ["a", "b", "c"]})
    titles = []
    monkeypatch.setattr(plots, "_scatter", lambda pts, yy, out, names, title, axes:
                        titles.append((len(pts), sorted(set(yy.tolist())), title)) or out)
    plots.plot_store_map(store, tmp_path / "m.png", "pca", max_points=50)
    plots.plot_store_map(store, tmp_path / "m.png", "pca")
    assert titles == [(50, [0, 1, 2], "PCA of a random sample of 50 of 120 feature vectors (s)"),
                      (120, [0, 1, 2], "PCA of 120 feature vectors (s)")]
    monkeypatch.undo()
    assert_png(plots.plot_store_map(store, tmp_path / "t.png", "tsne", max_points=30)
               if _has("sklearn") else plots.plot_store_map(store, tmp_path / "t.png"))


def _has(module):
    try:
        __import__(module)
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("method, module, fix", [
    ("tsne", "sklearn", "pip install scikit-learn"),
    ("umap", "umap", 'pip install "transferlab[umap]"')])
def test_missing_map_dependency_names_the_fix(monkeypatch, method, module, fix):
    monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.setitem(sys.modules, f"{module}.manifold", None)
    with pytest.raises(TransferlabError, match=fix.replace("[", r"\[").replace("]", r"\]")):
        projection.embed_2d(features()[0], method)
    with pytest.raises(DataError, match="use one of pca, tsne, umap"):
        projection.embed_2d(features()[0], "mds")


def test_maps_command_writes_the_png(tmp_path, capsys):
    from transferlab.commands.maps import main
    from transferlab.store.writer import StoreWriter

    x, y = features(n_per=10)
    with StoreWriter(tmp_path / "s", {"t": 1}, dtype="float32", shard_size=8) as writer:
        writer.add([f"k{i}.png" for i in range(30)], y, x)
        writer.close({"class_names": ["a", "b", "c"]})
    assert main([str(tmp_path / "s"), str(tmp_path / "map.png"), "--max-points", "20"]) == 0
    assert capsys.readouterr().out == f"wrote {tmp_path / 'map.png'}\n"
    assert_png(tmp_path / "map.png")
    assert main([str(tmp_path / "s"), str(tmp_path / "v.png"), "--view", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "0 rows of view 1" in err and "[0]" in err
    assert not (tmp_path / "v.png").exists()
    assert main([str(tmp_path / "s"), str(tmp_path / "m.png"), "--max-points", "1"]) == 2
    assert "--max-points must be at least 3" in capsys.readouterr().err


def test_gallery_shows_a_blank_grey_frame_as_it_is(tmp_path):
    Image.new("L", (28, 28), 255).save(tmp_path / "white.png")
    Image.new("L", (28, 28), 0).save(tmp_path / "black.png")
    out = plots.plot_gallery([[(tmp_path / "white.png", "w"), (tmp_path / "black.png", "b")]],
                       tmp_path / "g.png")
    with Image.open(out) as im:
        a = np.asarray(im.convert("L"), dtype=np.float64)
    w = a.shape[1]
    # the centre of each half: the white frame stays white, the black one black
    assert a[a.shape[0] // 2, w // 4] > 240 and a[a.shape[0] // 2, 3 * w // 4] < 15

"""Linear and kNN probes against straightforward numpy references."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from tests.helpers import make_store
from transferlab.analysis.linear_probe import fit_logistic
from transferlab.analysis.neighbors import knn_accuracy, knn_predict
from transferlab.analysis.splits import stratified_split
from transferlab.errors import ConfigError, DataError, SettingError


def gaussian_clusters(n_per_class=80, d=6, classes=(2, 5, 7), spread=1.6, seed=0):
    """Overlapping Gaussian clusters (not separable, so every strength has an optimum)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=spread, size=(len(classes), d))
    x = np.concatenate([c + rng.normal(size=(n_per_class, d)) for c in centers])
    y = np.repeat(np.asarray(classes), n_per_class)
    # a scale and offset per feature, which the probe's standardisation must undo
    x = x * rng.uniform(0.5, 20, size=d) + rng.uniform(-5, 5, size=d)
    return x, y


def numpy_logistic(x, y, l2, iters=20000):
    """Reference: plain full-batch gradient descent on mean CE + l2/2 ||W||^2."""
    mean, std = x.mean(0), x.std(0)
    xs = (x - mean) / std
    classes = np.unique(y)
    onehot = (y[:, None] == classes[None]).astype(float)
    n, d = xs.shape
    w, b = np.zeros((d, len(classes))), np.zeros(len(classes))
    lip = 0.5 * (np.linalg.eigvalsh(xs.T @ xs / n).max() + 1) + l2
    for _ in range(iters):
        z = xs @ w + b
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        w -= ((xs.T @ (p - onehot)) / n + l2 * w) / lip
        b -= (p - onehot).mean(0) / lip
    return w, b, mean, std, classes


def softmax(z):
    p = np.exp(z - z.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


def test_logistic_matches_numpy_gradient_descent():
    x, y = gaussian_clusters(n_per_class=120)
    test = np.arange(len(y)) % 3 == 0
    x, y, tx, ty = x[~test], y[~test], x[test], y[test]
    l2 = 1e-2
    w, b, mean, std, classes = numpy_logistic(x, y, l2)
    res = fit_logistic(x, y, [1e-3, l2, 1e-1], val_features=tx, val_labels=ty,
                       dtype=torch.float64, tol=1e-9)
    assert all(res.converged)
    np.testing.assert_allclose(res.weight[1].numpy(), w, atol=1e-6)
    np.testing.assert_allclose(res.bias[1].numpy(), b, atol=1e-6)
    ref_p = softmax(((tx - mean) / std) @ w + b)
    got_p = torch.softmax(res.logits(tx, index=1), 1).numpy()
    np.testing.assert_allclose(got_p, ref_p, atol=1e-6)
    ref_pred = classes[ref_p.argmax(1)]
    assert res.val_acc[1] == pytest.approx((ref_pred == ty).mean())
    assert res.train_acc[1] == pytest.approx((classes[(((x - mean) / std) @ w + b).argmax(1)]
                                              == y).mean())
    assert set(res.predict(tx, index=1).tolist()) <= {2, 5, 7}  # original labels come back


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-6), (torch.float32, 2e-3)])
def test_batched_sweep_equals_each_strength_alone(dtype, atol):
    x, y = gaussian_clusters(d=8, seed=3)
    l2s = [1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    sweep = fit_logistic(x, y, l2s, dtype=dtype, tol=1e-8)
    assert sweep.weight.shape == (5, 8, 3)
    for i, l2 in enumerate(l2s):
        alone = fit_logistic(x, y, [l2], dtype=dtype, tol=1e-8)
        np.testing.assert_allclose(sweep.weight[i].numpy(), alone.weight[0].numpy(),
                                   atol=atol, rtol=atol)
        p_sweep = torch.softmax(sweep.logits(x, i), 1).numpy()
        p_alone = torch.softmax(alone.logits(x, 0), 1).numpy()
        np.testing.assert_allclose(p_sweep, p_alone, atol=atol)
    # stronger regularisation -> smaller weights
    norms = sweep.weight.flatten(1).norm(dim=1).tolist()
    assert norms == sorted(norms, reverse=True)


def test_best_strength_is_picked_on_validation():
    x, y = gaussian_clusters(seed=4, n_per_class=110)
    x, y, tx, ty = x[::2], y[::2], x[1::2], y[1::2]
    res = fit_logistic(x, y, [1e-3, 1e2], val_features=tx, val_labels=ty)
    # l2=100 squashes the weights to nearly nothing; the best is the weak one
    assert res.val_acc[0] > res.val_acc[1] or res.val_acc[0] == res.val_acc[1]
    assert res.best == int(np.argmax(res.val_acc)) and res.best_l2 == res.l2s[res.best]
    assert res.val_acc[0] > 0.8


def test_logistic_input_errors():
    x, y = gaussian_clusters()
    with pytest.raises(DataError, match="two classes"):
        fit_logistic(x, np.zeros(len(x), dtype=int), [1e-3])
    with pytest.raises(SettingError, match="^l2s must be a non-empty list"):
        fit_logistic(x, y, [])
    with pytest.raises(DataError, match=r"\(N, D\)"):
        fit_logistic(x, y[:-1], [1e-3])


def brute_knn(train_x, train_y, q, k):
    """Reference: full cosine distances, stable sort, Counter vote, tie -> earliest rank."""
    tn = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    order = np.argsort(1 - qn @ tn.T, axis=1, kind="stable")[:, :k]
    out = []
    for row in order:
        labels = [int(train_y[j]) for j in row]
        counts = Counter(labels)
        top = max(counts.values())
        out.append(next(lab for lab in labels if counts[lab] == top))
    return np.asarray(out)


@pytest.mark.parametrize("k", [1, 4, 5])
def test_knn_matches_brute_force(k):
    x, y = gaussian_clusters(spread=0.8, seed=5, n_per_class=130)
    x, y, q, qy = x[::2], y[::2], x[1::2], y[1::2]
    ref = brute_knn(x, y, q, k)
    np.testing.assert_array_equal(knn_predict(x, y, q, k), ref)
    assert knn_accuracy(x, y, q, qy, k) == pytest.approx((ref == qy).mean())


def test_knn_tie_goes_to_class_ranked_first():
    train = np.array([[1.0, 0.0], [0.9, 0.1], [0.8, 0.2], [0.7, 0.3]])
    # ranks: row0 (class 9), row1 (class 3), row2 (class 3), row3 (class 9): 2 vs 2
    assert knn_predict(train, [9, 3, 3, 9], [[1.0, 0.0]], k=4).tolist() == [9]
    assert knn_predict(train, [3, 9, 9, 3], [[1.0, 0.0]], k=4).tolist() == [3]


def test_stratified_split_is_seeded_and_per_class():
    y = np.array([0] * 50 + [1] * 20 + [2] * 1 + [3] * 2)
    tr, va = stratified_split(y, 0.2, seed=7)
    assert np.array_equal(np.sort(np.concatenate([tr, va])), np.arange(len(y)))
    assert Counter(y[va].tolist()) == {0: 10, 1: 4, 3: 1}
    tr2, va2 = stratified_split(y, 0.2, seed=7)
    assert np.array_equal(va, va2) and np.array_equal(tr, tr2)
    assert not np.array_equal(va, stratified_split(y, 0.2, seed=8)[1])
    with pytest.raises(ConfigError, match="between 0 and 1"):
        stratified_split(y, 1.0)


# ---------------------------------------------------------------------------------------
# Store level and command line
# ---------------------------------------------------------------------------------------


def test_probe_cli_prints_table(tmp_path, capsys):
    from transferlab.analysis.probe_report import run_probe
    from transferlab.commands.probe import main
    from transferlab.store.reader import FeatureStore

    x, y = gaussian_clusters(n_per_class=30, classes=(0, 1, 2))
    make_store(tmp_path / "s", x, y, class_names=["a", "b", "c"])
    assert main([str(tmp_path / "s"), "--l2", "1e-3", "1e-1", "--knn", "3",
                 "--device", "cpu", "--plot", str(tmp_path / "plots")]) == 0
    out = capsys.readouterr().out
    report = run_probe(FeatureStore.open(tmp_path / "s"), l2s=[1e-3, 1e-1], knn=3, device="cpu")
    assert "train 72 rows, test 18 rows (validation split), 3 classes" in out
    for i, l2 in enumerate([1e-3, 1e-1]):
        line = next(ln for ln in out.splitlines() if ln.split() and ln.split()[0] == f"{l2:.3g}")
        assert line.split()[1:3] == [f"{report.train_acc[i]:.4f}", f"{report.test_acc[i]:.4f}"]
        assert ("<- best" in line) == (i == report.best)
    assert f"kNN (k=3, cosine) test acc {report.knn_acc:.4f}" in out
    for name in ("pca.png", "class_columns.png", "l2_sweep.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:4] == b"\x89PNG"


def test_probe_cli_with_test_store(tmp_path, capsys):
    from transferlab.commands.probe import main

    x, y = gaussian_clusters(n_per_class=40, classes=(0, 1, 2))
    make_store(tmp_path / "train", x[::2], y[::2])
    make_store(tmp_path / "test", x[1::2], y[1::2])
    assert main([str(tmp_path / "train"), "--test", str(tmp_path / "test"), "--l2", "1e-2",
                 "--knn", "0"]) == 0
    out = capsys.readouterr().out
    assert "train 60 rows, test 60 rows" in out and "kNN" not in out


def test_probe_cli_errors_exit_2(tmp_path, capsys):
    from transferlab.commands.probe import main

    x, _ = gaussian_clusters(n_per_class=5)
    make_store(tmp_path / "unlabelled", x, np.full(len(x), -1))
    assert main([str(tmp_path / "unlabelled")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: store") and "has no labels" in err
    assert "data.source=folder" in err and len(err.strip().splitlines()) == 1
    assert main([str(tmp_path / "missing")]) == 2
    assert "no feature store" in capsys.readouterr().err
    make_store(tmp_path / "ok", x, np.repeat([0, 1, 2], 5))
    assert main([str(tmp_path / "ok"), "--val-fraction", "1.5"]) == 2
    assert "--val-fraction" in capsys.readouterr().err
    assert main([str(tmp_path / "ok"), "--l2", "1e-3", "-1"]) == 2  # run_probe's l2s is --l2
    assert capsys.readouterr().err.startswith(
        "error: --l2 must be a non-empty list of values >= 0, got [0.001, -1.0]")


def test_views_never_leak_across_the_split(tmp_path):
    from transferlab.analysis.probe_report import _labelled
    from transferlab.analysis.splits import split_by_key

    x, y = gaussian_clusters(n_per_class=10, classes=(0, 1))
    keys = [f"c{lab}/{i}.png" for i, lab in enumerate(y)]
    # every image stored twice: the plain view and one augmented view
    store = make_store(tmp_path / "v", np.concatenate([x, x + 0.01]),
                       np.concatenate([y, y]), keys=keys + keys,
                       views=[0] * len(y) + [1] * len(y))
    _, labels, k, v = _labelled(store, plain_only=False)
    tr, va = split_by_key(labels, k, v, 0.3, seed=0)
    assert set(k[tr]).isdisjoint(set(k[va]))
    assert (v[va] == 0).all() and len(va) == 6 and len(tr) == 2 * 14


def test_tensor_inputs_as_a_finetune_runner_passes_them():
    x, y = gaussian_clusters(n_per_class=40)
    a = fit_logistic(x, y, [1e-2, 1e-1])
    b = fit_logistic(torch.tensor(x), torch.tensor(y), [1e-2, 1e-1], device="cpu")
    torch.testing.assert_close(a.weight, b.weight)
    assert torch.equal(b.predict(torch.tensor(x)), a.predict(x))
    assert b.accuracy(torch.tensor(x), torch.tensor(y)) == a.train_acc
    assert knn_accuracy(torch.tensor(x), torch.tensor(y), torch.tensor(x[:10]),
                        torch.tensor(y[:10]), k=1) == 1.0


def test_probe_plot_method_tsne(tmp_path, capsys):
    pytest.importorskip("sklearn")
    from transferlab.commands.probe import main

    x, y = gaussian_clusters(n_per_class=15, classes=(0, 1))
    make_store(tmp_path / "s", x, y, class_names=["a", "b"])
    assert main([str(tmp_path / "s"), "--device", "cpu", "--plot", str(tmp_path / "p"),
                 "--plot-method", "tsne"]) == 0
    assert (tmp_path / "p" / "tsne.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "p" / "pca.png").exists()

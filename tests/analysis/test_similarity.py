"""Issue #28: linear CKA (biased and unbiased HSIC, minibatch) and RSA, on arrays and stores,
checked against straightforward references written here."""
from __future__ import annotations

import csv

import numpy as np
import pytest
from scipy.stats import spearmanr

from tests.helpers import make_store
from transferlab.analysis.similarity import (
    compare_stores,
    depth_key,
    linear_cka,
    minibatch_cka,
    open_representations,
    rdm,
    rsa,
    shared_rows,
)
from transferlab.commands import main
from transferlab.errors import DataError, SettingError, StoreError

# ---------------------------------------------------------------------------------------
# References: the formulas as printed, with explicit centering matrices and loops
# ---------------------------------------------------------------------------------------


def ref_hsic_biased(k, g):
    n = len(k)
    h = np.eye(n) - np.ones((n, n)) / n
    return np.trace(k @ h @ g @ h) / (n - 1) ** 2


def ref_hsic_unbiased(k, g):
    """Song et al. (2012), eq. 5, term by term."""
    n = len(k)
    kt, lt = k.copy(), g.copy()
    np.fill_diagonal(kt, 0)
    np.fill_diagonal(lt, 0)
    one = np.ones(n)
    return (np.trace(kt @ lt) + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
            - 2 / (n - 2) * (one @ kt @ lt @ one)) / (n * (n - 3))


def ref_cka(x, y, hsic):
    k, g = x @ x.T, y @ y.T
    return hsic(k, g) / np.sqrt(hsic(k, k) * hsic(g, g))


def ref_rdm(x):
    n = len(x)
    return np.array([[1 - np.corrcoef(x[i], x[j])[0, 1] for j in range(n)] for i in range(n)])


@pytest.fixture
def xy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 12))
    y = np.tanh(x @ rng.normal(size=(12, 7))) + 0.3 * rng.normal(size=(40, 7))
    return x, y


def random_orthogonal(d, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q


# ---------------------------------------------------------------------------------------
# CKA
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("unbiased", [False, True])
def test_cka_agrees_with_the_reference_and_is_one_on_itself(xy, unbiased):
    x, y = xy
    want = ref_cka(x, y, ref_hsic_unbiased if unbiased else ref_hsic_biased)
    assert abs(linear_cka(x, y, unbiased) - want) < 1e-6
    assert 0.05 < want < 0.95  # a comparison that says something
    assert abs(linear_cka(x, x, unbiased) - 1.0) < 1e-12


def test_biased_cka_is_the_feature_space_formula(xy):
    x, y = (a - a.mean(0) for a in xy)
    want = np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))
    assert abs(linear_cka(x, y) - want) < 1e-10


@pytest.mark.parametrize("unbiased", [False, True])
def test_cka_invariant_to_rotation_and_isotropic_scale_not_to_any_linear_map(xy, unbiased):
    x, y = xy
    base = linear_cka(x, y, unbiased)
    q = random_orthogonal(x.shape[1], 1)
    assert abs(linear_cka(3.7 * x @ q, y, unbiased) - base) < 1e-10
    assert abs(linear_cka(x, 0.01 * y @ random_orthogonal(y.shape[1], 2), unbiased) - base) < 1e-10
    stretch = np.diag(np.r_[100.0, np.ones(x.shape[1] - 1)])  # anisotropic: not invariant
    assert abs(linear_cka(x @ stretch, y, unbiased) - base) > 0.05


def test_unbiased_cka_of_independent_features_is_near_zero_at_large_n():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(2000, 256)), rng.normal(size=(2000, 256))
    assert abs(linear_cka(x, y, unbiased=True)) < 0.05
    assert linear_cka(x, y, unbiased=False) > 0.08  # the biased one is not: about D / (N + D)


@pytest.mark.parametrize("unbiased", [False, True])
def test_minibatch_with_the_whole_set_is_the_full_batch_estimate(xy, unbiased):
    x, y = xy
    assert abs(minibatch_cka(x, y, batch_size=len(x), unbiased=unbiased)
               - linear_cka(x, y, unbiased)) < 1e-12


def test_minibatch_averages_hsic_terms_over_batches(xy):
    x, y = xy
    order = np.random.default_rng(5).permutation(len(x))
    parts = np.array_split(order, 4)  # what batch_size=10 with seed=5 forms
    terms = np.array([[ref_hsic_unbiased(a @ a.T, b @ b.T) for a, b in
                       ((x[p], y[p]), (x[p], x[p]), (y[p], y[p]))] for p in map(np.sort, parts)])
    cross, kk, ll = terms.mean(axis=0)
    got = minibatch_cka(x, y, batch_size=10, seed=5)
    assert abs(got - cross / np.sqrt(kk * ll)) < 1e-9
    assert abs(got - linear_cka(x, y, True)) > 1e-6  # a different estimate than full batch


def test_bad_shapes_and_batches_are_refused(xy):
    x, y = xy
    with pytest.raises(DataError, match="same N"):
        linear_cka(x, y[:-1])
    with pytest.raises(SettingError, match="batch_size must be at least 4"):
        minibatch_cka(x, y, batch_size=3)


# ---------------------------------------------------------------------------------------
# RSA
# ---------------------------------------------------------------------------------------


def test_rdm_is_correlation_distance_and_rsa_is_scipy_spearman(xy):
    x, y = xy
    np.testing.assert_allclose(rdm(x[:15]), ref_rdm(x[:15]), atol=1e-12)
    iu = np.triu_indices(len(x), k=1)
    want = spearmanr(ref_rdm(x)[iu], ref_rdm(y)[iu]).statistic
    assert abs(rsa(x, y) - want) < 1e-10
    assert abs(rsa(x, x) - 1.0) < 1e-12


def test_rsa_handles_ties_and_constant_rows_like_scipy():
    rng = np.random.default_rng(7)
    x = rng.integers(0, 3, size=(25, 4)).astype(float)  # many tied distances
    x[0] = 2.0  # a constant row: r = 0 with every other, distance 1
    y = rng.normal(size=(25, 5))
    d = rdm(x)
    assert np.all(d[0, 1:] == 1.0)
    iu = np.triu_indices(25, k=1)
    assert abs(rsa(x, y) - spearmanr(d[iu], rdm(y)[iu]).statistic) < 1e-10


# ---------------------------------------------------------------------------------------
# Stores
# ---------------------------------------------------------------------------------------


def stores_of(tmp_path, n=60, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 10)).astype(np.float32)
    y = np.tanh(x @ rng.normal(size=(10, 6))).astype(np.float32)
    labels = np.arange(n) % 3
    keys = [f"img{i:03d}.png" for i in range(n)]
    a = make_store(tmp_path / "a", x, labels, keys)
    # b holds the keys in another order, plus views and keys a lacks
    perm = rng.permutation(n)
    extra = rng.normal(size=(5, 6)).astype(np.float32)
    rows = np.concatenate([y[perm], y[perm] + 1, extra])
    bkeys = [keys[i] for i in perm] * 2 + [f"other{i}.png" for i in range(5)]
    views = np.r_[np.zeros(n), np.ones(n), np.zeros(5)].astype(np.int64)
    b = make_store(tmp_path / "b", rows, np.r_[labels[perm], labels[perm], np.zeros(5, int)],
                   bkeys, views)
    return a, b, x, y


def test_stores_are_compared_on_their_shared_plain_keys(tmp_path):
    a, b, x, y = stores_of(tmp_path)
    xa = np.asarray(a.features, np.float64)  # what the float16 store holds
    # b's plain rows back in a's order (a's keys are sorted)
    yb = np.asarray(b.features, np.float64)[:60][np.argsort(b.keys[:60])]
    res = compare_stores({"a": a}, {"a": a, "b": b}, batch_size=1000, rsa_sample_size=1000)
    assert res.n_keys == 60 and res.rsa_n == 60
    assert abs(res.cka[0, 0] - 1.0) < 1e-12
    assert abs(res.cka[0, 1] - linear_cka(xa, yb, unbiased=True)) < 1e-9
    assert abs(res.rsa[0, 1] - rsa(xa, yb)) < 1e-9
    assert abs(res.cka[0, 1] - linear_cka(x, y, unbiased=True)) < 1e-2  # float16 rounding


def test_minibatches_stream_from_the_memory_maps(tmp_path):
    a, b, _, _ = stores_of(tmp_path, n=80)
    whole = compare_stores({"a": a}, {"b": b}, batch_size=80, rsa_sample_size=0)
    small = compare_stores({"a": a}, {"b": b}, batch_size=20, rsa_sample_size=0)
    assert whole.rsa is None
    assert abs(whole.cka[0, 0] - small.cka[0, 0]) < 0.1 and whole.cka[0, 0] != small.cka[0, 0]


def test_stores_sharing_too_few_keys_are_refused_in_one_line(tmp_path):
    rng = np.random.default_rng(0)
    a = make_store(tmp_path / "a", rng.normal(size=(30, 4)), np.zeros(30, int),
                   [f"a{i}" for i in range(30)])
    b = make_store(tmp_path / "b", rng.normal(size=(30, 4)), np.zeros(30, int),
                   [f"a{i}" for i in range(12)] + [f"b{i}" for i in range(18)])
    with pytest.raises(StoreError, match="share 12 keys, fewer than the 20") as err:
        shared_rows([a, b], ["a", "b"])
    assert "\n" not in str(err.value)
    keys, rows = shared_rows([a, b], ["a", "b"], minimum=12)
    assert len(keys) == 12 and rows[1].tolist() == list(range(12))


def test_a_multi_cut_directory_opens_in_depth_order(tmp_path):
    x = np.random.default_rng(0).normal(size=(25, 3))
    for name in ["head", "stage-10", "stage-2", "stage-0"]:
        make_store(tmp_path / "run" / name, x, np.zeros(25, int), [f"k{i}" for i in range(25)])
    assert list(open_representations(tmp_path / "run")) == ["stage-0", "stage-2", "stage-10",
                                                            "head"]
    assert sorted(["b-1", "a", "head", "a-10", "a-9"], key=depth_key) == [
        "a", "a-9", "a-10", "b-1", "head"]
    with pytest.raises(StoreError, match="neither a feature store"):
        open_representations(tmp_path)


# ---------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------


def test_compare_command_prints_pairs_writes_csv_and_heatmap(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 8))
    keys = [f"k{i}" for i in range(40)]
    for i, name in enumerate(["stage-0", "stage-1", "head"]):
        make_store(tmp_path / "run" / name, np.tanh(x * (i + 1)), np.zeros(40, int), keys)
    make_store(tmp_path / "other", rng.normal(size=(40, 5)), np.zeros(40, int), keys)
    out_csv, png = tmp_path / "m.csv", tmp_path / "m.png"
    code = main(["compare", str(tmp_path / "run"), str(tmp_path / "other"), "--csv",
                 str(out_csv), "--plot", str(png), "--batch-size", "20"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "unbiased HSIC, 40 images" in out and "RSA on 40" in out
    rows = list(csv.DictReader(out_csv.open()))
    assert [(r["a"], r["b"]) for r in rows] == [("stage-0", "other"), ("stage-1", "other"),
                                               ("head", "other")]
    assert png.read_bytes()[:4] == b"\x89PNG"
    # one multi-cut directory: its layers against each other, each pair once
    assert main(["compare", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 2 + 3 and "stage-0  stage-1" in out
    # an existing output is refused before any work, in one line
    code = main(["compare", str(tmp_path / "run"), str(tmp_path / "other"), "--csv",
                 str(out_csv)])
    err = capsys.readouterr().err
    assert code == 2 and "--overwrite" in err and err.count("\n") == 1


def test_compare_command_refuses_bad_settings_in_one_line(tmp_path, capsys):
    a, b, _, _ = stores_of(tmp_path)
    for argv, text in [(["--batch-size", "2"], "--batch-size must be at least 4"),
                       (["--rsa-sample", "2"], "--rsa-sample must be 0"),
                       (["--min-keys", "100"], "share 60 keys, fewer than the 100")]:
        code = main(["compare", str(a.dir), str(b.dir), *argv])
        err = capsys.readouterr().err
        assert code == 2 and text in err and err.count("\n") == 1, err
    assert main(["compare", str(a.dir)]) == 2  # one store: nothing to compare it with
    assert "compare needs two stores" in capsys.readouterr().err
    with pytest.raises(SettingError, match="rsa_sample_size must be 0"):
        compare_stores({"a": a}, {"b": b}, rsa_sample_size=2)


def test_two_runs_of_the_same_cuts_give_the_full_matrix_named_by_run(tmp_path, capsys):
    rng = np.random.default_rng(1)
    keys = [f"k{i}" for i in range(30)]
    x = rng.normal(size=(30, 6))
    for run, scale in (("r1", 1.0), ("r2", -2.0)):
        for name in ("first-1", "first-2"):
            make_store(tmp_path / run / name, np.tanh(scale * x * (1 + (name == "first-2"))),
                       np.zeros(30, int), keys)
    a, b = str(tmp_path / "r1"), str(tmp_path / "r2")
    assert main(["compare", a, b, "--rsa-sample", "0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 + 4  # every (r1 cut, r2 cut) pair, r1/first-1 vs r2/first-1 too
    assert lines[2].split()[:2] == [f"{a}/first-1", f"{b}/first-1"]
    assert main(["compare", a, a]) == 2
    assert "named twice" in capsys.readouterr().err


def test_one_run_against_itself_is_symmetric_with_ones_on_the_diagonal(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(50, 5))
    reps = {name: make_store(tmp_path / name, np.tanh(x * s), np.zeros(50, int),
                             [f"k{i}" for i in range(50)])
            for name, s in (("first-1", 0.5), ("first-2", 2.0), ("first-3", 4.0))}
    res = compare_stores(reps, reps, batch_size=25)
    assert res.symmetric
    np.testing.assert_allclose(np.diag(res.cka), 1.0, atol=1e-12)
    np.testing.assert_allclose(res.cka, res.cka.T, atol=1e-12)
    np.testing.assert_allclose(res.rsa, res.rsa.T, atol=1e-12)
    other = compare_stores(reps, dict(reps), batch_size=25)  # the same, computed both sides
    np.testing.assert_allclose(other.cka, res.cka, atol=1e-12)
    np.testing.assert_allclose(other.rsa, res.rsa, atol=1e-12)
    assert not other.symmetric

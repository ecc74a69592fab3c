"""Curation: planted near-duplicates, outliers, flipped labels and leaked images are found,
and clean items are not flagged."""
from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from tests.helpers import make_store
from transferlab.analysis import curation
from transferlab.analysis.curation import confident_issues, curate, write_report
from transferlab.commands import main as cli_main
from transferlab.commands.curate import main as curate_main
from transferlab.errors import SettingError


def planted(seed=0, n_clusters=5, per=40, d=32):
    """Clusters (within-cluster cosine ~0.8), 4 planted near-duplicate groups (cosine
    ~0.999), 5 planted outliers (random directions). Returns x, labels, dup groups, outliers."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_clusters, d))
    x = np.concatenate([c + 0.5 * rng.normal(size=(per, d)) for c in centers])
    y = np.repeat(np.arange(n_clusters), per)
    groups = []
    extra, extra_y = [], []
    n = len(x)
    for g, size in enumerate((2, 2, 3, 4)):
        base = 7 + 31 * g  # an existing clean row
        members = [base]
        for _ in range(size - 1):
            extra.append(x[base] + 0.02 * rng.normal(size=d))
            extra_y.append(y[base])
            members.append(n + len(extra) - 1)
        groups.append(sorted(members))
    outliers = list(range(n + len(extra), n + len(extra) + 5))
    extra += list(3.0 * rng.normal(size=(5, d)))
    extra_y += [0] * 5
    return (np.concatenate([x, np.array(extra)]).astype(np.float32),
            np.concatenate([y, extra_y]), groups, outliers)


def found_groups(report):
    return sorted(sorted([g.keep, *g.others]) for g in report.duplicates)


def test_planted_duplicates_and_outliers_found_clean_items_not(tmp_path):
    x, y, groups, outliers = planted()
    store = make_store(tmp_path / "s", x, y)
    rep = curate(store, k=5, top=5, labels=False, center=False)
    assert found_groups(rep) == sorted(groups)
    for g in rep.duplicates:  # no files: the first key is kept, nothing marked exact
        assert g.keep == min([g.keep, *g.others]) and not any(g.exact)
        assert min(g.similarity) > 0.99
    assert sorted(rep.outliers) == outliers
    # the scores are the mean cosine distance to the 5 nearest others (a direct check)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    xn = xn.astype(np.float16).astype(np.float32)  # the store keeps float16
    xn /= np.linalg.norm(xn, axis=1, keepdims=True)
    dist = 1 - xn @ xn.T
    np.fill_diagonal(dist, np.inf)
    want = np.sort(dist, 1)[:, :5].mean(1)
    np.testing.assert_allclose(rep.outlier_scores, want, atol=2e-3)
    # centred: the same planted findings, distances of x - mean
    rep = curate(store, k=5, top=5, labels=False, center=True)
    assert found_groups(rep) == sorted(groups) and sorted(rep.outliers) == outliers
    xc = store.features[:].astype(np.float32)
    xc -= xc.astype(np.float64).mean(0).astype(np.float32)
    xc /= np.linalg.norm(xc, axis=1, keepdims=True)
    dist = 1 - xc @ xc.T
    np.fill_diagonal(dist, np.inf)
    np.testing.assert_allclose(rep.outlier_scores, np.sort(dist, 1)[:, :5].mean(1), atol=1e-4)


def test_faiss_index_gives_the_same_findings(tmp_path):
    pytest.importorskip("faiss")
    from transferlab.store.faiss_index import build_index

    x, y, groups, outliers = planted(seed=1)
    store = make_store(tmp_path / "s", x, y)
    build_index(store, "flat", "cosine")
    rep = curate(store, k=5, top=5, labels=False, center=False)
    assert "FAISS" in rep.neighbours_from
    assert found_groups(rep) == sorted(groups) and sorted(rep.outliers) == outliers


def test_chunked_search_matches_one_block(tmp_path, monkeypatch):
    x, y, groups, _ = planted(seed=2)
    store = make_store(tmp_path / "s", x, y)
    whole = curate(store, k=4, labels=False)
    monkeypatch.setattr(curation, "QUERY_BLOCK", 7)
    chunked = curate(store, k=4, labels=False)
    np.testing.assert_allclose(whole.outlier_scores, chunked.outlier_scores, rtol=1e-5)
    assert found_groups(chunked) == found_groups(whole) == sorted(groups)


def flipped_store(tmp_path, seed=0):
    rng = np.random.default_rng(seed)
    x, y, _, _ = planted(seed=seed, n_clusters=6, per=100)
    x, y = x[:600], y[:600].copy()
    flip = rng.choice(len(y), 30, replace=False)  # 5%
    y[flip] = (y[flip] + rng.integers(1, 6, size=30)) % 6
    return make_store(tmp_path / "lab", x, y), set(flip.tolist())


@pytest.mark.parametrize("with_cleanlab", [True, False])
def test_flipped_labels_found(tmp_path, monkeypatch, with_cleanlab):
    if with_cleanlab:
        pytest.importorskip("cleanlab")
    else:
        import builtins
        real = builtins.__import__

        def no_cleanlab(name, *a, **kw):
            if name.startswith("cleanlab"):
                raise ImportError(name)
            return real(name, *a, **kw)
        monkeypatch.setattr(builtins, "__import__", no_cleanlab)
    store, flipped = flipped_store(tmp_path)
    rep = curate(store, k=5)
    found = {i.row for i in rep.label_issues}
    tp = len(found & flipped)
    assert tp / len(found) >= 0.8 and tp / len(flipped) >= 0.8, (tp, len(found))
    assert ("cleanlab" in rep.label_method) == with_cleanlab
    assert any("cleanlab is not installed" in n for n in rep.notes) != with_cleanlab
    # ranked by the given label's probability, suggestions mostly the true cluster
    conf = [i.self_confidence for i in rep.label_issues]
    assert conf == sorted(conf)
    truth = np.repeat(np.arange(6), 100)
    right = sum(i.suggested == truth[i.row] for i in rep.label_issues if i.row in flipped)
    assert right >= 0.9 * tp


def test_probe_on_a_sample_still_predicts_every_row_out_of_fold(tmp_path, monkeypatch):
    """PROBE_ROWS bounds each fold's training rows (1M-row stores); every row is still
    predicted by a probe that did not see it, PREDICT_BLOCK rows at a time."""
    store, flipped = flipped_store(tmp_path)
    rows = np.arange(len(store.keys))
    full = curation.out_of_fold_probabilities(np.asarray(store.features, np.float32),
                                              np.asarray(store.labels), folds=3)
    monkeypatch.setattr(curation, "PREDICT_BLOCK", 7)  # many blocks per fold
    seen = []
    real_fit = curation.fit_logistic

    def fit(x, y, *a, **kw):
        seen.append(len(x))
        return real_fit(x, y, *a, **kw)

    monkeypatch.setattr(curation, "fit_logistic", fit)
    same = curation.out_of_fold_probabilities(curation._Rows(store, rows),
                                              np.asarray(store.labels), folds=3)
    np.testing.assert_allclose(same, full, atol=1e-5)  # all rows fit: the same probes
    seen.clear()
    notes: list[str] = []
    issues, _ = curation.label_issues(store, rows, folds=3, probe_rows=150, notes=notes)
    assert seen == [150, 150, 150] and any("sample of 150" in n for n in notes)
    found = {i.row for i in issues}
    assert len(found & flipped) >= 0.8 * len(flipped) and len(found & flipped) >= 0.8 * len(
        found)


def test_confident_rule_by_hand():
    y = np.array([0, 0, 1, 1, 1])
    p = np.array([[0.9, 0.1], [0.2, 0.8], [0.1, 0.9], [0.3, 0.7], [0.6, 0.4]])
    # t0 = mean(0.9, 0.2) = 0.55, t1 = mean(0.9, 0.7, 0.4) = 0.667
    # row 1: above = {1} -> 1 != 0: issue; row 4: above = {0} -> issue; row 3: {1}: fine
    assert confident_issues(y, p).tolist() == [1, 4]


def test_against_finds_leaked_pairs(tmp_path):
    x, y, _, _ = planted(seed=3)
    train = make_store(tmp_path / "train", x, y)
    rng = np.random.default_rng(9)
    leaked = [3, 50, 120]
    other = np.concatenate([x[leaked] + 0.01 * rng.normal(size=(3, x.shape[1])),
                            5 * rng.normal(size=(10, x.shape[1]))]).astype(np.float32)
    test = make_store(tmp_path / "test", other, np.zeros(13, int),
                      keys=[f"t{i}.png" for i in range(13)])
    rep = curate(train, k=3, labels=False, against=test)
    assert sorted((r, key) for r, key, _, _ in rep.leakage) == [
        (3, "t0.png"), (50, "t1.png"), (120, "t2.png")]


def image_store(tmp_path):
    """Images on disk: a byte-identical copy, a larger near-copy, one clean image."""
    root = tmp_path / "data"
    root.mkdir()
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(img).save(root / "a.png")
    (root / "b.png").write_bytes((root / "a.png").read_bytes())
    Image.fromarray(img).resize((64, 64)).save(root / "c.png")
    x = rng.normal(size=(8, 16)).astype(np.float32)
    x[1] = x[0]
    x[2] = x[0] + 0.01
    keys = ["a.png", "b.png", "c.png"] + [f"z{i}.png" for i in range(5)]
    writer_meta = {"data_root": str(root), "class_names": ["x"]}
    from transferlab.store.writer import StoreWriter
    w = StoreWriter(tmp_path / "s", fingerprint={"t": 1}, dtype="float32")
    w.add(keys, [0] * 8, x)
    return w.close(writer_meta), root


def test_exact_copies_marked_and_largest_file_kept(tmp_path):
    store, root = image_store(tmp_path)
    rep = curate(store, k=2, labels=False)
    (g,) = rep.duplicates
    assert store.keys[g.keep] == "c.png"  # the largest file
    marks = {store.keys[r]: e for r, e in zip(g.others, g.exact)}
    assert marks == {"a.png": True, "b.png": True}  # the same bytes; c.png differs
    # images gone: the lists still work, first key kept
    for p in root.iterdir():
        p.unlink()
    rep = curate(store, k=2, labels=False)
    assert store.keys[rep.duplicates[0].keep] == "a.png" and not any(rep.duplicates[0].exact)


def test_byte_identical_pair_marked(tmp_path):
    store, root = image_store(tmp_path)
    (root / "c.png").unlink()  # now a.png and b.png (same bytes) tie on size: first key kept
    rep = curate(store, k=2, labels=False)
    (g,) = rep.duplicates
    assert store.keys[g.keep] == "a.png"
    assert dict(zip((store.keys[r] for r in g.others), g.exact)) == {"b.png": True,
                                                                      "c.png": False}


def test_command_writes_csvs_and_summary(tmp_path, capsys):
    x, y, groups, outliers = planted()
    store = make_store(tmp_path / "s", x, y, keys=[f"k{i}" for i in range(len(y))])
    assert curate_main([str(store.dir), "-k", "5", "--top", "5", "--folds", "3"]) == 0
    out = capsys.readouterr().out
    assert "near-duplicate groups  4" in out and "label issues" in out
    folder = store.dir / "curation"
    with open(folder / "duplicates.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == sum(len(g) for g in groups)
    assert {r["key"] for r in rows if r["role"] == "keep"} == {f"k{g[0]}" for g in groups}
    with open(folder / "outliers.csv", newline="", encoding="utf-8") as f:
        assert {r["key"] for r in csv.DictReader(f)} == {f"k{i}" for i in outliers}
    for name in ("label_issues.csv", "leakage.csv", "summary.json"):
        assert (folder / name).is_file()
    # a rerun replaces curate's own folder; a user's folder with a file is refused
    assert curate_main([str(store.dir), "-k", "5", "--no-labels"]) == 0
    user = tmp_path / "mine"
    user.mkdir()
    (user / "outliers.csv").write_text("mine")
    assert curate_main([str(store.dir), "--out", str(user), "--no-labels"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (user / "outliers.csv").read_text() == "mine"


def test_bad_inputs_one_line(tmp_path, capsys):
    x, _, _, _ = planted()
    unlabelled = make_store(tmp_path / "u", x, -np.ones(len(x), int), class_names=[])
    rep = curate(unlabelled, k=3)
    assert rep.label_issues is None and rep.duplicates  # the rest still computed
    assert any("no labels" in n for n in rep.notes)
    small = make_store(tmp_path / "small", x[:4], np.zeros(4, int))
    with pytest.raises(SettingError, match="k\\+1"):
        curate(small, k=5)
    capsys.readouterr()
    assert cli_main(["curate", str(small.dir), "-k", "5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --k needs"), err
    assert cli_main(["curate", str(small.dir), "--threshold", "1.5"]) == 2
    assert "--threshold must be" in capsys.readouterr().err


def test_write_report_to_new_folder(tmp_path):
    x, y, _, _ = planted()
    rep = curate(make_store(tmp_path / "s", x, y), k=3, labels=False)
    paths = write_report(rep, tmp_path / "new" / "dir", parquet=False)
    assert sorted(p.name for p in paths) == sorted(curation.OUTPUT_FILES)


def test_parquet_tables_equal_the_csvs(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    x, y, _, _ = planted()
    y[[3, 50, 90, 130]] = (y[[3, 50, 90, 130]] + 1) % 5  # a few wrong labels
    store = make_store(tmp_path / "s", x, y, keys=[f"k{i}" for i in range(len(y))])
    rep = curate(store, k=5, top=5, folds=3, against=store)
    assert rep.duplicates and rep.outliers and rep.label_issues and rep.leakage
    rep.duplicates[0].sizes = {rep.duplicates[0].keep: 123}  # one known size, others null
    paths = write_report(rep, tmp_path / "out")
    assert sorted(p.name for p in paths) == sorted(curation.OUTPUT_FILES
                                                   + curation.PARQUET_FILES)
    for name in curation.TABLES:
        with open(tmp_path / "out" / f"{name}.csv", newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
        table = pq.read_table(tmp_path / "out" / f"{name}.parquet")
        assert table.column_names == rows[0] and table.num_rows == len(rows) - 1 > 0
        for col, (cname, kind) in zip(table.columns, curation.report_tables(rep)[name][0]):
            values = col.to_pylist()
            cells = [r[rows[0].index(cname)] for r in rows[1:]]
            if kind == "float":
                assert np.allclose(values, [float(c) for c in cells], atol=5e-7), cname
            elif kind == "bool":
                assert [{None: "", True: "yes", False: "no"}[v] for v in values] == cells
            else:
                assert ["" if v is None else str(v) for v in values] == cells, cname
    dup = pq.read_table(tmp_path / "out" / "duplicates.parquet").to_pydict()
    assert dup["bytes"][0] == 123 and dup["bytes"][1] is None
    assert str(pq.read_table(tmp_path / "out" / "outliers.parquet").schema.field(
        "score").type) == "double"


def test_without_pyarrow_csvs_and_one_note(tmp_path, monkeypatch, capsys):
    import builtins

    real = builtins.__import__

    def no_pyarrow(name, *a, **kw):
        if name.startswith("pyarrow"):
            raise ImportError(name)
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    x, y, _, _ = planted()
    store = make_store(tmp_path / "s", x, y)
    assert curate_main([str(store.dir), "-k", "3", "--no-labels"]) == 0
    out = capsys.readouterr().out
    assert out.count("transferlab[parquet]") == 1
    names = {p.name for p in (store.dir / "curation").iterdir()}
    assert set(curation.OUTPUT_FILES) <= names and not names & set(curation.PARQUET_FILES)


def test_plot_galleries_with_missing_images(tmp_path):
    pytest.importorskip("matplotlib")
    store, root = image_store(tmp_path)
    (root / "b.png").unlink()  # drawn as a placeholder
    assert curate_main([str(store.dir), "-k", "2", "--plot"]) == 0
    folder = store.dir / "curation"
    for name in ("duplicates.png", "outliers.png"):
        with Image.open(folder / name) as im:
            assert im.size[0] > 100 and im.size[1] > 100
    assert not (folder / "label_issues.png").exists()  # one class: no label issues


def test_stale_index_noted_and_exact_search_used(tmp_path):
    pytest.importorskip("faiss")
    from transferlab.store.faiss_index import build_index

    x, y, groups, _ = planted(seed=4)
    store = make_store(tmp_path / "s", x, y)
    build_index(store, "flat", "cosine")
    meta = store.dir / "meta.json"
    meta.write_text(meta.read_text())  # rewritten since the build (new mtime): stale
    rep = curate(store, k=4, labels=False, center=False)
    assert rep.neighbours_from == "exact search"
    assert any("stale" in n for n in rep.notes) and found_groups(rep) == sorted(groups)


def test_memory_index_above_the_row_limit(tmp_path, monkeypatch):
    pytest.importorskip("faiss")
    x, y, groups, outliers = planted(seed=5)
    store = make_store(tmp_path / "s", x, y)
    monkeypatch.setattr(curation, "AUTO_INDEX_ROWS", 10)
    rep = curate(store, k=4, top=5, labels=False, center=True)
    assert "in-memory ivf" in rep.neighbours_from and any("IVF" in n for n in rep.notes)
    assert not (store.dir / "index").exists()  # nothing written into the store
    assert found_groups(rep) == sorted(groups)


def test_only_plain_views_are_curated(tmp_path):
    """Augmented views (view 1) of a key are near-copies of it, not duplicates."""
    x, y, groups, outliers = planted(seed=6)
    keys = [f"k{i}" for i in range(len(y))]
    rng = np.random.default_rng(0)
    aug = x[:30] + 0.01 * rng.normal(size=(30, x.shape[1]))
    store = make_store(tmp_path / "s", np.concatenate([x, aug]).astype(np.float32),
                       np.concatenate([y, y[:30]]), keys=keys + keys[:30],
                       views=[0] * len(y) + [1] * 30)
    rep = curate(store, k=4, top=5, labels=False, center=True)
    assert found_groups(rep) == sorted(groups) and sorted(rep.outliers) == outliers
    assert np.isnan(rep.outlier_scores[len(y):]).all()


def test_leaked_byte_copy_marked_exact(tmp_path):
    store, root = image_store(tmp_path)
    other_root = tmp_path / "test_data"
    other_root.mkdir()
    (other_root / "same.png").write_bytes((root / "a.png").read_bytes())
    Image.new("RGB", (8, 8)).save(other_root / "other.png")
    from transferlab.store.writer import StoreWriter
    w = StoreWriter(tmp_path / "t", fingerprint={"t": 2}, dtype="float32")
    x = np.asarray(store.features[:], dtype=np.float32)
    w.add(["same.png", "other.png"], [0, 0], np.stack([x[0], x[2]]))
    test = w.close({"data_root": str(other_root)})
    rep = curate(store, k=2, labels=False, against=test)
    got = {(store.keys[r], key): e for r, key, _, e in rep.leakage}
    assert got == {("a.png", "same.png"): True, ("c.png", "other.png"): False}

"""output.reduce (#13 item 3): seeded sparse random projection and a stored PCA."""
from __future__ import annotations

import math
import time
import tracemalloc

import numpy as np
import pytest
import torch

from transferlab.errors import ConfigError, DataError, StoreError
from transferlab.extract.reduce import (
    PCA_FILE,
    PCAProjection,
    ReduceSpec,
    SparseProjection,
    check_reduce_dims,
    collect_rows,
    fit_pca,
    open_pca,
    parse_reduce,
    pca_sample_rows,
    reduce_fingerprint,
    reduction_from_record,
)
from transferlab.store.reader import FeatureStore
from transferlab.store.writer import StoreWriter


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def low_rank(k: int, d: int, rank: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """k rows of rank ``rank`` (plus an offset) in d dims, and an orthonormal basis of their
    span (rank, d)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d, rank, generator=g, dtype=torch.float64))[0].t()
    coords = torch.randn(k, rank, generator=g, dtype=torch.float64) * torch.arange(
        rank, 0, -1, dtype=torch.float64)  # distinct variances: a unique top-r subspace
    return (coords @ basis + 3.0).float(), basis


# ---- parse_reduce ---------------------------------------------------------------------


def test_parse_reduce_reads_srp_pca_and_null() -> None:
    assert parse_reduce("srp:256") == ReduceSpec("srp", 256)
    assert parse_reduce(" PCA:8 ") == ReduceSpec("pca", 8)
    assert str(parse_reduce("pca:8")) == "pca:8"
    assert parse_reduce(None) is None
    assert parse_reduce("none") is None


@pytest.mark.parametrize("bad", ["srp", "srp:", "srp:0", "srp:-3", "lda:4", "srp:4.5",
                                 "pca:x", "srp:4:5", 256])
def test_bad_reduce_specs_are_one_line_config_errors(bad: object) -> None:
    with pytest.raises(ConfigError) as err:
        parse_reduce(bad)
    text = one_line(err)
    assert "output.reduce" in text and "srp:D or pca:D" in text


def test_more_dims_than_the_cut_gives_is_refused() -> None:
    check_reduce_dims(ReduceSpec("srp", 10), 10)
    with pytest.raises(ConfigError) as err:
        check_reduce_dims(ReduceSpec("srp", 11), 10)
    assert "srp:10 or fewer" in one_line(err)


# ---- sparse random projection ---------------------------------------------------------


def test_srp_gives_the_dims_asked_and_equals_its_dense_matrix() -> None:
    proj = SparseProjection(300, 17, seed=3)
    x = torch.randn(5, 300)
    y = proj(x)
    assert y.shape == (5, 17) and y.dtype == torch.float32
    dense = torch.zeros(300, 17, dtype=torch.float64)
    dense[proj.indices[0], proj.indices[1]] = proj.values.double()
    torch.testing.assert_close(y.double(), x.double() @ dense, rtol=1e-5, atol=1e-5)
    s = math.sqrt(300)  # Li et al.: entries +-sqrt(s / D) only
    assert proj.values.abs().unique().tolist() == [pytest.approx(math.sqrt(s / 17))]
    assert 0.3 < (proj.values > 0).float().mean() < 0.7  # fair signs
    assert proj(torch.randn(0, 300)).shape == (0, 17)
    assert proj(torch.randn(2, 3, 10, 10)).shape == (2, 17)  # maps are flattened


def test_srp_is_identical_across_constructions_as_on_a_resume() -> None:
    x = torch.randn(4, 5000)
    a, b = SparseProjection(5000, 64, seed=7), SparseProjection(5000, 64, seed=7)
    assert a.record() == b.record()
    assert torch.equal(a(x), b(x))  # bit-identical rows
    other = SparseProjection(5000, 64, seed=8)
    assert other.record()["sha256"] != a.record()["sha256"]
    assert not torch.equal(other(x), a(x))


def test_srp_of_a_huge_layer_is_fast_small_and_as_sparse_as_asked() -> None:
    d_in, dim = 64 * 112 * 112, 256  # 802,816 features: a dense matrix would be 822 MB
    tracemalloc.start()
    started = time.perf_counter()
    proj = SparseProjection(d_in, dim, seed=0)
    seconds = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert seconds < 1.0
    assert peak < 64 << 20  # numpy's working memory: nonzeros only
    expected = d_in * dim / math.sqrt(d_in)  # density 1/sqrt(d_in)
    assert abs(proj.nnz - expected) < 6 * math.sqrt(expected)
    assert proj(torch.randn(2, d_in)).shape == (2, dim)


def test_srp_preserves_pairwise_distances_roughly() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 10000, generator=g) * torch.rand(1, 10000, generator=g)
    y = SparseProjection(10000, 1024, seed=1)(x)
    i, j = torch.triu_indices(20, 20, 1)
    before = (x[i] - x[j]).norm(dim=1)
    after = (y[i] - y[j]).norm(dim=1)
    error = (after / before - 1).abs()
    assert error.mean() < 0.05 and error.max() < 0.2


def test_srp_ignores_autocast() -> None:
    proj, x = SparseProjection(1000, 32, seed=0), torch.randn(3, 1000)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = proj(x)
    assert y.dtype == torch.float32 and torch.equal(y, proj(x))


@pytest.mark.gpu
def test_srp_runs_on_the_features_device(cuda) -> None:
    proj, x = SparseProjection(20000, 128, seed=0), torch.randn(8, 20000)
    on_gpu = proj.to("cuda")
    y = on_gpu(x.cuda())
    assert y.is_cuda and torch.equal(y, on_gpu(x.cuda()))
    torch.testing.assert_close(y.cpu(), SparseProjection(20000, 128, seed=0)(x),
                               rtol=1e-4, atol=1e-3)


# ---- PCA ------------------------------------------------------------------------------


@pytest.mark.parametrize("k, d", [(60, 400), (300, 40)])  # wide (Gram) and narrow routes
def test_pca_recovers_the_subspace_of_low_rank_data(k: int, d: int) -> None:
    x, basis = low_rank(k, d, rank=4)
    pca = fit_pca(x, 4)
    assert pca(x).shape == (k, 4)
    c = pca.components.double()
    torch.testing.assert_close(c @ c.t(), torch.eye(4, dtype=torch.float64), atol=1e-5,
                               rtol=0)
    torch.testing.assert_close(c.t() @ c, basis.t() @ basis, atol=1e-5, rtol=0)
    torch.testing.assert_close(pca.mean, x.mean(0), atol=1e-5, rtol=0)
    assert pca.record()["explained_variance"] == pytest.approx(1.0)
    back = pca(x) @ pca.components + pca.mean  # rank-4 data is rebuilt from 4 dims
    torch.testing.assert_close(back, x, atol=1e-4, rtol=0)


@pytest.mark.parametrize("k, d", [(60, 400), (300, 40)])
def test_pca_axes_match_svd_and_are_signed_so_refits_agree(k: int, d: int) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(k, d, generator=g) * torch.linspace(3, 0.1, d)
    pca = fit_pca(x, 5)
    assert torch.equal(fit_pca(x.clone(), 5).components, pca.components)
    c = pca.components
    assert (c.gather(1, c.abs().argmax(1, keepdim=True)) > 0).all()
    ref = torch.linalg.svd(x.double() - x.double().mean(0), full_matrices=False)[2][:5]
    ref = ref * torch.sign(ref.gather(1, ref.abs().argmax(1, keepdim=True)))
    torch.testing.assert_close(c.double(), ref, atol=1e-4, rtol=0)


def test_pca_save_load_round_trip_is_exact(tmp_path) -> None:
    x, _ = low_rank(50, 120, rank=6)
    pca = fit_pca(x, 6)
    path = tmp_path / PCA_FILE
    pca.save(path)
    back = PCAProjection.load(path)
    assert torch.equal(back.mean, pca.mean) and torch.equal(back.components, pca.components)
    assert back.record() == pca.record()
    assert torch.equal(back(x), pca(x))
    assert [p.name for p in tmp_path.iterdir()] == [PCA_FILE]  # no temporary file left


def test_a_damaged_or_foreign_pca_file_is_one_store_error(tmp_path) -> None:
    pca = fit_pca(low_rank(30, 50, rank=3)[0], 3)
    path = tmp_path / PCA_FILE
    pca.save(path)
    with np.load(path) as z:
        fields = dict(z)
    fields["components"] = fields["components"] + 1
    np.savez(path, **fields)
    with pytest.raises(StoreError) as err:
        PCAProjection.load(path)
    assert "damaged" in one_line(err) and "output.overwrite=true" in str(err.value)
    path.write_bytes(b"not a zip")
    with pytest.raises(StoreError) as err:
        PCAProjection.load(path)
    assert "output.overwrite=true" in one_line(err)
    np.savez(path, other=np.zeros(3))
    with pytest.raises(StoreError) as err:
        PCAProjection.load(path)
    assert "not a transferlab PCA file" in one_line(err)


def test_pca_sample_rule_and_its_refusals() -> None:
    assert pca_sample_rows(100_000, 64, 5000) == 1024
    assert pca_sample_rows(100_000, 512, 5000) == 2048
    assert pca_sample_rows(300, 8, 5000) == 300
    assert pca_sample_rows(100_000, 64, 802_816) == 1024  # 3.1 GiB: allowed
    with pytest.raises(ConfigError) as err:
        pca_sample_rows(100_000, 256, 2 * 802_816)
    assert "srp:256" in one_line(err) and "4 GiB" in str(err.value)
    with pytest.raises(ConfigError) as err:
        pca_sample_rows(100, 200, 5000)
    assert "pca:100 or fewer" in one_line(err)
    with pytest.raises(ConfigError) as err:
        fit_pca(torch.randn(10, 6), 7)
    assert "pca:6 or fewer" in one_line(err)


def test_a_sample_spanning_too_few_directions_is_a_data_error() -> None:
    with pytest.raises(DataError) as err:
        fit_pca(low_rank(40, 100, rank=3)[0], 4)
    assert "only 3 directions" in one_line(err) and "pca:3" in str(err.value)
    with pytest.raises(DataError):
        fit_pca(torch.ones(40, 100), 1)


# ---- what the runner calls ------------------------------------------------------------


def test_open_pca_fits_once_then_a_resume_loads_the_same(tmp_path) -> None:
    x, _ = low_rank(200, 80, rank=8)
    asked: list[int] = []

    def sample(k: int) -> torch.Tensor:
        asked.append(k)
        return collect_rows(iter(x.split(32)), k)

    spec, path = ReduceSpec("pca", 8), tmp_path / PCA_FILE
    first = open_pca(path, spec, 80, available=200, sample=sample, resuming=False)
    assert asked == [200] and path.exists()
    again = open_pca(path, spec, 80, available=200, sample=sample, resuming=True)
    assert asked == [200]  # loaded, not refitted
    assert torch.equal(again(x), first(x))
    other = x[:, torch.randperm(80, generator=torch.Generator().manual_seed(0))]
    open_pca(path, spec, 80, 200, lambda k: other[:k], resuming=False)  # no rows yet: refit
    assert not torch.equal(PCAProjection.load(path).components, first.components)
    with pytest.raises(StoreError) as err:
        open_pca(path, ReduceSpec("pca", 4), 80, 200, sample, True)
    assert "output.overwrite=true" in one_line(err)
    path.unlink()
    with pytest.raises(StoreError) as err:
        open_pca(path, spec, 80, 200, sample, resuming=True)
    assert "missing" in one_line(err)


def test_collect_rows_takes_the_first_rows_of_batches() -> None:
    batches = [np.full((3, 2), i, np.float32) for i in range(4)]
    rows = collect_rows(iter(batches), 7)
    assert rows.shape == (7, 2) and rows[:, 0].tolist() == [0, 0, 0, 1, 1, 1, 2]
    with pytest.raises(DataError):
        collect_rows(iter([]), 5)


def test_fingerprint_records_and_rebuilding_from_them(tmp_path) -> None:
    assert reduce_fingerprint(None, 100, 0, 10) is None
    srp = reduce_fingerprint(ReduceSpec("srp", 16), 100, 0, 10)
    assert srp == reduce_fingerprint(ReduceSpec("srp", 16), 100, 0, 10)
    assert srp == SparseProjection(100, 16, 0).record()
    rebuilt = reduction_from_record(srp, None)
    x = torch.randn(2, 100)
    assert torch.equal(rebuilt(x), SparseProjection(100, 16, 0)(x))
    with pytest.raises(StoreError) as err:
        reduction_from_record({**srp, "sha256": "0" * 64}, None)
    assert "re-extract" in one_line(err)
    assert reduce_fingerprint(ReduceSpec("pca", 8), 100, 0, 5000)["sample_rows"] == 1024
    pca = fit_pca(low_rank(40, 100, rank=8)[0], 8)
    pca.save(tmp_path / PCA_FILE)
    assert torch.equal(reduction_from_record(pca.record(), tmp_path)(x), pca(x))
    with pytest.raises(StoreError):
        reduction_from_record({"kind": "lda"}, tmp_path)


def reduced_run(directory, spec: ReduceSpec, raw: torch.Tensor,
                stop: int | None = None) -> FeatureStore | None:
    """What the runner does with output.reduce, in small: the fingerprint, the projection
    (pca: fitted on the first rows and saved before any row), batches of 4 rows projected
    and stored; ``stop`` kills it (abort) after that many batches."""
    d_in, keys = raw.shape[1], [f"k{i}" for i in range(len(raw))]
    prints = {"backbone": "toy", "reduce": reduce_fingerprint(spec, d_in, 5, len(raw))}
    writer = StoreWriter(directory, prints, "float32", shard_size=4)
    if spec.kind == "srp":
        proj: torch.nn.Module = SparseProjection(d_in, spec.dim, seed=5)
    else:
        proj = open_pca(directory / PCA_FILE, spec, d_in, len(raw),
                        lambda k: collect_rows(iter(raw.split(4)), k), writer.dim is not None)
    todo = [i for i, key in enumerate(keys) if key not in writer.done_keys]
    for n, start in enumerate(range(0, len(todo), 4)):
        if n == stop:
            writer.abort()
            return None
        idx = todo[start:start + 4]
        with torch.inference_mode():
            rows = proj(raw[idx]).numpy()
        writer.add([keys[i] for i in idx], np.zeros(len(idx)), rows)
    return writer.close({"reduce": proj.record()})


@pytest.mark.parametrize("spec", ["srp:6", "pca:3"])
def test_a_killed_and_resumed_run_stores_identical_reduced_rows(tmp_path, spec: str) -> None:
    raw = torch.randn(24, 50, generator=torch.Generator().manual_seed(2))
    whole = reduced_run(tmp_path / "whole", parse_reduce(spec), raw)
    assert whole is not None and whole.features.shape == (24, int(spec[4:]))
    for stop in (0, 2):  # killed before any row, and after two batches
        out = tmp_path / f"cut{stop}"
        assert reduced_run(out, parse_reduce(spec), raw, stop=stop) is None
        resumed = reduced_run(out, parse_reduce(spec), raw)
        assert resumed.keys == whole.keys
        np.testing.assert_array_equal(np.asarray(resumed.features), np.asarray(whole.features))
        assert resumed.meta["reduce"] == whole.meta["reduce"]
    with pytest.raises(StoreError):  # another projection: the fingerprint differs
        reduced_run(tmp_path / "whole", parse_reduce(spec[:4] + "2"), raw)

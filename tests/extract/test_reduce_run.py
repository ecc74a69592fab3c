"""Issue #13 item 3 through the runner: output.reduce=srp:D / pca:D give D-dim rows,
identical after a kill and resume, recorded in the fingerprint and used for queries."""
from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import cli, make_cfg, same_store, write_config
from tests.imagegen import make_image_tree
from transferlab.errors import StoreError
from transferlab.extract.queries import embed_images
from transferlab.extract.runner import run_extract
from transferlab.store.reader import FeatureStore

ARGS = ("model.cut=stage:1", "runtime.batch_size=2", "output.shard_size=2", "output.dtype=float32")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("reduce") / "data"
    make_image_tree(root, per_class=4)
    return root


@pytest.mark.parametrize("reduce", ["srp:16", "pca:6"])
def test_reduced_rows_resume_identically(data, tmp_path, reduce):
    whole = run_extract(make_cfg(data, tmp_path / "whole", *ARGS, f"output.reduce={reduce}"))
    assert whole.store.features.shape[1] == int(reduce.split(":")[1])
    assert whole.store.meta["reduce"]["kind"] == reduce.split(":")[0]

    def stop(done):
        if done >= 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_extract(make_cfg(data, tmp_path / "part", *ARGS, f"output.reduce={reduce}"),
                    on_batch=stop)
    resumed = run_extract(make_cfg(data, tmp_path / "part", *ARGS, f"output.reduce={reduce}"))
    assert resumed.skipped >= 4
    same_store(resumed.store, whole.store)
    np.testing.assert_array_equal(np.asarray(resumed.store.features),
                                  np.asarray(whole.store.features))


def test_another_projection_is_refused(data, tmp_path):
    run_extract(make_cfg(data, tmp_path / "s", *ARGS, "output.reduce=srp:16"))
    for other in ("output.reduce=srp:8", "output.reduce=null", "runtime.seed=1"):
        with pytest.raises(StoreError, match="written with another configuration"):
            run_extract(make_cfg(data, tmp_path / "s", *ARGS, other,
                                 *(["output.reduce=srp:16"] if "seed" in other else [])))


@pytest.mark.parametrize("reduce", ["srp:16", "pca:6"])
def test_queries_are_projected_as_the_rows(data, tmp_path, reduce):
    store = run_extract(make_cfg(data, tmp_path / "s", *ARGS, f"output.reduce={reduce}")).store
    keys = store.keys[:3]
    got = embed_images(store.meta, [data / k for k in keys], root=store.dir)
    want = np.stack([store.get(k) for k in keys])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bad_or_impossible_reduce_is_one_line(data, tmp_path):
    config = write_config(tmp_path / "cfg.yaml")
    base = [config, f"data.root={data}", f"output.dir={tmp_path / 'o'}"]
    for bad, words in [("output.reduce=srp", "output.reduce"),
                       ("output.reduce=pca:100000", "output.reduce")]:
        code, _, err = cli(*base, bad)
        assert code == 2 and words in err and err.count("\n") == 1, err


def test_overwrite_removes_the_pca_file(data, tmp_path):
    run_extract(make_cfg(data, tmp_path / "s", *ARGS, "output.reduce=pca:6"))
    assert (tmp_path / "s" / "reduce-pca.npz").is_file()
    run_extract(make_cfg(data, tmp_path / "s", *ARGS, "output.overwrite=true"))
    assert not (tmp_path / "s" / "reduce-pca.npz").exists()
    assert "reduce" not in FeatureStore.open(tmp_path / "s").meta


@pytest.mark.parametrize("reduce", ["srp:40", "pca:6"])  # srp:40 leaves the 32-d cuts
def test_several_cuts_reduced_in_one_pass_equal_their_single_cut_runs(data, tmp_path, reduce):
    """Each cut wider than D gets its own projection; a narrower one is stored as it is."""
    cuts = "model.cut=[stage:0, stage:1, head]"
    extra = ("runtime.batch_size=2", "output.shard_size=2", "output.dtype=float32",
             "model.pool=avg")
    result = run_extract(make_cfg(data, tmp_path / "m", cuts, f"output.reduce={reduce}", *extra))
    dim = int(reduce.split(":")[1])
    for name, store in result.stores.items():
        cut = name.replace("-", ":", 1) if name != "head" else "head"
        want = run_extract(make_cfg(data, tmp_path / name, f"model.cut={cut}", *extra,
                                    "runtime.fold_bn=false",
                                    *([f"output.reduce={reduce}"]
                                      if store.meta.get("reduce") else []))).store
        assert store.meta["fingerprint"] == want.meta["fingerprint"], name
        assert store.features.shape[1] <= max(dim, want.features.shape[1])
        np.testing.assert_allclose(np.asarray(store.features), np.asarray(want.features),
                                   rtol=1e-5, atol=1e-6)
    assert any(s.meta.get("reduce") for s in result.stores.values())

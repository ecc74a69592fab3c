"""Work splitting and store merging for torchrun runs (the launches are in test_torchrun)."""
import numpy as np
import pytest
import torch

from transferlab.errors import StoreError
from transferlab.runtime.distributed import dist_info, part_range
from transferlab.store.merge import merge_stores
from transferlab.store.owner import prepare_store
from transferlab.store.reader import FeatureStore
from transferlab.store.writer import StoreWriter


def test_part_range_covers_everything_once():
    for count in (0, 1, 7, 10, 101):
        for world in (1, 2, 3, 8):
            parts = [part_range(count, r, world) for r in range(world)]
            assert parts[0][0] == 0 and parts[-1][1] == count
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
            sizes = [b - a for a, b in parts]
            assert max(sizes) - min(sizes) <= 1


def test_dist_info_reads_torchrun_env(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    info = dist_info()
    assert (info.rank, info.world_size, info.local_rank) == (3, 4, 1)
    assert info.enabled and not info.is_main


def write_part(path, keys, feats, fingerprint=None):
    with StoreWriter(path, fingerprint or {"m": 1}, "float32", shard_size=3) as writer:
        writer.add(keys, np.arange(len(keys)), feats)
        writer.add_failures([(f"bad-{path.name}.jpg", "corrupt: x")])
        return writer.close({"backbone": "m"})


def test_merged_store_reads_like_one_store(tmp_path):
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(10, 4)).astype(np.float32)
    keys = [f"k{i:02d}" for i in range(10)]
    write_part(tmp_path / "ranks" / "rank-0", keys[:6], feats[:6])
    write_part(tmp_path / "ranks" / "rank-1", keys[6:], feats[6:])
    merged = merge_stores(tmp_path, [tmp_path / "ranks" / "rank-0", tmp_path / "ranks" / "rank-1"],
                          {"backbone": "m"})
    again = FeatureStore.open(tmp_path)
    assert again.keys == keys
    assert np.array_equal(np.asarray(again.features), feats)
    assert again.get("k07").tolist() == feats[7].tolist()
    assert [k for k, _ in merged.failures] == ["bad-rank-0.jpg", "bad-rank-1.jpg"]
    assert again.meta["rows"] == 10 and again.meta["backbone"] == "m"


def test_merge_refuses_mixed_configurations(tmp_path):
    write_part(tmp_path / "a", ["x"], np.zeros((1, 2), np.float32), {"m": 1})
    write_part(tmp_path / "b", ["y"], np.zeros((1, 2), np.float32), {"m": 2})
    with pytest.raises(StoreError, match="another configuration"):
        merge_stores(tmp_path, [tmp_path / "a", tmp_path / "b"])


def test_prepare_store_refuses_then_overwrites(tmp_path):
    write_part(tmp_path / "s", ["x"], np.zeros((1, 2), np.float32), {"m": 1})
    prepare_store(tmp_path / "s", {"m": 1}, "float32")  # same: fine
    with pytest.raises(StoreError, match="overwrite=true"):
        prepare_store(tmp_path / "s", {"m": 2}, "float32")
    prepare_store(tmp_path / "s", {"m": 2}, "float32", overwrite=True)
    assert not (tmp_path / "s" / "meta.json").exists()


def test_rank_dir_is_the_root_alone_and_a_world_keyed_part_under_torchrun(tmp_path):
    from transferlab.runtime.distributed import DistInfo, rank_dir

    assert rank_dir(tmp_path, DistInfo()) == tmp_path
    assert rank_dir(tmp_path, DistInfo(1, 3)) == tmp_path / "ranks" / "world-3" / "rank-00001"
    assert rank_dir(tmp_path, DistInfo(1, 2)) != rank_dir(tmp_path, DistInfo(1, 3))


def test_gathers_are_the_identity_in_one_process():
    from transferlab.runtime.distributed import (
        all_gather,
        all_reduce_values,
        from_main,
        gather_to_main,
        part_sizes,
    )

    assert all_gather({"a": 1}) == [{"a": 1}] and gather_to_main(3) == [3]
    assert from_main("x") == "x"
    assert all_reduce_values([1.5, 2.0], torch.device("cpu")) == [1.5, 2.0]
    assert part_sizes(10, 3) == [4, 3, 3] and part_sizes(2, 3) == [1, 1, 0]
    assert part_sizes(10, 3) == [b - a for a, b in (part_range(10, r, 3) for r in range(3))]


def test_derive_seed_gives_distinct_reproducible_streams():
    from transferlab.runtime.device import derive_seed

    assert derive_seed(5) == 5  # the run's own seed: unchanged
    assert derive_seed(0, "process", 1) == derive_seed(0, "process", 1)
    seeds = {derive_seed(s, kind, r) for s in (0, 1, 7919) for kind in ("process", "workers")
             for r in range(4)}
    assert len(seeds) == 24  # no stream of one run is a stream (or the seed) of another
    assert all(0 <= s < 2**63 for s in seeds)
    torch.Generator().manual_seed(derive_seed(-3, "loader", 2))  # a valid torch seed


def test_frozen_forward_records_no_graph_and_autocasts():
    from transferlab.config import RuntimeConfig
    from transferlab.runtime.device import frozen_forward, resolve_runtime

    layer = torch.nn.Linear(4, 2)
    x = torch.randn(3, 4)
    with frozen_forward():
        out = layer(x)
    assert out.is_inference() and not out.requires_grad
    bf16 = resolve_runtime(RuntimeConfig(device="cpu", precision="bf16"))
    with frozen_forward(bf16):
        assert layer(x).dtype == torch.bfloat16
    assert layer(x).requires_grad  # outside: autograd as usual

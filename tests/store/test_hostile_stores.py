"""Issue #11, the store side: transferlab deletes only its own files, refuses directories
that are not its stores, and a damaged or crafted store is one line naming the file."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import cli, write_config
from tests.imagegen import make_image_tree
from transferlab.errors import StoreError
from transferlab.store.merge import merge_stores
from transferlab.store.reader import FeatureStore
from transferlab.store.writer import StoreWriter

FP = {"backbone": "b", "cut": "head"}


def small_store(directory: Path, keys=("a/0.png", "a/1.png", "b/2.png"), shard_size=2,
                fingerprint=FP) -> FeatureStore:
    feats = np.arange(len(keys) * 3, dtype=np.float32).reshape(len(keys), 3)
    with StoreWriter(directory, fingerprint, "float32", shard_size) as writer:
        writer.add(list(keys), [i % 2 for i in range(len(keys))], feats)
        return writer.close({"class_names": ["a", "b"]})


def user_folder(directory: Path) -> dict[str, str]:
    """A folder of the user's that happens to use a store's file names."""
    files = {"index.csv": "my,own,table\n", "meta.json": '{"mine": true}',
             "shards/notes.txt": "notes", "shards/sub/deep.txt": "deep",
             "draft.tmp": "unsaved", "config.yaml": "my: settings\n"}
    for name, text in files.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(text, encoding="utf-8")
    return files


def unchanged(directory: Path, files: dict[str, str]) -> bool:
    return all((directory / n).read_text(encoding="utf-8") == t for n, t in files.items())


def extract_args(tmp_path: Path, out: Path) -> list:
    make_image_tree(tmp_path / "data", per_class=2)
    return [write_config(tmp_path / "cfg.yaml"), f"data.root={tmp_path / 'data'}",
            f"output.dir={out}"]


# ---- files that are not transferlab's -------------------------------------------------------


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_user_folder_is_refused_and_left_untouched(tmp_path, overwrite):
    out = tmp_path / "mine"
    files = user_folder(out)
    code, _, err = cli(*extract_args(tmp_path, out), f"output.overwrite={str(overwrite).lower()}")
    assert code == 2
    assert err.count("\n") == 1 and str(out) in err and "not a transferlab store" in err
    assert "choose another output.dir" in err
    assert unchanged(out, files) and not (out / ".lock").exists()
    assert sorted(p.name for p in out.iterdir()) == sorted({"index.csv", "meta.json", "shards",
                                                            "draft.tmp", "config.yaml"})


def test_overwrite_deletes_only_the_stores_own_files(tmp_path):
    out = tmp_path / "s"
    args = extract_args(tmp_path, out)
    assert cli(*args)[0] == 0
    planted = {"shards/notes.txt": "mine", "shards/sub/deep.txt": "deep", "notes.tmp": "mine",
               "README.md": "about this store"}
    for name, text in planted.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text, encoding="utf-8")
    code, _, err = cli(*args, "model.pool=max", "output.overwrite=true")
    assert code == 0, err
    assert unchanged(out, planted)
    assert FeatureStore.open(out).meta["pool"] == "max"


def test_overwrite_never_follows_a_linked_shards_folder(tmp_path):
    out = tmp_path / "s"
    args = extract_args(tmp_path, out)
    assert cli(*args)[0] == 0
    elsewhere = tmp_path / "precious"
    elsewhere.mkdir()
    (elsewhere / "shard-00000.npy").write_bytes(b"not yours")
    (elsewhere / "shard-00000.json").write_text("{}", encoding="utf-8")
    for path in (out / "shards").iterdir():
        path.unlink()
    (out / "shards").rmdir()
    (out / "shards").symlink_to(elsewhere, target_is_directory=True)
    for extra in ([], ["model.pool=max", "output.overwrite=true"]):  # resume and wipe
        code, _, err = cli(*args, *extra)
        assert code == 2 and "is a link" in err and err.count("\n") == 1
        assert sorted(p.name for p in elsewhere.iterdir()) == ["shard-00000.json",
                                                               "shard-00000.npy"]


def test_wipe_leaves_linked_files_and_their_targets(tmp_path):
    store = small_store(tmp_path / "s")
    target = tmp_path / "precious.npy"
    target.write_bytes(b"keep")
    (store.dir / "shards" / "shard-00007.npy").symlink_to(target)
    StoreWriter(store.dir, {"other": 1}, "float32", overwrite=True).abort()
    assert target.read_bytes() == b"keep"


def test_resume_deletes_only_its_own_temporary_files(tmp_path):
    store = small_store(tmp_path / "s")
    (store.dir / "index.csv.123-456.tmp").write_text("half", encoding="utf-8")
    (store.dir / "shards" / "shard-00003.npy.99-1.tmp").write_bytes(b"half")
    (store.dir / "mine.tmp").write_text("user's", encoding="utf-8")
    (store.dir / "shards" / "draft.tmp").write_text("user's", encoding="utf-8")
    StoreWriter(store.dir, FP, "float32", 2).abort()
    assert not (store.dir / "index.csv.123-456.tmp").exists()
    assert not (store.dir / "shards" / "shard-00003.npy.99-1.tmp").exists()
    assert (store.dir / "mine.tmp").exists() and (store.dir / "shards" / "draft.tmp").exists()


def test_output_dir_that_is_a_file_is_one_line(tmp_path):
    out = tmp_path / "file"
    out.write_text("x", encoding="utf-8")
    code, _, err = cli(*extract_args(tmp_path, out))
    assert code == 2 and "is a file" in err and err.count("\n") == 1
    assert out.read_text(encoding="utf-8") == "x"


def test_a_store_written_before_the_format_marker_resumes(tmp_path):
    store = small_store(tmp_path / "s")
    record = json.loads((store.dir / "fingerprint.json").read_text(encoding="utf-8"))
    del record["format"]  # as an earlier transferlab wrote it
    (store.dir / "fingerprint.json").write_text(json.dumps(record), encoding="utf-8")
    with StoreWriter(store.dir, FP, "float32", 2) as writer:
        assert writer.done_keys == set(store.keys)
        writer.close({})
    assert json.loads((store.dir / "fingerprint.json").read_text())["format"]


def test_an_earlier_stores_missing_fields_are_named(tmp_path):
    small_store(tmp_path / "s")
    with pytest.raises(StoreError, match=r"earlier transferlab that did not record "
                                         r"fingerprint\.compute\.precision"):
        StoreWriter(tmp_path / "s", {**FP, "compute": {"precision": "fp32"}}, "float32", 2)


# ---- stores that lie or are damaged -----------------------------------------------------------


def rewrite_meta(store: FeatureStore, **changes) -> Path:
    meta = {**store.meta, **changes}
    (store.dir / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    return store.dir


def test_a_re_sorted_index_is_refused(tmp_path):
    store = small_store(tmp_path / "s")
    path = store.dir / "index.csv"
    rows = list(csv.reader(path.open(newline="", encoding="utf-8")))
    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([rows[0], *sorted(rows[1:], reverse=True)])
    with pytest.raises(StoreError, match=r"index\.csv line 2 says row 2 but is row 0"):
        FeatureStore.open(store.dir)


@pytest.mark.parametrize("change, words", [
    ({"version": "2"}, "format version '2' is not a number"),
    ({"dim": 10 ** 12}, "meta.json says float32 (2, 1000000000000)"),
    ({"dim": 1e12}, "dim must be a whole number"),
    ({"rows": 4}, "the shards hold 3 rows but rows says 4"),
    ({"shards": None}, "shards must be a list"),
    ({"dtype": "object"}, "dtype must be float16 or float32"),
])
def test_crafted_meta_is_one_line(tmp_path, change, words):
    directory = rewrite_meta(small_store(tmp_path / "s"), **change)
    with pytest.raises(StoreError) as info:
        FeatureStore.open(directory)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_no_shards_key_and_deep_json_are_one_line(tmp_path):
    store = small_store(tmp_path / "s")
    meta = dict(store.meta)
    del meta["shards"]
    (store.dir / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    with pytest.raises(StoreError, match="shards must be a list"):
        FeatureStore.open(store.dir)
    (store.dir / "meta.json").write_text("[" * 100_000 + "]" * 100_000, encoding="utf-8")
    with pytest.raises(StoreError, match="not a transferlab store's metadata"):
        FeatureStore.open(store.dir)


def test_a_shard_outside_the_store_is_never_read(tmp_path):
    store = small_store(tmp_path / "s")
    outside = tmp_path / "secret.npy"
    np.save(outside, np.zeros((2, 3), np.float32))
    for file in ("../secret.npy", str(outside)):
        shards = [{"file": file, "rows": 2}, store.meta["shards"][1]]
        with pytest.raises(StoreError, match="outside the store"):
            FeatureStore.open(rewrite_meta(store, shards=shards))


def test_truncated_and_short_shards_are_one_line(tmp_path):
    store = small_store(tmp_path / "s")
    shard = store.dir / "shards" / "shard-00000.npy"
    shard.write_bytes(shard.read_bytes()[:-5])
    with pytest.raises(StoreError, match="shard-00000.npy is not a complete .npy"):
        FeatureStore.open(store.dir)
    np.save(shard, np.zeros((1, 3), np.float32))  # meta says 2 rows
    with pytest.raises(StoreError, match=r"holds float32 \(1, 3\) but meta.json says"):
        FeatureStore.open(store.dir)


@pytest.mark.parametrize("line", ['a/0.png,cat,0,0', 'a/0.png,0', 'a/0.png,0,0,zero'])
def test_bad_index_lines_are_one_line(tmp_path, line):
    store = small_store(tmp_path / "s")
    path = store.dir / "index.csv"
    lines = path.read_text(encoding="utf-8").splitlines()
    path.write_text("\r\n".join([lines[0], line, *lines[2:]]) + "\r\n", encoding="utf-8")
    with pytest.raises(StoreError, match="line 2 is not key,label,row,view"):
        FeatureStore.open(store.dir)


def test_keys_with_carriage_returns_and_commas_round_trip(tmp_path):
    keys = ["a/odd\rname.png", 'a/x,"y"\n.png', "b/plain.png"]
    store = small_store(tmp_path / "s", keys=keys)
    with StoreWriter(tmp_path / "s", FP, "float32", 2) as writer:
        writer.add_failures([("b/bad\r.png", "cannot decode")])
        writer.close({})
    again = FeatureStore.open(tmp_path / "s")
    assert again.keys == keys and again.failures == [("b/bad\r.png", "cannot decode")]
    np.testing.assert_array_equal(again.get(keys[0]), store.features[0])


def test_a_killed_torchrun_merge_says_unfinished(tmp_path):
    parts = [tmp_path / "ranks" / "world-2" / f"rank-0000{r}" for r in range(2)]
    for r, part in enumerate(parts):
        small_store(part, keys=(f"k/{r}.png",))
    with pytest.raises(StoreError, match="unfinished.*rerun the same extract command"):
        FeatureStore.open(tmp_path)
    merged = merge_stores(tmp_path, parts)
    assert merged.keys == ["k/0.png", "k/1.png"]


def test_overwrite_of_a_torchrun_store_removes_its_parts(tmp_path):
    parts = [tmp_path / "ranks" / "world-2" / f"rank-0000{r}" for r in range(2)]
    for r, part in enumerate(parts):
        small_store(part, keys=(f"k/{r}.png",))
    merge_stores(tmp_path, parts)
    (tmp_path / "ranks" / "world-2" / "mine.txt").write_text("x", encoding="utf-8")
    StoreWriter(tmp_path, {"other": 1}, "float32", overwrite=True).abort()
    assert not parts[0].exists() and not parts[1].exists()
    assert (tmp_path / "ranks" / "world-2" / "mine.txt").exists()
    assert sorted(os.listdir(tmp_path)) == [".lock", "fingerprint.json", "ranks", "shards"]


def test_the_binary_index_equals_the_csv_and_is_used_only_while_they_match(tmp_path):
    from transferlab.store.files import _parse_index, _read_sidecar
    keys = [f"a/{i},odd\r{i}.png" for i in range(7)]
    store = small_store(tmp_path / "s", keys=keys, shard_size=3)
    index = store.dir / "index.csv"
    fast = _read_sidecar(index, 7)
    slow = _parse_index(index, 7)
    assert fast is not None and fast[0] == slow[0] == keys
    np.testing.assert_array_equal(fast[1], slow[1])
    np.testing.assert_array_equal(fast[2], slow[2])
    index.write_bytes(index.read_bytes().replace(b"a/3", b"a/X"))  # edited by hand
    assert _read_sidecar(index, 7) is None
    assert FeatureStore.open(store.dir).keys[3].startswith("a/X")  # the CSV is the truth

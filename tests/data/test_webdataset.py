"""data.source=webdataset: tar shards built here from an image folder give the folder's
features key for key; bad members and cut shards are failures with reasons; a missing shard
is one line before the model loads; kills resume to an identical store; ranks take whole
shards."""
from __future__ import annotations

import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.helpers import (
    CONFIG,
    add_member,
    complete,
    extract,
    kill_when,
    make_shards,
    make_tree,
    same_store,
)
from tests.imagegen import add_bad_files, jpeg_bytes
from transferlab.config import DataConfig, ExtractConfig, load_config
from transferlab.data.webdataset import (
    build_webdataset,
    expand_urls,
    item_shards,
    split_member,
    tar_shard_name,
)
from transferlab.errors import DataError
from transferlab.extract.runner import rank_items, run_extract
from transferlab.runtime.distributed import DistInfo
from transferlab.store.reader import FeatureStore


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """29 images as a folder and as 4 shards of 8, 8, 8 and 5 members."""
    tmp = tmp_path_factory.mktemp("wds")
    keys = sorted(make_tree(tmp / "imgs", 29))
    mapping = make_shards(tmp / "imgs", keys, tmp / "shards", 8)
    urls = str(tmp / "shards" / "train-{000000..000003}.tar")
    return {"tmp": tmp, "keys": keys, "mapping": mapping, "urls": urls}


# ---------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------


def test_brace_expansion_ranges_alternatives_and_lists():
    assert expand_urls("s/t-{000..002}.tar") == ["s/t-000.tar", "s/t-001.tar", "s/t-002.tar"]
    assert expand_urls("{a,b}-{8..10}.tar") == ["a-8.tar", "a-9.tar", "a-10.tar", "b-8.tar",
                                                "b-9.tar", "b-10.tar"]
    assert expand_urls(["x.tar", "s3://b/y-{1..2}.tar"]) == ["x.tar", "s3://b/y-1.tar",
                                                              "s3://b/y-2.tar"]
    with pytest.raises(DataError, match=r"must be two integers.*fix data.urls"):
        expand_urls("t-{a..c}.tar")
    with pytest.raises(DataError, match="more than"):
        expand_urls("t-{0..99999999}.tar")


def test_member_and_shard_names_follow_webdataset():
    assert split_member("a/0001.jpg") == ("a/0001", "jpg")
    assert split_member("x.seg.png") == ("x", "seg.png")
    assert split_member("d.v/k.cls") == ("d.v/k", "cls")
    assert tar_shard_name("s3://bucket/p/train-000001.tar") == "train-000001"
    assert tar_shard_name("https://h/x/y.tar?sig=1") == "y"


# ---------------------------------------------------------------------------------------
# Same features as the folder
# ---------------------------------------------------------------------------------------


def test_dataset_lists_members_in_tar_order_with_each_label_kind(shards):
    cfg = DataConfig(source="webdataset", urls=shards["urls"], label_key="txt")
    ds = build_webdataset(cfg)
    assert ds.keys == list(shards["mapping"])
    assert ds.class_names == ["a", "b", "c"]
    want = [("abc".index(k[0])) for k in shards["keys"]]
    assert ds.labels.tolist() == want
    for kind, names in (("cls", None), ("json", ["a", "b", "c"])):
        other = build_webdataset(DataConfig(source="webdataset", urls=shards["urls"],
                                            label_key=kind))
        assert other.labels.tolist() == want and other.class_names == names, kind
    unlabeled = build_webdataset(DataConfig(source="webdataset", urls=shards["urls"]))
    assert set(unlabeled.labels.tolist()) == {-1} and unlabeled.class_names is None
    assert item_shards(ds).tolist() == [0] * 8 + [1] * 8 + [2] * 8 + [3] * 5


def test_tar_shards_give_the_folder_features_key_for_key(shards):
    tmp = shards["tmp"]
    folder = extract(tmp, "folder", {"root": str(tmp / "imgs")})
    tars = extract(tmp, "tars", {"source": "webdataset", "urls": shards["urls"],
                                 "label_key": "txt"})
    assert len(tars) == 29 and tars.failures == []
    assert [shards["mapping"][k] for k in tars.keys] == folder.keys
    assert np.array_equal(tars.labels, folder.labels)
    assert tars.meta["class_names"] == folder.meta["class_names"] == ["a", "b", "c"]
    assert np.array_equal(np.asarray(tars.features), np.asarray(folder.features))


# ---------------------------------------------------------------------------------------
# Bad members, cut shards, missing shards
# ---------------------------------------------------------------------------------------


def cut_shard(path: Path, at: int) -> None:
    path.write_bytes(path.read_bytes()[:at])


@pytest.fixture
def damaged(tmp_path, shards):
    """Shard 0: a good image, a text file named .jpg, a corrupt PNG, a '..' name and a link;
    shard 1 cut inside its third image; shard 2 cut between its second and third image."""
    src, keys = tmp_path / "src", shards["keys"]
    bad = add_bad_files(tmp_path / "bad")
    with tarfile.open(tmp_path / "d-0.tar", "w") as tar:
        add_member(tar, "a/good.png", (shards["tmp"] / "imgs" / keys[0]).read_bytes())
        add_member(tar, "a/text.jpg", bad["text"].path.read_bytes())
        add_member(tar, "a/broken.png", bad["corrupt"].path.read_bytes())
        add_member(tar, "../evil.jpg", (shards["tmp"] / "imgs" / keys[0]).read_bytes())
        link = tarfile.TarInfo("a/link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    make_tree(src, 8)
    for part in (1, 2):
        names = sorted(p.relative_to(src).as_posix() for p in src.rglob("*.*"))[:4]
        with tarfile.open(tmp_path / f"d-{part}.tar", "w") as tar:
            for name in names:
                add_member(tar, f"s{part}/{name}", (src / name).read_bytes())
        with tarfile.open(tmp_path / f"d-{part}.tar") as tar:
            third = tar.getmembers()[2]
        cut_shard(tmp_path / f"d-{part}.tar",
                  third.offset_data + third.size // 2 if part == 1 else third.offset)
    return str(tmp_path / "d-{0..2}.tar")


def test_bad_members_and_cut_shards_are_failures_with_reasons(tmp_path, damaged):
    store = extract(tmp_path, "damaged", {"source": "webdataset", "urls": damaged})
    good = ["d-0/a/good", "d-1/s1/a/0000", "d-1/s1/a/0003", "d-2/s2/a/0000", "d-2/s2/a/0003"]
    assert store.keys == good
    reasons = {key: reason.split(":")[0] for key, reason in store.failures}
    assert reasons == {"d-0/a/text": "not-an-image", "d-0/a/broken": "corrupt",
                       "d-0/../evil": "outside-root", "d-0/a/link": "unreadable",
                       "d-1/s1/a/0006": "truncated", f"d-2/@{_third_header(tmp_path)}":
                       "truncated"}
    detail = dict(store.failures)
    assert "shard is cut short" in detail["d-1/s1/a/0006"]
    assert "later members are lost" in detail[f"d-2/@{_third_header(tmp_path)}"]


def _third_header(tmp_path: Path) -> int:
    return (tmp_path / "d-2.tar").stat().st_size


def test_member_names_that_are_not_utf8_are_bad_name_and_unicode_is_kept(tmp_path):
    data = jpeg_bytes(20, 20, seed=1)
    with tarfile.open(tmp_path / "n.tar", "w", encoding="utf-8",
                      errors="surrogateescape") as tar:
        for name in ("ok.jpg", "caf\udce9.jpg", "ñandú_猫.jpg"):
            add_member(tar, name, data)
    ds = build_webdataset(DataConfig(source="webdataset", urls=str(tmp_path / "n.tar")))
    assert ds.keys == ["n/ok", "n/caf\\xe9", "n/ñandú_猫"]
    assert [ds[i]["error"] for i in range(3)] == [
        None, "bad-name: member name is not valid UTF-8", None]


def test_missing_shard_is_one_line_before_the_model_loads(tmp_path, shards, capsys):
    from transferlab.extract.__main__ import main

    urls = [shards["urls"].replace("{000000..000003}", "000000"), str(tmp_path / "gone.tar")]
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump({**CONFIG, "data": {"source": "webdataset", "urls": urls},
                                      "model": {"name": "no_such_model_xyz"},
                                      "output": {"dir": str(tmp_path / "out")}}))
    assert main([str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "1 of 2 shards not found" in err
    assert "gone.tar" in err and "fix data.urls" in err
    assert not (tmp_path / "out").exists()
    not_tar = tmp_path / "notes.tar"
    not_tar.write_text("not a tar file\n" * 100)
    with pytest.raises(DataError, match=r"notes.tar is not a tar file.*re-copy it"):
        build_webdataset(DataConfig(source="webdataset", urls=str(not_tar)))


# ---------------------------------------------------------------------------------------
# Kill + resume, ranks
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resumable(tmp_path_factory):
    """300 images in 5 shards of 60; the uninterrupted reference store."""
    tmp = tmp_path_factory.mktemp("wds-resume")
    keys = sorted(make_tree(tmp / "imgs", 300))
    make_shards(tmp / "imgs", keys, tmp / "shards", 60)
    config = tmp / "cfg.yaml"
    data = {"source": "webdataset", "urls": str(tmp / "shards" / "train-{000000..000004}.tar"),
            "label_key": "cls"}
    config.write_text(yaml.safe_dump({**CONFIG, "data": data}))
    ref = run_extract(load_config(config, [f"output.dir={tmp / 'ref'}"], ExtractConfig))
    assert ref.written == 300
    return {"tmp": tmp, "config": config, "overrides": [], "ref": ref.store}


@pytest.mark.slow
def test_killed_webdataset_run_resumes_to_the_same_store(resumable):
    out = resumable["tmp"] / "killed"
    shards_dir = out / "shards"
    done = kill_when(resumable, out, lambda _: len(list(shards_dir.glob("shard-*.json"))) >= 2
                     if shards_dir.is_dir() else False)
    assert 2 <= done < 19
    written, failed, skipped = complete(resumable, out)
    assert skipped >= 32 and written + failed + skipped == 300
    same_store(FeatureStore.open(out), resumable["ref"])


def test_ranks_take_whole_shards_in_order(shards):
    ds = build_webdataset(DataConfig(source="webdataset", urls=shards["urls"]))
    parts = [rank_items(ds, DistInfo(r, 3), tar_shards=True) for r in range(3)]
    assert parts == [(0, 16), (16, 24), (24, 29)]  # shards 0-1, 2, 3
    assert [rank_items(ds, DistInfo(r, 5), tar_shards=True) for r in range(5)] == [
        (0, 8), (8, 16), (16, 24), (24, 29), (29, 29)]  # more ranks than shards: one idle
    limited = ds.subset(range(20))
    parts = [rank_items(limited, DistInfo(r, 2), tar_shards=True) for r in range(2)]
    assert parts == [(0, 16), (16, 20)]


@pytest.mark.slow
def test_two_torchrun_ranks_equal_one_process(tmp_path, shards):
    from tests.helpers import REPO, assert_same_rows, env, torchrun

    data = {"source": "webdataset", "urls": shards["urls"], "label_key": "txt"}
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump({**CONFIG, "data": data, "output": {
        **CONFIG["output"], "dir": str(tmp_path / "dist")}}))
    proc = subprocess.run(torchrun("-m", "transferlab.extract", str(config)), env=env(),
                          cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "29 images written, 0 failed" in proc.stdout
    merged = FeatureStore.open(tmp_path / "dist")
    assert merged.meta["world_size"] == 2
    single = run_extract(load_config(config, [f"output.dir={tmp_path / 'single'}"],
                                     ExtractConfig)).store
    assert_same_rows(merged, single)
    rank0 = FeatureStore.open(tmp_path / "dist" / "ranks" / "world-2" / "rank-00000")
    assert rank0.keys == merged.keys[:16]  # shards 0 and 1, whole (2 of the 4 shards)


def test_a_resume_with_other_shards_or_labels_is_refused(shards):
    """The shard list and label member are part of the fingerprint: rows never mix."""
    from transferlab.errors import StoreError

    tmp = shards["tmp"]
    data = {"source": "webdataset", "urls": shards["urls"], "label_key": "txt"}
    extract(tmp, "fp", data)
    fewer = shards["urls"].replace("{000000..000003}", "{000000..000002}")
    for other in ({**data, "urls": fewer}, {**data, "label_key": "cls"}):
        with pytest.raises(StoreError, match="written with another configuration"):
            extract(tmp, "fp", other)


def test_urls_stay_as_written_in_the_fingerprint():
    from transferlab.config import DataConfig
    from transferlab.data.fingerprint import data_fingerprint

    cfg = DataConfig(source="webdataset", urls="s3://bucket/t-{0..3}.tar", label_key="cls",
                     root="s3://bucket/photos/")
    printed = data_fingerprint(cfg)
    assert printed["urls"] == ["s3://bucket/t-{0..3}.tar"] and printed["label_key"] == "cls"
    assert printed["root"] == "s3://bucket/photos/"
    assert "urls" not in data_fingerprint(DataConfig(root="x"))  # other stores unchanged

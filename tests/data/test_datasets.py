"""Datasets: keys, labels, sources, filters, errors, and bad files inside DataLoader workers."""
from __future__ import annotations

import gzip
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.imagegen import UNICODE_NAME, make_flat_folder, make_image_tree, make_messy_tree
from transferlab.config import DataConfig
from transferlab.data.datasets import (
    DEBIAN_FASHION_MNIST,
    MNIST_5K,
    ImageDataset,
    ThreadedItems,
    collate_skip_errors,
    from_arrays,
    make_loader,
)
from transferlab.data.sources import build_dataset, find_idx_files, mnist_5k_split, read_idx
from transferlab.errors import DataError


def to_tensor(im: Image.Image) -> torch.Tensor:
    """Fixed-size tensor so batches stack (preprocessing proper lives elsewhere)."""
    arr = np.asarray(im.resize((16, 16)), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1) if arr.ndim == 3 else torch.from_numpy(arr)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("tree")
    return root, make_image_tree(root)


# ---- folder --------------------------------------------------------------------------------


def test_folder_keys_are_relative_sorted_and_distinct(tree):
    root, keys = tree
    ds = build_dataset(DataConfig(source="folder", root=str(root)))
    assert ds.keys == keys == sorted(keys)
    assert "cat/0000.jpg" in ds.keys and "dog/0000.jpg" in ds.keys  # same base name
    assert len(set(ds.keys)) == len(ds.keys)
    assert f"cat/{UNICODE_NAME}" in ds.keys
    assert "cat/0001.PNG" in ds.keys  # upper-case extension found
    assert all(not k.startswith("/") and "\\" not in k for k in ds.keys)


def test_folder_class_labels(tree):
    root, _ = tree
    ds = build_dataset(DataConfig(source="folder", root=str(root)))
    assert ds.class_names == ["cat", "dog"]
    assert ds.labels.dtype == np.int64
    for key, label in zip(ds.keys, ds.labels):
        assert label == (0 if key.startswith("cat/") else 1)


def test_folder_items_decode(tree):
    root, _ = tree
    ds = build_dataset(DataConfig(source="folder", root=str(root)), image_mode="L")
    sample = ds[ds.keys.index(f"cat/{UNICODE_NAME}")]
    assert sample["error"] is None and sample["image"].mode == "L"
    assert sample["image"].size == (30, 30) and sample["label"] == 0
    assert ds.path(0) == root / ds.keys[0]


def test_flat_folder_has_no_labels(tmp_path):
    keys = make_flat_folder(tmp_path)
    ds = build_dataset(DataConfig(source="folder", root=str(tmp_path)))
    assert ds.keys == keys and ds.class_names is None
    assert (ds.labels == -1).all()


def test_hidden_files_and_other_extensions_are_skipped(tmp_path):
    make_flat_folder(tmp_path, 2)
    (tmp_path / "._img0.png").write_bytes(b"AppleDouble junk")
    (tmp_path / ".cache").mkdir()
    shutil.copy(tmp_path / "img0.png", tmp_path / ".cache" / "x.png")
    (tmp_path / "notes.txt").write_text("hi")
    ds = build_dataset(DataConfig(source="folder", root=str(tmp_path), extensions=["png"]))
    assert ds.keys == ["img0.png", "img1.png"]


def test_empty_folder_error(tmp_path):
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"no images with extensions .*readme.txt.*data.root"):
        build_dataset(DataConfig(source="folder", root=str(tmp_path)))


def test_missing_root_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist; point data.root"):
        build_dataset(DataConfig(source="folder", root=str(tmp_path / "nope")))
    with pytest.raises(DataError, match="data.root is not set"):
        build_dataset(DataConfig(source="folder", root=None))


# ---- classes / limit / subset ----------------------------------------------------------------


def test_classes_filter_by_name_and_int(tree):
    root, _ = tree
    dogs = build_dataset(DataConfig(source="folder", root=str(root), classes=["dog"]))
    assert dogs.keys and all(k.startswith("dog/") for k in dogs.keys)
    assert (dogs.labels == 1).all() and dogs.class_names == ["cat", "dog"]
    by_int = build_dataset(DataConfig(source="folder", root=str(root), classes=[1]))
    assert by_int.keys == dogs.keys


def test_classes_filter_error_lists_available(tree):
    root, _ = tree
    with pytest.raises(DataError, match=r"unknown class 'dgo'; did you mean 'dog'.*cat, dog"):
        build_dataset(DataConfig(source="folder", root=str(root), classes=["dgo"]))
    with pytest.raises(DataError, match=r"label 7 matches no item.*cat, dog"):
        build_dataset(DataConfig(source="folder", root=str(root), classes=[7]))


def test_limit_and_subset(tree):
    from transferlab.extract.batches import resume_positions

    root, keys = tree
    ds = build_dataset(DataConfig(source="folder", root=str(root), limit=3))
    assert ds.keys == keys[:3]
    sub = ds.subset([2, 0])
    assert sub.keys == [keys[2], keys[0]] and sub[0]["key"] == keys[2]
    assert sub[0]["index"] == 0
    full = build_dataset(DataConfig(source="folder", root=str(root)))
    rest = full.subset(resume_positions(full.keys, set(keys[:2]), batch_size=1))
    assert rest.keys == keys[2:]  # what a resumed run still reads, order kept


# ---- list / CSV ------------------------------------------------------------------------------


def test_text_list_relative_to_list_folder(tree, tmp_path):
    root, keys = tree
    list_file = root / "files.txt"
    list_file.write_text(f"# comment\n{keys[3]}\n\n{root / keys[0]}\n", encoding="utf-8")
    ds = build_dataset(DataConfig(source="list", list_file=str(list_file)))
    assert ds.keys == [keys[3], keys[0]]  # file order kept; absolute path made relative
    assert (ds.labels == -1).all() and ds[1]["error"] is None


def test_csv_list_with_names_and_root(tree, tmp_path):
    root, keys = tree
    csv_file = tmp_path / "items.csv"
    csv_file.write_text("file,species\n" + "".join(
        f"\"{k}\",{k.split('/')[0]}\n" for k in keys[:4]), encoding="utf-8")
    ds = build_dataset(DataConfig(source="list", list_file=str(csv_file), root=str(root),
                                  path_column="file", label_column="species"))
    assert ds.keys == keys[:4] and ds.class_names == ["cat"]
    assert (ds.labels == 0).all()


def test_csv_integer_labels(tree, tmp_path):
    root, keys = tree
    csv_file = tmp_path / "ints.csv"
    csv_file.write_text("path,label\n" + f"{keys[0]},3\n{keys[1]},\n{keys[2]},5\n")
    ds = build_dataset(DataConfig(source="list", list_file=str(csv_file), root=str(root),
                                  label_column="label", classes=[5]))
    assert ds.keys == [keys[2]] and ds.class_names is None and list(ds.labels) == [5]


def test_list_errors(tree, tmp_path):
    root, keys = tree
    with pytest.raises(DataError, match="not found; fix data.list_file"):
        build_dataset(DataConfig(source="list", list_file=str(tmp_path / "none.txt")))
    csv_file = tmp_path / "bad.csv"
    csv_file.write_text("paths,label\na.jpg,1\n")
    with pytest.raises(DataError, match=r"no column 'path'; did you mean 'paths'.*"
                                        r"columns: paths, label.*data.path_column"):
        build_dataset(DataConfig(source="list", list_file=str(csv_file)))
    dup = tmp_path / "dup.txt"
    dup.write_text(f"{keys[0]}\n{keys[0]}\n")
    with pytest.raises(DataError, match="twice"):
        build_dataset(DataConfig(source="list", list_file=str(dup), root=str(root)))
    wrong = tmp_path / "wrong.txt"
    wrong.write_text(f"{keys[0]}\n")
    with pytest.raises(DataError, match="set data.root"):
        build_dataset(DataConfig(source="list", list_file=str(wrong)))


# ---- bad files -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    root = tmp_path_factory.mktemp("messy")
    return root, make_messy_tree(root)


def test_bad_files_become_error_samples(messy):
    root, tree = messy
    special, bad = tree["special"], tree["bad"]
    ds = build_dataset(DataConfig(source="folder", root=str(root)), transform=to_tensor)
    by_key = {k: i for i, k in enumerate(ds.keys)}
    for name, case in bad.items():
        key = case.path.relative_to(root).as_posix()
        if case.skip or key not in by_key:  # directories and missing files are not scanned
            continue
        sample = ds[by_key[key]]
        assert sample["error"] is not None and sample["error"].startswith(case.reason), name
        assert sample["image"].shape == (3, 16, 16)  # placeholder went through the transform
    for case in special.values():
        assert ds[by_key[case.path.relative_to(root).as_posix()]]["error"] is None


def test_loader_with_workers_never_dies_and_reports_failures(messy):
    root, tree = messy
    ds = build_dataset(DataConfig(source="folder", root=str(root)), transform=to_tensor)
    loader = make_loader(ds, batch_size=4, num_workers=2)
    seen, failures = [], []
    for batch in loader:
        if batch["image"] is not None:
            assert batch["image"].shape == (len(batch["key"]), 3, 16, 16)
        seen += batch["key"]
        failures += batch["failures"]
    expected_bad = tree["failures"]
    assert len(expected_bad) >= 8
    assert {k: r.split(":")[0] for k, r in failures} == expected_bad
    assert sorted(seen + [k for k, _ in failures]) == sorted(ds.keys)
    assert seen == [k for k in ds.keys if k not in expected_bad]  # order kept


def test_list_with_missing_and_directory_entries(messy):
    root, _ = messy
    list_file = root / "bad_list.txt"
    list_file.write_text("good/cat/0000.jpg\nbad/missing.jpg\nbad/directory.jpg\n")
    ds = build_dataset(DataConfig(source="list", list_file=str(list_file)))
    assert [ds[i]["error"] and ds[i]["error"].split(":")[0] for i in range(3)] == [
        None, "missing", "unreadable"]


def test_collate_all_failed():
    batch = [{"image": None, "label": 0, "key": "a", "index": 0, "error": "empty: zero"}]
    out = collate_skip_errors(batch)
    assert out["image"] is None and out["failures"] == [("a", "empty: zero")]
    assert out["label"].shape == (0,)


# ---- arrays / mnist-5k / torchvision ---------------------------------------------------------


def test_from_arrays_share_one_code_path():
    images = np.arange(2 * 4 * 5, dtype=np.uint8).reshape(2, 4, 5)
    ds = from_arrays(images, [1, 2], prefix="x/", image_mode="L")
    assert ds.keys == ["x/000000", "x/000001"]
    np.testing.assert_array_equal(np.asarray(ds[1]["image"]), images[1])
    rgb = from_arrays(images)[0]["image"]
    assert rgb.mode == "RGB" and rgb.size == (5, 4)
    with pytest.raises(DataError, match="uint8"):
        from_arrays(images.astype(np.float32))


def test_mnist_5k_split_sizes_and_determinism():
    train = build_dataset(DataConfig(source="mnist-5k", split="train"), image_mode="L")
    test = build_dataset(DataConfig(source="mnist-5k", split="test"), image_mode="L")
    assert len(train) == 4000 and len(test) == 1000
    assert np.bincount(train.labels).tolist() == [400] * 10
    assert np.bincount(test.labels).tolist() == [100] * 10
    assert not set(train.keys) & set(test.keys)
    assert train.keys[:2] == ["mnist-5k/train/00000", "mnist-5k/train/00001"]
    assert test.keys[0] == "mnist-5k/test/00004"
    again = build_dataset(DataConfig(source="mnist-5k", split="test"))
    assert again.keys == test.keys and train.class_names == [str(i) for i in range(10)]
    data = np.load(MNIST_5K)
    np.testing.assert_array_equal(np.asarray(test[0]["image"]), data["images"][4])
    assert test[0]["label"] == data["labels"][4]
    labels = np.repeat(np.arange(3), 10)
    assert mnist_5k_split(labels, "test").tolist() == [4, 9, 14, 19, 24, 29]


def test_mnist_5k_classes_and_limit():
    ds = build_dataset(DataConfig(source="mnist-5k", classes=["5", 9], limit=450))
    assert len(ds) == 450 and set(ds.labels.tolist()) == {5, 9}


def write_idx(path: Path, array: np.ndarray) -> None:
    codes = {np.dtype(np.uint8): 0x08}
    header = bytes([0, 0, codes[array.dtype], array.ndim])
    header += np.array(array.shape, ">u4").tobytes()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


@pytest.mark.parametrize("gz", [True, False])
def test_idx_files_read_directly(tmp_path, gz):
    ext = ".gz" if gz else ""
    images = np.random.default_rng(0).integers(0, 256, (7, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{ext}", images)
    write_idx(tmp_path / f"t10k-labels-idx1-ubyte{ext}", np.arange(7, dtype=np.uint8))
    ds = build_dataset(DataConfig(source="torchvision", dataset="MNIST", root=str(tmp_path),
                                  split="test"), image_mode="L")
    assert ds.keys[3] == "test/000003" and ds.labels.tolist() == list(range(7))
    np.testing.assert_array_equal(np.asarray(ds[6]["image"]), images[6])
    assert ds.class_names[0].startswith("0")


def test_damaged_idx_file(tmp_path):
    path = tmp_path / "x.idx"
    path.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 9, 1, 2]))
    with pytest.raises(DataError, match="damaged"):
        read_idx(path)


@pytest.mark.skipif(not (DEBIAN_FASHION_MNIST / "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="Debian package dataset-fashion-mnist is not installed")
def test_fashion_mnist_from_debian_package():
    assert find_idx_files(DEBIAN_FASHION_MNIST, "FashionMNIST", "test") is not None
    for root in (None, str(DEBIAN_FASHION_MNIST)):
        ds = build_dataset(DataConfig(source="torchvision", dataset="fashion-mnist", root=root,
                                      split="test"), image_mode="L")
        assert len(ds) == 10_000 and ds.keys[123] == "test/000123"
        assert np.bincount(ds.labels).tolist() == [1000] * 10
        assert ds.class_names[9] == "Ankle boot"
        assert ds[0]["image"].size == (28, 28) and ds[0]["error"] is None


def test_missing_torchvision_dataset_says_how_to_fix(tmp_path):
    for name in ("MNIST", "CIFAR10"):
        with pytest.raises(DataError, match=r"set data.download=true or point data.root"):
            build_dataset(DataConfig(source="torchvision", dataset=name, root=str(tmp_path)))
    with pytest.raises(DataError, match="did you mean 'CIFAR10'"):
        build_dataset(DataConfig(source="torchvision", dataset="CIFAR-1O", root=str(tmp_path)))


def test_dataset_is_a_torch_dataset(tree):
    root, _ = tree
    ds = build_dataset(DataConfig(source="folder", root=str(root)))
    assert isinstance(ds, torch.utils.data.Dataset) and isinstance(ds, ImageDataset)
    assert "items" in repr(ds)


# ---- threaded batch decoding -----------------------------------------------------------


class Recording(torch.utils.data.Dataset):
    """Items 0..n-1 that record the thread each was read in (and wait a moment, so a pool
    of two threads really shares the work)."""

    def __init__(self, n: int):
        self.n, self.threads, self.lock = n, set(), threading.Lock()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        with self.lock:
            self.threads.add(threading.current_thread().name)
        threading.Event().wait(0.01)
        return i


def test_threaded_items_come_in_index_order_from_several_threads():
    base = Recording(8)
    items = ThreadedItems(base, 2).__getitems__([5, 1, 7, 0, 2, 6])
    assert items == [5, 1, 7, 0, 2, 6]
    assert len(base.threads) == 2 and all(t.startswith("decode") for t in base.threads)
    one = Recording(8)
    assert ThreadedItems(one, 1).__getitems__([3, 2]) == [3, 2]
    assert one.threads == {threading.current_thread().name}

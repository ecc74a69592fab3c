"""Names and inputs that break runs (#11): odd file names, FIFOs, escaping list keys, images
that blow up under the resize, the one DataLoader factory (#12 item 3).

Every test builds its hostile input in ``tmp_path`` and runs the real extraction entry point.
"""
from __future__ import annotations

import io
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import cli, same_store, summary_counts, write_config
from tests.imagegen import make_image_tree, random_image, save
from transferlab.config import DataConfig
from transferlab.data import datasets
from transferlab.data.datasets import from_arrays
from transferlab.data.imageio import ImageDecodeError, escape_name, load_image
from transferlab.data.sources import DATA_SOURCES, build_dataset, describe_data
from transferlab.errors import DataError
from transferlab.extract import batches
from transferlab.store.reader import FeatureStore


def extract(tmp_path: Path, root: Path, *overrides: str) -> tuple[int, str, str, Path]:
    cfg = write_config(tmp_path / "cfg.yaml")
    out = tmp_path / "store"
    code, stdout, err = cli(cfg, f"data.root={root}", f"output.dir={out}", *overrides)
    return code, stdout, err, out


def png_bytes(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    random_image(24, 24, seed=seed).save(buf, format="PNG")
    return buf.getvalue()


# ---- 1. a file name that is not UTF-8 -----------------------------------------------------


def test_non_utf8_name_is_a_failure_under_its_escape_and_the_rest_is_written(tmp_path):
    root = tmp_path / "data"
    keys = make_image_tree(root, unicode_name=False)
    with open(os.fsencode(root / "cat") + b"/\xff\\x.png", "wb") as f:  # bytes path
        f.write(png_bytes())
    code, stdout, err, out = extract(tmp_path, root)
    assert code == 0, err
    store = FeatureStore.open(out)
    assert store.keys == keys  # everything else written
    assert store.failures == [("cat/\\xff\\\\x.png", "bad-name: file name is not valid UTF-8")]
    assert summary_counts(stdout)[:2] == (len(keys), 1)
    # the escape is lossless: backslashes doubled, the byte as \xNN
    assert escape_name(os.fsdecode(b"cat/\xff\\x.png")) == "cat/\\xff\\\\x.png"
    assert escape_name("cat/ok\\x.png") is None
    code, stdout, err, _ = extract(tmp_path, root)  # rerun: failures are tried again
    assert code == 0, err
    assert summary_counts(stdout)[:2] == (0, 1)
    same_store(store, FeatureStore.open(out))


# ---- 2. a FIFO named x.png -----------------------------------------------------------------


def test_fifo_named_png_is_a_failure_and_never_blocks(tmp_path):
    root = tmp_path / "data"
    keys = make_image_tree(root, unicode_name=False)
    os.mkfifo(root / "dog" / "x.png")
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(run=extract(tmp_path, root)),
                              daemon=True)
    worker.start()
    worker.join(timeout=60)
    if worker.is_alive():  # unblock the reader so the test process can end, then fail
        fd = os.open(root / "dog" / "x.png", os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        pytest.fail("extraction blocked on a FIFO")
    code, _, err, out = result["run"]
    assert code == 0, err
    store = FeatureStore.open(out)
    assert store.keys == keys
    assert store.failures == [("dog/x.png", "unreadable: not a regular file")]


def test_load_image_refuses_fifo_and_directory_without_opening_for_read(tmp_path):
    os.mkfifo(tmp_path / "f.png")
    (tmp_path / "d.png").mkdir()
    for name, detail in (("f.png", "not a regular file"), ("d.png", "is a directory")):
        with pytest.raises(ImageDecodeError) as info:
            load_image(tmp_path / name)
        assert info.value.short() == f"unreadable: {detail}"
        assert len(str(info.value).splitlines()) == 1 and "only regular files" in str(info.value)


# ---- 3. list keys that escape the data root -----------------------------------------------


def test_list_keys_outside_the_root_are_failures_and_never_read(tmp_path):
    root = tmp_path / "data"
    keys = make_image_tree(root, unicode_name=False)
    secret = save(random_image(20, 20), tmp_path / "secret.png")
    (root / "cat" / "link.png").symlink_to(secret)  # a link the data owner planted: followed
    listed = [*keys, "../secret.png", str(secret), "cat/../../data2/x.png", "cat/link.png"]
    (root / "list.txt").write_text("\n".join(listed) + "\n", encoding="utf-8")
    code, _, err, out = extract(tmp_path, root, "data.source=list",
                                f"data.list_file={root / 'list.txt'}")
    assert code == 0, err
    store = FeatureStore.open(out)
    assert store.keys == [*keys, "cat/link.png"]
    reason = f"outside-root: outside {root}"
    assert sorted(store.failures) == sorted([("../secret.png", reason), (str(secret), reason),
                                             ("../data2/x.png", reason)])  # normalised


def test_list_whose_every_path_escapes_is_one_line_naming_the_fix(tmp_path):
    root = tmp_path / "data"
    make_image_tree(root, unicode_name=False)
    (root / "list.txt").write_text("../a.png\n/etc/passwd.png\n", encoding="utf-8")
    code, _, err, out = extract(tmp_path, root, "data.source=list",
                                f"data.list_file={root / 'list.txt'}")
    assert code == 2
    line = err.strip()
    assert len(line.splitlines()) == 1 and "outside" in line and "set data.root" in line
    assert not (out / "fingerprint.json").exists()


def test_list_file_that_is_not_utf8_is_one_line(tmp_path):
    root = tmp_path / "data"
    make_image_tree(root, unicode_name=False)
    for name, body in (("list.txt", b"cat/\xff.png\n"), ("list.csv", b"path\ncat/\xff.png\n")):
        (root / name).write_bytes(body)
        code, _, err, _ = extract(tmp_path, root, "data.source=list",
                                  f"data.list_file={root / name}")
        assert code == 2
        assert len(err.strip().splitlines()) == 1 and "is not UTF-8" in err and "save it" in err


# ---- 4. an image that blows up under the resize ---------------------------------------------


def test_long_thin_png_is_too_large_after_resize_before_allocating(tmp_path):
    root = tmp_path / "data"
    keys = make_image_tree(root, unicode_name=False)
    Image.new("L", (20000, 1)).save(root / "dog" / "thin.png")
    assert (root / "dog" / "thin.png").stat().st_size < 200
    code, _, err, out = extract(tmp_path, root, "preprocess.input_size=[224,224]",
                                "preprocess.crop_pct=1.0")
    assert code == 0, err
    store = FeatureStore.open(out)
    assert store.keys == keys
    [(key, reason)] = store.failures
    assert key == "dog/thin.png"
    assert reason == ("too-large: 20000x1 resized to cover 224x224 is 4480000x224 = "
                      "1003520000 pixels > max_pixels=89478485")


def test_resized_bound_spares_ordinary_images(tmp_path):
    path = save(random_image(300, 20), tmp_path / "wide.png")
    assert load_image(path, draft_size=(224, 224)).size == (300, 20)
    with pytest.raises(ImageDecodeError, match="resized to cover"):
        load_image(path, draft_size=(224, 224), max_pixels=224 * 3360 - 1)


# ---- 7. one DataLoader factory ---------------------------------------------------------------


def test_one_loader_factory_with_one_prefetch_rule():
    ds = from_arrays(np.zeros((5, 4, 4), np.uint8), image_mode="L",
                     transform=lambda im: np.asarray(im))
    by_size = datasets.make_loader(ds, 2, num_workers=1)
    by_batches = datasets.make_loader(ds, batches=[[0, 1], [2, 3], [4]], num_workers=1)
    assert by_size.prefetch_factor == by_batches.prefetch_factor == datasets.PREFETCH_FACTOR
    assert [b["index"].tolist() for b in by_batches] == [[0, 1], [2, 3], [4]]
    assert datasets.make_loader(ds, 2).prefetch_factor is None  # no workers, no prefetch
    with pytest.raises(ValueError):
        datasets.make_loader(ds, 2, batches=[[0]])
    # the extraction's loader is built by it, not a second factory of its own
    assert getattr(batches, "make_loader", batches.run_loader) is batches.run_loader
    assert "DataLoader(" not in Path(batches.__file__).read_text(encoding="utf-8")
    from transferlab.training import feeds as sources
    assert "DataLoader(" not in Path(sources.__file__).read_text(encoding="utf-8")


def test_the_gpu_decode_path_never_blocks_on_a_fifo_nor_resizes_a_long_thin_jpeg(tmp_path):
    from transferlab.data.gpudecode import read_jpeg

    os.mkfifo(tmp_path / "x.jpg")
    result: list = []
    worker = threading.Thread(target=lambda: result.append(read_jpeg(tmp_path / "x.jpg", 10**8)),
                              daemon=True)
    worker.start()
    worker.join(timeout=30)
    if worker.is_alive():
        os.close(os.open(tmp_path / "x.jpg", os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("read_jpeg blocked on a FIFO")
    assert result == [None]  # the PIL path names the reason
    thin = save(random_image(4000, 2), tmp_path / "thin.jpg")
    assert read_jpeg(thin, 10**8) is not None  # as stored it is small
    assert read_jpeg(thin, 10**8, draft_size=(224, 224)) is None  # 448000x224 after resize


def test_gpu_decode_run_lists_a_fifo_and_a_long_thin_jpeg_as_failures(tmp_path):
    root = tmp_path / "data"
    keys = make_image_tree(root, unicode_name=False)
    os.mkfifo(root / "dog" / "x.jpg")
    save(random_image(40000, 3), root / "dog" / "thin.jpg")
    code, _, err, out = extract(tmp_path, root, "runtime.gpu_decode=true",
                                "data.max_image_pixels=1000000")  # 120,000 as stored
    assert code == 0, err
    store = FeatureStore.open(out)
    assert store.keys == keys
    reasons = dict(store.failures)
    assert reasons["dog/x.jpg"] == "unreadable: not a regular file"
    assert reasons["dog/thin.jpg"].startswith("too-large:")


# ---- the data-source registry (#23 item 4) -------------------------------------------------


@pytest.mark.parametrize("cfg, words", [
    (DataConfig(root="photos"), "folder photos"),
    (DataConfig(source="list", list_file="l.csv"), "list l.csv"),
    (DataConfig(source="list", list_file="l.csv", root="img"), "list img"),
    (DataConfig(source="torchvision", dataset="MNIST"), "torchvision MNIST (root None)"),
    (DataConfig(source="mnist-5k"),
     "mnist-5k (the 5,000 bundled MNIST digits, fixed 80/20 train/test split)"),
    (DataConfig(source="webdataset", urls="t-{0..3}.tar"), "webdataset t-{0..3}.tar"),
])
def test_each_source_names_its_data_in_messages(cfg, words):
    assert describe_data(cfg) == words


def test_an_unknown_source_is_one_line_naming_the_registry():
    with pytest.raises(DataError) as exc:
        build_dataset(DataConfig(source="hdf5"))  # a Python-built config skips the Literal
    assert str(exc.value) == ("unknown data.source 'hdf5'; choose one of folder, list, "
                              "torchvision, mnist-5k, webdataset")
    assert list(DATA_SOURCES) == ["folder", "list", "torchvision", "mnist-5k", "webdataset"]

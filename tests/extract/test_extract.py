"""``python -m transferlab.extract`` end to end on generated folders holding every bad case.

Models are timm's ``test_resnet`` with random weights at 32x32, one thread, no workers, so a
whole run takes about a second once torch is imported.
"""
from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import cli, make_cfg, same_store, summary_counts, write_config
from tests.imagegen import add_bad_files, make_image_tree, make_messy_tree, random_image, save
from transferlab.config import ExtractConfig, load_config, to_dict
from transferlab.data.imageio import load_image
from transferlab.errors import ConfigError, StoreError
from transferlab.extract.batches import ViewsDataset, aligned_batches, resume_positions
from transferlab.extract.runner import run_extract
from transferlab.models.extractor import extractor_from_config
from transferlab.runtime.device import seed_everything
from transferlab.store.reader import FeatureStore


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    """A messy folder extracted once through the CLI: (tree, cfg file, store dir, stdout)."""
    tmp = tmp_path_factory.mktemp("extract")
    tree = make_messy_tree(tmp / "data")
    config = write_config(tmp / "cfg.yaml")
    code, out, err = cli(config, f"data.root={tmp / 'data'}", f"output.dir={tmp / 'store'}")
    assert code == 0, err
    tree.update(root=tmp / "data", config=config, store=tmp / "store", stdout=out, tmp=tmp)
    bad_ok = [c.path.relative_to(tmp / "data").as_posix() for c in tree["bad"].values()
              if c.path.is_file() and c.skip]  # chmod 000 is readable as root
    special = [c.path.relative_to(tmp / "data").as_posix() for c in tree["special"].values()]
    tree["written"] = sorted(tree["good"] + special + bad_ok)
    return tree


# ---------------------------------------------------------------------------------------
# One run over every bad case
# ---------------------------------------------------------------------------------------


def test_every_bad_file_is_skipped_counted_and_listed_with_its_reason(messy):
    store = FeatureStore.open(messy["store"])
    with open(messy["store"] / "failures.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    got = {r["key"]: r["reason"].split(":")[0] for r in rows}
    assert got == messy["failures"]  # corrupt, truncated, empty, not-an-image, bombs ...
    assert {"bad/bomb.png", "bad/bomb_moderate.png", "bad/zero.jpg"} <= set(got)
    assert all(":" in r["reason"] and len(r["reason"]) > len("corrupt: ") for r in rows
               if r["reason"].split(":")[0] != "empty")  # a detail beside the category
    written, failed, skipped = summary_counts(messy["stdout"])
    assert (written, failed, skipped) == (len(messy["written"]), len(messy["failures"]), 0)
    assert len(store) == written and len(store.failures) == failed
    counts = store.meta["counts"]
    assert counts["written_this_run"] == written and counts["failed_this_run"] == failed
    assert counts["dataset"] == written + failed


def test_keys_are_relative_paths_with_folder_labels(messy):
    store = FeatureStore.open(messy["store"])
    assert store.keys == messy["written"]  # sorted relative paths, unicode name included
    assert "good/cat/0000.jpg" in store.keys and "good/dog/0000.jpg" in store.keys
    assert any("ñandú_猫" in k for k in store.keys)
    assert store.class_names == ["bad", "good", "special"]
    for key, label in zip(store.keys, store.labels):
        assert store.class_names[label] == key.split("/")[0]
    # duplicate base names keep distinct features
    assert not np.array_equal(store.get("good/cat/0000.jpg"), store.get("good/dog/0000.jpg"))


def test_resolved_config_is_saved_beside_the_store(messy):
    saved = load_config(messy["store"] / "config.yaml", [], ExtractConfig)
    expected = load_config(messy["config"], [f"data.root={messy['root']}",
                                             f"output.dir={messy['store']}"], ExtractConfig)
    assert to_dict(saved) == to_dict(expected)
    assert FeatureStore.open(messy["store"]).meta["config"] == to_dict(expected)


def test_store_reads_back_with_numpy_alone(messy):
    d = messy["store"]
    meta = json.loads((d / "meta.json").read_text(encoding="utf-8"))
    feats = np.concatenate([np.load(d / s["file"], allow_pickle=False) for s in meta["shards"]])
    with open(d / "index.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    store = FeatureStore.open(d)
    assert len(meta["shards"]) > 1 and feats.dtype == np.float16
    assert np.array_equal(feats, np.asarray(store.features))
    assert [r["key"] for r in rows] == store.keys
    assert [int(r["label"]) for r in rows] == store.labels.tolist()
    assert [int(r["row"]) for r in rows] == list(range(len(store)))
    assert meta["dim"] == feats.shape[1] == 96 and meta["rows"] == len(rows)


def test_features_equal_a_direct_extractor_computation(messy):
    """extractor(transform(image)) by hand, for plain, unicode and awkward images."""
    store = FeatureStore.open(messy["store"])
    cfg = load_config(messy["store"] / "config.yaml", [], ExtractConfig)
    seed_everything(cfg.runtime.seed)
    bundle = extractor_from_config(cfg.model, cfg.preprocess)
    transform = bundle.transform()  # PIL -> normalised float tensor
    keys = ["good/cat/0000.jpg", "good/dog/0001.png", next(k for k in store.keys if "ñ" in k),
            "special/cmyk.jpg", "special/exif6.jpg", "special/rgba.png", "special/deep16.png",
            "special/gray.png"]
    spec = bundle.spec
    images = [load_image(messy["root"] / k, spec.image_mode, spec.scale_size()) for k in keys]
    with torch.inference_mode():
        direct = bundle.extractor(torch.stack([transform(im) for im in images])).numpy()
    stored = np.stack([store.get(k) for k in keys]).astype(np.float32)
    scale = np.abs(direct).max()
    np.testing.assert_allclose(stored, direct, rtol=2e-3, atol=2e-3 * scale)
    # EXIF orientation honoured: the image as stored on disk gives other features
    with Image.open(messy["root"] / "special/exif6.jpg") as im:
        sideways = transform(im.convert("RGB"))
    with torch.inference_mode():
        raw = bundle.extractor(sideways[None]).numpy()[0]
    assert np.abs(raw - store.get("special/exif6.jpg")).max() > 5 * 2e-3 * scale


def test_rerun_of_a_finished_store_retries_only_the_failures_and_changes_nothing(messy,
                                                                                 tmp_path):
    import shutil

    copy = tmp_path / "store"
    shutil.copytree(messy["store"], copy)
    result = run_extract(load_config(messy["store"] / "config.yaml",
                                     [f"output.dir={copy}"], ExtractConfig))
    assert (result.written, result.failed) == (0, len(messy["failures"]))  # still broken
    assert result.skipped == len(messy["written"])
    same_store(result.store, FeatureStore.open(messy["store"]))


def test_a_fixed_file_is_extracted_on_the_rerun_and_leaves_the_failures(tmp_path):
    make_image_tree(tmp_path / "data", per_class=2, unicode_name=False)
    broken = tmp_path / "data" / "cat" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    first = run_extract(make_cfg(tmp_path / "data", tmp_path / "o"))
    assert [k for k, _ in first.store.failures] == ["cat/broken.jpg"]
    save(random_image(40, 30, seed=7), broken)
    again = run_extract(make_cfg(tmp_path / "data", tmp_path / "o"))
    assert (again.written, again.failed, again.skipped) == (1, 0, first.written)
    assert again.store.failures == [] and len(again.store) == first.written + 1
    fresh = run_extract(make_cfg(tmp_path / "data", tmp_path / "fresh"))
    np.testing.assert_allclose(again.store.get("cat/broken.jpg"),
                               fresh.store.get("cat/broken.jpg"), atol=2e-3)


def test_a_folder_of_only_bad_files_gives_an_empty_store_not_a_crash(tmp_path):
    cases = add_bad_files(tmp_path / "data")
    cases["locked"].path.unlink()  # readable when running as root
    result = run_extract(make_cfg(tmp_path / "data", tmp_path / "o"))
    expected = {c.path.name for c in cases.values() if c.path.is_file()}
    assert (result.written, result.failed, result.skipped) == (0, len(expected), 0)
    assert len(result.store) == 0 and result.store.features.shape == (0, 96)
    assert {k for k, _ in result.store.failures} == expected


def test_folding_batchnorm_leaves_the_features_as_they_were(tmp_path):
    make_image_tree(tmp_path / "data", per_class=2, unicode_name=False)
    folded = run_extract(make_cfg(tmp_path / "data", tmp_path / "a", "output.dtype=float32"))
    plain = run_extract(make_cfg(tmp_path / "data", tmp_path / "b", "output.dtype=float32",
                                 "runtime.fold_bn=false"))
    assert folded.store.keys == plain.store.keys
    want = np.asarray(plain.store.features)
    np.testing.assert_allclose(folded.store.features, want, rtol=0,
                               atol=1e-4 * np.abs(want).max())


def test_bf16_autocast_features_are_the_fp32_features_within_bf16_rounding(tmp_path):
    make_image_tree(tmp_path / "data", per_class=2, unicode_name=False)
    half = run_extract(make_cfg(tmp_path / "data", tmp_path / "bf16", "output.dtype=float32",
                                "runtime.precision=bf16"))
    full = run_extract(make_cfg(tmp_path / "data", tmp_path / "fp32", "output.dtype=float32"))
    assert half.store.meta["runtime"]["precision"] == "bf16"
    want = np.asarray(full.store.features)
    got = np.asarray(half.store.features)
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=0, atol=0.02 * scale)  # bf16: 8-bit mantissa
    assert np.abs(got - want).max() > 0  # autocast really ran in bf16


def test_a_rerun_after_deleting_files_keeps_their_rows_and_says_so(tmp_path):
    make_image_tree(tmp_path / "data", per_class=2, unicode_name=False)
    first = run_extract(make_cfg(tmp_path / "data", tmp_path / "o"))
    gone = sorted(first.store.keys)[0]
    (tmp_path / "data" / gone).unlink()
    again = run_extract(make_cfg(tmp_path / "data", tmp_path / "o"))
    assert (again.written, again.skipped, again.stale) == (0, first.written - 1, 1)
    assert gone in again.store.keys and first.stale == 0
    assert "1 stored items are not in this run's data" in again.summary()
    assert "not in this run's data" not in first.summary()


def test_the_same_root_named_relatively_resumes_the_store(tmp_path, monkeypatch):
    make_image_tree(tmp_path / "data", per_class=1, unicode_name=False)
    first = run_extract(make_cfg(tmp_path / "data", tmp_path / "o"))
    monkeypatch.chdir(tmp_path)
    again = run_extract(make_cfg(Path("data"), tmp_path / "o"))
    assert (again.written, again.skipped) == (0, first.written)


# ---------------------------------------------------------------------------------------
# Clear errors
# ---------------------------------------------------------------------------------------


def test_empty_folder_and_missing_root_exit_2_before_touching_the_store(tmp_path):
    config = write_config(tmp_path / "cfg.yaml")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    code, _, err = cli(config, f"data.root={tmp_path / 'empty'}", f"output.dir={tmp_path / 'o'}")
    assert code == 2
    assert err.startswith("error: no images with extensions") and "notes.txt" in err
    assert "data.root" in err and "Traceback" not in err
    code, _, err = cli(config, f"data.root={tmp_path / 'nope'}", f"output.dir={tmp_path / 'o'}")
    assert code == 2
    assert "data.root" in err and "does not exist" in err and str(tmp_path / "nope") in err
    assert not (tmp_path / "o").exists()  # failed before the model or the store


def test_store_of_another_configuration_is_refused_and_overwrite_replaces_it(tmp_path):
    make_image_tree(tmp_path / "data", per_class=2)
    config = write_config(tmp_path / "cfg.yaml")
    args = [config, f"data.root={tmp_path / 'data'}", f"output.dir={tmp_path / 's'}"]
    assert cli(*args)[0] == 0
    before = (tmp_path / "s" / "meta.json").read_text(encoding="utf-8")
    for change, named in [("model.pool=max", "pool"),  # another cut/pooling
                          ("model.name=test_efficientnet", "backbone"),
                          ("preprocess.input_size=[40,40]", "preprocess.input_size"),
                          ("preprocess.resize=squash", "preprocess.crop_mode"),
                          ("preprocess.window=image", "preprocess.window")]:  # other pixels
        code, _, err = cli(*args, change)
        assert code == 2, change
        assert "written with another configuration" in err and named in err, err
        assert "output.overwrite=true" in err
        assert (tmp_path / "s" / "meta.json").read_text(encoding="utf-8") == before
    code, out, err = cli(*args, "model.pool=max", "output.overwrite=true")
    assert code == 0, err
    store = FeatureStore.open(tmp_path / "s")
    assert store.meta["pool"] == "max" and store.meta["fingerprint"]["pool"] == "max"
    assert summary_counts(out) == (len(store), 0, 0) and len(store.meta["shards"]) == 1


def test_bad_runtime_choices_are_config_errors(tmp_path):
    make_image_tree(tmp_path / "data", per_class=1, unicode_name=False)
    with pytest.raises(ConfigError, match="output.views=0"):
        run_extract(make_cfg(tmp_path / "data", tmp_path / "o", "runtime.gpu_decode=true",
                             "output.views=1"))
    with pytest.raises(ConfigError, match="interpolation"):
        run_extract(make_cfg(tmp_path / "data", tmp_path / "o", "runtime.gpu_decode=true",
                             "preprocess.interpolation=lanczos"))


# ---------------------------------------------------------------------------------------
# Interrupts and resume mechanics (subprocess kills are in test_resume.py)
# ---------------------------------------------------------------------------------------


def test_resume_positions_recompute_whole_batches():
    keys = [f"k{i}" for i in range(10)]
    assert resume_positions(keys, frozenset(), 4) == list(range(10))
    assert resume_positions(keys, frozenset(keys[:5]), 4) == [4, 5, 6, 7, 8, 9]
    assert resume_positions(keys, frozenset(keys[:4]), 4) == [4, 5, 6, 7, 8, 9]
    assert resume_positions(keys, frozenset(keys[:8] + ["k9"]), 4) == [8, 9]
    assert resume_positions(keys, frozenset(keys), 4) == []
    assert aligned_batches([4, 5, 6, 7, 8, 9], 4) == [[0, 1, 2, 3], [4, 5]]


def test_keyboard_interrupt_leaves_a_store_that_resumes_identically(messy, tmp_path,
                                                                     monkeypatch):
    """KeyboardInterrupt from inside the loop: finished shards stay; the rerun feeds the model
    exactly the batches the uninterrupted run did and ends identical, value for value."""
    from transferlab.models import engine as extract

    cfg = load_config(messy["store"] / "config.yaml", [f"output.dir={tmp_path / 's'}"],
                      ExtractConfig)
    sizes: list[int] = []
    start = extract.FeatureComputer.start
    monkeypatch.setattr(extract.FeatureComputer, "start",
                        lambda self, images: (sizes.append(len(images)), start(self, images))[1])

    def interrupt(n_done: int) -> None:
        if n_done >= 13:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_extract(cfg, on_batch=interrupt)
    with pytest.raises(StoreError, match="unfinished"):
        FeatureStore.open(tmp_path / "s")
    shards = sorted((tmp_path / "s" / "shards").glob("shard-*.json"))
    assert len(shards) >= 1  # the full ones were written, not lost with the writer thread
    sizes.clear()
    result = run_extract(cfg)
    assert result.skipped > 0 and result.written > 0
    assert result.written + result.skipped + result.failed == (
        len(messy["written"]) + len(messy["failures"]))
    same_store(result.store, FeatureStore.open(messy["store"]))
    resumed = list(sizes)
    sizes.clear()
    run_extract(load_config(messy["store"] / "config.yaml", [f"output.dir={tmp_path / 'ref'}"],
                            ExtractConfig))
    # the same batches, whole: the rest of the run plus the earlier ones with a failed file
    # (tried again); in the uninterrupted run's order
    rest = iter(sizes)
    assert all(any(n == m for m in rest) for n in resumed), (resumed, sizes)
    assert resumed[-1] == sizes[-1]


def test_a_transform_error_is_a_failure_not_a_crash(tmp_path):
    make_image_tree(tmp_path / "data", per_class=1, unicode_name=False)
    cfg = make_cfg(tmp_path / "data", tmp_path / "o")
    from transferlab.data.sources import build_dataset

    seed_everything(0)
    spec = extractor_from_config(cfg.model, cfg.preprocess).spec
    views = ViewsDataset(build_dataset(cfg.data, None, "RGB", (33, 33)), spec, 0, 0)
    views.plain = lambda image: (_ for _ in ()).throw(ValueError("odd image"))
    item = views[0]
    assert item["image"] is None
    assert item["error"] == "transform-failed: ValueError: odd image"


def test_threaded_batch_decoding_equals_reading_one_by_one(messy):
    """The main-process loader decodes a batch in threads: same items, order, failures and
    pixels as one by one, and the process's warning filters are left as they were."""
    from transferlab.data.sources import build_dataset

    cfg = load_config(messy["store"] / "config.yaml", [], ExtractConfig)
    spec = extractor_from_config(cfg.model, cfg.preprocess).spec
    base = build_dataset(cfg.data, None, "RGB", spec.scale_size())
    one, threaded = (ViewsDataset(base, spec, 0, 0, decode_threads=n) for n in (1, 3))
    filters = list(warnings.filters)
    indices = list(range(len(base)))[::-1]  # any order: the batch keeps it
    got, want = threaded.__getitems__(indices), one.__getitems__(indices)
    assert warnings.filters == filters
    assert [g["key"] for g in got] == [base.keys[i] for i in indices]
    assert [g["error"] for g in got] == [w["error"] for w in want]
    assert any(w["error"] for w in want) and any(w["image"] is not None for w in want)
    for g, w in zip(got, want):
        assert (g["image"] is None) == (w["image"] is None)
        if w["image"] is not None:
            assert torch.equal(g["image"], w["image"])


def test_extraction_decodes_in_threads_only_without_loader_workers(tmp_path):
    from transferlab.data.sources import build_dataset
    from transferlab.extract.runner import build_loader
    from transferlab.runtime.device import resolve_runtime

    make_image_tree(tmp_path / "data", per_class=2, unicode_name=False)
    for workers, threads in ((0, 2), (1, 1)):
        cfg = make_cfg(tmp_path / "data", tmp_path / "o", "runtime.threads=2",
                       f"runtime.num_workers={workers}")
        spec = extractor_from_config(cfg.model, cfg.preprocess).spec
        data = build_dataset(cfg.data, None, "RGB", spec.scale_size())
        loader, _ = build_loader(cfg, data, list(range(len(data))), spec,
                                 resolve_runtime(cfg.runtime), 4)
        assert loader.dataset.decode_threads == threads
        assert sum(len(b["key"]) for b in loader) == len(data)


# ---------------------------------------------------------------------------------------
# Batched JPEG decoding (torchvision) with its CPU fallback
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpu_decoded(messy):
    cfg = load_config(messy["store"] / "config.yaml",
                      [f"output.dir={messy['tmp'] / 'gpu'}", "runtime.gpu_decode=true"],
                      ExtractConfig)
    return run_extract(cfg), cfg


def test_gpu_decode_is_close_to_the_pil_path_and_keeps_failures(messy, gpu_decoded):
    result, _ = gpu_decoded
    pil, gpu = FeatureStore.open(messy["store"]), result.store
    assert gpu.keys == pil.keys and (result.written, result.failed) == (len(pil), len(
        pil.failures))
    assert {k: r.split(":")[0] for k, r in gpu.failures} == messy["failures"]
    a, b = np.asarray(pil.features, np.float32), np.asarray(gpu.features, np.float32)
    scale = np.abs(a).mean()
    assert np.abs(a - b).mean() < 0.02 * scale  # resize kernels differ slightly
    jpeg = [i for i, k in enumerate(pil.keys) if k.startswith("good/") and k.endswith(".jpg")]
    assert np.abs(a[jpeg] - b[jpeg]).max() > 0  # ... so these really took the new path
    assert gpu.meta["fingerprint"]["decode"] == "torchvision"


def test_gpu_decode_store_refuses_pil_rows(messy, gpu_decoded):
    cfg = load_config(messy["store"] / "config.yaml", [f"output.dir={gpu_decoded[0].out_dir}"],
                      ExtractConfig)
    with pytest.raises(StoreError, match="decode"):
        run_extract(cfg)


def test_read_jpeg_sends_awkward_files_to_pil(messy):
    from transferlab.data.gpudecode import read_jpeg

    root = messy["root"]
    assert read_jpeg(root / "good/cat/0000.jpg", 10**8) is not None
    assert read_jpeg(root / "special/gray.jpg", 10**8) is not None
    for key in ("special/cmyk.jpg", "special/exif6.jpg", "good/dog/0001.png", "bad/zero.jpg",
                "bad/truncated.jpg", "bad/header_only.jpg", "bad/corrupt_header.jpg",
                "bad/text.jpg", "bad/missing.jpg"):
        assert read_jpeg(root / key, 10**8) is None, key
    assert read_jpeg(root / "good/cat/0000.jpg", 100) is None  # above max_pixels


def test_decoder_rejections_fall_back_to_the_pil_path_exactly(messy, monkeypatch):
    """Files the batched decoder rejects are decoded by PIL: features equal the PIL store's."""
    from transferlab.data.gpudecode import BatchDecoder

    monkeypatch.setattr(BatchDecoder, "decode", lambda self, data: [None] * len(data))
    cfg = load_config(messy["store"] / "config.yaml",
                      [f"output.dir={messy['tmp'] / 'fallback'}", "runtime.gpu_decode=true"],
                      ExtractConfig)
    store, pil = run_extract(cfg).store, FeatureStore.open(messy["store"])
    assert store.keys == pil.keys and store.failures == pil.failures
    assert np.array_equal(np.asarray(store.features), np.asarray(pil.features))


@pytest.mark.parametrize("resize,crop_pct", [("center_crop", 0.875), ("squash", 1.0)])
def test_tensor_resize_crop_matches_timm_geometry(tmp_path, resize, crop_pct):
    from transferlab.config import PreprocessConfig
    from transferlab.data.gpudecode import BatchDecoder
    from transferlab.data.preprocess import build_transform, resolve_preprocess

    spec = resolve_preprocess({"interpolation": "bicubic"}, PreprocessConfig(
        resize=resize, input_size=[40, 40], crop_pct=crop_pct))
    path = save(random_image(150, 90, seed=7), tmp_path / "wide.jpg", quality=95)
    pil = build_transform(spec, normalize=False)(load_image(path)).float()
    data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
    decoder = BatchDecoder(spec, "cpu", None)
    tensor = decoder.resize_crop(decoder.decode([data])[0]).float()
    assert tensor.shape == pil.shape == (3, 40, 40)
    assert (tensor - pil).abs().mean() < 2.0  # of 255: kernels differ, geometry does not
    shifted = torch.roll(pil, 2, dims=2)  # a 2-pixel misalignment is clearly worse
    assert (tensor - shifted).abs().mean() > 2 * (tensor - pil).abs().mean()


def test_inf_nan_features_stop_the_run_in_one_line_keeping_finished_shards(tmp_path,
                                                                            monkeypatch):
    """The engine refuses non-finite rows (its line names no store: predict runs it too);
    extraction adds what a rerun does, and the rerun continues after the finished shard."""
    from transferlab.errors import ComputeError
    from transferlab.models.engine import FeatureComputer

    root = tmp_path / "img"
    for i in range(3):
        save(random_image(32, 32, seed=i), root / "a" / f"{i}.png")
    real = FeatureComputer.finish
    calls = []

    def poisoned(self, pending):
        calls.append(1)
        if len(calls) == 2:
            rows, ready = pending
            poisoned_rows = rows[0].clone()
            poisoned_rows[0, 0] = float("nan")
            pending = ([poisoned_rows, *rows[1:]], ready)
        return real(self, pending)

    monkeypatch.setattr(FeatureComputer, "finish", poisoned)
    with pytest.raises(ComputeError, match=r"inf/NaN features in fp32; check the weights "
                                           r"and the input \(finished shards are kept\)$"):
        run_extract(make_cfg(root, tmp_path / "out", "runtime.batch_size=1",
                             "output.shard_size=1"))
    monkeypatch.undo()
    resumed = run_extract(make_cfg(root, tmp_path / "out", "runtime.batch_size=1",
                                   "output.shard_size=1"))
    assert resumed.skipped == 1 and resumed.written == 2

"""Fine-tuning: the MNIST split experiment, frozen base, feature cache, determinism,
checkpoints, partial unfreeze, folder config and the errors of bad input."""
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.helpers import MNIST, tiny, write_digit_folder
from transferlab.commands.finetuning import command
from transferlab.config import FinetuneConfig, TrainConfig, load_config
from transferlab.errors import ConfigError, DataError, HeadError, ModelError
from transferlab.finetune.run import run_finetune
from transferlab.models.checkpoint import read_checkpoint, save_checkpoint
from transferlab.models.classifier import Classifier, load_model
from transferlab.models.lenet import lenet
from transferlab.runtime.device import resolve_runtime
from transferlab.training.feeds import TensorSource
from transferlab.training.loop import fit, make_optimizer, make_scheduler

ROOT = Path(__file__).resolve().parents[2]


def head_tensors(path):
    return {k: v for k, v in load_file(str(path)).items() if k.startswith("head.")}


def base_tensors(path):
    return {k[5:]: v for k, v in load_file(str(path)).items() if k.startswith("base.")}


# ---------------------------------------------------------------------------------------
# The MNIST experiment
# ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_mnist_split_experiment_on_the_bundled_digits(tmp_path, capsys):
    """The whole configs/mnist_split.yaml: no full MNIST here, so it falls back to the bundle."""
    out = tmp_path / "mnist"
    start = time.perf_counter()
    result = command([str(ROOT / "configs" / "mnist_split.yaml"), f"output.dir={out}",
                   f"data.root={tmp_path / 'no_mnist'}", "runtime.progress=false"])
    elapsed = time.perf_counter() - start
    printed = capsys.readouterr().out
    assert "mnist-5k" in printed and "not available" in printed
    for stage in ("pretrain", "head-only", "probe"):
        assert stage in printed
    acc = {s.stage: s.accuracy for s in result.stages}
    assert acc["pretrain"] >= 0.98, acc
    assert acc["head-only"] >= 0.96, acc
    assert acc["probe"] >= 0.97, acc
    assert [s.train_samples for s in result.stages] == [2000, 2000, 1000]
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["data_source"] == "mnist-5k" and "mnist-5k" in summary["data"]
    assert [s["stage"] for s in summary["stages"]] == ["pretrain", "head-only", "probe"]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {x["stage"] for x in lines} == {"pretrain", "head"}
    # the pretrain checkpoint is a backbone checkpoint that model.source=checkpoint reuses
    state, meta = read_checkpoint(out / "pretrain.safetensors")
    assert meta["backbone"]["name"] == "lenet" and meta["backbone"]["num_classes"] == 5
    from transferlab.config import ModelConfig
    from transferlab.models.backbones import build_backbone
    rebuilt = build_backbone(ModelConfig(name=str(out / "pretrain.safetensors"),
                                         source="checkpoint")).model
    assert torch.equal(rebuilt[0].weight, state["0.weight"])
    # the fine-tune used it: its base equals the pretrained first seven layers
    base = base_tensors(out / "model.safetensors")
    assert torch.equal(base["body.0.weight"], state["0.weight"])
    saved = load_config(out / "config.yaml", None, FinetuneConfig)
    assert saved.model.source == "checkpoint" and saved.data.source == "mnist-5k"
    conf = json.loads((out / "confusion.json").read_text())
    assert conf["classes"] == ["5", "6", "7", "8", "9"]
    assert np.trace(conf["matrix"]) / np.sum(conf["matrix"]) == pytest.approx(acc["head-only"])
    # the pretrain checkpoint is also a classifier of digits 0-4
    source_model = load_model(out / "pretrain.safetensors")
    assert source_model.class_names == ["0", "1", "2", "3", "4"]
    with np.load(MNIST) as data:
        images, labels = data["images"], data["labels"]
    rows = _mnist_test_rows(labels, (0, 4))
    pred = source_model.predict_proba(torch.from_numpy(images[rows][:, None].copy())).argmax(1)
    assert float((pred.numpy() == labels[rows]).mean()) == pytest.approx(acc["pretrain"])
    print(f"mnist split: {acc}, {elapsed:.1f} s")


def write_idx(path, array):
    """An MNIST idx file (ubyte) of ``array``."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, np.uint8).tobytes())


@pytest.mark.slow
def test_mnist_split_uses_mnist_files_on_disk_with_the_original_epochs(tmp_path, capsys):
    """MNIST idx files under data.root (here the bundled digits in that format): no fallback,
    3 pretrain epochs and 1 head-only epoch as in the original experiment."""
    from transferlab.data.sources import mnist_5k_split

    with np.load(MNIST) as data:
        images, labels = data["images"], data["labels"]
    root = tmp_path / "mnist"
    root.mkdir()
    for split, prefix in (("train", "train"), ("test", "t10k")):
        rows = mnist_5k_split(labels, split)
        write_idx(root / f"{prefix}-images-idx3-ubyte", images[rows])
        write_idx(root / f"{prefix}-labels-idx1-ubyte", labels[rows])
    result = command([str(ROOT / "configs" / "mnist_split.yaml"), f"data.root={root}",
                   f"output.dir={tmp_path / 'out'}", "runtime.progress=false"])
    printed = capsys.readouterr().out
    assert "torchvision MNIST" in printed and "not available" not in printed
    assert [s.epochs for s in result.stages] == [3, 1, None]
    assert result.config.data.source == "torchvision"
    assert all(s.accuracy > 0.9 for s in result.stages)


# ---------------------------------------------------------------------------------------
# Frozen base, cache, determinism
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("cache", ["off", "memory"])
def test_frozen_base_is_bit_identical_after_training(tmp_path, cache):
    """A BatchNorm model (timm test_resnet): weights and running statistics unchanged."""
    import timm
    from safetensors.torch import save_file

    root = write_digit_folder(tmp_path / "digits", per_class=6)
    model = timm.create_model("test_resnet", pretrained=False)
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    cfg = load_config(None, ["model.name=test_resnet", f"model.weights={weights}",
                             "preprocess.input_size=[32, 32]", "data.source=folder",
                             f"data.root={root}", "head.dropout=0.5", "train.epochs=2",
                             "train.batch_size=4", "train.lr=0.1", f"train.cache={cache}",
                             "runtime.progress=false", f"output.dir={tmp_path / 'out'}"],
                      FinetuneConfig)
    result = run_finetune(cfg)
    assert result.stage("head-only").details["cache"] == ("off" if cache == "off" else "cpu")
    base = base_tensors(tmp_path / "out" / "model.safetensors")
    before = {f"body.model.{k}": v for k, v in model.state_dict().items()}
    assert set(base) == set(before)
    for key, value in before.items():
        assert torch.equal(base[key], value), key
    assert any("running_mean" in k for k in base)


@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_cached_and_uncached_training_give_the_same_head(tmp_path, cache):
    # fp32: under bf16 autocast the base rounds differently in other batch shapes
    common = ["head.dropout=0.3", "train.epochs=3", "train.val_split=0.2",
              "runtime.precision=fp32"]
    cached = run_finetune(tiny(tmp_path, *common, f"train.cache={cache}", name="cached"))
    plain = run_finetune(tiny(tmp_path, *common, "train.cache=off", name="plain"))
    assert cached.stage("head-only").details["cache"] == ("cpu" if cache == "memory" else "disk")
    assert plain.stage("head-only").details["cache"] == "off"
    a, b = head_tensors(cached.checkpoint), head_tensors(plain.checkpoint)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    assert cached.history[-1]["input"] == "features" and plain.history[-1]["input"] == "images"
    assert cached.stage("head-only").accuracy == pytest.approx(plain.stage("head-only").accuracy)
    if cache == "disk":
        assert (tmp_path / "cached" / "cache" / "train" / "meta.json").is_file()


def test_augmentation_runs_the_frozen_base_every_step_without_cache(tmp_path):
    result = run_finetune(tiny(tmp_path, "train.augment=true", "train.epochs=1"))
    stage = result.stage("head-only")
    assert stage.details["cache"] == "off" and result.history[0]["input"] == "images"
    torch.manual_seed(0)
    fresh = lenet(num_classes=10)
    base = base_tensors(result.checkpoint)
    assert all(torch.equal(base[f"body.{k}"], v) for k, v in fresh[:7].state_dict().items())


def test_in_memory_pixels_equal_the_decoded_and_transformed_images():
    """The fast path for array datasets skips PIL and transforms: it must give the same
    pixels as the generic path."""
    from transferlab.config import DataConfig, ModelConfig
    from transferlab.data.preprocess import build_transform, resolve_preprocess
    from transferlab.data.sources import build_dataset
    from transferlab.finetune.labelled import array_pixels
    from transferlab.models.backbones import build_backbone

    spec = resolve_preprocess(build_backbone(ModelConfig(name="lenet")).data_config)
    ds = build_dataset(DataConfig(source="mnist-5k", classes=[3, 8]), image_mode="L")
    rows = np.arange(0, len(ds), 97)
    fast = array_pixels(ds.subset(rows), spec)
    tf = build_transform(spec, normalize=False)
    slow = torch.stack([tf(ds.load_image(int(i))) for i in rows])
    assert fast.dtype == torch.uint8 and torch.equal(fast, slow)


def test_the_cached_base_runs_once_whatever_the_number_of_epochs(tmp_path, monkeypatch):
    """Work, not wall time (the machine may be busy): count the frozen base's forward calls."""
    from transferlab.models.cuts import FrozenExtractor

    calls = []
    real = FrozenExtractor.forward
    monkeypatch.setattr(FrozenExtractor, "forward",  # batch 1: the cut's dummy shape check
                        lambda self, x: (len(x) > 1 and calls.append(len(x))) or real(self, x))
    for epochs in (1, 4):
        calls.clear()
        run_finetune(tiny(tmp_path, f"train.epochs={epochs}", name=f"e{epochs}"))
        assert sum(calls) == 1200 + 300  # train and test items, once each
    calls.clear()
    run_finetune(tiny(tmp_path, "train.epochs=4", "train.cache=off", name="off"))
    assert sum(calls) == 4 * 1200 + 300  # every epoch, plus the test set once


def test_same_seed_same_result_and_another_seed_differs(tmp_path):
    args = ["head.dropout=0.2", "train.schedule=cosine"]
    one = run_finetune(tiny(tmp_path, *args, name="a"))
    two = run_finetune(tiny(tmp_path, *args, name="b"))
    other = run_finetune(tiny(tmp_path, *args, "runtime.seed=1", name="c"))
    ha, hb, hc = (head_tensors(r.checkpoint) for r in (one, two, other))
    assert all(torch.equal(ha[k], hb[k]) for k in ha)
    assert not all(torch.equal(ha[k], hc[k]) for k in ha)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in one.history]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in two.history]


# ---------------------------------------------------------------------------------------
# Checkpoints and outputs
# ---------------------------------------------------------------------------------------


def test_checkpoint_round_trip_gives_identical_predictions(tmp_path):
    result = run_finetune(tiny(tmp_path, "head.type=keep"))
    model = load_model(result.checkpoint)
    assert not model.training and model.class_names == ["5", "6", "7"]
    assert model.preprocess.input_size == (1, 28, 28)
    with np.load(MNIST) as data:
        images, labels = data["images"], data["labels"]
    rows = np.flatnonzero((labels >= 5) & (labels <= 7))[::30]
    pixels = torch.from_numpy(images[rows][:, None].copy())
    probs = model.predict_proba(pixels)
    again = load_model(result.checkpoint).predict_proba(pixels)
    assert torch.equal(probs, again)
    as_pil = model.predict([Image.fromarray(images[r]) for r in rows])
    assert [p[0] for p in as_pil] == [model.class_names[i] for i in probs.argmax(1)]
    assert np.allclose([p[1] for p in as_pil], probs.max(1).values.numpy())
    # the loaded model reproduces the confusion matrix the training run wrote
    conf = json.loads((tmp_path / "run" / "confusion.json").read_text())
    test_rows = _mnist_test_rows(labels)
    pred = model.predict_proba(torch.from_numpy(images[test_rows][:, None].copy())).argmax(1)
    target = labels[test_rows] - 5
    matrix = np.zeros((3, 3), int)
    np.add.at(matrix, (target, pred.numpy()), 1)
    assert matrix.tolist() == conf["matrix"]


def _mnist_test_rows(labels, digits=(5, 7)):
    from transferlab.data.sources import mnist_5k_split

    rows = mnist_5k_split(labels, "test")
    return rows[(labels[rows] >= digits[0]) & (labels[rows] <= digits[1])]


def test_outputs_metrics_lines_confusion_csv_and_config(tmp_path):
    result = run_finetune(tiny(tmp_path, "train.val_split=0.25"))
    out = tmp_path / "run"
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2]
    assert {"train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"} <= set(lines[0])
    csv_rows = (out / "confusion.csv").read_text().splitlines()
    assert csv_rows[0] == "true\\predicted,5,6,7" and len(csv_rows) == 4
    assert load_config(out / "config.yaml", None, FinetuneConfig) == result.config
    assert result.stage("head-only").train_samples == 900  # 1,200 minus the validation quarter
    _, meta = read_checkpoint(result.checkpoint)
    assert meta["cut"] == "first:7" and meta["class_names"] == ["5", "6", "7"]
    assert meta["preprocess"]["input_size"] == [1, 28, 28]
    assert meta["config"]["train"]["val_split"] == 0.25 and meta["epoch"] == 2


def test_interrupt_leaves_the_last_epoch_checkpoint_loadable(tmp_path, monkeypatch):
    import transferlab.finetune.stages as ft

    calls = {"n": 0}
    real = ft.save_classifier

    def save_then_interrupt(*args, **kwargs):
        real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(ft, "save_classifier", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_finetune(tiny(tmp_path, "train.epochs=5", "output.save_interval_s=0"))
    model = load_model(tmp_path / "run" / "model.safetensors")
    assert model.meta["epoch"] == 2
    assert not list((tmp_path / "run").glob("*.tmp"))


@pytest.mark.parametrize("interval, saves", [(0, 5), (3600, 1)])
def test_checkpoints_are_rewritten_at_most_every_save_interval(tmp_path, monkeypatch, interval,
                                                               saves):
    """Fast epochs (cached features) must not each rewrite the whole frozen base: with an
    hour between writes only the final checkpoint is written; 0 writes after every epoch."""
    import transferlab.finetune.stages as ft

    epochs = []
    real = ft.save_classifier

    def counting(path, base, head, meta):
        epochs.append(meta["epoch"])
        return real(path, base, head, meta)

    monkeypatch.setattr(ft, "save_classifier", counting)
    run_finetune(tiny(tmp_path, "train.epochs=4", f"output.save_interval_s={interval}"))
    assert len(epochs) == saves and epochs[-1] == 4
    assert load_model(tmp_path / "run" / "model.safetensors").meta["epoch"] == 4


def test_negative_save_interval_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"^output.save_interval_s must be 0 \(every epoch\) "
                                          r"or more, got -1.0"):
        run_finetune(tiny(tmp_path, "output.save_interval_s=-1"))


def test_partial_unfreeze_trains_only_the_last_layers(tmp_path):
    result = run_finetune(tiny(tmp_path, "unfreeze.layers=1", "unfreeze.epochs=1",
                               "unfreeze.lr_mult=0.5", "head.type=keep"))
    stage = result.stage("fine-tune")
    assert stage.details["unfrozen"] == ["3"] and stage.epochs == 3
    assert [r["phase"] for r in result.history] == ["head", "head", "unfreeze"]
    assert result.history[-1]["input"] == "images"  # no cache in the unfreeze phase
    torch.manual_seed(0)
    fresh = lenet(num_classes=10)
    base = base_tensors(result.checkpoint)
    assert torch.equal(base["body.0.weight"], fresh[0].weight)  # still frozen
    assert not torch.equal(base["body.3.weight"], fresh[3].weight)  # trained in phase 2


def test_after_unfreezing_evaluation_and_probe_use_the_trained_base_not_the_cache(
        tmp_path, monkeypatch):
    """The cached features belong to the base before phase 2 trained it: the validation
    score and the probe after it run the images through the trained base."""
    import transferlab.finetune.stages as stages

    seen, real = [], stages.evaluate
    monkeypatch.setattr(stages, "evaluate", lambda net, src, *a: seen.append(src.kind)
                        or real(net, src, *a))
    cfg = load_config(None, [
        "model.name=lenet", "model.cut=first:7", "data.source=mnist-5k",
        "data.classes=[5, 6]", "head.type=keep", "train.epochs=1",
        "train.val_split=0.2", "train.cache=memory", "unfreeze.layers=1", "unfreeze.epochs=1",
        "probe.samples=100", "runtime.progress=false", f"output.dir={tmp_path / 'run'}"],
        FinetuneConfig)
    result = run_finetune(cfg)
    stage = result.stage("fine-tune")
    assert stage.details["cache"] == "cpu" and stage.held_out == "validation"
    assert seen[-1] == "images"  # the score of the final network: images, not the cache
    assert result.stage("probe").details["features_cached"] is False


def test_unfreeze_more_layers_than_the_base_has(tmp_path):
    with pytest.raises(ConfigError, match=r"unfreeze.layers=5 but the base has only 2 layers "
                                          r"with weights \(0, 3\)"):
        run_finetune(tiny(tmp_path, "unfreeze.layers=5", "unfreeze.epochs=1"))


# ---------------------------------------------------------------------------------------
# Training loop pieces
# ---------------------------------------------------------------------------------------


def test_schedules_cosine_reaches_zero_and_step_decays():
    p = [torch.nn.Parameter(torch.zeros(1))]
    cfg = TrainConfig(epochs=4, lr=1.0, schedule="cosine")
    opt = make_optimizer([{"params": p}], cfg)
    sched = make_scheduler(opt, cfg, steps_per_epoch=5)
    for _ in range(20):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-9)
    cfg = TrainConfig(epochs=4, lr=1.0, schedule="step", step_epochs=2, step_gamma=0.5)
    opt = make_optimizer([{"params": p}], cfg)
    sched = make_scheduler(opt, cfg, steps_per_epoch=5)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 1.0 and lrs[9] == 1.0 and lrs[10] == 0.5
    assert isinstance(make_optimizer([{"params": p}], TrainConfig(optimizer="sgd")),
                      torch.optim.SGD)


def test_early_stopping_stops_and_restores_the_best_epoch():
    """Random labels: validation loss rises as the head memorises, so training stops."""
    from transferlab.config import RuntimeConfig
    from transferlab.data.preprocess import PreprocessSpec

    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 32, generator=g)
    y = torch.randint(0, 4, (200,), generator=g)
    rt = resolve_runtime(RuntimeConfig(device="cpu"))
    spec = PreprocessSpec((1, 1, 1), "bilinear", (0.0,), (1.0,), 1.0, "squash", "squash")
    head = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.ReLU(), torch.nn.Linear(256, 4))
    net = Classifier(torch.nn.Identity(), head, list("abcd"), spec)
    src = TensorSource(x, y, "features", rt.device)
    train, val = src.subset(np.arange(150)), src.subset(np.arange(150, 200))
    cfg = TrainConfig(epochs=40, lr=0.01, batch_size=16, val_split=0.25, early_stopping=2)
    res = fit(net, train, val, cfg, rt, [{"params": list(head.parameters())}],
              torch.Generator().manual_seed(0))
    assert res.stopped_early and res.epochs_run < 40
    best = min(r["val_loss"] for r in res.history)
    assert res.history[res.best_epoch - 1]["val_loss"] == best
    from transferlab.training.loop import evaluate
    assert evaluate(net, val, 64, rt).loss == pytest.approx(best, rel=1e-5)


def test_early_stopping_without_validation_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="train.early_stopping needs a validation split"):
        run_finetune(tiny(tmp_path, "train.early_stopping=2"))


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_amp_training_on_cuda(tmp_path, cuda, precision):
    result = run_finetune(tiny(tmp_path, "runtime.device=cuda", f"runtime.precision={precision}",
                               "train.epochs=3"))
    stage = result.stage("head-only")
    assert stage.details["cache"] == "device"
    assert np.isfinite(result.history[-1]["train_loss"]) and stage.accuracy > 0.5


# ---------------------------------------------------------------------------------------
# The folder config with a timm backbone
# ---------------------------------------------------------------------------------------


def test_folder_finetune_config_on_a_generated_folder(tmp_path):
    root = write_digit_folder(tmp_path / "images", per_class=10, classes=(1, 4, 8))
    out = tmp_path / "out"
    result = command([str(ROOT / "configs" / "folder_finetune.yaml"), f"data.root={root}",
                   "model.name=test_resnet", "model.pretrained=false",
                   "preprocess.input_size=[32, 32]", "train.epochs=3", "train.batch_size=8",
                   "runtime.progress=false", f"output.dir={out}"])
    stage = result.stage("head-only")
    assert stage.held_out == "validation" and stage.train_samples == 24
    model = load_model(out / "model.safetensors")
    assert model.class_names == ["digit1", "digit4", "digit8"]
    assert model.preprocess.input_size == (3, 32, 32)
    preds = model.predict(sorted(root.rglob("*.png"))[:5])
    assert all(name in model.class_names and 0 < p <= 1 for name, p in preds)


# ---------------------------------------------------------------------------------------
# Bad input: clear errors
# ---------------------------------------------------------------------------------------


def test_an_empty_class_filter_is_refused_when_the_config_loads(tmp_path):
    with pytest.raises(ConfigError, match=r"^data.classes must be a non-empty list"):
        tiny(tmp_path, "data.classes=[]")


def test_class_filter_naming_an_unknown_label(tmp_path):
    with pytest.raises(DataError, match="label 42 matches no item"):
        run_finetune(tiny(tmp_path, "data.classes=[5, 42]"))


def test_a_single_class(tmp_path):
    with pytest.raises(DataError, match=r"only one class \(7\) in the data; a classifier needs "
                                        "at least two"):
        run_finetune(tiny(tmp_path, "data.classes=[7]"))


def test_labels_missing(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(4):
        Image.new("L", (28, 28), i * 40).save(flat / f"{i}.png")
    with pytest.raises(DataError, match=r"none of the 4 items .* has a label \(all -1\)"):
        run_finetune(tiny(tmp_path, "data.source=folder", f"data.root={flat}", "test=null",
                          "data.classes=null"))


def test_head_that_does_not_fit_the_cut(tmp_path):
    with pytest.raises(HeadError, match="the head does not fit the cut's output"):
        run_finetune(tiny(tmp_path, "head.type=keep", "model.cut=first:4", "model.pool=avg"))
    with pytest.raises(HeadError, match="head.in_features=500 does not fit"):
        run_finetune(tiny(tmp_path, "head.in_features=500"))


def test_checkpoint_from_another_model(tmp_path):
    state = {k: v for k, v in lenet(num_classes=5).state_dict().items()}
    ckpt = save_checkpoint(tmp_path / "lenet.safetensors", state,
                           {"backbone": {"name": "lenet", "source": "builtin", "num_classes": 5}})
    with pytest.raises(ModelError, match="is a checkpoint of model 'lenet', not 'test_resnet'"):
        run_finetune(tiny(tmp_path, "model.name=test_resnet", f"model.weights={ckpt}",
                          "model.cut=head"))
    # a classifier checkpoint whose tensors come from another model than its metadata names
    result = run_finetune(tiny(tmp_path))
    tensors, meta = read_checkpoint(result.checkpoint)
    tensors["base.body.0.weight"] = torch.zeros(8, 1, 3, 3)
    save_checkpoint(tmp_path / "altered.safetensors", tensors, meta)
    with pytest.raises(ModelError, match="does not hold the weights of the model its metadata "
                                         "names"):
        load_model(tmp_path / "altered.safetensors")


def test_cli_prints_one_line_error_and_exits_2(tmp_path, capsys):
    from transferlab.finetune.__main__ import main

    start = time.perf_counter()
    code = main([str(ROOT / "configs" / "mnist_split.yaml"), "data.source=mnist-5k",
                 "data.classes=[7]", f"output.dir={tmp_path}"])
    assert time.perf_counter() - start < 5  # checked before any training
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: data: only one class (7)")
    assert len(err.strip().splitlines()) == 1


def test_unknown_fallback_key_fails_before_training(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'train.epoch' in the 'fallback' section"):
        run_finetune(tiny(tmp_path, "fallback={train: {epoch: 3}}"))


def test_a_second_run_into_a_locked_output_dir_fails_at_once(tmp_path, capsys, monkeypatch):
    """Another process writing the directory holds its lock (here: another open file, as a
    second process would): the run exits 2 with one line and writes nothing there."""
    import fcntl
    import subprocess
    import sys

    from transferlab.finetune.__main__ import main

    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time\n"
        f"f = open({str(out / '.lock')!r}, 'a')\n"
        "fcntl.flock(f.fileno(), fcntl.LOCK_EX)\n"
        "print('held', flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.perf_counter()
        code = main([str(ROOT / "configs" / "mnist_split.yaml"), "data.source=mnist-5k",
                     f"output.dir={out}", "runtime.progress=false"])
        assert time.perf_counter() - start < 10  # refused before any training
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: another run is writing {out}") and "output.dir" in err
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # no metrics.jsonl, no config
    # released with its holder: the same directory works now, and stays locked during the run
    from transferlab.finetune.outputs import MetricsLog

    held, write = [], MetricsLog.write

    def write_and_try_the_lock(self, record):
        with open(out / ".lock", "a") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                held.append(record["epoch"])
        write(self, record)

    monkeypatch.setattr(MetricsLog, "write", write_and_try_the_lock)
    run_finetune(tiny(tmp_path, "train.epochs=1"))
    assert held == [1] and (out / "metrics.jsonl").read_text().count("\n") == 1


def test_an_output_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    from transferlab.finetune.__main__ import main

    (tmp_path / "run").write_text("my notes")
    code = main([str(ROOT / "configs" / "mnist_split.yaml"), "data.source=mnist-5k",
                 f"output.dir={tmp_path / 'run'}", "runtime.progress=false"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "is a file, not a directory; choose another output.dir" in err
    assert (tmp_path / "run").read_text() == "my notes"


def test_probe_val_fraction_errors_name_the_config_key(tmp_path):
    with pytest.raises(ConfigError, match=r"^probe.val_fraction must be between 0 and 1 "
                                          r"\(exclusive\), got 1.5 in <defaults>; try 0.2$") as exc:
        run_finetune(tiny(tmp_path, "probe.samples=50", "probe.val_fraction=1.5"))
    assert "--" not in str(exc.value)


def test_the_train_config_is_checked_once_per_run(tmp_path, monkeypatch):
    import transferlab.finetune.run as run_module

    calls = []
    real = run_module.check_train_config
    monkeypatch.setattr(run_module, "check_train_config",
                        lambda cfg, where="train", world_size=1: calls.append(where) or
                        real(cfg, where, world_size))
    run_finetune(tiny(tmp_path, "train.epochs=1", "unfreeze.layers=1", "unfreeze.epochs=1"))
    assert calls == ["train"]
    import inspect

    from transferlab.finetune import stages
    from transferlab.training import loop

    assert "check_train_config" not in inspect.getsource(stages)
    assert "check_train_config(" not in inspect.getsource(loop.fit)


def test_the_cut_lists_its_layers_and_the_dataset_its_pixels():
    from transferlab.config import DataConfig
    from transferlab.data.sources import build_dataset
    from transferlab.models.cuts import make_extractor

    cut = make_extractor(lenet(num_classes=10), "first:4", None, (1, 28, 28))
    assert [n for n, _ in cut.layers((1, 28, 28))] == ["0", "1", "2", "3"]
    ds = build_dataset(DataConfig(source="mnist-5k", classes=[3]), image_mode="L")
    px = ds.subset([0, 5]).pixels((28, 28))
    assert px.shape == (2, 1, 28, 28) and px.dtype == np.uint8
    assert np.array_equal(px[1, 0], np.asarray(ds.load_image(5)))
    assert ds.pixels((32, 32)) is None


def test_the_disk_cache_holds_the_rows_extraction_writes(tmp_path):
    """One engine: the caching pass and extraction of the same model, cut, preprocessing
    and runtime (BatchNorm folded, fp32) give the same rows, key by key."""
    import timm
    from safetensors.torch import save_file

    from transferlab.config import ExtractConfig
    from transferlab.extract.runner import run_extract
    from transferlab.store.reader import FeatureStore

    root = write_digit_folder(tmp_path / "digits", per_class=10)
    model = timm.create_model("test_resnet", pretrained=False)
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    shared = ["model.name=test_resnet", f"model.weights={weights}",
              "preprocess.input_size=[32, 32]", "data.source=folder", f"data.root={root}",
              "runtime.precision=fp32", "runtime.batch_size=8", "runtime.progress=false"]
    run_finetune(load_config(None, [*shared, "train.epochs=1", "train.cache=disk",
                                    f"output.dir={tmp_path / 'ft'}"], FinetuneConfig))
    run_extract(load_config(None, [*shared, "output.dtype=float32",
                                   f"output.dir={tmp_path / 'ex'}"], ExtractConfig))
    cache, store = FeatureStore.open(tmp_path / "ft" / "cache" / "train"), \
        FeatureStore.open(tmp_path / "ex")
    assert cache.meta["fingerprint"]["compute"] == store.meta["compute"]
    assert store.meta["compute"]["fold_bn"] is True and sorted(cache.keys) == store.keys
    rows = {k: i for i, k in enumerate(cache.keys)}
    got = np.asarray(cache.features)[[rows[k] for k in store.keys]]
    np.testing.assert_array_equal(got, np.asarray(store.features))

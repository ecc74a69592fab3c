"""Sizes a file claims (issue #24): a store's meta.json, a checkpoint's metadata, a model
folder's config.json and a recorded srp projection are bounded and cross-checked before
anything is built from them. Each case crafts the file and asserts one line (exit 2 for a
command), and where the claim would cost GBs that it is refused inside a memory limit."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from transferlab.config import ExtractConfig, HeadConfig, ModelConfig, load_config
from transferlab.data.preprocess import resolve_preprocess
from transferlab.errors import ConfigError, ModelError, StoreError
from transferlab.models.backbones import build_backbone
from transferlab.models.checkpoint import META_KEY, save_checkpoint
from transferlab.models.classifier import classifier_meta, load_model, save_classifier
from transferlab.models.heads import cut_with_head
from transferlab.models.lenet import LENET_DATA_CONFIG, lenet

ROOT = Path(__file__).resolve().parents[2]
BUDGET = 1 << 30  # what the calls may allocate beyond the imports in a bounded run

# One fresh interpreter per test runs a batch of calls: imports first (their mappings are
# not what is measured), then the address-space limit, then each call with its stderr
# captured: whatever a call allocates must fit in BUDGET (a 5e6-class LeNet head is 1.6 GiB).
RUNNER = textwrap.dedent(f"""
    import contextlib, io, json, resource, sys
    import numpy, torch, timm, torchvision
    import transferlab.commands.search, transferlab.predict, transferlab.inspect
    import transferlab.models.backbones, transferlab.extract.reduce
    from transferlab.config import ModelConfig
    from transferlab.errors import TransferlabError

    def build(name, source="auto"):
        transferlab.models.backbones.build_backbone(ModelConfig(name=name, source=source))
        return 0

    def srp(d_in, dim):
        transferlab.extract.reduce.SparseProjection(d_in, dim)
        return 0

    def allocate():
        torch.zeros(5_000_000, 84)  # what an unchecked claim of 5e6 classes allocates
        return 0

    COMMANDS = {{"search": transferlab.commands.search.main, "predict": transferlab.predict.main,
                 "build": build, "srp": srp, "allocate": allocate}}
    CLI = ("search", "predict")

    def vm_size():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024

    limit = vm_size() + {BUDGET}
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    results = []
    for command, args in json.loads(sys.argv[1]):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = COMMANDS[command](args) if command in CLI else COMMANDS[command](*args)
            except TransferlabError as exc:
                print(exc, file=sys.stderr)
                code = 2
            except (MemoryError, RuntimeError) as exc:  # torch: "can't allocate memory"
                code = f"{{type(exc).__name__}}: {{str(exc)[:200]}}"
        results.append([code, err.getvalue()])
    print(json.dumps(results))
""")


def bounded_calls(calls: list[tuple[str, list]], timeout: int = 300
                  ) -> list[tuple[int | str, str]]:
    """(exit code, stderr) of each (command, args) run under the memory limit."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(calls)],
                          capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [tuple(r) for r in json.loads(proc.stdout.strip().splitlines()[-1])]


def refused_in_one_line(result: tuple[int | str, str], *words: str, case: str = "") -> str:
    code, err = result
    err = err.strip()
    assert code == 2 and len(err.splitlines()) == 1, (case, code, err)
    assert "MemoryError" not in err and "Traceback" not in err, (case, err)
    for word in words:
        assert word in err, (case, err)
    return err


def one_line_exit_2(code, capsys) -> str:
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    return err


def test_the_memory_limit_of_these_tests_catches_a_large_allocation():
    """The control: the same harness fails what an unchecked claim allocates."""
    [(code, _)] = bounded_calls([("allocate", [])])
    assert isinstance(code, str) and ("MemoryError" in code or "allocate" in code), code


# ---------------------------------------------------------------------------------------
# A store's meta.json: the model the queries are embedded with
# ---------------------------------------------------------------------------------------


def edited_store(lenet_store, tmp_path, change, name="store") -> tuple[Path, str]:
    tmp, keys = lenet_store
    store_dir = Path(shutil.copytree(tmp / "store", tmp_path / name))
    meta = json.loads((store_dir / "meta.json").read_text())
    change(meta)
    (store_dir / "meta.json").write_text(json.dumps(meta))
    return store_dir, str(tmp / "data" / keys[0])


def srp_record(d_in, dim):
    return lambda m: m.update(reduce={"kind": "srp", "dims": [d_in, dim], "seed": 0})


# (what meta.json is changed to claim, the words of the one-line refusal)
STORE_CLAIMS = {
    "num_classes": (lambda m: m["config"]["model"].update(num_classes=5_000_000),
                    ["num_classes", "100,000"]),
    "kwargs-num_classes": (lambda m: m["config"]["model"].update(
        kwargs={"num_classes": 5_000_000}), ["num_classes=5000000", "lenet"]),
    "input_size": (lambda m: m["config"]["preprocess"].update(input_size=[1, 12000, 12000]),
                   ["input_size", "4096"]),
    "in_chans": (lambda m: m["config"]["model"].update(in_chans=10_000_000), ["in_chans"]),
    # a recorded srp projection: its dims against a bound, the cut and the rows
    "srp-dim>d_in": (srp_record(96, 50_000_000), ["output dims"]),
    "srp-huge-dim": (srp_record(800, 50_000_000), ["output dims"]),
    "srp-dim-vs-rows": (srp_record(800, 8), ["dims of the store's rows are 800"]),
    "srp-d_in-vs-cut": (srp_record(96, 96), ["features of the model's cut are 800"]),
    "srp-huge-d_in": (srp_record(2 ** 40, 800), ["input dims"]),
    "srp-text": (srp_record("800", 800), ["whole number"]),
}


def test_store_meta_sizes_are_refused_before_anything_is_built(lenet_store, tmp_path):
    calls = []
    for n, (change, _) in enumerate(STORE_CLAIMS.values()):
        store_dir, image = edited_store(lenet_store, tmp_path, change, f"store{n}")
        calls.append(("search", [str(store_dir), image, "-k", "1"]))
    for (case, (_, words)), result in zip(STORE_CLAIMS.items(), bounded_calls(calls)):
        refused_in_one_line(result, *words, case=case)


def test_store_meta_unknown_kwargs_are_one_line(lenet_store, tmp_path, capsys):
    from transferlab.commands.search import main as search_main

    store_dir, image = edited_store(
        lenet_store, tmp_path, lambda m: m["config"]["model"].update(kwargs={"depthx": 3}))
    err = one_line_exit_2(search_main([str(store_dir), image, "-k", "1"]), capsys)
    assert "'depthx'" in err and "lenet" in err


def test_rows_of_another_width_than_the_model_gives_are_refused(lenet_store, tmp_path,
                                                                 capsys):
    """meta.json describing a model whose features are not the store's rows: one line, not
    neighbours computed from another model's vectors."""
    from transferlab.commands.search import main as search_main
    from transferlab.extract.queries import embed_images
    from transferlab.store.reader import FeatureStore

    def change(meta):  # first:2 of LeNet: 20 x 24 x 24 features, not the head's 800
        meta["config"]["model"]["cut"] = "first:2"

    store_dir, image = edited_store(lenet_store, tmp_path, change)
    err = one_line_exit_2(search_main([str(store_dir), image, "-k", "1"]), capsys)
    assert "re-extract" in err
    with pytest.raises(StoreError, match="holds rows of 800 features"):
        embed_images(FeatureStore.open(store_dir).meta, [image], root=store_dir)


# ---------------------------------------------------------------------------------------
# srp on a very wide cut: what it needs, said before extracting
# ---------------------------------------------------------------------------------------


def test_srp_beyond_memory_is_refused_before_anything_is_drawn():
    [result] = bounded_calls([("srp", [1_605_632, 1_605_632])])
    refused_in_one_line(result, "srp:1605632 on a 1,605,632-d cut needs ~",
                        "choose srp:D with D <=")


def test_an_honest_srp_record_is_rebuilt_with_its_widths():
    from transferlab.extract.reduce import SparseProjection, reduction_from_record

    record = SparseProjection(800, 64, seed=3).record()
    assert reduction_from_record(record, None, 800, 64).sha256 == record["sha256"]
    assert reduction_from_record(record, None).sha256 == record["sha256"]  # widths unknown
    with pytest.raises(StoreError, match="dims of the store's rows are 65"):
        reduction_from_record(record, None, 800, 65)


def test_the_largest_srp_offered_fits(monkeypatch):
    from transferlab.extract import reduce

    monkeypatch.setattr(reduce, "available_memory", lambda: None)
    with pytest.raises(ConfigError) as exc:
        reduce.check_srp_memory(1_605_632, 1_605_632)
    most = int(str(exc.value).split("D <= ")[1].split(" ")[0].replace(",", ""))
    reduce.check_srp_memory(1_605_632, most)  # the D the message offers is accepted
    with pytest.raises(ConfigError):
        reduce.check_srp_memory(1_605_632, most + 2)
    monkeypatch.setattr(reduce, "available_memory", lambda: 64 << 20)  # a small machine
    with pytest.raises(ConfigError, match="this machine has available"):
        reduce.check_srp_memory(1_605_632, 4096)
    reduce.check_srp_memory(1_605_632, 256)


def test_srp_over_the_limit_refuses_the_run_before_extracting(tmp_path, monkeypatch, capsys):
    from tests.imagegen import make_image_tree
    from transferlab.commands.extraction import main as extract_main
    from transferlab.extract import reduce

    make_image_tree(tmp_path / "data", per_class=1)
    monkeypatch.setattr(reduce, "SRP_MAX_BYTES", 1 << 20)  # as a 1.6M-d layer at srp:1.6M
    monkeypatch.setattr(reduce, "available_memory", lambda: None)
    out = tmp_path / "store"
    config = tmp_path / "config.yaml"
    config.write_text("model:\n  name: lenet\n")
    code = extract_main([str(config), f"data.root={tmp_path / 'data'}", "model.cut=first:2",
                         "output.reduce=srp:11520", f"output.dir={out}",
                         "runtime.num_workers=0", "runtime.progress=false"])
    err = one_line_exit_2(code, capsys)
    assert "srp:11520 on a 11,520-d cut needs" in err and "choose srp:D with D <=" in err
    assert not list(out.glob("**/shards/*.npy")) and not (out / "meta.json").exists()


# ---------------------------------------------------------------------------------------
# Checkpoint metadata
# ---------------------------------------------------------------------------------------


def rewrite_meta(path, change) -> None:
    """Rewrite a checkpoint's metadata with safetensors itself (as an attacker would)."""
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()[META_KEY])
    raw = change(meta)
    save_file(tensors, str(path), metadata={META_KEY: raw if isinstance(raw, str)
                                            else json.dumps(raw if raw is not None else meta)})


def classifier_checkpoint(path, head=None):
    head_cfg = head or HeadConfig()
    spec = resolve_preprocess(LENET_DATA_CONFIG)
    base, head = cut_with_head(lenet(), "first:7", None, spec.input_size, head_cfg, 2)
    meta = classifier_meta({"name": "lenet", "source": "builtin"}, "first:7", None,
                           head_cfg, base.feature_dim, ["a", "b"], spec)
    return save_classifier(path, base, head, meta)


def backbone_checkpoint(path):
    return save_checkpoint(path, lenet().state_dict(),
                           {"format": "transferlab.backbone",
                            "class_names": [str(i) for i in range(10)],
                            "backbone": {"name": "lenet", "source": "builtin"}})


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "img.png"
    Image.new("L", (28, 28), 128).save(path)
    return path


def head_of(classes: int):
    def change(meta):
        meta["head"]["num_classes"] = classes
        meta["class_names"] = [f"c{i}" for i in range(min(classes, 3))]
    return change


def backbone(change):
    return "backbone", change


# (the checkpoint, what its metadata is changed to claim, the words of the refusal)
CHECKPOINT_CLAIMS = {
    "classes": (head_of(5_000_000), ["num_classes", "5,000,000"]),
    "classes-vs-tensors": (head_of(3), ["head weights have [2]"]),
    "names-vs-classes": (lambda m: m["head"].update(num_classes=3),
                         ["names 2 classes but its head has 3"]),
    "mlp-hidden": (lambda m: m["head"].update(type="mlp", hidden=[1_000_000]),
                   ["mlp head", "[1000000, 2]"]),
    "arch-classes": (lambda m: m["arch"].update(num_classes=5_000_000),
                     ["num_classes=5000000"]),
    "arch-kwargs": (lambda m: m["arch"].update(kwargs={"num_classes": 5_000_000}),
                    ["num_classes=5000000"]),
    "input_size": (lambda m: m["preprocess"].update(input_size=[1, 12000, 12000]),
                   ["input_size", "4096"]),
    # a backbone checkpoint: the class count must be its classifier's, data_config bounded
    "backbone-classes": (backbone(lambda m: m["backbone"].update(num_classes=5_000_000)),
                         ["num_classes"]),
    "backbone-classes-vs-tensors": (backbone(lambda m: m["backbone"].update(num_classes=20)),
                                    ["num_classes 20", "none of its weights"]),
    "data_config-input_size": (backbone(lambda m: m.update(
        data_config={"input_size": [1, 12000, 12000]})), ["input_size"]),
    "data_config-text": (backbone(lambda m: m.update(data_config={"input_size": "big"})),
                         ["not usable"]),
    "data_config-std": (backbone(lambda m: m.update(data_config={"std": [0.0]})), ["std"]),
}


def test_checkpoint_sizes_are_checked_before_the_model_is_built(tmp_path, image):
    calls, paths = [], []
    for n, (change, _) in enumerate(CHECKPOINT_CLAIMS.values()):
        if isinstance(change, tuple):
            ckpt = backbone_checkpoint(tmp_path / f"pretrain{n}.safetensors")
            change = change[1]
        else:
            ckpt = classifier_checkpoint(tmp_path / f"model{n}.safetensors")
        rewrite_meta(ckpt, change)
        calls.append(("predict", [str(ckpt), str(image)]))
        paths.append(ckpt)
    for (case, (_, words)), result, ckpt in zip(CHECKPOINT_CLAIMS.items(),
                                                bounded_calls(calls), paths):
        refused_in_one_line(result, *words, case=case)
        if "data_config" not in case:
            with pytest.raises(ModelError) as exc:
                load_model(ckpt)
            assert "\n" not in str(exc.value)


def test_honest_mlp_and_keep_heads_still_load(tmp_path):
    mlp = classifier_checkpoint(tmp_path / "mlp.safetensors", HeadConfig(type="mlp",
                                                                         hidden=[16, 8]))
    assert load_model(mlp).class_names == ["a", "b"]
    keep = classifier_checkpoint(tmp_path / "keep.safetensors", HeadConfig(type="keep"))
    assert load_model(keep).class_names == ["a", "b"]


def test_backbone_checkpoint_with_its_true_class_count_loads(tmp_path):
    ckpt = backbone_checkpoint(tmp_path / "pretrain.safetensors")
    rewrite_meta(ckpt, lambda m: m["backbone"].update(num_classes=10))
    assert len(load_model(ckpt).class_names) == 10


def test_metadata_nested_100000_deep_is_one_line(tmp_path, image, capsys):
    from transferlab.inspect import main as inspect_main
    from transferlab.predict import main as predict_main

    ckpt = classifier_checkpoint(tmp_path / "model.safetensors")
    deep = "[" * 100_000 + "]" * 100_000
    rewrite_meta(ckpt, lambda m: json.dumps(m)[:-1] + f', "extra": {deep}}}')
    for run in (predict_main, inspect_main):
        argv = [str(ckpt), str(image)] if run is predict_main else [str(ckpt)]
        err = one_line_exit_2(run(argv), capsys)
        assert "nests 100,001 levels deep" in err
    # a nesting inside a string is text, not depth
    ckpt = classifier_checkpoint(tmp_path / "model.safetensors")
    rewrite_meta(ckpt, lambda m: {**m, "note": deep})
    assert load_model(ckpt).class_names == ["a", "b"]


@pytest.mark.parametrize("std", [[0.0], [-1.0], ["NaN"], ["Infinity"]])
def test_checkpoint_std_zero_is_refused_not_nan(tmp_path, image, capsys, std):
    from transferlab.predict import main as predict_main

    ckpt = classifier_checkpoint(tmp_path / "model.safetensors")

    def change(meta):
        meta["preprocess"]["std"] = std
        return json.dumps(meta).replace('"NaN"', "NaN").replace('"Infinity"', "Infinity")

    rewrite_meta(ckpt, change)
    err = one_line_exit_2(predict_main([str(ckpt), str(image)]), capsys)
    assert "std" in err and "re-save the checkpoint" in err


def test_unknown_recorded_kwargs_are_one_line(tmp_path, image, capsys):
    from transferlab.predict import main as predict_main

    ckpt = classifier_checkpoint(tmp_path / "model.safetensors")
    rewrite_meta(ckpt, lambda m: m["arch"].update(kwargs={"widthx": 2}))
    err = one_line_exit_2(predict_main([str(ckpt), str(image)]), capsys)
    assert "built-in model 'lenet' does not take the argument 'widthx'" in err


@pytest.mark.parametrize("name", ["lenet", "resnet18", "alexnet"])
def test_unknown_kwargs_of_a_users_config_name_the_argument_and_the_model(name):
    source = {"lenet": "builtin", "resnet18": "timm", "alexnet": "torchvision"}[name]
    with pytest.raises(ModelError) as exc:
        build_backbone(ModelConfig(name=name, source=source, kwargs={"bogus_arg": 1}))
    message = str(exc.value)
    assert f"'{name}' does not take the argument 'bogus_arg'" in message and "\n" not in message


def test_config_sizes_are_bounded_when_the_config_loads():
    with pytest.raises(ConfigError, match="model.num_classes must be between 0 and 100,000"):
        load_config(None, ["model.num_classes=5000000"], ExtractConfig)
    with pytest.raises(ConfigError, match="preprocess.input_size must be"):
        load_config(None, ["preprocess.input_size=[12000,12000]"], ExtractConfig)
    load_config(None, ["model.num_classes=0", "preprocess.input_size=[3,4096,4096]"],
                ExtractConfig)


# ---------------------------------------------------------------------------------------
# Hub / timm model folders: config.json
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    timm = pytest.importorskip("timm")
    from timm.models import save_for_hf

    folder = tmp_path_factory.mktemp("folder") / "tiny"
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, num_classes=7, img_size=64)
    save_for_hf(model, str(folder), safe_serialization=True,
                model_args={"num_classes": 7, "img_size": 64},
                data_config={"input_size": (3, 64, 64), "interpolation": "bilinear",
                             "crop_pct": 0.8, "crop_mode": "center", "mean": (0.5,) * 3,
                             "std": (0.5,) * 3})
    return folder


def edited_folder(model_folder, tmp_path, change) -> Path:
    folder = Path(shutil.copytree(model_folder, tmp_path / "folder"))
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def fifo_config(folder: Path) -> None:
    (folder / "config.json").unlink()
    os.mkfifo(folder / "config.json")


# (what config.json is changed to claim, the words of the refusal)
FOLDER_CLAIMS = {
    "num_classes": (lambda c: c.update(num_classes=5_000_000), ["num_classes"]),
    "model_args-classes": (lambda c: c["model_args"].update(num_classes=5_000_000),
                           ["model_args.num_classes"]),
    "img_size": (lambda c: c["model_args"].update(img_size=12000), ["model_args.img_size"]),
    "input_size": (lambda c: c["pretrained_cfg"].update(input_size=[3, 12000, 12000]),
                   ["pretrained_cfg.input_size"]),
    "not-the-weights": (lambda c: (c.update(num_classes=9),
                                   c["model_args"].update(num_classes=9)),
                        ["num_classes 9", "none of its weights"]),
}


def test_folder_config_sizes_are_checked_before_timm_builds(model_folder, tmp_path):
    calls = []
    for n, (change, _) in enumerate(FOLDER_CLAIMS.values()):
        folder = edited_folder(model_folder, tmp_path / str(n), change)
        calls.append(("build", [str(folder)]))
    fifo = Path(shutil.copytree(model_folder, tmp_path / "fifo"))
    fifo_config(fifo)  # named as a Hub folder: read without blocking, refused
    calls.append(("build", [str(fifo), "hub"]))
    results = bounded_calls(calls, timeout=120)
    for (case, (_, words)), result in zip(FOLDER_CLAIMS.items(), results):
        refused_in_one_line(result, *words, case=case)
    refused_in_one_line(results[-1], "is a FIFO", case="fifo")


def test_folder_config_unknown_model_args_and_deep_nesting_are_one_line(model_folder, tmp_path):
    folder = edited_folder(model_folder, tmp_path,
                           lambda c: c["model_args"].update(bogus_arg=1))
    with pytest.raises(ModelError, match="does not take the argument 'bogus_arg'") as exc:
        build_backbone(ModelConfig(name=str(folder)))
    assert "\n" not in str(exc.value)
    (folder / "config.json").write_text('{"a": ' + "[" * 50_000 + "]" * 50_000 + "}")
    with pytest.raises(ModelError, match="nests 50,001 levels deep"):
        build_backbone(ModelConfig(name=str(folder)))


def test_honest_folder_still_builds(model_folder):
    backbone = build_backbone(ModelConfig(name=str(model_folder)))
    assert backbone.model.num_classes == 7
    assert tuple(backbone.data_config["input_size"]) == (3, 64, 64)

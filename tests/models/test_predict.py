"""``python -m transferlab.predict``: CSV of (path, class, probability) for files and folders."""
import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.imagegen import random_image
from transferlab.commands.predict import main
from transferlab.config import FinetuneConfig, load_config
from transferlab.data.preprocess import resolve_preprocess
from transferlab.errors import ModelError
from transferlab.finetune.run import run_finetune
from transferlab.models.classifier import Classifier, load_model
from transferlab.models.prediction import run_predict
from transferlab.runtime.device import Runtime

ROOT = Path(__file__).resolve().parents[2]
MNIST = ROOT / "transferlab" / "data" / "mnist_5k.npz"


def write_digits(root: Path, digits=(0, 1), per_class=8, offset=0) -> list[Path]:
    with np.load(MNIST) as data:
        images, labels = data["images"], data["labels"]
    paths = []
    for d in digits:
        for i, r in enumerate(np.flatnonzero(labels == d)[offset:offset + per_class]):
            path = root / f"d{d}" / f"{i:02d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[r]).save(path)
            paths.append(path)
    return paths


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A LeNet head trained on a folder of real 0/1 digits (classes 'd0', 'd1')."""
    tmp = tmp_path_factory.mktemp("predict")
    write_digits(tmp / "train", per_class=40)
    cfg = load_config(None, ["model.name=lenet", "model.cut=first:7", "data.source=folder",
                             f"data.root={tmp / 'train'}", "train.epochs=4",
                             "train.batch_size=16", "runtime.progress=false",
                             f"output.dir={tmp / 'out'}"], FinetuneConfig)
    run_finetune(cfg)
    return tmp / "out" / "model.safetensors", tmp


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_csv_has_one_row_per_image_with_class_and_probability(trained, tmp_path):
    ckpt, _ = trained
    images = write_digits(tmp_path / "new", per_class=5, offset=100)
    out = tmp_path / "preds.csv"
    main([str(ckpt), str(tmp_path / "new"), "--out", str(out)])
    text = out.read_text(encoding="utf-8")
    assert text.splitlines()[0] == "path,class,probability"
    rows = read_rows(out)
    assert [r["path"] for r in rows] == [str(p) for p in sorted(images)]
    assert all(0.0 < float(r["probability"]) <= 1.0 for r in rows)
    assert {r["class"] for r in rows} <= {"d0", "d1"}
    correct = sum(r["class"] == Path(r["path"]).parent.name for r in rows)
    assert correct >= 9  # zeros and ones are easy
    model = load_model(ckpt)
    expected = model.predict(sorted(images))
    assert [(r["class"], round(float(r["probability"]), 6)) for r in rows] == \
        [(c, round(p, 6)) for c, p in expected]


def test_files_and_folders_mixed_and_bad_files_skipped(trained, tmp_path, capsys):
    ckpt, _ = trained
    images = write_digits(tmp_path / "a", digits=(1,), per_class=2, offset=200)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    out = tmp_path / "p.csv"
    code = main([str(ckpt), str(images[0]), str(tmp_path / "b"), str(images[1]),
                          "--out", str(out)])
    assert code == 0
    rows = read_rows(out)
    assert [r["path"] for r in rows] == [str(images[0]), str(images[1])]
    err = capsys.readouterr().err
    assert "skipped" in err and "broken.png" in err


def test_csv_to_stdout_from_the_command_line(trained, tmp_path):
    ckpt, _ = trained
    images = write_digits(tmp_path / "x", digits=(0,), per_class=2, offset=300)
    proc = subprocess.run([sys.executable, "-m", "transferlab.predict", str(ckpt),
                           *map(str, images)], check=False, capture_output=True, text=True,
                          cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == "path,class,probability" and len(lines) == 3


def test_missing_path_is_a_one_line_error(trained, tmp_path, capsys):
    ckpt, _ = trained
    code = main([str(ckpt), str(tmp_path / "nothing_here.png")])
    err = capsys.readouterr().err
    assert code == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1


def test_a_backbone_checkpoint_without_class_names_is_refused(tmp_path, capsys):
    from transferlab.models.checkpoint import save_checkpoint
    from transferlab.models.lenet import lenet

    ckpt = save_checkpoint(tmp_path / "bb.safetensors", lenet().state_dict(),
                           {"backbone": {"name": "lenet", "source": "builtin"}})
    img = write_digits(tmp_path / "i", digits=(0,), per_class=1)[0]
    code = main([str(ckpt), str(img)])
    assert code == 2 and "backbone checkpoint without class names" in capsys.readouterr().err


def test_plain_safetensors_file_is_not_a_classifier(tmp_path, capsys):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    img = write_digits(tmp_path / "i", digits=(0,), per_class=1)[0]
    code = main([str(tmp_path / "plain.safetensors"), str(img)])
    assert code == 2 and "not a transferlab checkpoint" in capsys.readouterr().err


def test_csv_round_trips_file_names_with_line_breaks_commas_and_quotes():
    import io

    from transferlab.models.prediction import Prediction, write_csv

    names = ['a\rb.png', 'c\nd.png', 'e,f.png', 'g"h.png', 'plain.png']
    out = io.StringIO()
    write_csv([Prediction(n, "cls\r", 0.5) for n in names], out)
    rows = list(csv.reader(io.StringIO(out.getvalue(), newline="")))
    assert rows[0] == ["path", "class", "probability"]
    assert [r[0] for r in rows[1:]] == names and all(r[1] == "cls\r" for r in rows[1:])


def test_predict_on_files_named_with_cr_and_non_utf8_round_trips(trained, tmp_path):
    import os

    ckpt, _ = trained
    src = write_digits(tmp_path / "src", digits=(1,), per_class=3)
    folder = tmp_path / "odd"
    folder.mkdir()
    os.replace(src[0], folder / "a\rb.png")
    os.replace(src[1], os.fsencode(folder) + b"/\xffc.png")  # not UTF-8: read, name escaped
    os.replace(src[2], folder / "plain.png")
    out = tmp_path / "p.csv"
    assert main([str(ckpt), str(folder), "--out", str(out)]) == 0
    with open(out, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path", "class", "probability"]
    assert sorted(r[0] for r in rows[1:]) == sorted(
        [str(folder / "a\rb.png"), str(folder / "plain.png"), str(folder) + "/\\xffc.png"])
    assert all(r[1] in ("d0", "d1") for r in rows[1:])


def tiny_classifier(conv: bool = False):
    """An untrained classifier on 8x8 RGB input (no training needed to check batching); with
    ``conv`` its base is a conv, a BatchNorm with odd statistics (folded by the engine), a
    ReLU and a global pool."""
    torch.manual_seed(0)
    spec = resolve_preprocess({"input_size": (3, 8, 8)})
    if not conv:
        return Classifier(torch.nn.Flatten(), torch.nn.Linear(192, 3), ["a", "b", "c"], spec)
    base = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.BatchNorm2d(6),
                               torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten()).eval()
    bn = base[1]
    bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.data.uniform_()
    return Classifier(base, torch.nn.Linear(6, 3), ["a", "b", "c"], spec)


def cpu_runtime(precision: str, channels_last: bool = True) -> Runtime:
    return Runtime(torch.device("cpu"), precision, channels_last, 0, 2)


def plain_proba(model: Classifier, pixels: torch.Tensor) -> torch.Tensor:
    """What predict_proba computed before the engine: fp32, no folding, NCHW."""
    with torch.no_grad():
        return model(model.normalize(pixels)).softmax(1)


def test_predict_streams_the_images_batch_by_batch():
    """A generator of images is read a batch at a time, each batch only after the one before
    it ran: the pixels of one batch are alive, not those of every image."""
    model = tiny_classifier()
    runs: list[int] = []
    model.head.register_forward_hook(lambda *_: runs.append(1))
    pulled: list[int] = []

    def images():
        for i in range(10):
            pulled.append(len(runs))  # batches run before image i was asked for
            yield random_image(12 + i, 10, seed=i)

    probs = model.predict_proba(images(), batch_size=4)
    assert pulled == [0] * 4 + [1] * 4 + [2] * 2 and len(runs) == 3
    assert probs.shape == (10, 3)
    listed = [random_image(12 + i, 10, seed=i) for i in range(10)]
    torch.testing.assert_close(probs, model.predict_proba(listed, batch_size=3))
    names = model.predict(iter(listed), batch_size=4)
    assert [n for n, _ in names] == [model.class_names[int(i)] for i in probs.argmax(1)]


def test_predict_takes_a_uint8_tensor_in_batches_and_refuses_float_input():
    model = tiny_classifier()
    sizes: list[int] = []
    model.head.register_forward_hook(lambda _m, args, _o: sizes.append(len(args[0])))
    pixels = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    probs = model.predict_proba(pixels, batch_size=2)
    assert sizes == [2, 2, 1] and probs.shape == (5, 3)
    assert torch.allclose(probs.sum(1), torch.ones(5))
    assert model.predict_proba(pixels[:0]).shape == (0, 3)
    with pytest.raises(ModelError, match="uint8"):
        model.predict_proba(pixels.float())


def test_predict_in_fp32_equals_the_plain_forward_with_folding_and_channels_last():
    model = tiny_classifier(conv=True)
    pixels = torch.randint(0, 256, (7, 3, 8, 8), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(1))
    want = plain_proba(model, pixels)
    assert model.engine(cpu_runtime("fp32")).folded  # the BatchNorm is folded
    got = model.predict_proba(pixels, batch_size=3, runtime=cpu_runtime("fp32"))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    unfolded = model.predict_proba(pixels, runtime=cpu_runtime("fp32", False), fold_bn=False)
    torch.testing.assert_close(unfolded, want, rtol=1e-6, atol=1e-7)


def test_bf16_agrees_with_fp32_on_the_class(trained, tmp_path):
    ckpt, _ = trained
    images = sorted(write_digits(tmp_path / "n", per_class=6, offset=400))
    model = load_model(ckpt)
    fp32 = model.predict_proba(images, runtime=cpu_runtime("fp32"))
    bf16 = model.predict_proba(images, runtime=cpu_runtime("bf16"))
    assert not torch.equal(fp32, bf16)  # autocast did run in bf16
    assert torch.equal(fp32.argmax(1), bf16.argmax(1))
    assert float((fp32 - bf16).abs().max()) < 0.05


def test_the_command_in_fp32_gives_the_plain_forward_and_takes_the_runtime_flags(trained,
                                                                                   tmp_path):
    ckpt, _ = trained
    images = sorted(write_digits(tmp_path / "n", per_class=5, offset=450))
    out = tmp_path / "p.csv"
    code = main([str(ckpt), str(tmp_path / "n"), "--out", str(out), "--precision", "fp32",
                 "--batch-size", "3", "--workers", "0"])
    assert code == 0
    model = load_model(ckpt)
    tf = model.transform()
    want = torch.stack([tf(Image.open(p).convert(model.preprocess.image_mode)) for p in images])
    with torch.no_grad():
        best, idx = model(want).softmax(1).max(1)
    rows = read_rows(out)
    assert [r["path"] for r in rows] == [str(p) for p in images]
    assert [r["class"] for r in rows] == [model.class_names[int(i)] for i in idx]
    np.testing.assert_allclose([float(r["probability"]) for r in rows], best.numpy(),
                               rtol=0, atol=2e-6)
    result = run_predict(ckpt, [tmp_path / "n"], tmp_path / "q.csv", precision="fp32")
    assert [(p.label, round(p.probability, 6)) for p in result.predictions] == \
        [(r["class"], float(r["probability"])) for r in rows]


def test_out_follows_the_output_policy(trained, tmp_path, capsys, monkeypatch):
    """An existing --out is refused before the model loads (it was silently replaced) unless
    --overwrite; a FIFO is refused without blocking; the CSV appears only whole."""
    import os
    import signal

    ckpt, _ = trained
    write_digits(tmp_path / "n", digits=(0,), per_class=2, offset=460)
    out = tmp_path / "p.csv"
    out.write_text("keep me")

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the output was checked")

    with monkeypatch.context() as patch:
        patch.setattr("transferlab.models.prediction.load_model", no_model)
        assert main([str(ckpt), str(tmp_path / "n"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--overwrite is not set" in err and str(out) in err
    assert out.read_text() == "keep me"
    assert main([str(ckpt), str(tmp_path / "n"), "--out", str(out), "--overwrite"]) == 0
    assert len(read_rows(out)) == 2
    fifo = tmp_path / "fifo.csv"
    os.mkfifo(fifo)
    old = signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(AssertionError("hang")))
    signal.alarm(60)
    try:
        assert main([str(ckpt), str(tmp_path / "n"), "--out", str(fifo), "--overwrite"]) == 2
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert "is a FIFO" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo.csv", "n", "p.csv"]

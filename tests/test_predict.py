"""``python -m transferlab.predict``: CSV of (path, class, probability) for files and folders."""
import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from transferlab.commands.predict import main
from transferlab.config import FinetuneConfig, load_config
from transferlab.finetune.run import run_finetune
from transferlab.models.classifier import load_model

ROOT = Path(__file__).resolve().parents[1]
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
    import torch
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

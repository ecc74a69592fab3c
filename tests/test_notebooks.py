"""Run every notebook in notebooks/ end to end, as a user would, in FAST mode.

Each notebook is executed with nbclient in a fresh ``python3`` kernel whose working
directory is a temporary folder. The kernel is this interpreter (jupyter_client starts the
native ``python3`` kernel with ``sys.executable``; checked below) and imports this checkout
of transferlab (its root is put first on the kernel's PYTHONPATH, so it works with and
without ``pip install -e .``). Parameters are injected papermill-style: the lines of the
cell tagged ``parameters`` that assign an overridden name are replaced.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT = 300  # seconds per cell; whole notebooks take well under a minute in FAST mode
PROBE = "__notebook_test_probe__"


def parameters_cell(nb) -> int:
    """Index of the cell tagged ``parameters`` (it must be the first code cell)."""
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert "parameters" in cell.metadata.get("tags", []), \
                "the first code cell must be tagged 'parameters'"
            return i
    raise AssertionError("notebook has no code cell")


def inject(nb, params: dict) -> None:
    """Replace ``NAME = ...`` lines of the parameters cell (append names it lacks)."""
    cell = nb.cells[parameters_cell(nb)]
    lines = cell.source.splitlines()
    for name, value in params.items():
        line = f"{name} = {value!r}  # injected by tests/test_notebooks.py"
        pattern = re.compile(rf"^{re.escape(name)}\s*=")
        hits = [n for n, text in enumerate(lines) if pattern.match(text)]
        if hits:
            for n in hits:
                lines[n] = line
        else:
            lines.append(line)
    cell.source = "\n".join(lines)


def kernel_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.pop("MPLBACKEND", None)  # the kernel's own inline backend, as in Jupyter
    env.setdefault("HF_HUB_OFFLINE", "1")  # never touch the network
    env.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    return env


def execute(name: str, workdir: Path, params: dict) -> tuple[object, dict, float]:
    """Run notebook ``name`` in ``workdir``; return it executed, the kernel probe, seconds."""
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    inject(nb, params)
    nb.cells.append(nbformat.v4.new_code_cell(
        "import json as _j, sys as _s, transferlab as _t\n"
        f"print('{PROBE}' + _j.dumps({{'executable': _s.executable, "
        "'transferlab': _t.__file__}))"))
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                                     resources={"metadata": {"path": str(workdir)}})
    started = time.time()
    client.execute(env=kernel_env())
    seconds = time.time() - started
    text = "".join(o.get("text", "") for o in nb.cells[-1].outputs)
    probe = json.loads(text.split(PROBE, 1)[1])
    return nb, probe, seconds


def check_common(nb, probe: dict) -> None:
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert not errors, errors
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.outputs)
    assert "IProgress not found" not in text, "progress bars warn without ipywidgets"
    assert probe["executable"] == sys.executable, "kernel runs another Python than pytest"
    assert Path(probe["transferlab"]).resolve().is_relative_to(ROOT / "transferlab"), \
        f"kernel imported transferlab from {probe['transferlab']}, not this checkout"


def check_png(path: Path) -> None:
    assert path.is_file(), f"{path} was not written"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 2000, path


def test_notebooks_found():
    assert NOTEBOOKS == ["01_extract_search_probe.ipynb", "02_mnist_split.ipynb",
                         "03_finetune_folder.ipynb", "04_layers.ipynb", "05_clip_text.ipynb",
                         "06_curate.ipynb"]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_without_outputs(name):
    """Notebooks are committed clean: no outputs, no execution counts, FAST by default."""
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, \
                f"{name}: clear the outputs before committing"
    params = nb.cells[parameters_cell(nb)].source
    assert re.search(r"^FAST = True\b", params, re.M), params


@pytest.mark.slow
def test_01_extract_search_probe(tmp_path):
    nb, probe, seconds = execute("01_extract_search_probe.ipynb", tmp_path, {"FAST": True})
    check_common(nb, probe)
    out = tmp_path / "outputs" / "01_extract_search_probe"
    summary = json.loads((out / "summary.json").read_text())
    for png in ("neighbors.png", "pca.png"):
        check_png(out / png)
    assert summary["images"] == 60
    # random weights, but the classes differ in colour too: well above chance (1/3)
    assert summary["probe_val_acc"] >= 0.6, summary
    assert summary["knn_val_acc"] >= 0.6, summary
    assert 0.0 <= summary["nmi"] <= 1.0 and summary["purity"] >= 1 / 3, summary
    print(f"01_extract_search_probe: {seconds:.1f} s")


@pytest.mark.slow
def test_02_mnist_split(tmp_path):
    nb, probe, seconds = execute("02_mnist_split.ipynb", tmp_path, {"FAST": True})
    check_common(nb, probe)
    out = tmp_path / "outputs" / "02_mnist_split"
    summary = json.loads((out / "summary.json").read_text())
    for png in ("class_columns.png", "pca.png", "training_curves.png"):
        check_png(out / png)
    assert summary["data"] == "mnist-5k"
    acc = summary["accuracy"]
    assert set(acc) == {"pretrain", "head-only", "probe"}, acc
    # even 2 + 2 epochs on the 5,000 bundled digits give > 95 %; 90 % leaves room
    assert all(a >= 0.9 for a in acc.values()), acc
    table = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert re.search(r"head-only\s+2000\s+2\s+0\.9\d+", table), "accuracy table not shown"
    assert sum(pred == str(true) for pred, true in summary["predictions"]) >= 8, summary
    print(f"02_mnist_split: {seconds:.1f} s")


@pytest.mark.slow
def test_03_finetune_folder(tmp_path):
    nb, probe, seconds = execute("03_finetune_folder.ipynb", tmp_path, {"FAST": True})
    check_common(nb, probe)
    out = tmp_path / "outputs" / "03_finetune_folder"
    summary = json.loads((out / "summary.json").read_text())
    for png in ("training_curves.png", "predictions.png"):
        check_png(out / png)
    assert Path(tmp_path / summary["checkpoint"]).is_file()
    assert summary["held_out"] == "validation"
    # random weights, but the classes differ in colour too: well above chance (1/3)
    assert summary["held_out_accuracy"] >= 0.6, summary
    correct, total = map(int, summary["new_images_correct"].split("/"))
    assert total == 6 and correct >= 4, summary
    print(f"03_finetune_folder: {seconds:.1f} s")


@pytest.mark.slow
def test_04_layers(tmp_path):
    nb, probe, seconds = execute("04_layers.ipynb", tmp_path, {"FAST": True})
    check_common(nb, probe)
    out = tmp_path / "outputs" / "04_layers"
    summary = json.loads((out / "summary.json").read_text())
    check_png(out / "layers.png")
    assert summary["cuts"] == ["first-3", "first-6", "first-8", "head"]
    assert summary["images"] == 1000 and summary["dims"] == [20, 50, 500, 800]
    # random LeNet weights, real digits: every depth separates them well above chance (0.1)
    assert all(a > 0.5 for a in summary["probe_acc"]), summary
    print(f"04_layers: {seconds:.1f} s")


@pytest.mark.slow
def test_05_clip_text(tmp_path):
    pytest.importorskip("open_clip")
    nb, probe, seconds = execute("05_clip_text.ipynb", tmp_path, {"FAST": True})
    check_common(nb, probe)
    out = tmp_path / "outputs" / "05_clip_text"
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.outputs)
    assert "'source': 'open_clip', 'name': 'open_clip:ViT-S-32'" in text
    assert "a photo of a red circle\n" in text and "zero-shot accuracy (all 24" in text
    rows = (out / "zeroshot.csv").read_text().splitlines()
    assert rows[0] == "key,predicted,score,true" and len(rows) == 25
    print(f"05_clip_text: {seconds:.1f} s")


@pytest.mark.slow
def test_06_curate(tmp_path):
    nb, probe, seconds = execute("06_curate.ipynb", tmp_path, {"FAST": True})
    check_common(nb, probe)
    out = tmp_path / "outputs" / "06_curate"
    summary = json.loads((out / "summary.json").read_text())
    for png in ("duplicates.png", "outliers.png", "label_issues.png"):
        check_png(out / "store" / "curation" / png)
    for name in ("duplicates", "outliers", "label_issues"):
        assert (out / "store" / "curation" / f"{name}.csv").is_file()
    assert summary["images"] == 509 and summary["wrong_labels"] == 25, summary
    # every planted copy grouped with its source, nothing else; the non-digits on top
    assert summary["copies_found"] == "4/4" and summary["duplicate_groups"] == 4, summary
    assert summary["outliers_found"] in ("4/5", "5/5"), summary
    # FAST: 1 epoch of LeNet, 100 digits a class; most planted labels found, mostly right
    assert summary["label_recall"] >= 0.8 and summary["label_precision"] >= 0.5, summary
    assert summary["suggested_right"] >= 0.9, summary
    assert seconds < 60, seconds
    print(f"06_curate: {seconds:.1f} s")

"""The public API as a type checker sees it (#29): ``transferlab/py.typed`` ships, the names of
``transferlab/__init__.py`` are typed (its TYPE_CHECKING imports equal the lazy table), and
mypy passes on code that uses them the way the README does, and fails on code that misuses
them (so the names are really typed, not ``Any``)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import transferlab

REPO = Path(__file__).resolve().parents[1]

USAGE = '''
from pathlib import Path

import numpy as np

import transferlab
from transferlab import ExtractConfig, FeatureStore, FinetuneConfig, load_config

cfg: ExtractConfig = load_config("xception", ["data.root=photos"], ExtractConfig)
ft: FinetuneConfig = transferlab.load_config("mnist_split", ["train.epochs=1"], FinetuneConfig)
result: transferlab.ExtractResult = transferlab.run_extract(cfg)
store: FeatureStore = transferlab.FeatureStore.open("feats")
rows: int = len(store)
out: Path = transferlab.export_store(store, "feats.parquet", overwrite=True)
queries: np.ndarray = transferlab.embed_images(store.meta, ["a.jpg"])
finetuned: transferlab.FinetuneResult = transferlab.run_finetune(ft)
version: str = transferlab.__version__
try:
    load_config("nope")
except transferlab.ConfigError as exc:
    message: str = str(exc)
'''
MISUSE = '''
import transferlab

rows: int = transferlab.FeatureStore.open("feats")
transferlab.run_finetune("mnist_split")
'''


def test_type_checking_imports_equal_the_lazy_table():
    tree = ast.parse((REPO / "transferlab" / "__init__.py").read_text(encoding="utf-8"))
    (block,) = [n for n in tree.body if isinstance(n, ast.If)
                and getattr(n.test, "id", None) == "TYPE_CHECKING"]
    typed = {}
    for node in block.body:
        assert isinstance(node, ast.ImportFrom) and node.level == 1
        for alias in node.names:
            typed[alias.name] = node.module
    lazy = dict(transferlab._EXPORTS)
    lazy.update({name: module.rpartition(".")[0] for name, module in
                 transferlab._SUBMODULES.items()})
    assert typed == lazy
    assert (REPO / "transferlab" / "py.typed").is_file()


def mypy(tmp_path: Path, name: str, text: str) -> subprocess.CompletedProcess:
    pytest.importorskip("mypy", reason='mypy is in the [test] extra: pip install -e ".[test]"')
    (tmp_path / name).write_text(text, encoding="utf-8")
    # pyproject's [tool.mypy]: missing stubs ignored, transferlab's own bodies not reported
    return subprocess.run([sys.executable, "-m", "mypy", "--config-file",
                           str(REPO / "pyproject.toml"), "--cache-dir", str(tmp_path / "cache"),
                           "--no-error-summary", name],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})


@pytest.mark.slow
def test_mypy_passes_on_the_public_api_and_catches_misuse(tmp_path):
    good = mypy(tmp_path, "usage.py", USAGE)
    assert good.returncode == 0, good.stdout + good.stderr
    bad = mypy(tmp_path, "misuse.py", MISUSE)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert 'misuse.py:4: error: Incompatible types in assignment (expression has type ' \
           '"FeatureStore", variable has type "int")' in bad.stdout
    assert "misuse.py:5: error: Argument 1 to \"run_finetune\" has incompatible type" in bad.stdout

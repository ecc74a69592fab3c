"""The public API: every exported name resolves; command modules start without warnings."""
import subprocess
import sys
from pathlib import Path

import pytest

import transferlab

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", transferlab.__all__)
def test_exported_name_resolves(name):
    assert getattr(transferlab, name) is not None


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        transferlab.nope  # noqa: B018


def test_command_module_runs_without_import_warnings():
    proc = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m",
                           "transferlab.inspect", "lenet"], capture_output=True, text=True,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "first:7 (6)" in proc.stdout


def test_build_extractor_unpacks_and_declares_its_preprocessing():
    built = transferlab.build_extractor("lenet", cut="first:7")
    extractor, transform = built
    assert isinstance(built.spec, transferlab.PreprocessSpec) and built.spec.input_size == (1, 28, 28)
    assert not hasattr(extractor, "preprocess")  # no undeclared attribute on the module
    from PIL import Image

    assert extractor(transform(Image.new("L", (28, 28)))[None]).shape == (1, 800)

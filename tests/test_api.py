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

"""Built-in configs (#29): a real path wins, else a built-in name; ``transferlab config
list/show``; ``transferlab --version``."""
from __future__ import annotations

import contextlib
import io

import pytest
import yaml

import transferlab
from tests.helpers import REPO
from transferlab.commands import main
from transferlab.config import (
    ExtractConfig,
    FinetuneConfig,
    builtin_config_dir,
    builtin_configs,
    load_config,
    resolve_config,
)
from transferlab.errors import ConfigError


def cli(*argv: str) -> tuple[int, str, str]:
    """``transferlab ARGV`` in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


SHIPPED = sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))


def test_the_built_in_names_are_the_repository_configs():
    assert {"folder_finetune", "mnist_split", "xception"} <= set(SHIPPED)  # the README's
    assert list(builtin_configs()) == SHIPPED
    # from a checkout the one source is configs/ itself (a wheel holds a copy the build made)
    assert builtin_config_dir() == REPO / "configs"


@pytest.mark.parametrize("name", ["xception", "xception.yaml"])
def test_a_built_in_name_resolves_from_any_folder(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_config(name) == REPO / "configs" / "xception.yaml"
    cfg = load_config(name, ["data.root=photos"], ExtractConfig)
    assert cfg.model.name == "legacy_xception" and cfg.data.root == "photos"
    ft = load_config("mnist_split", ["train.epochs=1"], FinetuneConfig)
    assert ft.model.name == "lenet" and ft.train.epochs == 1


def test_a_real_path_always_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("xception", "xception.yaml"):
        (tmp_path / name).write_text("model:\n  name: test_resnet\n", encoding="utf-8")
        assert resolve_config(name).resolve() == tmp_path / name
        assert load_config(name, None, ExtractConfig).model.name == "test_resnet"


@pytest.mark.parametrize("name, hint", [
    ("mnist_splt", "did you mean 'mnist_split'?"),
    ("configs/xception.yaml", "did you mean 'xception'?"),  # a path outside the checkout
    ("nothing_like_it", ""),
])
def test_an_unknown_name_is_one_line_listing_the_built_ins(name, hint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        load_config(name, None, ExtractConfig)
    text = str(err.value)
    assert "\n" not in text and f"config file not found: {name}" in text
    assert f"built-in configs: {', '.join(SHIPPED)} " in text
    assert hint in text
    code, out, errtext = cli("extract", name)
    assert code == 2 and out == "" and errtext == f"error: {text}\n"


def test_a_path_with_a_folder_never_means_a_built_in(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="did you mean 'xception'"):
        resolve_config("sub/xception")


def test_config_list_names_every_built_in():
    code, out, err = cli("config", "list")
    assert code == 0 and err == ""
    rows = {line.split()[0]: line for line in out.splitlines()[:len(SHIPPED)]}
    assert sorted(rows) == SHIPPED
    assert "MNIST transfer experiment" in rows["mnist_split"]
    assert str(REPO / "configs") in out


def test_config_show_prints_the_file_exactly(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in SHIPPED:
        code, out, err = cli("config", "show", name)
        assert code == 0 and err == ""
        assert out == (REPO / "configs" / f"{name}.yaml").read_text(encoding="utf-8")
    # `> my.yaml` then edit: the copy loads like the original
    code, out, _ = cli("config", "show", "xception.yaml")
    (tmp_path / "my.yaml").write_text(out, encoding="utf-8")
    assert load_config("my.yaml", None, ExtractConfig) == load_config("xception", None,
                                                                      ExtractConfig)
    assert yaml.safe_load(out)["model"]["name"] == "legacy_xception"


def test_config_show_of_an_unknown_name_and_a_missing_action():
    code, out, err = cli("config", "show", "xcepton")
    assert code == 2 and out == ""
    assert err.startswith("error: config file not found: xcepton; did you mean 'xception'?")
    with pytest.raises(SystemExit) as exit_:
        cli("config")
    assert exit_.value.code == 2


def test_version_is_one_value_everywhere(tmp_path):
    from importlib.metadata import version

    code, out, _ = cli("--version")
    assert code == 0 and out == f"transferlab {transferlab.__version__}\n"
    assert version("transferlab") == transferlab.__version__
    from transferlab.store.format import library_versions
    assert library_versions()["transferlab"] == transferlab.__version__
    import torch

    from transferlab.models.checkpoint import read_checkpoint, save_checkpoint
    save_checkpoint(tmp_path / "m.safetensors", {"w": torch.zeros(2)}, {"format": "x"})
    _, meta = read_checkpoint(tmp_path / "m.safetensors")
    assert meta["format"] == "x" and meta["versions"]["transferlab"] == transferlab.__version__


def test_a_dangling_link_is_a_path_not_a_built_in(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "xception.yaml").symlink_to(tmp_path / "gone.yaml")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("xception.yaml", None, ExtractConfig)

"""Config loading: strict keys and types, overrides, clear errors, CLI exit code 2."""
import subprocess
import sys
import typing
from pathlib import Path
from typing import Literal

import pytest
import yaml

from transferlab.config import (
    DataConfig,
    ExtractConfig,
    HeadConfig,
    ModelConfig,
    OutputConfig,
    RuntimeConfig,
    load_config,
    save_config,
)
from transferlab.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text, name="x.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_and_nested_values(tmp_path):
    path = write(tmp_path, "model:\n  name: lenet\n  cut: first:7\nruntime:\n  batch_size: 8\n")
    cfg = load_config(path)
    assert cfg.model.name == "lenet" and cfg.model.cut == "first:7"
    assert cfg.runtime.batch_size == 8
    assert cfg.output.dtype == "float16"  # documented default


def test_overrides_apply_after_file(tmp_path):
    path = write(tmp_path, "runtime:\n  batch_size: 8\n")
    cfg = load_config(path, ["runtime.batch_size=32", "model.cut=first:7",
                             "preprocess.mean=[0.5]", "data.classes=[5,6]"])
    assert cfg.runtime.batch_size == 32
    assert cfg.model.cut == "first:7"
    assert cfg.preprocess.mean == [0.5]
    assert cfg.data.classes == [5, 6]


def test_unknown_key_names_file_and_close_match(tmp_path):
    path = write(tmp_path, "runtime:\n  batchsize: 8\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "unknown key 'runtime.batchsize'" in msg
    assert str(path) in msg
    assert "did you mean 'runtime.batch_size'?" in msg


def test_unknown_override_key(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'model.pretrained'"):
        load_config(None, ["model.pretrain=true"])


def test_wrong_type(tmp_path):
    path = write(tmp_path, "runtime:\n  batch_size: lots\n")
    with pytest.raises(ConfigError,
                       match=r"wrong type for 'runtime.batch_size'.*expected an integer"):
        load_config(path)


def test_bad_choice_suggests(tmp_path):
    path = write(tmp_path, "output:\n  dtype: float61\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "bad value 'float61' for 'output.dtype'" in str(err.value)
    assert "did you mean 'float16'" in str(err.value)


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found: nope.yaml"):
        load_config("nope.yaml")


def test_section_must_be_mapping(tmp_path):
    with pytest.raises(ConfigError, match="'model'.*must be a mapping"):
        load_config(write(tmp_path, "model: resnet50\n"))


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["runtime.batch_size"])


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["model.name=lenet", "runtime.batch_size=4"])
    path = save_config(cfg, tmp_path / "config.yaml")
    assert load_config(path) == cfg
    assert yaml.safe_load(path.read_text())["model"]["name"] == "lenet"


def test_shipped_configs_load():
    cfg = load_config(ROOT / "configs" / "xception.yaml", schema=ExtractConfig)
    assert cfg.model.name == "legacy_xception" and cfg.model.cut == "head"


def test_cli_user_mistake_is_one_line_exit_2(tmp_path):
    path = write(tmp_path, "model:\n  nme: lenet\n")
    proc = subprocess.run([sys.executable, "-m", "transferlab.extract", str(path)],
                          check=False, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "unknown key 'model.nme'" in proc.stderr and "did you mean 'model.name'" in proc.stderr


def literal_choices(schema: type, name: str) -> set:
    """The string choices a config field's Literal allows (Optional and unions unwrapped)."""
    hint = typing.get_type_hints(schema)[name]
    literals = [a for a in (typing.get_args(hint) or (hint,)) if typing.get_origin(a) is Literal]
    if typing.get_origin(hint) is Literal:
        literals = [hint]
    return {c for lit in literals for c in typing.get_args(lit)}


def test_config_choices_are_the_registries():
    """A name added to a registry (or to a config Literal) alone fails here, so the config
    and the code that acts on it never disagree."""
    from transferlab.data.sources import DATA_SOURCES
    from transferlab.data.webdataset import LABEL_KEYS
    from transferlab.models.backbones import SOURCES
    from transferlab.models.cuts import POOLS
    from transferlab.models.heads import ACTIVATIONS
    from transferlab.models.library import LIBRARY_BUILDERS
    from transferlab.runtime.device import PRECISIONS
    from transferlab.store.format import DTYPES

    assert literal_choices(ModelConfig, "source") == set(SOURCES)
    assert set(SOURCES) == {"auto", "checkpoint", *LIBRARY_BUILDERS}
    assert literal_choices(ModelConfig, "pool") == set(POOLS)
    assert literal_choices(DataConfig, "source") == set(DATA_SOURCES)
    assert literal_choices(DataConfig, "label_key") == set(LABEL_KEYS)
    assert literal_choices(HeadConfig, "activation") == set(ACTIVATIONS)
    assert literal_choices(RuntimeConfig, "precision") == {"auto", *PRECISIONS}
    assert literal_choices(OutputConfig, "dtype") == set(DTYPES)

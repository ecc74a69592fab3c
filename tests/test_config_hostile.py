"""Hostile configs and command-line inputs (#11 "Names and inputs that break runs").

Each case builds its input itself and goes through the real entry point; an error is exit
code 2 (a mistake) or 1 (the environment) with one line on stderr that names the fix.
"""
from __future__ import annotations

import dataclasses
import errno
import itertools
import os
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import blobs, make_store
from tests.imagegen import make_image_tree
from transferlab.analysis import cluster_report, probe_report
from transferlab.analysis.splits import stratified_split
from transferlab.commands import cluster, probe, run_cli
from transferlab.config import (
    BOUNDS,
    DataConfig,
    ExtractConfig,
    FinetuneConfig,
    HeadConfig,
    PretrainConfig,
    TrainConfig,
    UnfreezeConfig,
    check_bounds,
    load_config,
)
from transferlab.errors import ConfigError
from transferlab.extract.__main__ import main as extract_main
from transferlab.yamlsafe import MAX_SHOWN

TINY = ["model.name=test_resnet", "model.pretrained=false", "preprocess.input_size=[32,32]",
        "runtime.batch_size=4", "runtime.num_workers=0", "runtime.threads=1",
        "runtime.progress=false", "runtime.precision=fp32"]


def one_line_error(capsys, code: int, expected: int = 2) -> str:
    """The stderr of a command that failed: exactly one 'error: ...' line."""
    err = capsys.readouterr().err
    assert code == expected, err
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def alias_bomb(levels: int) -> str:
    """The 'billion laughs': each level repeats the previous one nine times."""
    lines = ["  kwargs:", '    a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    names = "abcdefghijklmnop"[:levels]
    for prev, name in itertools.pairwise(names):
        lines.append(f"    {name}: &{name} [{','.join(['*' + prev] * 9)}]")
    return "model:\n" + "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------
# 1. Alias bomb, echoed values
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("levels", [9, 10])
def test_alias_bomb_is_refused_fast_in_small_memory(tmp_path, capsys, levels):
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb(levels), encoding="utf-8")
    assert len(path.read_bytes()) < 700  # 9 ** levels values in a few hundred bytes
    tracemalloc.start()
    start = time.perf_counter()
    code = extract_main([str(path)])
    elapsed = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    line = one_line_error(capsys, code)
    assert elapsed < 0.5 and peak < 20 * 2**20
    assert f"{path} expands to more than 100000 values" in line
    assert "remove the aliases" in line and len(line) < 300


def test_deep_nesting_and_bombs_in_overrides_are_one_line(tmp_path, capsys):
    path = tmp_path / "deep.yaml"
    path.write_text("model:\n  kwargs: {a: " + "[" * 20_000 + "]" * 20_000 + "}\n")
    line = one_line_error(capsys, extract_main([str(path)]))
    assert line == f"error: {path} nests too deeply to be a config; flatten it"
    levels = ["a: &a [1,1,1,1,1,1,1,1,1]"] + [
        f"{n}: &{n} [{','.join(['*' + p] * 9)}]" for p, n in itertools.pairwise("abcdefghi")]
    bomb = "model.kwargs={" + ", ".join(levels) + "}"
    line = one_line_error(capsys, extract_main([str(empty_config(tmp_path)), bomb]))
    assert "expands to more than 100000 values" in line and len(line) < 500


def test_a_few_aliases_still_load(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("model:\n  kwargs: &k {drop_rate: 0.1}\ntest: *k\n", encoding="utf-8")
    cfg = load_config(path, [], FinetuneConfig)
    assert cfg.model.kwargs == {"drop_rate": 0.1} and cfg.test == {"drop_rate": 0.1}


def test_recursive_alias_is_one_line(tmp_path, capsys):
    path = tmp_path / "loop.yaml"
    path.write_text("model:\n  kwargs: &a {again: *a}\n", encoding="utf-8")
    line = one_line_error(capsys, extract_main([str(path)]))
    assert "refers to itself" in line and "write the values out" in line


@pytest.mark.parametrize("text", ["output:\n  dtype: {big}\n", "output:\n  dir: [{big}]\n",
                                  "runtime:\n  ? {big}\n  : 1\n"])
def test_values_echoed_in_errors_are_cut_short(tmp_path, capsys, text):
    path = tmp_path / "big.yaml"
    path.write_text(text.format(big="x" * 100_000), encoding="utf-8")
    line = one_line_error(capsys, extract_main([str(path)]))
    assert "..." in line and len(line) < 2 * MAX_SHOWN + len(str(path)) + 300


# ---------------------------------------------------------------------------------------
# 2. Unreadable config files
# ---------------------------------------------------------------------------------------


def test_latin1_config_names_the_encoding(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("model:\n  name: caf\xe9\n".encode("latin-1"))
    line = one_line_error(capsys, extract_main([str(path)]))
    assert line == (f"error: config file {path} is not UTF-8 text (byte 0xe9 at offset 18); "
                    "save it as UTF-8")


def test_utf8_with_bom_loads(tmp_path):
    path = tmp_path / "bom.yaml"
    path.write_bytes("\ufeffmodel:\n  name: lenet\n".encode())
    assert load_config(path).model.name == "lenet"


def test_yaml_syntax_error_is_one_line_with_line_and_column(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  name: [lenet\n  cut: head\n", encoding="utf-8")
    line = one_line_error(capsys, extract_main([str(path)]))
    assert line.startswith(f"error: {path}:3:6: not valid YAML: expected ',' or ']'")
    assert "quote values" in line


def test_python_tags_stay_refused_on_one_line(tmp_path, capsys):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.yaml"
    path.write_text(f"model:\n  kwargs: !!python/object/apply:os.system [touch {marker}]\n",
                    encoding="utf-8")
    line = one_line_error(capsys, extract_main([str(path)]))
    assert "not valid YAML" in line and "python/object/apply" in line
    assert not marker.exists()


def test_directory_as_config_says_directory(tmp_path, capsys):
    line = one_line_error(capsys, extract_main([str(tmp_path)]))
    assert f"{tmp_path} is a directory, not a YAML file" in line
    assert "not found" not in line and str(tmp_path / "config.yaml") in line


# ---------------------------------------------------------------------------------------
# 3. Overrides: strings as typed, mappings parsed or refused
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, attr, value", [
    ("output.dir=0777", "output.dir", "0777"),  # not YAML's octal 511
    ("output.dir=12:30", "output.dir", "12:30"),  # not YAML 1.1's sexagesimal 750
    ("data.root=~", "data.root", "~"),  # not None
    ("model.name=1e5", "model.name", "1e5"),
    ("model.cut=first:7", "model.cut", "first:7"),
    ('output.dir="with space "', "output.dir", "with space "),  # quotes are removed
    ("model.weights=null", "model.weights", None),  # unsets an optional string
    ("model.kwargs={drop_rate: 0.5}", "model.kwargs", {"drop_rate": 0.5}),
    ("model.kwargs.drop_rate=0.5", "model.kwargs", {"drop_rate": 0.5}),
    ("runtime.batch_size=16", "runtime.batch_size", 16),
    ("output.overwrite=true", "output.overwrite", True),
    ("data.classes=[cat, 3]", "data.classes", ["cat", 3]),
    ("preprocess.crop_pct=1", "preprocess.crop_pct", 1.0),
    ("preprocess.crop_pct=0.875", "preprocess.crop_pct", 0.875),
])
def test_override_values(override, attr, value):
    cfg = load_config(None, [override], ExtractConfig)
    section, name = attr.split(".")
    got = getattr(getattr(cfg, section), name)
    assert got == value and type(got) is type(value)


def test_override_strings_inside_free_form_sections_follow_their_schema():
    cfg = load_config(None, ["test.root=0777", "fallback.output.dir=12:30", "train.lr=1e-3",
                             "train.cache=off"], FinetuneConfig)
    assert cfg.test == {"root": "0777"} and cfg.fallback == {"output": {"dir": "12:30"}}
    assert cfg.train.lr == 0.001 and cfg.train.cache is False


@pytest.mark.parametrize("override, expected", [
    ("model.kwargs={drop_rate:0.5}", ("has the key 'drop_rate:0.5' with no value: YAML needs "
                                      "a space after ':' (write {drop_rate: 0.5})")),
    ("model.kwargs={drop_rate: 0.5", "not valid YAML"),
    ("model.kwargs=drop_rate", "expected a mapping, got 'drop_rate'"),
])
def test_a_mapping_override_parses_or_is_one_line(tmp_path, capsys, override, expected):
    line = one_line_error(capsys, extract_main([str(empty_config(tmp_path)), override]))
    assert expected in line and "model.kwargs" in line


def test_a_mapping_missing_its_space_in_a_file_is_refused_too(tmp_path, capsys):
    path = tmp_path / "k.yaml"
    path.write_text("model:\n  kwargs: {drop_rate:0.5, extra: {depth:2}}\n", encoding="utf-8")
    line = one_line_error(capsys, extract_main([str(path)]))
    assert f"'model.kwargs' in {path} has the key 'drop_rate:0.5' with no value" in line


def empty_config(tmp_path: Path) -> Path:
    path = tmp_path / "empty.yaml"
    path.write_text("{}\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------
# 4. Ranges
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, expected", [
    ("runtime.threads=-1", ("runtime.threads must be at least 1 (or null: chosen for the "
                            "machine), got -1")),
    ("runtime.num_workers=-1", "runtime.num_workers must be 0 (main process) or more"),
    ("runtime.batch_size=0", "runtime.batch_size must be at least 1"),
    ("data.max_image_pixels=0", "data.max_image_pixels must be at least 1"),
    ("data.max_image_pixels=-5", "data.max_image_pixels must be at least 1"),
    ("data.limit=0", "data.limit must be at least 1 (or null: every item)"),
    ("data.classes=[]", "data.classes must be a non-empty list (or null: every class), got []"),
    ("preprocess.crop_pct=0", "preprocess.crop_pct must be in (0, 1], e.g. 0.875"),
    ("preprocess.crop_pct=-0.5", "preprocess.crop_pct must be in (0, 1]"),
    ("preprocess.crop_pct=.nan", "preprocess.crop_pct must be in (0, 1]"),
    ("preprocess.channels=0", "preprocess.channels must be 1 or 3"),
    ("output.views=1000", "output.views must be between 0 and 256, got 1000"),
    ("output.views=-1", "output.views must be between 0 and 256, got -1"),
    ("output.shard_size=0", "output.shard_size must be at least 1"),
])
def test_out_of_range_values_are_one_line(tmp_path, capsys, override, expected):
    config = empty_config(tmp_path)
    line = one_line_error(capsys, extract_main([str(config), override]))
    assert expected in line and line.endswith(f"in {config}")
    assert not (tmp_path / "outputs").exists()


def test_range_checks_apply_to_config_files_and_finetune(tmp_path):
    path = tmp_path / "f.yaml"
    path.write_text("data:\n  classes: []\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"^data.classes must be a non-empty list"):
        load_config(path, [], FinetuneConfig)
    with pytest.raises(ConfigError, match=r"^pretrain.classes must be a non-empty list"):
        load_config(None, ["pretrain.classes=[]"], FinetuneConfig)


def test_edge_values_in_range_still_load():
    cfg = load_config(None, ["output.views=256", "runtime.threads=1", "runtime.num_workers=0",
                             "data.max_image_pixels=1", "preprocess.crop_pct=1.0",
                             "runtime.threads=null", "data.classes=null"])
    assert cfg.output.views == 256 and cfg.runtime.num_workers == 0
    assert cfg.runtime.threads is None and cfg.data.classes is None


@pytest.mark.parametrize("overrides, expected", [
    (["train.lr=0"], "train.lr must be greater than 0, e.g. 1e-3, got 0.0"),
    (["pretrain.train.epochs=-1"], "pretrain.train.epochs must be 0 or more, got -1"),
    (["train.val_split=1"], "train.val_split must be in [0, 1) (0: no validation split)"),
    (["train.label_smoothing=.nan"], "train.label_smoothing must be in [0, 1), got nan"),
    (["unfreeze.lr_mult=0"], "unfreeze.lr_mult must be greater than 0, e.g. 0.1, got 0.0"),
    (["output.save_interval_s=-1"], "output.save_interval_s must be 0 (every epoch) or more"),
    (["head.dropout=1"], "head.dropout must be in [0, 1), got 1.0"),
    (["head.type=mlp", "head.hidden=[64, 0]"], "head.hidden must be sizes of at least 1"),
    (["probe.samples=20", "probe.val_fraction=0"],
     "probe.val_fraction must be between 0 and 1 (exclusive), got 0.0 in <defaults>; try 0.2"),
    (["preprocess.std=[0.2, 0, 0.2]"], "preprocess.std must be positive"),
])
def test_finetune_ranges_are_checked_when_the_config_loads(overrides, expected):
    with pytest.raises(ConfigError) as exc:
        load_config(None, overrides, FinetuneConfig)
    assert expected in str(exc.value) and "\n" not in str(exc.value)


def test_a_range_applies_only_where_the_field_is_used():
    cfg = load_config(None, ["probe.val_fraction=0", "probe.l2=[0.1]", "probe.samples=20",
                             "head.hidden=[0]"], FinetuneConfig)
    assert cfg.probe.val_fraction == 0 and cfg.head.hidden == [0]  # one l2; a linear head


def test_every_bound_names_a_field_and_the_defaults_lie_inside():
    for schema, bounds in BOUNDS.items():
        assert set(bounds) <= {f.name for f in dataclasses.fields(schema)}, schema
    check_bounds(ExtractConfig())
    check_bounds(FinetuneConfig())


def test_configs_built_in_python_meet_the_same_table(tmp_path):
    from transferlab.data.preprocess import resolve_preprocess
    from transferlab.data.sources import build_dataset
    from transferlab.finetune.run import preflight
    from transferlab.models.heads import build_head
    from transferlab.store.writer import StoreWriter

    bad = FinetuneConfig(pretrain=PretrainConfig(train=TrainConfig(step_epochs=0)))
    with pytest.raises(ConfigError, match=r"^pretrain.train.step_epochs must be at least 1, "
                                          r"got 0$"):
        check_bounds(bad)
    with pytest.raises(ConfigError, match=r"^unfreeze.layers must be 0 \(no second phase\) "
                                          r"or more, got -1$"):
        preflight(FinetuneConfig(unfreeze=UnfreezeConfig(layers=-1)))
    with pytest.raises(ConfigError, match=r"^data.limit must be at least 1 \(or null: every "
                                          r"item\), got 0$"):
        build_dataset(DataConfig(source="mnist-5k", limit=0))
    with pytest.raises(ConfigError, match=r"^output.shard_size must be at least 1, got 0$"):
        StoreWriter(tmp_path / "store", {}, shard_size=0)
    assert not (tmp_path / "store").exists()
    with pytest.raises(ConfigError, match=r"^head.dropout must be in \[0, 1\), got 1.5$"):
        build_head(HeadConfig(dropout=1.5), 4, 2)
    # a model's own setting meets the same range as the config's
    with pytest.raises(ConfigError, match=r"^preprocess.crop_pct must be in \(0, 1\]"):
        resolve_preprocess({"crop_pct": 2.0})


# ---------------------------------------------------------------------------------------
# 5. cluster options, 6. probe option names
# ---------------------------------------------------------------------------------------


@pytest.fixture
def small_store(tmp_path):
    x, y = blobs(n_per=4, k=2, d=4)
    make_store(tmp_path / "s", x, y)
    return tmp_path / "s"


def test_cluster_out_that_is_a_directory(small_store, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    code = cluster.main([str(small_store), "-k", "2", "--out", str(tmp_path / "out")])
    line = one_line_error(capsys, code)
    assert line == (f"error: --out {tmp_path / 'out'} is a directory; name a CSV file in it, "
                    f"e.g. --out {tmp_path / 'out' / 'assignments.csv'}")
    assert list((tmp_path / "out").iterdir()) == []


def test_cluster_plot_that_is_a_file(small_store, tmp_path, capsys):
    (tmp_path / "p").write_text("mine")
    code = cluster.main([str(small_store), "-k", "2", "--plot", str(tmp_path / "p")])
    assert "--plot" in one_line_error(capsys, code) and (tmp_path / "p").read_text() == "mine"


@pytest.mark.parametrize("value", ["-1", "0"])
def test_cluster_max_iter_below_one(small_store, capsys, value):
    line = one_line_error(capsys, cluster.main([str(small_store), "-k", "2",
                                                "--max-iter", value]))
    assert line == f"error: --max-iter must be at least 1, got {value}; try 300"


def test_probe_split_errors_name_the_real_setting(small_store, capsys):
    with pytest.raises(ConfigError, match=r"^val_fraction must be between 0 and 1"):
        stratified_split(np.arange(4), 1.0)
    with pytest.raises(ConfigError, match=r"^train.val_split must be"):
        stratified_split(np.arange(4), -0.1, setting="train.val_split")
    with pytest.raises(ConfigError, match=r"^val_fraction must be"):
        probe_report.run_probe(probe.FeatureStore.open(small_store), val_fraction=0.0)
    line = one_line_error(capsys, probe.main([str(small_store), "--val-fraction", "1.5"]))
    assert line.startswith("error: --val-fraction must be between 0 and 1 (exclusive), got 1.5")


# ---------------------------------------------------------------------------------------
# 7. Environment errors: exit 1, one line, resumable
# ---------------------------------------------------------------------------------------


@pytest.fixture
def images(tmp_path):
    make_image_tree(tmp_path / "data", per_class=1, unicode_name=False)
    return [str(empty_config(tmp_path)), *TINY, f"data.root={tmp_path / 'data'}"]


def test_output_dir_below_a_file(images, tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    code = extract_main([*images, f"output.dir={tmp_path / 'file' / 'store'}"])
    line = one_line_error(capsys, code, expected=1)
    assert line.startswith("error: Not a directory: ")
    assert "a file stands where a directory is needed" in line
    assert (tmp_path / "file").read_text() == "mine"


def test_disk_full_writing_config_yaml_is_one_line_and_resumable(images, tmp_path, capsys,
                                                                 monkeypatch):
    import transferlab.config as config_module

    def full(path, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    out = tmp_path / "store"
    monkeypatch.setattr(config_module, "atomic_write_text", full)
    line = one_line_error(capsys, extract_main([*images, f"output.dir={out}"]), expected=1)
    assert line == (f"error: No space left on device: {out / 'config.yaml'}; free disk space, "
                    "then rerun the same command (finished work is kept)")
    monkeypatch.undo()
    assert extract_main([*images, f"output.dir={out}"]) == 0
    assert (out / "config.yaml").is_file()


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="root writes into read-only directories")
def test_read_only_output_dir(images, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        code = extract_main([*images, f"output.dir={ro / 'store'}"])
    finally:
        ro.chmod(0o700)
    line = one_line_error(capsys, code, expected=1)
    assert "Permission denied" in line and "fix the permissions" in line


@pytest.mark.parametrize("exc, expected", [
    (PermissionError(errno.EACCES, "Permission denied", "/x/y"),
     "error: Permission denied: /x/y; fix the permissions or choose another path"),
    (OSError(errno.EROFS, "Read-only file system", "/ro"),
     "error: Read-only file system: /ro; the file system is read-only"),
    (OSError(errno.EIO, "Input/output error", "a\nb"),
     "error: Input/output error: a\\nb; check the path, free space and permissions"),
    (OSError("no errno at all"), "error: no errno at all; check the path"),
])
def test_run_cli_turns_os_errors_into_one_line_exit_1(capsys, exc, expected):
    def command(argv):
        raise exc

    assert one_line_error(capsys, run_cli(command, []), expected=1).startswith(expected)


def test_run_cli_keeps_interrupt_and_mistake_codes(capsys):
    def interrupted(argv):
        raise KeyboardInterrupt

    def mistaken(argv):
        raise ConfigError("bad thing; do this")

    assert run_cli(interrupted, []) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err
    assert one_line_error(capsys, run_cli(mistaken, [])) == "error: bad thing; do this"


# ---------------------------------------------------------------------------------------
# 8. One name per report formatter
# ---------------------------------------------------------------------------------------


def test_report_formatters_have_distinct_names():
    assert callable(probe_report.probe_report) and callable(cluster_report.cluster_report)
    assert not hasattr(probe_report, "format_report")
    assert not hasattr(cluster_report, "format_report")


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_config_that_is_a_fifo_or_device_is_one_line_never_a_hang(tmp_path, kind):
    """A config path naming a FIFO would block the read forever, /dev/zero would fill memory:
    both are refused as not regular files (issue #24: one rule for every file read)."""
    import os
    import subprocess
    import sys

    from tests.helpers import REPO

    path = tmp_path / "c.yaml"
    if kind == "fifo":
        os.mkfifo(path)
    target = str(path) if kind == "fifo" else "/dev/zero"
    proc = subprocess.run([sys.executable, "-m", "transferlab.extract", target],
                          capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1
    assert ("a FIFO" if kind == "fifo" else "a device") in proc.stderr

"""One command-line convention: ``transferlab COMMAND`` == ``python -m transferlab.COMMAND``."""
from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from transferlab.commands import COMMANDS, main, main_of

# command -> (its module, the module `python -m` runs for it)
MODULES = {"extract": ("transferlab.commands.extraction", "transferlab.extract.__main__"),
           "finetune": ("transferlab.commands.finetuning", "transferlab.finetune.__main__"),
           "predict": ("transferlab.commands.predict", "transferlab.predict"),
           "inspect": ("transferlab.commands.inspection", "transferlab.inspect"),
           "probe": ("transferlab.commands.probe", "transferlab.probe"),
           "search": ("transferlab.commands.search", "transferlab.search"),
           "cluster": ("transferlab.commands.cluster", "transferlab.cluster"),
           "export": ("transferlab.commands.export", "transferlab.export"),
           "index": ("transferlab.commands.index", "transferlab.index"),
           "maps": ("transferlab.commands.maps", "transferlab.maps"),
           # newer commands have no `python -m transferlab.NAME` shim
           "config": ("transferlab.commands.configs", None),
           "compare": ("transferlab.commands.compare", None),
           "sweep": ("transferlab.commands.sweep", None),
           "curate": ("transferlab.commands.curate", None),
           "view": ("transferlab.commands.view", None),
           "zeroshot": ("transferlab.commands.zeroshot", None)}


def console_script() -> str | None:
    """The installed `transferlab` next to this interpreter (pip install puts it there)."""
    here = Path(sys.executable).parent / "transferlab"
    return str(here) if here.exists() else shutil.which("transferlab")


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in MODULES:
        assert f"  {name} " in out
    assert set(COMMANDS) == set(MODULES)


def test_no_command_is_a_usage_error(capsys):
    assert main([]) == 2
    assert "usage: transferlab COMMAND" in capsys.readouterr().err


def test_unknown_command_is_one_line_with_a_close_match(capsys):
    assert main(["finetnue", "x.yaml"]) == 2
    err = capsys.readouterr().err
    assert err == "error: unknown command 'finetnue'; did you mean 'finetune'?\n"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_command_has_the_same_entry_points(name):
    """Each command module: build_parser(), command(argv) raises on user mistakes, main(argv)
    -> exit code; `transferlab NAME`, `python -m transferlab NAME` and `python -m
    transferlab.NAME` all run that main."""
    home, entry = MODULES[name]
    module = importlib.import_module(home)
    assert callable(module.build_parser) and callable(module.command)
    assert module.build_parser().prog == f"transferlab {name}"
    assert main_of(name) is module.main
    if entry is not None:
        assert importlib.import_module(entry).main is module.main
    assert importlib.import_module("transferlab.__main__").main is main


@pytest.mark.parametrize("name, argv", [("probe", ["{tmp}/missing"]),
                                        ("cluster", ["{tmp}/missing", "-k", "2"]),
                                        ("export", ["{tmp}/missing", "{tmp}/out.npz"]),
                                        ("index", ["{tmp}/missing"]),
                                        ("compare", ["{tmp}/missing", "{tmp}/missing2"]),
                                        ("sweep", ["{tmp}/missing.yaml"]),
                                        ("curate", ["{tmp}/missing"]),
                                        ("view", ["{tmp}/missing", "--no-browser"]),
                                        ("search", ["{tmp}/missing", "q.png"]),
                                        ("extract", ["{tmp}/missing.yaml"]),
                                        ("finetune", ["{tmp}/missing.yaml"]),
                                        ("predict", ["{tmp}/missing.safetensors", "q.png"])])
def test_every_command_answers_a_mistake_with_one_line_and_exit_2(name, argv, tmp_path, capsys):
    code = main([name, *(a.format(tmp=tmp_path) for a in argv)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_console_script_and_module_give_the_same_output():
    script = console_script()
    if script is None:
        pytest.skip("the transferlab console script is not installed (pip install -e .)")
    a = subprocess.run([script, "inspect", "lenet"], check=False, capture_output=True,
                       text=True, timeout=120)
    b = subprocess.run([sys.executable, "-m", "transferlab.inspect", "lenet"], check=False,
                       capture_output=True, text=True, timeout=120)
    assert a.returncode == b.returncode == 0
    assert a.stdout == b.stdout and "first:" in a.stdout
    c = subprocess.run([script, "--help"], check=False, capture_output=True, text=True,
                       timeout=60)
    assert c.returncode == 0 and "extract" in c.stdout


def test_a_huge_value_in_an_error_is_cut_to_one_short_line(tmp_path, capsys):
    from PIL import Image

    from transferlab.extract.__main__ import main as extract_main

    (tmp_path / "a").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "x.png")
    huge = "x" * 20000
    code = extract_main([str(_config(tmp_path)), f"data.root={tmp_path}",
                         f"output.dir={tmp_path / 'o'}", f"model.cut=[layer:{huge}, head]"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and len(err) < 2100 and " ... " in err


def _config(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("model: {name: test_resnet, pretrained: false}\n"
                    "runtime: {progress: false, device: cpu}\n", encoding="utf-8")
    return path


def test_a_setting_error_names_the_commands_option(capsys):
    """The library names its parameter (n_init); the command line names its option for it."""
    import argparse
    import pickle

    from transferlab.commands import run_cli
    from transferlab.errors import SettingError

    parser = argparse.ArgumentParser()
    parser.add_argument("-k", type=int)
    parser.add_argument("--n-init", type=int)

    def mistaken(setting):
        def command(argv):
            raise SettingError(setting, "must be at least 1, got 0")
        return command

    assert run_cli(mistaken("n_init"), [], parser) == 2
    assert capsys.readouterr().err == "error: --n-init must be at least 1, got 0\n"
    assert run_cli(mistaken("k"), [], parser) == 2
    assert capsys.readouterr().err == "error: -k must be at least 1, got 0\n"
    assert run_cli(mistaken("batch_size"), [], parser) == 2  # no option sets it: kept
    assert capsys.readouterr().err == "error: batch_size must be at least 1, got 0\n"
    assert run_cli(mistaken("n_init"), []) == 2  # no parser: the library's name
    assert capsys.readouterr().err == "error: n_init must be at least 1, got 0\n"
    again = pickle.loads(pickle.dumps(SettingError("n_init", "must be at least 1, got 0")))
    assert (again.setting, again.problem, str(again)) == (
        "n_init", "must be at least 1, got 0", "n_init must be at least 1, got 0")

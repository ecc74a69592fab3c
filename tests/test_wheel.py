"""The package as users install it: the wheel built from this tree, installed (not editable)
into a fresh virtual environment, run from a folder outside the repository (#29).

Nothing is downloaded: the wheel is built without build isolation and installed without
dependencies; torch, timm ... come from the running environment through a ``.pth`` line
(``venv --system-site-packages`` would give the base interpreter's packages, not this
environment's). The wheel's own ``transferlab`` comes first on the new ``sys.path``, and
the test checks that it, not the source tree, is what runs.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from tests.imagegen import make_image_tree

REPO = Path(__file__).resolve().parents[1]
# what a build reads: everything else in the checkout stays out of the copy
BUILD_INPUTS = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "configs",
                "transferlab")


def run(args: list[str | Path], cwd: Path, env: dict, timeout: float = 120) -> str:
    done = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, f"{args}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def clean_env() -> dict[str, str]:
    """This environment without PYTHONPATH: the source tree (and an ``.egg-info`` a build left
    in it) must not be what pip or the installed commands see."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


def build_wheel(tmp: Path) -> Path:
    """The wheel of a clean copy of the build inputs (a stale ``build/`` cannot leak in)."""
    src = tmp / "src"
    src.mkdir()
    for name in BUILD_INPUTS:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps",
                    "--no-build-isolation", "--no-index", "-q", "-w", str(tmp / "dist")],
                   check=True, capture_output=True, timeout=120)
    (wheel,) = (tmp / "dist").glob("transferlab-*.whl")
    return wheel


def fresh_venv(tmp: Path, wheel: Path) -> tuple[Path, Path]:
    """A new environment with the wheel installed; returns (bin folder, site-packages)."""
    env_dir = tmp / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / ("Scripts" if os.name == "nt" else "bin") / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()"
                                "['purelib'])"], capture_output=True, text=True,
                               check=True).stdout.strip())
    # installed before the running environment is visible: pip would take its transferlab
    # (an editable install, say) for this one and skip the wheel
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps",
                    "--no-index", "-q", str(wheel)], check=True, capture_output=True,
                   timeout=120, env=clean_env())
    # the running environment's packages (torch ...) after the venv's own; lines of a .pth
    # that are paths only: its .pth files (an editable transferlab among them) are not run
    paths = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    paths |= {p for p in sys.path if p.endswith(("site-packages", "dist-packages"))}
    # (CI's environment lives inside the checkout, .ci/venv: only site-packages folders are
    # listed, never the checkout itself, and the test asserts where transferlab came from)
    (site / "zz_running_env.pth").write_text("\n".join(sorted(paths)) + "\n")
    return py.parent, site


@pytest.mark.slow
def test_wheel_installed_in_a_fresh_venv_works_from_any_folder(tmp_path):
    wheel = build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    for member in ("transferlab/py.typed", "transferlab/data/mnist_5k.npz",
                   *(f"transferlab/viewer/static/{n}" for n in  # the viewer's built page
                     ("index.html", "viewer.js", "viewer.css", "plotly-gl2d.min.js")),
                   *(f"transferlab/configs/{p.name}" for p in (REPO / "configs").glob("*.yaml"))):
        assert member in names, f"{member} missing from {wheel.name}"
    bindir, site = fresh_venv(tmp_path, wheel)
    work = tmp_path / "elsewhere"  # outside the repository; nothing of it on the path
    work.mkdir()
    env = clean_env()
    env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
    py, cli = bindir / "python", bindir / "transferlab"

    # the wheel's files, not the source tree, and its package data
    where = json.loads(run([py, "-c", """if True:
        import json, importlib.metadata as md, importlib.resources as res, transferlab
        root = res.files("transferlab")
        print(json.dumps({"file": transferlab.__file__, "version": transferlab.__version__,
                          "dist": md.version("transferlab"),
                          "configs": sorted(p.name for p in (root / "configs").iterdir()),
                          "typed": (root / "py.typed").is_file(),
                          "digits": (root / "data" / "mnist_5k.npz").is_file()}))"""],
                           work, env))
    assert Path(where["file"]).resolve().is_relative_to(site.resolve()), where["file"]
    assert where["version"] == where["dist"] == wheel.name.split("-")[1]
    assert where["configs"] == sorted(p.name for p in (REPO / "configs").glob("*.yaml"))
    assert where["typed"] and where["digits"]
    # the configs shipped are byte for byte the repository's
    for name in where["configs"]:
        assert (site / "transferlab" / "configs" / name).read_bytes() == \
            (REPO / "configs" / name).read_bytes()

    assert "finetune" in run([cli, "--help"], work, env)
    assert run([cli, "--version"], work, env).split() == ["transferlab", where["version"]]
    listed = run([cli, "config", "list"], work, env)
    assert {"xception", "mnist_split", "folder_finetune"} <= {
        line.split()[0] for line in listed.splitlines() if line.strip()}
    assert str(site / "transferlab" / "configs") in listed
    shown = run([cli, "config", "show", "mnist_split"], work, env)
    assert shown == (REPO / "configs" / "mnist_split.yaml").read_text(encoding="utf-8")

    # the README's experiment by its built-in name, full length (5 s on 2 cores): the README's
    # accuracies (MNIST itself is absent, so it falls back to the bundled digits)
    printed = run([cli, "finetune", "mnist_split", f"data.root={work / 'no_mnist'}",
                   "output.dir=mnist", "runtime.progress=false"], work, env)
    assert "mnist-5k" in printed
    metrics = json.loads((work / "mnist" / "metrics.json").read_text())
    acc = {s["stage"]: s["accuracy"] for s in metrics["stages"]}
    assert acc["pretrain"] >= 0.98 and acc["head-only"] >= 0.97 and acc["probe"] >= 0.97, acc

    # an extraction of generated images with the built-in xception config, a small model
    keys = make_image_tree(work / "photos", per_class=2, unicode_name=False)
    run([cli, "extract", "xception", "data.root=photos", "output.dir=feats",
         "model.name=test_resnet", "model.pretrained=false", "preprocess.input_size=[32, 32]",
         "runtime.progress=false", "runtime.num_workers=0"], work, env)
    stored = json.loads(run([py, "-c", """if True:
        import json, transferlab
        s = transferlab.FeatureStore.open("feats")
        model = transferlab.load_model("mnist/model.safetensors")
        print(json.dumps({"keys": list(s.keys), "shape": list(s.features.shape),
                          "versions": s.meta.get("versions", {}),
                          "model_versions": model.meta.get("versions", {})}))"""], work, env))
    assert sorted(stored["keys"]) == keys and stored["shape"][0] == len(keys)
    assert stored["versions"].get("transferlab") == where["version"]
    assert stored["model_versions"].get("transferlab") == where["version"]

    # every public name imports from the installed package
    missing = run([py, "-c", "import transferlab\n"
                   "print([n for n in transferlab.__all__ if getattr(transferlab, n) is None])"],
                  work, env)
    assert missing.strip() == "[]"

"""The build copies the repository's ``configs/*.yaml`` into the package
(``transferlab/configs/``): the examples ship in the wheel with one source to edit. The rest
of the metadata is in pyproject.toml."""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CONFIGS = Path(__file__).resolve().parent / "configs"


class BuildWithConfigs(build_py):
    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "transferlab" / "configs"
        shutil.rmtree(target, ignore_errors=True)  # a config deleted from configs/ goes too
        target.mkdir(parents=True)
        for config in sorted(CONFIGS.glob("*.yaml")):
            shutil.copyfile(config, target / config.name)


setup(cmdclass={"build_py": BuildWithConfigs})

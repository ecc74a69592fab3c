"""Errors raised for user mistakes. Each message says what is wrong and how to fix it.

Command-line entry points catch ``TransferlabError`` and print one clear line (exit code 2)
instead of a traceback.
"""
from __future__ import annotations


class TransferlabError(Exception):
    """Base class of every error caused by user input (config, data, model choice)."""


class ConfigError(TransferlabError):
    """A config file or a ``key=value`` override is missing, unknown, mistyped or invalid."""


class ModelError(TransferlabError):
    """A backbone cannot be built: unknown name, weights missing or not matching."""


class HeadError(ModelError):
    """A head does not fit the base's output, or cannot be built for this model and cut."""


class CutError(TransferlabError):
    """A cut point does not exist in the model; the message lists the valid ones."""


class DataError(TransferlabError):
    """Input data is missing, empty or unusable."""


class StoreError(TransferlabError):
    """A feature store is missing, corrupt or was written with another configuration."""


class MissingDependencyError(TransferlabError, ImportError):
    """An optional extra is not installed; the message names the pip command."""


class ComputeError(TransferlabError):
    """The model's numbers cannot be stored: inf/NaN features (fp16 overflow, broken weights)."""


class SettingError(ConfigError):
    """One setting (a function's parameter, a config key) cannot take the value it was given.

    ``str(exc)`` is ``f"{setting} {problem}"``: the library names its parameter, and a command
    names its own flag for it instead (``--n-init`` for ``n_init``).
    """

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"{setting} {problem}")
        self.setting = setting
        self.problem = problem

    def __reduce__(self) -> tuple:  # pickles with both parts (Exception keeps only the message)
        return type(self), (self.setting, self.problem)

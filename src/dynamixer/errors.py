"""The package's own error types: mistakes in what the user gave us, not bugs.

Every error that a user can cause and fix (a bad flag value, a damaged checkpoint, a data folder
without images, an optional dependency that is not installed) is raised as a `DynaMixerError`
with a message that says what was wrong and what to do. The command line turns these into one
``error: ...`` line on stderr and exit code 2; any other exception is a bug and is shown in full.
"""
from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ['DynaMixerError', 'MissingDependencyError', 'require']


class DynaMixerError(Exception):
    """A mistake in the user's input: the message says what was wrong and what to do."""


class MissingDependencyError(DynaMixerError, ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import an optional dependency, or raise MissingDependencyError naming the extra to install.

    ``require('onnxruntime', 'onnx', 'running ONNX files')`` returns the module when it imports.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(
            f'{purpose} needs the optional package {module.split(".")[0]!r}, which is not installed '
            f'({e}). Install it with: pip install "dynamixer[{extra}]"') from None

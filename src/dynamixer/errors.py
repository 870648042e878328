"""The package's own error types: mistakes in what the user gave us, not bugs.

Every error that a user can cause and fix (a bad flag value, a damaged checkpoint, a data folder
without images, an optional dependency that is not installed) is raised as a `DynaMixerError`
with a message that says what was wrong and what to do. The command line (`cli.main`, the one
place) turns these into one ``error: ...`` line on stderr and exit code 2; any other exception is
a bug and is shown in full.

The family, each defined next to the code that raises it and also a subclass of the built-in
exception of its kind (a bad value is a ValueError, a missing file a FileNotFoundError):

- `UsageError` (ValueError), `MissingDependencyError` (ImportError), `MissingFileError`
  (FileNotFoundError): here
- `files.CheckpointError` (ValueError; `CheckpointNotFoundError` also a MissingFileError),
  `files.OutputError` (OSError: an output path that cannot be written)
- `recipes.ConfigError` (ValueError), `data.DataError` (ValueError), `engine.DeviceError`,
  `engine.NonFiniteLoss`, `train.TrainingError`, `runs.RunFolderError`, `export.ExportError`,
  `hub.HubError`
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Optional

__all__ = ['DynaMixerError', 'UsageError', 'MissingDependencyError', 'MissingFileError', 'require']


class DynaMixerError(Exception):
    """A mistake in the user's input: the message says what was wrong and what to do."""


class UsageError(DynaMixerError, ValueError):
    """Arguments that do not fit together or do not fit the input (a layer the model does not
    have, an unknown variant name, ...)."""


class MissingDependencyError(DynaMixerError, ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""


class MissingFileError(DynaMixerError, FileNotFoundError):
    """A file the user named (or one that must sit next to it) does not exist."""


# import name -> the name pip installs it by, where they differ
_PIP_NAMES = {'sklearn': 'scikit-learn', 'PIL': 'pillow', 'yaml': 'pyyaml'}


def require(module: str, extra: Optional[str], purpose: str) -> ModuleType:
    """Import an optional dependency, or raise MissingDependencyError saying how to install it.

    ``require('onnxruntime', 'onnx', 'running ONNX files')`` returns the module when it imports,
    else the message names ``pip install "dynamixer[onnx]"``. ``extra=None`` is for a dependency
    every install has (matplotlib, scikit-learn) that is missing anyway (``pip install --no-deps``):
    the message names its pip package.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split('.')[0]
        if extra:
            what, how = 'the optional package', f'pip install "dynamixer[{extra}]"'
        else:
            what, how = 'the package', f'pip install {_PIP_NAMES.get(top, top)}'
        raise MissingDependencyError(
            f'{purpose} needs {what} {top!r}, which is not installed ({e}). Install it with: {how}') from None

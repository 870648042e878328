"""Run folders: where a training run writes, and the rule that a run is never overwritten unasked.

Shared by every training command (`dynamixer train`, `dynamixer detect train`, `dynamixer segment
train`): a run's folder is made absolute when the run is created; a resumed run writes next to
the checkpoint it resumes unless told otherwise; a folder that holds another run (`RUN_FILES`) is
refused unless the caller passes `overwrite` or resumes that folder's own checkpoint.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

from .errors import DynaMixerError
from .files import check_output_folder

__all__ = ['RunFolderError', 'RUN_FILES', 'REPLACED_FILES', 'run_folder', 'default_output', 'holds_run',
           'claim_run_folder']

# the files that make a folder a run's: a folder holding any of them is not written into unasked
RUN_FILES = ('last.pth', 'model.safetensors', 'metrics.json', 'metrics.csv')
# what --overwrite removes before the new run starts (so nothing of the old run is left to mix in)
REPLACED_FILES = RUN_FILES + ('config.yaml', 'curves.png', 'bad_images.txt')


class RunFolderError(DynaMixerError, ValueError):
    """The run folder holds another run, and nothing said to replace it."""


def run_folder(config: Dict[str, Any], resume: Optional[str] = None) -> str:
    """Where a run writes, as an absolute path: config['output'], else the resumed checkpoint's
    folder, else a new runs/<recipe>-<model> folder (numbered when that one holds a run)."""
    if config.get('output'):
        return os.path.abspath(config['output'])
    return os.path.dirname(os.path.abspath(resume)) if resume else default_output(config)


def default_output(config: Dict[str, Any], create: bool = True) -> str:
    base = os.path.abspath(os.path.join('runs', f"{config.get('recipe', 'run')}-{config['model']}"))
    if not create:
        return base
    path, n = base, 1
    while holds_run(path):  # never overwrite a run
        n += 1
        path = f'{base}-{n}'
    return path


def holds_run(folder: str) -> List[str]:
    """The run files (`RUN_FILES`) in `folder`; empty when it holds no run."""
    return [f for f in RUN_FILES if os.path.exists(os.path.join(folder, f))]


def claim_run_folder(output: str, resume: Optional[str], overwrite: bool, is_main: bool) -> None:
    """Refuse a folder that holds another run, unless `overwrite` (its run files are then removed
    by the main process) or the run resumes a checkpoint in that same folder."""
    check_output_folder(output, 'run folder')
    found = holds_run(output)
    if not found:
        return
    if resume and os.path.realpath(os.path.dirname(os.path.abspath(resume))) == os.path.realpath(output):
        return  # continuing the folder's own run
    if not overwrite:
        raise RunFolderError(
            f'{output} holds another run ({", ".join(found)}); it is not replaced without a word. Pass '
            f'--overwrite to replace it, --resume {os.path.join(output, "last.pth")} to continue it, or '
            'choose another --output.')
    if is_main:
        for name in REPLACED_FILES:
            path = os.path.join(output, name)
            if os.path.isfile(path):
                os.remove(path)

"""Run folders and training checkpoints: where a training run writes, the rule that a run is never
overwritten unasked, and the last.pth that a bit-identical resume continues from.

Shared by every training command (`dynamixer train`, `dynamixer detect train`, `dynamixer segment
train`): a run's folder is made absolute when the run is created; a resumed run writes next to
the checkpoint it resumes unless told otherwise; a folder that holds another run (`RUN_FILES`) is
refused unless the caller passes `overwrite` or resumes that folder's own checkpoint.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from . import __version__
from .engine import rng_state, set_rng_state
from .errors import DynaMixerError
from .files import CheckpointError, atomic_torch_save, check_output_folder

__all__ = ['RunFolderError', 'TrainingError', 'RUN_FILES', 'REPLACED_FILES', 'run_folder', 'default_output',
           'holds_run', 'claim_run_folder', 'save_training_state', 'restore_training_state']

# the files that make a folder a run's: a folder holding any of them is not written into unasked
RUN_FILES = ('last.pth', 'model.safetensors', 'metrics.json', 'metrics.csv')
# what --overwrite removes before the new run starts (so nothing of the old run is left to mix in)
REPLACED_FILES = RUN_FILES + ('config.yaml', 'curves.png', 'bad_images.txt')


class RunFolderError(DynaMixerError, ValueError):
    """The run folder holds another run, and nothing said to replace it."""


class TrainingError(DynaMixerError, RuntimeError):
    """Training cannot go on (a non-finite loss, a resume checkpoint that does not fit)."""


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


# ---- training checkpoints -----------------------------------------------------------------------

def save_training_state(output: str, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                        scaler: Any, ema: Any, generator: torch.Generator, config: Dict[str, Any],
                        class_names: List[str], epoch: int, step: int, metrics: Dict[str, Any],
                        history: List[Dict[str, Any]], is_main: bool, advice: str = '',
                        extra: Optional[Dict[str, Any]] = None) -> None:
    """OUTPUT/last.pth, atomically: everything a bit-identical resume needs (weights, optimiser,
    scaler and RNG states, epoch and update count, settings, class names, metrics history) plus
    `extra`. TrainingError for non-finite weights (nothing written; `advice` says what to do).
    Every process checks its weights; the main process writes."""
    for name, p in model.state_dict().items():
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise TrainingError(f'the weights became non-finite ({name}) in epoch {epoch}; not saving them. {advice}')
    if not is_main:
        return
    state = {
        'state_dict': model.state_dict(),
        'optimizer': optimizer.state_dict(),
        'scheduler': scheduler.state_dict(),
        'scaler': scaler.state_dict() if scaler is not None else None,
        'rng': rng_state(generator),
        'epoch': epoch, 'step': step,
        'config': config, 'class_names': class_names,
        'metrics': {**metrics, 'history': history},
        'version': __version__,
    }
    if ema is not None:
        state['state_dict_ema'] = ema.module.state_dict()
    state.update(extra or {})
    atomic_torch_save(state, os.path.join(output, 'last.pth'))


def restore_training_state(ckpt: Dict[str, Any], path: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                           scaler: Any, ema: Any, generator: torch.Generator,
                           total_epochs: int) -> Tuple[int, int, List[Dict[str, Any]]]:
    """Load what `save_training_state` wrote into the run's objects; returns (epoch, step, history)
    to continue from. The schedule is not loaded: it is rebuilt from the settings, and the lr is a
    function of the update count, so this continues it exactly (and a resume with a new --epochs
    or --lr follows them). CheckpointError when the weights or optimiser do not fit;
    TrainingError when the run already finished `total_epochs`."""
    try:
        model.load_state_dict(ckpt['state_dict'])
        if ema is not None and 'state_dict_ema' in ckpt:
            ema.module.load_state_dict(ckpt['state_dict_ema'])
        optimizer.load_state_dict(ckpt['optimizer'])
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f'{path}: does not fit this run ({e})') from None
    if scaler is not None and ckpt.get('scaler'):
        scaler.load_state_dict(ckpt['scaler'])
    set_rng_state(ckpt['rng'], generator)
    epoch, step = int(ckpt['epoch']), int(ckpt['step'])
    if epoch >= total_epochs:
        raise TrainingError(f'{path} already finished all {total_epochs} epochs; pass a larger --epochs to train on')
    return epoch, step, list((ckpt.get('metrics') or {}).get('history', []))

"""Loading a model from a checkpoint file: the variant, its arguments, the weights, class names.

File reading (`read_checkpoint`, `validate_checkpoint_file`, `CheckpointError`) lives in `files`
and the key layouts in `layout`.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Optional, Tuple

import timm
import torch

from . import layout
from .files import CheckpointError, PathLike, read_checkpoint
from .model import MODEL_ARGS
from .resample import trained_img_size

__all__ = ['infer_variant', 'load_model']


def infer_variant(state_dict: Mapping[str, torch.Tensor]) -> Optional[str]:
    """The registered DynaMixer variant whose architecture fits these weights (either layout),
    read from their shapes (no model is built)."""
    return layout.infer_variant(state_dict, MODEL_ARGS)


def load_model(
        path: PathLike,
        model_name: Optional[str] = None,
        **kwargs: Any,
) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """Build the model a checkpoint was trained as and load its weights (EMA weights when present).

    Works for this project's training checkpoints (which record the model name, its arguments
    and the class names), the authors' checkpoints and bare state dicts / safetensors files (the
    variant is inferred from the weights' shapes unless `model_name` is given). The model is built
    at the input size the weights were trained at, or at ``img_size=...`` when given (the mixing
    generators are then resampled, see `dynamixer.resample`).

    Returns (model in eval mode, info) with info keys 'model', 'num_classes', 'class_names'
    (None when the checkpoint has none) and 'config' (the training config, or {}). A file that
    cannot be read, or whose weights fit no model, raises CheckpointError (a ValueError) saying why.
    """
    checkpoint = read_checkpoint(path)
    try:
        return _build(checkpoint, path, model_name, kwargs)
    except CheckpointError:
        raise
    except (ValueError, RuntimeError, KeyError, TypeError) as e:
        # weights of another shape, a config naming an unknown model, ...: the file does not fit
        raise CheckpointError(f'{os.fspath(path)}: cannot load it as {model_name or "a DynaMixer model"}: '
                              f'{e}') from None


def _build(checkpoint: Dict[str, Any], path: PathLike, model_name: Optional[str],
           kwargs: Dict[str, Any]) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    config: Dict[str, Any] = checkpoint['config'] if isinstance(checkpoint.get('config'), dict) else {}
    model_name = model_name or config.get('model')
    model_kwargs = dict(config.get('model_kwargs') or {})
    model_kwargs.update(kwargs)
    state_dict = layout.unwrap_state_dict(checkpoint)
    if model_name is None:
        model_name = infer_variant(state_dict)
        if model_name is None:
            raise CheckpointError(
                f'{os.fspath(path)}: the weights fit none of the DynaMixer variants '
                f'({", ".join(_variants())}); pass the model name explicitly.')
    if model_kwargs.get('img_size') is None:
        # build at the size the weights were trained at; img_size=... resamples them for another
        size = trained_img_size(state_dict)
        if size is not None:
            model_kwargs['img_size'] = size
    head = state_dict.get('head.weight')
    num_classes = model_kwargs.pop('num_classes', head.shape[0] if head is not None else 1000)
    model = timm.create_model(
        model_name, pretrained=True, num_classes=num_classes,
        pretrained_cfg_overlay=dict(state_dict=state_dict, num_classes=num_classes),
        **model_kwargs)
    class_names = checkpoint.get('class_names')
    return model.eval(), dict(
        model=model_name, num_classes=num_classes, config=config,
        class_names=list(class_names) if class_names is not None else None)


def _variants() -> List[str]:
    return list(MODEL_ARGS)

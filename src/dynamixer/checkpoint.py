"""Reading checkpoint files safely, with errors that say what is wrong with the file.

Checkpoints are read without executing pickled code (``torch.load(weights_only=True)`` or
safetensors). The one non-tensor class the authors' training script pickles, argparse.Namespace
(its command-line arguments), is allowed explicitly: rebuilding it only sets attributes.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import struct
import zipfile
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple, Union

import torch

__all__ = [
    "CheckpointError", "validate_checkpoint_file", "read_checkpoint", "authors_pickle_globals",
    "infer_variant", "load_model",
]

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A checkpoint file that is missing, truncated, corrupt or not a checkpoint."""


@contextlib.contextmanager
def authors_pickle_globals() -> Iterator[None]:
    """Allow argparse.Namespace (pickled by the authors' train script) under weights_only loading."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        yield


def _check_safetensors(path: str, size: int) -> None:
    with open(path, 'rb') as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f'{path}: truncated safetensors file ({size} bytes)')
        (n,) = struct.unpack('<Q', head)
        if n > size - 8:
            raise CheckpointError(f'{path}: truncated or corrupt safetensors file (header of {n} bytes, file {size})')
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise CheckpointError(f'{path}: corrupt safetensors header ({e})') from None
    end = max((v['data_offsets'][1] for k, v in header.items() if k != '__metadata__'), default=0)
    if 8 + n + end > size:
        raise CheckpointError(
            f'{path}: truncated safetensors file: the header promises {8 + n + end} bytes, the file has '
            f'{size}. Copy or download it again.')


def validate_checkpoint_file(path: PathLike) -> None:
    """Cheap checks that `path` is a whole checkpoint file; raises CheckpointError or FileNotFoundError."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f'checkpoint file not found: {path}')
    if os.path.isdir(path):
        raise CheckpointError(f'{path} is a directory, not a checkpoint file')
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(f'{path} is empty (0 bytes): the copy or download was interrupted')
    if path.endswith('.safetensors'):
        _check_safetensors(path, size)
        return
    with open(path, 'rb') as f:
        magic = f.read(4)
    if magic.startswith(b'PK'):
        if not zipfile.is_zipfile(path):
            raise CheckpointError(
                f'{path}: truncated or corrupt PyTorch checkpoint ({size} bytes; its zip directory is '
                f'missing). Copy or download it again.')
    elif not magic.startswith(b'\x80'):  # neither zip nor a legacy pickle
        raise CheckpointError(
            f'{path} is not a PyTorch checkpoint (.pt/.pth/.pth.tar) or a .safetensors file')


def read_checkpoint(path: PathLike, map_location: Union[str, torch.device] = 'cpu') -> Dict[str, Any]:
    """Load a checkpoint file as a dict without running pickled code; clear errors for bad files."""
    validate_checkpoint_file(path)
    path = os.fspath(path)
    if path.endswith('.safetensors'):
        from safetensors.torch import load_file
        return load_file(path, device=str(map_location))
    try:
        with authors_pickle_globals():
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f'{path}: could not read the checkpoint, it is truncated or corrupt ({e})') from None
    except Exception as e:  # pickle.UnpicklingError for classes outside the allow-list
        raise CheckpointError(
            f'{path}: refused to load: it contains pickled Python objects that could run code '
            f'({e}). Save plain tensors, or convert it to safetensors in a trusted environment.') from None
    if not isinstance(obj, dict):
        raise CheckpointError(f'{path}: expected a dict of weights, found {type(obj).__name__}')
    return obj


def pretrained_file(pretrained_cfg: Any, overlay: Optional[Mapping[str, Any]]) -> Optional[str]:
    """The local weights file a timm pretrained config (and its overlay) point to, if any."""
    if overlay and overlay.get('file'):
        return overlay['file']
    if isinstance(pretrained_cfg, Mapping):
        return pretrained_cfg.get('file') or None
    return getattr(pretrained_cfg, 'file', None) or None


def check_pretrained_file(pretrained_cfg: Any, overlay: Optional[Mapping[str, Any]]) -> None:
    """Validate the file named in a pretrained config before timm loads it."""
    path = pretrained_file(pretrained_cfg, overlay)
    if path and os.path.isdir(path):
        # 'local-dir:' sources name a folder (config.json + weights); timm picks the weights file
        # in this order, check the one it will read
        for name in ('model.safetensors', 'pytorch_model.bin', 'pytorch_model.pth', 'model.pth'):
            if os.path.isfile(os.path.join(path, name)):
                validate_checkpoint_file(os.path.join(path, name))
                return
        return
    if path:
        validate_checkpoint_file(path)


def infer_variant(state_dict: Mapping[str, torch.Tensor]) -> Optional[str]:
    """The registered DynaMixer variant whose architecture fits these weights (either layout)."""
    import timm
    from .model import MODEL_ARGS, _unwrap_state_dict, fits
    state_dict = _unwrap_state_dict(dict(state_dict))
    for name in MODEL_ARGS:
        with torch.device('meta'):
            model = timm.create_model(name)
        if fits(state_dict, model):
            return name
    return None


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
    (None when the checkpoint has none) and 'config' (the training config, or {}).
    """
    import timm
    checkpoint = read_checkpoint(path)
    config = checkpoint.get('config') if isinstance(checkpoint.get('config'), dict) else {}
    model_name = model_name or config.get('model')
    model_kwargs = dict(config.get('model_kwargs') or {})
    model_kwargs.update(kwargs)
    from .model import _unwrap_state_dict
    state_dict = _unwrap_state_dict(checkpoint)
    if model_name is None:
        model_name = infer_variant(state_dict)
        if model_name is None:
            raise CheckpointError(
                f'{os.fspath(path)}: the weights fit none of the DynaMixer variants '
                f'({", ".join(_variants())}); pass the model name explicitly.')
    if model_kwargs.get('img_size') is None:
        # build at the size the weights were trained at; img_size=... resamples them for another
        from .resample import trained_img_size
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


def _variants() -> list:
    from .model import MODEL_ARGS
    return list(MODEL_ARGS)

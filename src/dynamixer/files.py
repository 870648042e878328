"""Checkpoint files: reading them safely, writing them atomically, and the one safetensors
metadata schema this project writes and reads.

Checkpoints are read without executing pickled code (``torch.load(weights_only=True)`` or
safetensors). The one non-tensor class the authors' training script pickles, argparse.Namespace
(its command-line arguments), is allowed explicitly: rebuilding it only sets attributes.

Writes go to a temporary file in the same folder, are fsynced, then renamed over the target: a
crash while writing leaves the previous version, never a partial file. The file gets the mode a
plain ``open()`` would give it (0o666 less the user's umask), not mkstemp's private 0o600. A write
the operating system refuses (read-only folder, disk full, a file where a folder should be) raises
`OutputError` naming the path.

Safetensors metadata (str -> str, `safetensors_metadata` / `read_safetensors_metadata`)::

    format        'dynamixer'
    model         the registered model name, e.g. 'dynamixer_nano'
    model_kwargs  JSON object of the model's construction arguments
    class_names   JSON list of class names (or null)
    preprocessing JSON object of the preprocessing (optional; written by `dynamixer export`)
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import struct
import tempfile
import threading
import zipfile
from typing import Any, BinaryIO, Callable, Dict, Iterator, Mapping, Optional, Sequence, Union

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from .errors import DynaMixerError, MissingFileError

__all__ = [
    'CheckpointError', 'CheckpointNotFoundError', 'OutputError', 'check_output_file', 'check_output_folder',
    'current_umask',
    'validate_checkpoint_file', 'read_checkpoint', 'authors_pickle_globals',
    'pretrained_file', 'check_pretrained_file', 'atomic_write', 'atomic_torch_save', 'atomic_write_text',
    'safetensors_metadata', 'read_safetensors_metadata', 'save_safetensors',
]

PathLike = Union[str, os.PathLike]


class CheckpointError(DynaMixerError, ValueError):
    """A checkpoint file that is missing, truncated, corrupt, unsafe or not a checkpoint of a model
    that fits."""


class CheckpointNotFoundError(CheckpointError, MissingFileError):
    """The checkpoint file does not exist (also a FileNotFoundError, as it was before)."""


class OutputError(DynaMixerError, OSError):
    """A file or folder the user asked for cannot be written there."""


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
    """Cheap checks that `path` is a whole checkpoint file; raises CheckpointError
    (CheckpointNotFoundError, also a FileNotFoundError, for a missing file)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointNotFoundError(f'checkpoint file not found: {path}')
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


# --------------------------------------------------------------------------------------------
# output paths and atomic writes
# --------------------------------------------------------------------------------------------

_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it where the system allows (Linux: /proc).

    Elsewhere it is read by setting and restoring it under a lock; for that instant the mask is
    0o077, so a file another thread creates meanwhile is private rather than too open."""
    try:
        with open('/proc/self/status', encoding='ascii', errors='replace') as f:
            for line in f:
                if line.startswith('Umask:'):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_lock:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def check_output_file(path: PathLike, what: str = 'output file', example: str = 'model') -> str:
    """Refuse an output file name that cannot be written: an existing folder, a path under an
    existing file, a folder the user may not write in. Returns the absolute path; missing parent
    folders are fine (writes create them). Raises OutputError."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        raise OutputError(f'{what} {path} is an existing folder; give a file name, e.g. {os.path.join(path, example)}')
    _check_writable(os.path.dirname(path), what, path)
    return path


def check_output_folder(path: PathLike, what: str = 'output folder') -> str:
    """Refuse an output folder that cannot be made or written: an existing file, a path under a
    file, a folder the user may not write in. Returns the absolute path. Raises OutputError."""
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputError(f'{what} {path} is a file; give a folder')
    _check_writable(path, what, path)
    return path


def _check_writable(folder: str, what: str, target: str) -> None:
    """`folder`, or its nearest existing ancestor when it is still to be made, is a folder the
    user may write in; the messages name `target`, what was asked for."""
    existing = folder
    while not os.path.exists(existing):  # the root exists, at worst
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise OutputError(f'cannot write {what} {target}: {existing} is a file, not a folder')
    if not os.access(existing, os.W_OK | os.X_OK):  # read-only folder or file system (root passes)
        raise OutputError(f'cannot write {what} {target}: permission denied in {existing}')


def _refused(path: str, e: OSError) -> OutputError:
    reason = e.strerror or str(e)
    return OutputError(f'cannot write {path}: {reason}' + (f' ({e.filename})' if e.filename and
                                                           os.fspath(e.filename) != path else ''))


def atomic_write(path: PathLike, write: Callable[[BinaryIO], Any]) -> None:
    """Call write(f) on a temporary file in the same folder, fsync, then os.replace over `path`.

    The file gets mode 0o666 & ~umask; a write the OS refuses raises OutputError."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + '.', suffix='.tmp', dir=folder)
    except OSError as e:
        raise _refused(path, e) from None
    try:
        with os.fdopen(fd, 'wb') as f:
            # mkstemp makes the file 0o600; give it what open() would, so the umask decides
            os.chmod(tmp, 0o666 & ~current_umask())
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and not isinstance(e, DynaMixerError):
            raise _refused(path, e) from None
        raise


def atomic_torch_save(obj: Any, path: PathLike) -> None:
    """torch.save(obj, path) that leaves either the old or the new file, never a partial one."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: PathLike) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    atomic_write(path, lambda f: f.write(text.encode()))


def atomic_save_figure(fig: Any, path: PathLike, **savefig_kwargs: Any) -> None:
    """A matplotlib figure as PNG at `path`, atomically (rendered in memory first)."""
    buf = io.BytesIO()
    fig.savefig(buf, format='png', **savefig_kwargs)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


# --------------------------------------------------------------------------------------------
# the safetensors metadata schema
# --------------------------------------------------------------------------------------------

SAFETENSORS_FORMAT = 'dynamixer'


def safetensors_metadata(
        model_name: str,
        model_kwargs: Optional[Mapping[str, Any]] = None,
        class_names: Optional[Sequence[str]] = None,
        preprocessing: Optional[Mapping[str, Any]] = None,
) -> Dict[str, str]:
    """The metadata (str -> str) this project writes into every safetensors file (schema above)."""
    meta = {'format': SAFETENSORS_FORMAT, 'model': str(model_name),
            'model_kwargs': json.dumps(dict(model_kwargs or {})),
            'class_names': json.dumps(list(class_names) if class_names is not None else None)}
    if preprocessing is not None:
        meta['preprocessing'] = json.dumps(preprocessing, indent=2)
    return meta


def read_safetensors_metadata(path: PathLike) -> Dict[str, Any]:
    """The parsed metadata of a safetensors file this project wrote, {} for any other file.

    Returns dict(model=str, model_kwargs=dict, class_names=list or None, preprocessing=dict or
    None). Files written before the schema was shared (by `dynamixer train` or `dynamixer
    export`) use the same keys and read the same way.
    """
    try:
        with safe_open(os.fspath(path), framework='pt') as f:
            raw = dict(f.metadata() or {})
    except Exception:  # a broken file: read_checkpoint gives the clear error
        return {}
    if raw.get('format') != SAFETENSORS_FORMAT:
        return {}
    pre = raw.get('preprocessing')
    return dict(model=raw.get('model'), model_kwargs=json.loads(raw.get('model_kwargs') or '{}'),
                class_names=json.loads(raw.get('class_names') or 'null'),
                preprocessing=json.loads(pre) if pre else None)


def save_safetensors(state_dict: Mapping[str, torch.Tensor], path: PathLike,
                     metadata: Optional[Dict[str, str]] = None) -> None:
    """Write weights (CPU, contiguous copies) as safetensors with `metadata`, atomically."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    data = save(tensors, metadata=metadata)
    atomic_write(path, lambda f: f.write(data))

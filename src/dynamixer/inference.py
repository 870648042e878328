"""Running a trained model on image files, with PyTorch or with an exported ONNX file.

``load_inference_model`` (checkpoint -> model and class names), ``preprocess`` (image files ->
batch tensor with the model's eval transform), ``topk`` / ``format_predictions`` (probabilities
-> ranked class names -> text), the preprocessing config an export writes next to its file, and
the ONNX Runtime side: ``ort_session`` (every session of the package is made here),
``OnnxClassifier`` (an exported ONNX file, float32 or int8, as a parameter-free ``nn.Module`` that
returns logits, so one evaluation and prediction path serves checkpoints and ONNX files) and
``predict_onnx``. `dynamixer predict`, `validate`, `export` and `benchmark` are thin commands
over these.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from timm.data import resolve_data_config
from torch import nn

from .checkpoint import load_model
from .data import DataError, class_names_for, load_image, preprocessing_transform
from .errors import DynaMixerError, MissingFileError, require
from .files import CheckpointError, atomic_write_text, read_checkpoint, read_safetensors_metadata

PathLike = Union[str, os.PathLike]

__all__ = ['load_inference_model', 'class_names_for', 'preprocess', 'topk', 'format_predictions',
           'preprocessing_config', 'preprocessing_path', 'save_preprocessing', 'load_preprocessing', 'is_onnx_file',
           'load_onnx', 'ort_session',
           'OnnxClassifier', 'predict_onnx', 'PREPROCESSING_SUFFIX', 'INPUT_NAME', 'OUTPUT_NAME']

PREPROCESSING_SUFFIX = '.preprocessing.json'
INPUT_NAME, OUTPUT_NAME = 'input', 'logits'


# ---- PyTorch models -----------------------------------------------------------------------------

def load_inference_model(path: str, model_name: Optional[str] = None) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """load_model plus the model name / arguments / class names this project writes into
    safetensors metadata. Raises CheckpointError with the reason for files that do not fit."""
    kwargs: Dict[str, Any] = {}
    class_names = None
    if str(path).endswith('.safetensors'):
        read_checkpoint(path)  # clear errors for missing / truncated files
        meta = read_safetensors_metadata(path)
        if meta:
            model_name = model_name or meta['model']
            if model_name == meta['model']:
                kwargs = {k: v for k, v in meta['model_kwargs'].items() if k not in ('drop_path_rate',)}
            class_names = meta['class_names']
    model, info = load_model(path, model_name, **kwargs)
    if info.get('class_names') is None and class_names is not None:
        info['class_names'] = class_names
    names = info.get('class_names')
    info['has_class_names'] = names is not None and len(names) == info['num_classes']
    info['class_names'] = class_names_for(info['num_classes'], info.get('class_names'))
    return model, info


def preprocess(paths: Sequence[str], transform: Callable) -> Tuple[torch.Tensor, List[str], List[Tuple[str, str]]]:
    """Image files -> (batch (B, 3, H, W), the paths that loaded, [(path, error)] for those that did not).

    `transform` is the model's eval transform (``dynamixer.data.eval_transform(model)``); images of
    any mode (grayscale, RGBA, palette, 16-bit) are converted to 8-bit RGB first."""
    tensors, ok, failed = [], [], []
    for p in paths:
        try:
            tensors.append(transform(load_image(p)))
            ok.append(p)
        except DataError as e:
            failed.append((p, str(e)))
    batch = torch.stack(tensors) if tensors else torch.empty(0)
    return batch, ok, failed


def topk(probs: torch.Tensor, class_names: Sequence[str], k: int = 5) -> List[List[Tuple[int, str, float]]]:
    """(B, num_classes) probabilities -> per image the k best (index, name, probability)."""
    probs = probs.detach().float()
    k = min(k, probs.shape[-1])
    values, indices = probs.topk(k, dim=-1)
    return [[(int(i), class_names[int(i)], float(v)) for v, i in zip(vs, ix)] for vs, ix in zip(values, indices)]


def format_predictions(paths: Sequence[str], ranked: Sequence[Sequence[Tuple[int, str, float]]],
                       as_json: bool = False) -> str:
    """Text (or JSON) for the top-k lists of each image."""
    if as_json:
        return json.dumps([{'image': p, 'top': [{'index': i, 'class': n, 'probability': round(v, 6)}
                                                 for i, n, v in r]} for p, r in zip(paths, ranked)], indent=1)
    lines = []
    for p, r in zip(paths, ranked):
        lines.append(p)
        width = max(len(n) for _, n, _ in r)
        lines += [f'  {rank}. {n:<{width}}  {100 * v:6.2f}%' for rank, (_, n, v) in enumerate(r, 1)]
    return '\n'.join(lines)


# ---- the preprocessing an export writes next to its file ------------------------------------------

def preprocessing_config(
        model: torch.nn.Module,
        class_names: Optional[Sequence[str]] = None,
        model_name: Optional[str] = None,
) -> Dict[str, Any]:
    """Eval preprocessing of `model` (from its pretrained_cfg via timm) and its class names."""
    cfg = resolve_data_config({}, model=model)
    timm_model: Any = model  # timm keeps the config in plain attributes
    # the size the model was built for (img_size=...), which its pretrained_cfg does not follow
    cfg['input_size'] = (timm_model.in_chans, *timm_model.img_size)
    return dict(
        model=model_name or timm_model.pretrained_cfg.get('architecture'),
        input_name=INPUT_NAME,
        output_name=OUTPUT_NAME,
        input_size=list(cfg['input_size']),
        mean=[float(v) for v in cfg['mean']],
        std=[float(v) for v in cfg['std']],
        crop_pct=float(cfg['crop_pct']),
        crop_mode=cfg.get('crop_mode', 'center'),
        interpolation=cfg['interpolation'],
        num_classes=timm_model.num_classes,
        class_names=class_names_for(timm_model.num_classes, class_names),
    )


def preprocessing_path(model_path: PathLike) -> Path:
    """``dir/name.onnx`` -> ``dir/name.onnx.preprocessing.json`` (one per exported file)."""
    p = Path(model_path)
    return p.with_name(p.name + PREPROCESSING_SUFFIX)


def save_preprocessing(config: Dict[str, Any], model_path: PathLike) -> Path:
    """Write `config` as the preprocessing JSON next to an exported model file, atomically (the
    one writer of these files); returns its path."""
    path = preprocessing_path(model_path)
    atomic_write_text(json.dumps(config, indent=2) + '\n', path)
    return path


def load_preprocessing(model_path: PathLike) -> Dict[str, Any]:
    """Read the preprocessing JSON written next to an exported model file."""
    path = preprocessing_path(model_path)
    if not path.is_file():
        raise MissingFileError(
            f'{path} not found: it is written by `dynamixer export` next to {Path(model_path).name}; '
            f'keep the two files together.')
    try:
        with open(path, encoding='utf-8') as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f'{path}: cannot read the preprocessing written by `dynamixer export` ({e}); '
                        'export the model again') from None
    if not isinstance(config, dict) or 'input_size' not in config or 'num_classes' not in config:
        raise DataError(f'{path} is not the preprocessing JSON `dynamixer export` writes; export the model again')
    return config


# ---- exported ONNX files (ONNX Runtime, no PyTorch model needed) --------------------------------

def is_onnx_file(path: PathLike) -> bool:
    """Does `path` name an ONNX file (by its extension)?"""
    return str(path).lower().endswith('.onnx')


def _not_whole_onnx(path: PathLike, e: Exception) -> CheckpointError:
    return CheckpointError(f'{path}: not a whole ONNX file ({type(e).__name__}: {str(e)[:300]}); it may be '
                           f'empty, cut short or another kind of file: export it again')


def load_onnx(path: PathLike) -> Any:
    """The graph (onnx.ModelProto) of an ONNX file, checked by ``onnx.checker``: with `ort_session`
    the one reader of ONNX files, so that every command says the same about a broken one.

    Raises MissingFileError for a missing file, CheckpointError for an empty, truncated or foreign
    one, MissingDependencyError naming the `onnx` extra without onnx."""
    onnx = require('onnx', 'onnx', 'reading an ONNX file')
    if not Path(path).is_file():
        raise MissingFileError(f'ONNX file not found: {path}')
    try:
        proto = onnx.load(os.fspath(path))
        onnx.checker.check_model(proto)
    except Exception as e:  # protobuf's DecodeError, onnx's ValidationError, ...
        raise _not_whole_onnx(path, e) from None
    return proto


def ort_session(path: PathLike, threads: Optional[int] = None, providers: Optional[Sequence[str]] = None,
                spin: bool = True) -> Any:
    """An ONNX Runtime InferenceSession for `path`: `threads` intra-op threads (None: ONNX
    Runtime's default, one per physical core) and one inter-op thread (the graph is a chain).
    `spin=False` lets the intra-op threads block instead of spinning after a run: each session
    has its own thread pool, and spinning pools of sessions (or of PyTorch) run in turn in one
    process compete for the cores (benchmarks/int8_variants.py --no-spin; on this project's 2-core
    machine it changed the int8 / float32 ratio by less than the run-to-run noise).
    Raises MissingDependencyError naming the `onnx` extra when onnxruntime is not installed,
    MissingFileError for a missing file and CheckpointError for one ONNX Runtime cannot load."""
    ort = require('onnxruntime', 'onnx', 'running an ONNX file')
    if not Path(path).is_file():
        raise MissingFileError(f'ONNX file not found: {path}')
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
    if not spin:
        options.add_session_config_entry('session.intra_op.allow_spinning', '0')
    try:
        return ort.InferenceSession(os.fspath(path), options, providers=list(providers or ['CPUExecutionProvider']))
    except Exception as e:  # onnxruntime's own exception types (InvalidProtobuf, Fail, ...)
        raise _not_whole_onnx(path, e) from None


class OnnxClassifier(nn.Module):
    """An exported ONNX file (float32 or int8) with its preprocessing JSON, run by ONNX Runtime
    on the CPU, as a module without parameters.

    ``clf(batch)``: (B, C, H, W) float tensor (on any device) -> (B, num_classes) float32 logits
    on the CPU. ``transform``: PIL image -> (C, H, W) tensor; ``class_names``; ``config``: the
    preprocessing JSON (``config.get('quantization')`` says how an int8 file was made);
    ``img_size``, ``in_chans`` and ``num_classes`` as on the PyTorch model.
    """

    def __init__(self, onnx_path: PathLike, threads: Optional[int] = None):
        super().__init__()
        require('onnxruntime', 'onnx', 'running an ONNX file')  # before the file: what to install comes first
        if not Path(onnx_path).is_file():
            raise MissingFileError(f'ONNX file not found: {onnx_path}')
        self.path = Path(onnx_path)
        self.config: Dict[str, Any] = load_preprocessing(onnx_path)
        self.transform = preprocessing_transform(self.config)
        self.num_classes = int(self.config['num_classes'])
        self.class_names: List[str] = class_names_for(self.num_classes, self.config.get('class_names'))
        self.in_chans = int(self.config['input_size'][0])
        self.img_size = tuple(int(v) for v in self.config['input_size'][1:])
        self.session = ort_session(onnx_path, threads)
        self._input = self.config.get('input_name', INPUT_NAME)
        self._output = self.config.get('output_name', OUTPUT_NAME)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != (self.in_chans, *self.img_size):
            raise DynaMixerError(
                f'{self.path.name} takes (batch, {self.in_chans}, {self.img_size[0]}, {self.img_size[1]}) '
                f'inputs, got {tuple(x.shape)}: resize images with its eval transform (clf.transform)')
        feed = np.ascontiguousarray(x.detach().float().cpu().numpy())
        return torch.from_numpy(self.session.run([self._output], {self._input: feed})[0])


def predict_onnx(
        onnx_path: PathLike,
        image_paths: Sequence[PathLike],
        topk: int = 5,
        batch_size: int = 32,
) -> List[List[Tuple[int, str, float]]]:
    """Top-k (index, class name, probability) per image from an exported ONNX file, with the
    preprocessing and ranking of `dynamixer predict`. Raises DataError for unreadable images."""
    clf = OnnxClassifier(onnx_path)
    results: List[List[Tuple[int, str, float]]] = []
    paths = [os.fspath(p) for p in image_paths]
    k = topk
    for start in range(0, len(paths), batch_size):
        batch, _, failed = preprocess(paths[start:start + batch_size], clf.transform)
        if failed:
            raise DataError('; '.join(e for _, e in failed))
        results += _rank(clf(batch).softmax(dim=-1), clf.class_names, k)
    return results


_rank = topk  # predict_onnx's `topk` argument shadows the function's name inside it

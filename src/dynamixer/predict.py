"""`dynamixer predict`: classify image files with a checkpoint, print the top-k classes.

The pieces are separate so other back-ends (e.g. ONNX Runtime) reuse them:
``load_inference_model`` (checkpoint -> model, class names), ``preprocess`` (image files -> batch
tensor with the model's eval transform), ``topk`` / ``format_predictions`` (probabilities ->
ranked class names -> text). ``--onnx FILE`` (or an ``.onnx`` file given as the checkpoint) runs
an exported ONNX file, float32 or int8, instead (``dynamixer.runtime.OnnxClassifier``) through the
same preprocessing and ranking.
"""
from __future__ import annotations

import argparse
import json
import sys
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .checkpoint import CheckpointError, load_model, read_checkpoint
from .data import DataError, eval_transform, load_image
from .errors import DynaMixerError
from .runtime import OnnxClassifier, is_onnx_file

__all__ = ['load_inference_model', 'class_names_for', 'preprocess', 'topk', 'format_predictions',
           'predict_onnx', 'add_arguments', 'run']


def _safetensors_metadata(path: str) -> Dict[str, str]:
    from safetensors import safe_open
    try:
        with safe_open(path, framework='pt') as f:
            return dict(f.metadata() or {})
    except Exception:  # a broken file: read_checkpoint gives the clear error
        return {}


def load_inference_model(path: str, model_name: Optional[str] = None) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """load_model plus the model name / arguments / class names this project writes into
    safetensors metadata. Raises CheckpointError with the reason for files that do not fit."""
    kwargs: Dict[str, Any] = {}
    class_names = None
    if str(path).endswith('.safetensors'):
        read_checkpoint(path)  # clear errors for missing / truncated files
        meta = _safetensors_metadata(path)
        if meta.get('format') == 'dynamixer':
            model_name = model_name or meta.get('model')
            if model_name == meta.get('model'):
                kwargs = {k: v for k, v in json.loads(meta.get('model_kwargs', '{}')).items()
                          if k not in ('drop_path_rate',)}
            class_names = json.loads(meta.get('class_names', 'null'))
    try:
        model, info = load_model(path, model_name, **kwargs)
    except CheckpointError:
        raise
    except (ValueError, RuntimeError, KeyError) as e:
        raise CheckpointError(f'{path}: cannot load it as {model_name or "a DynaMixer model"}: {e}') from None
    if info.get('class_names') is None and class_names is not None:
        info['class_names'] = class_names
    names = info.get('class_names')
    info['has_class_names'] = names is not None and len(names) == info['num_classes']
    info['class_names'] = class_names_for(info['num_classes'], info.get('class_names'))
    return model, info


def class_names_for(num_classes: int, names: Optional[Sequence[str]]) -> List[str]:
    """The checkpoint's class names; ImageNet-1k names for 1000 classes without; else '0', '1', ..."""
    if names is not None and len(names) == num_classes:
        return [str(n) for n in names]
    if num_classes == 1000:
        from timm.data import ImageNetInfo  # ships with timm, works offline
        return [d.split(',')[0] for d in ImageNetInfo().label_descriptions()]
    return [str(i) for i in range(num_classes)]


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


_topk = topk  # for predict_onnx, whose argument `topk` (the count) shadows the function


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


def predict_onnx(
        onnx_path: str,
        image_paths: Sequence[str],
        topk: int = 5,
        batch_size: int = 32,
) -> List[List[Tuple[int, str, float]]]:
    """Top-k (index, class name, probability) per image from an exported ONNX file, with the
    preprocessing and ranking of `dynamixer predict`. Raises DataError for unreadable images."""
    clf = OnnxClassifier(onnx_path)
    results: List[List[Tuple[int, str, float]]] = []
    paths = [os.fspath(p) for p in image_paths]
    for start in range(0, len(paths), batch_size):
        batch, _, failed = preprocess(paths[start:start + batch_size], clf.transform)
        if failed:
            raise DataError('; '.join(e for _, e in failed))
        results += _topk(clf(batch).softmax(dim=-1), clf.class_names, topk)
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('images', nargs='+', metavar='IMAGE', help='image files')
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument('-c', '--checkpoint',
                        help="a checkpoint: this project's (.pth), the authors', or .safetensors")
    source.add_argument('--onnx', metavar='FILE',
                        help='an ONNX file from `dynamixer export`, float32 or int8 (with its '
                             '.preprocessing.json), run by ONNX Runtime instead of PyTorch')
    parser.add_argument('--model', default=None, help='model name, when the checkpoint does not record it')
    parser.add_argument('-k', '--top-k', type=int, default=5, help='how many classes to show per image')
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--json', action='store_true', help='print JSON instead of text')


def run(args: argparse.Namespace) -> int:
    try:
        onnx_path = getattr(args, 'onnx', None) or (args.checkpoint if is_onnx_file(args.checkpoint) else None)
        if onnx_path:
            clf = OnnxClassifier(onnx_path)  # preprocessing and class names from the export's JSON
            model, transform, names = clf, clf.transform, clf.class_names
        else:
            model, info = load_inference_model(args.checkpoint, args.model)
            transform = eval_transform(model)
            names = info['class_names']
    except (CheckpointError, DynaMixerError, FileNotFoundError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    all_paths: List[str] = []
    all_ranked: List[Any] = []
    failed_all: List[Tuple[str, str]] = []
    for start in range(0, len(args.images), args.batch_size):
        batch, ok, failed = preprocess(args.images[start:start + args.batch_size], transform)
        failed_all += failed
        if ok:
            with torch.no_grad():
                probs = model(batch).softmax(dim=-1)
            all_paths += ok
            all_ranked += topk(probs, names, args.top_k)
    if all_paths:
        print(format_predictions(all_paths, all_ranked, args.json))
    for p, e in failed_all:
        print(f'error: {e}', file=sys.stderr)
    return 1 if failed_all else 0

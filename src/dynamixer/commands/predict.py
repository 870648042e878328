"""`dynamixer predict`: classify image files with a checkpoint, print the top-k classes.

The pieces live in `dynamixer.inference`: ``load_inference_model``, ``preprocess``, ``topk``,
``format_predictions``. ``--onnx FILE`` (or an
``.onnx`` file given as the checkpoint) runs an exported ONNX file, float32 or int8, instead
(``OnnxClassifier``) through the same preprocessing and ranking.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, List, Tuple

import torch

from ..argtypes import positive_int
from ..data import eval_transform
from ..inference import OnnxClassifier, format_predictions, is_onnx_file, load_inference_model, preprocess, topk

__all__ = ['add_arguments', 'run']


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('images', nargs='+', metavar='IMAGE', help='image files')
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument('-c', '--checkpoint',
                        help="a checkpoint: this project's (.pth), the authors', or .safetensors; or an "
                             '.onnx file from `dynamixer export` (float32 or int8)')
    source.add_argument('--onnx', metavar='FILE',
                        help='an ONNX file from `dynamixer export`, float32 or int8 (with its '
                             '.preprocessing.json), run by ONNX Runtime instead of PyTorch')
    parser.add_argument('--model', default=None, help='model name, when the checkpoint does not record it')
    parser.add_argument('-k', '--top-k', type=positive_int, default=5, help='how many classes to show per image')
    parser.add_argument('--batch-size', type=positive_int, default=32, help='images per forward pass')
    parser.add_argument('--json', action='store_true', help='print JSON instead of text')


def run(args: argparse.Namespace) -> int:
    """Exit code 0, or 1 when some images could not be read (the others are still classified)."""
    onnx_path = getattr(args, 'onnx', None) or (args.checkpoint if is_onnx_file(args.checkpoint) else None)
    if onnx_path:  # preprocessing and class names from the export's JSON
        clf = OnnxClassifier(onnx_path)
        model: torch.nn.Module = clf
        transform, names = clf.transform, clf.class_names
    else:
        model, info = load_inference_model(args.checkpoint, args.model)
        transform = eval_transform(model)
        names = info['class_names']
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
    for _, e in failed_all:
        print(f'error: {e}', file=sys.stderr)
    return 1 if failed_all else 0

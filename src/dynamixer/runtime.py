"""Run an exported ONNX file (float32 or int8) in ONNX Runtime as if it were the PyTorch model.

`OnnxClassifier` is an ``nn.Module`` without parameters whose forward maps a (B, C, H, W) float
batch to (B, num_classes) logits through an ONNX Runtime session; it carries the eval transform
and class names of the preprocessing JSON written next to the file by `dynamixer export`. Being a
module, the same evaluation and prediction code serves checkpoints and ONNX files
(`dynamixer validate FILE.onnx`, `dynamixer predict --onnx FILE.onnx`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from .errors import DynaMixerError, require
from .export import INPUT_NAME, OUTPUT_NAME, class_names_for, eval_transform, load_preprocessing

__all__ = ['OnnxClassifier', 'is_onnx_file', 'ort_session']

PathLike = Union[str, os.PathLike]


def is_onnx_file(path: PathLike) -> bool:
    """Does `path` name an ONNX file (by its extension)?"""
    return str(path).lower().endswith('.onnx')


def ort_session(path: PathLike, threads: Optional[int] = None, providers: Optional[Sequence[str]] = None):
    """An ONNX Runtime InferenceSession for `path` with `threads` intra-op threads (None: ORT's
    default, one per physical core) and one inter-op thread (the graph is a chain)."""
    ort = require('onnxruntime', 'onnx', 'running ONNX files')
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    return ort.InferenceSession(os.fspath(path), so, providers=list(providers or ['CPUExecutionProvider']))


class OnnxClassifier(nn.Module):
    """An exported ONNX file with its preprocessing JSON, run by ONNX Runtime on the CPU.

    ``clf(batch)``: (B, C, H, W) float tensor -> (B, num_classes) float32 logits (on the CPU; the
    input may live anywhere). ``transform``: PIL image -> (C, H, W) tensor; ``class_names``;
    ``config``: the preprocessing JSON (``config.get('quantization')`` says how an int8 file was
    made); ``img_size``, ``in_chans``, ``num_classes`` as on the PyTorch model.
    """

    def __init__(self, onnx_path: PathLike, threads: Optional[int] = None):
        super().__init__()
        if not Path(onnx_path).is_file():
            raise FileNotFoundError(f'ONNX file not found: {onnx_path}')
        self.path = Path(onnx_path)
        self.config: Dict[str, Any] = load_preprocessing(onnx_path)
        self.transform = eval_transform(self.config)
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
        feed = x.detach().float().cpu().numpy()
        out = self.session.run([self._output], {self._input: np.ascontiguousarray(feed)})[0]
        return torch.from_numpy(out)

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        """Same as calling the module (kept for the pre-`runtime` name)."""
        return self(batch)

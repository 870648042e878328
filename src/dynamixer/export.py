"""`dynamixer export`: a checkpoint to an ONNX, TorchScript or safetensors file plus its preprocessing.

Every export writes two files: the model (``NAME.onnx`` / ``NAME.pt`` / ``NAME.safetensors``) and
``NAME.<ext>.preprocessing.json`` with what a consumer needs to feed it (input size, mean, std, crop,
interpolation, class names). The exported ONNX and TorchScript files run without this package
(ONNX Runtime alone; torch alone), and the export is checked against the PyTorch model on random
and real images before the command reports success.

ONNX uses the torch.export-based exporter (``torch.onnx.export(..., dynamo=True)``, the default
since torch 2.9) with a dynamic batch axis; the input check in ``DynaMixer._check_input`` only
reads the static channel and spatial sizes, so it traces away and costs nothing at run time.
"""
from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import __version__
from .argtypes import Bounded, non_negative_float
from .checkpoint import load_model
from .data import class_names_for, preprocessing_transform, sample_images
from .errors import DynaMixerError, require
from .inference import (INPUT_NAME, OUTPUT_NAME, PREPROCESSING_SUFFIX, OnnxClassifier, load_preprocessing,
                        predict_onnx, preprocessing_config, preprocessing_path)
from .files import (OutputError, atomic_write, atomic_write_text, check_output_file, safetensors_metadata,
                    save_safetensors)

PathLike = Union[str, os.PathLike]

__all__ = [
    'FORMATS', 'PREPROCESSING_SUFFIX', 'class_names_for', 'preprocessing_config', 'preprocessing_path',
    'sample_images', 'eval_transform', 'export_onnx', 'export_torchscript', 'export_safetensors',
    'check_onnx', 'check_torchscript', 'export_checkpoint', 'load_preprocessing', 'OnnxClassifier',
    'predict_onnx', 'ExportError',
]

FORMATS = {'onnx': '.onnx', 'torchscript': '.pt', 'safetensors': '.safetensors'}
DEFAULT_OPSET = 18


class ExportError(DynaMixerError, ValueError):
    """An export that cannot be made as asked (an unknown format, an opset the exporter cannot write)."""


# --------------------------------------------------------------------------------------------
# Preprocessing (`dynamixer.inference` holds the config, `dynamixer.data` the transform and the
# sample images; re-exported here, their old home)
# --------------------------------------------------------------------------------------------

def _real_batch(config: Dict[str, Any]) -> torch.Tensor:
    """The sample images through the eval transform of a preprocessing config: (6, C, H, W)."""
    transform = preprocessing_transform(config)
    return torch.stack([transform(im) for im in sample_images()])


eval_transform = preprocessing_transform  # the old name: eval transform of a preprocessing config


# --------------------------------------------------------------------------------------------
# Exporters and their checks
# --------------------------------------------------------------------------------------------

def export_onnx(
        model: torch.nn.Module,
        path: PathLike,
        opset: int = DEFAULT_OPSET,
        metadata: Optional[Dict[str, str]] = None,
) -> Path:
    """Write `model` as one self-contained ONNX file, input (B, C, H, W) with a dynamic batch axis.

    `metadata` (str -> str) goes into the file's metadata_props.
    """
    onnx = require('onnx', 'onnx', 'exporting to ONNX')
    newest = onnx.defs.onnx_opset_version()
    if not DEFAULT_OPSET <= opset <= newest:  # below 18 torch's exporter cannot convert these models
        raise ExportError(f'opset {opset}: choose one from {DEFAULT_OPSET} to {newest}, the newest the installed '
                          f'onnx {onnx.__version__} knows')
    path = Path(path)
    model = model.eval()
    c, h, w = model.in_chans, *model.img_size
    # batch 2 as example: with 1 the exporter could specialise the batch axis to a constant
    example = torch.randn(2, c, h, w)
    batch = torch.export.Dim('batch', min=1)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        program = torch.onnx.export(
            model, (example,), dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_shapes={'x': {0: batch}}, opset_version=opset, verbose=False)
    proto = program.model_proto
    for k, v in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    # one file, weights inside (DynaMixer-L is ~390 MB, far below protobuf's 2 GB limit)
    atomic_write(path, lambda f: f.write(proto.SerializeToString()))
    onnx.checker.check_model(os.fspath(path), full_check=True)
    return path


def export_torchscript(
        model: torch.nn.Module,
        path: PathLike,
        extra_files: Optional[Dict[str, str]] = None,
) -> Path:
    """Write `model` scripted (torch.jit.script) with `extra_files` stored inside the archive."""
    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # TorchScript is deprecated upstream but still the torch-only format
        scripted = torch.jit.script(model.eval())
        atomic_write(path, lambda f: torch.jit.save(scripted, f, _extra_files=extra_files or {}))
    return path


def export_safetensors(
        model: torch.nn.Module,
        path: PathLike,
        metadata: Optional[Dict[str, str]] = None,
) -> Path:
    """Write the weights (no code, no pickle) with `metadata` (str -> str) in the header."""
    path = Path(path)
    save_safetensors(model.state_dict(), path, metadata)
    return path


def _max_abs_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def check_onnx(onnx_path: PathLike, model: torch.nn.Module, inputs: torch.Tensor) -> float:
    """Max abs difference of ONNX Runtime's logits from the PyTorch model's on `inputs` (B, C, H, W)."""
    ort = require('onnxruntime', 'onnx', 'checking an ONNX export')
    session = ort.InferenceSession(os.fspath(onnx_path), providers=['CPUExecutionProvider'])
    out = session.run([OUTPUT_NAME], {INPUT_NAME: inputs.numpy()})[0]
    with torch.no_grad():
        ref = model.eval()(inputs).numpy()
    return _max_abs_error(out, ref)


def check_torchscript(ts_path: PathLike, model: torch.nn.Module, inputs: torch.Tensor) -> float:
    """Max abs difference of the loaded TorchScript model's logits from the eager model's."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        loaded = torch.jit.load(os.fspath(ts_path), map_location='cpu')
    with torch.no_grad():
        return _max_abs_error(loaded(inputs).numpy(), model.eval()(inputs).numpy())


def export_checkpoint(
        checkpoint: PathLike,
        fmt: str = 'onnx',
        output: Optional[PathLike] = None,
        opset: int = DEFAULT_OPSET,
        seed: int = 0,
) -> Dict[str, Any]:
    """Export a checkpoint; returns dict(path, preprocessing_path, config, errors).

    `errors` maps 'random' / 'real' to the max abs error of the exported model against PyTorch
    (empty for safetensors, whose weights are bit-exact copies).
    """
    if fmt not in FORMATS:
        raise ExportError(f'unknown format {fmt!r}; choose one of {", ".join(FORMATS)}')
    if output is None:
        output = Path(checkpoint).with_name(Path(checkpoint).name.split('.')[0] + FORMATS[fmt])
    # where it goes is checked before the (slow) export, and the checkpoint the same way as by
    # predict and validate (files.read_checkpoint through load_model)
    output = Path(check_output_file(output, f'{fmt} file', 'model' + FORMATS[fmt]))
    check_output_file(preprocessing_path(output), 'preprocessing file')
    if os.path.exists(checkpoint) and output.exists() and os.path.samefile(checkpoint, output):
        raise OutputError(f'the {fmt} file {output} would replace the checkpoint it is made from; give --output')
    model, info = load_model(checkpoint)
    model = model.eval()
    config = preprocessing_config(model, info['class_names'], info['model'])
    config['format'] = fmt
    config['dynamixer_version'] = __version__
    config_text = json.dumps(config, indent=2)
    meta = {'preprocessing': config_text, 'model': str(config['model'])}

    if fmt == 'onnx':
        config['opset'] = opset
        meta['preprocessing'] = config_text = json.dumps(config, indent=2)
        export_onnx(model, output, opset=opset, metadata=meta)
        check = check_onnx
    elif fmt == 'torchscript':
        export_torchscript(model, output, extra_files={'preprocessing.json': config_text})
        check = check_torchscript
    else:
        # the shared schema (`files.safetensors_metadata`, read back by `dynamixer predict`)
        meta = safetensors_metadata(config['model'], info['config'].get('model_kwargs') or {},
                                    config['class_names'], preprocessing=config)
        export_safetensors(model, output, metadata=meta)
        check = None

    errors: Dict[str, float] = {}
    if check is not None:
        gen = torch.Generator().manual_seed(seed)
        # batch 3 and 6 (not the exporter's example batch of 2): exercises the dynamic batch axis
        random_inputs = torch.randn(3, *config['input_size'], generator=gen)
        errors['random'] = check(output, model, random_inputs)
        errors['real'] = check(output, model, _real_batch(config))
    pre_path = preprocessing_path(output)
    atomic_write_text(config_text + '\n', pre_path)
    return dict(path=output, preprocessing_path=pre_path, config=config, errors=errors)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('checkpoint', help='training checkpoint, authors\' checkpoint or weights file')
    parser.add_argument('--format', default='onnx', choices=list(FORMATS),
                        help='onnx (ONNX Runtime etc.), torchscript (torch only) or safetensors (weights)')
    parser.add_argument('--output', '-o', default=None,
                        help='model file to write (default: next to the checkpoint, with the format\'s '
                             'extension); the preprocessing JSON goes next to it')
    parser.add_argument('--opset', type=Bounded(int, DEFAULT_OPSET), default=DEFAULT_OPSET,
                        help='ONNX opset, from %(default)s (the default) to the newest the installed onnx knows')
    parser.add_argument('--atol', type=non_negative_float, default=1e-4,
                        help='largest max abs logit error accepted against PyTorch (default %(default)g)')


def run(args: argparse.Namespace) -> int:
    result = export_checkpoint(args.checkpoint, args.format, args.output, opset=args.opset)
    cfg = result['config']
    size_mb = os.path.getsize(result['path']) / 2 ** 20
    print(f"wrote {result['path']} ({args.format}, {cfg['model']}, {cfg['num_classes']} classes, "
          f"{size_mb:.1f} MiB)")
    print(f"wrote {result['preprocessing_path']} (input {'x'.join(map(str, cfg['input_size']))}, "
          f"{cfg['interpolation']}, crop_pct {cfg['crop_pct']})")
    ok = True
    for kind, err in result['errors'].items():
        passed = err <= args.atol
        ok &= passed
        what = 'random inputs (batch 3)' if kind == 'random' else 'real images (batch 6, eval transform)'
        print(f"check {args.format} vs PyTorch on {what}: max abs error {err:.3g} "
              f"({'ok' if passed else 'FAILED'}, tolerance {args.atol:g})")
    if not ok:
        print(f'error: the exported model does not reproduce the PyTorch outputs within {args.atol:g}; '
              f'the files were kept for inspection.')
        return 1
    return 0

"""`dynamixer export`: a checkpoint to an ONNX, TorchScript or safetensors file plus its preprocessing.

Every export writes two files: the model (``NAME.onnx`` / ``NAME.pt`` / ``NAME.safetensors``) and
``NAME.<ext>.preprocessing.json`` with what a consumer needs to feed it (input size, mean, std, crop,
interpolation, class names). The exported ONNX and TorchScript files run without this package
(ONNX Runtime alone; torch alone), and the export is checked against the PyTorch model on random
and real images before the command reports success.

ONNX uses the torch.export-based exporter (``torch.onnx.export(..., dynamo=True)``, the default
since torch 2.9) with a dynamic batch axis; the input check in ``DynaMixer._check_input`` only
reads the static channel and spatial sizes, so it traces away and costs nothing at run time.

``--quantize int8`` (`export_int8`) writes an int8 file instead: ONNX Runtime's quantisation of
the float ONNX export, or PyTorch's dynamic int8 Linear layers scripted to TorchScript; the
quantisation itself, and which parts stay in float, is `dynamixer.quantize`.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Union

import numpy as np
import torch

from .. import __version__
from ..argtypes import Bounded, non_negative_float, positive_int
from ..checkpoint import load_model
from ..data import preprocessing_transform, sample_images
from ..errors import DynaMixerError, require
from ..files import OutputError, atomic_write, check_output_file, safetensors_metadata, save_safetensors
from ..inference import (
    INPUT_NAME,
    OUTPUT_NAME,
    OnnxClassifier,
    is_onnx_file,
    ort_session,
    preprocessing_config,
    preprocessing_path,
    save_preprocessing,
)
from ..onnx_graph import softmax_on_last_axis
from ..quantize import DEFAULT_KEEP_FLOAT, check_parts, compare_logits, quantize_model, quantize_onnx

PathLike = Union[str, os.PathLike]

__all__ = [
    'FORMATS', 'export_onnx', 'export_torchscript', 'export_safetensors', 'check_onnx', 'check_torchscript',
    'export_checkpoint', 'sample_batch', 'INT8_FORMATS', 'export_int8', 'ExportError', 'add_arguments', 'run',
]

FORMATS = {'onnx': '.onnx', 'torchscript': '.pt', 'safetensors': '.safetensors'}
# 20: the first opset with a Gelu operator, which ONNX Runtime fuses with the bias (BiasGelu); at
# 18-19 the exporter spells GELU out as Div, Erf, Add, Mul, Mul (about 4% of the float file's time)
DEFAULT_OPSET = 20
MIN_OPSET = 18  # below 18 torch's exporter cannot convert these models


class ExportError(DynaMixerError, ValueError):
    """An export that cannot be made as asked (an unknown format, an opset the exporter cannot write)."""


# --------------------------------------------------------------------------------------------
# Preprocessing (`dynamixer.inference` holds the config, `dynamixer.data` the transform and the
# sample images)
# --------------------------------------------------------------------------------------------

def sample_batch(config: Dict[str, Any]) -> torch.Tensor:
    """The sample images through the eval transform of a preprocessing config: (6, C, H, W)."""
    transform = preprocessing_transform(config)
    return torch.stack([transform(im) for im in sample_images()])




# --------------------------------------------------------------------------------------------
# Exporters and their checks
# --------------------------------------------------------------------------------------------

def export_onnx(
        model: torch.nn.Module,
        path: PathLike,
        opset: int = DEFAULT_OPSET,
        metadata: Optional[Dict[str, str]] = None,
        input_size: Optional[Sequence[int]] = None,
) -> Path:
    """Write `model` as one self-contained ONNX file, input (B, C, H, W) with a dynamic batch axis.

    `metadata` (str -> str) goes into the file's metadata_props. `input_size` (C, H, W) defaults
    to a DynaMixer's own (``in_chans``, ``img_size``); give it for other image models (timm's, in
    `dynamixer benchmark`).
    """
    onnx = require('onnx', 'onnx', 'exporting to ONNX')
    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise ExportError(f'opset {opset}: choose one from {MIN_OPSET} to {newest}, the newest the installed '
                          f'onnx {onnx.__version__} knows')
    require('onnxscript', 'onnx', 'exporting to ONNX')  # torch's dynamo exporter builds the graph with it
    path = Path(path)
    model = model.eval()
    if input_size is None:
        timm_model: Any = model
        input_size = (timm_model.in_chans, *timm_model.img_size)
    # batch 2 as example: with 1 the exporter could specialise the batch axis to a constant
    example = torch.randn(2, *input_size)
    batch = torch.export.Dim('batch', min=1)
    arg = next(iter(inspect.signature(model.forward).parameters))  # 'x' for DynaMixer and most timm models
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        program = torch.onnx.export(
            model, (example,), dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_shapes={arg: {0: batch}}, opset_version=opset, verbose=False)
    assert program is not None  # dynamo=True always returns the program
    proto = program.model_proto
    softmax_on_last_axis(proto)  # same function; ONNX Runtime's softmax is fastest on the last axis
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
    session = ort_session(onnx_path)
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
        check: Optional[Callable[..., float]] = check_onnx
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
        errors['real'] = check(output, model, sample_batch(config))
    pre_path = save_preprocessing(config, output)
    return dict(path=output, preprocessing_path=pre_path, config=config, errors=errors)


# --------------------------------------------------------------------------------------------
# int8 (`dynamixer export CKPT --quantize int8`; the quantisation itself is `dynamixer.quantize`)
# --------------------------------------------------------------------------------------------

INT8_FORMATS = ('onnx', 'torchscript')


def export_int8(
        checkpoint: PathLike,
        fmt: str = 'onnx',
        output: Optional[PathLike] = None,
        calibration: Optional[PathLike] = None,
        keep_float: Sequence[str] = DEFAULT_KEEP_FLOAT,
        calibration_size: int = 256,
        opset: int = DEFAULT_OPSET,
) -> Dict[str, Any]:
    """Export a checkpoint (or quantise a float .onnx file from ``dynamixer export``) as an int8
    model file plus its preprocessing JSON.

    'onnx': the float ONNX export (checked against PyTorch), then `quantize_onnx` (dynamic, or
    static when `calibration` names an image folder). 'torchscript': `quantize_model` with the
    torch.ao backend (TorchScript cannot hold torchao's tensor subclasses), then torch.jit.script.
    The default output is ``NAME.int8.onnx`` / ``NAME.int8.pt`` next to the checkpoint. Returns
    dict(path, preprocessing_path, config, float_errors, checks, quantized, kept_float, reference);
    `checks` maps 'random' / 'real' to `compare_logits` of the int8 file against the float model.
    """
    if fmt not in INT8_FORMATS:
        raise DynaMixerError(f'--quantize int8 works with --format {" or ".join(INT8_FORMATS)}, not {fmt!r} '
                             f'(safetensors stores the float weights; quantise after loading with '
                             f'dynamixer.quantize.quantize_model)')
    if calibration is not None and fmt != 'onnx':
        raise DynaMixerError('--calibration (static int8) is for --format onnx; the TorchScript int8 model '
                             'quantises activations dynamically and needs no calibration images')
    keep = check_parts(keep_float)
    ckpt = Path(checkpoint)
    from_onnx = is_onnx_file(ckpt)
    if from_onnx and fmt != 'onnx':
        raise DynaMixerError(f'{ckpt.name} is an ONNX file: it can only be quantised to ONNX (--format onnx)')
    if output is None:
        output = ckpt.with_name(ckpt.name.split('.')[0] + '.int8' + FORMATS[fmt])
    output = Path(output)
    if output.resolve() == ckpt.resolve():
        raise DynaMixerError(f'the int8 file would overwrite {ckpt}: give another --output')
    gen = torch.Generator().manual_seed(0)
    result: Dict[str, Any] = dict(path=output, float_errors={}, quantized={}, kept_float={})
    mode = 'static' if calibration is not None else 'dynamic'
    if fmt == 'onnx':
        with tempfile.TemporaryDirectory() as tmp:
            if from_onnx:  # quantise an existing float export; compare against it
                float_path = ckpt
            else:
                float_path = Path(tmp) / (output.name.replace('.int8', '') or 'float.onnx')
                exported = export_checkpoint(checkpoint, 'onnx', float_path, opset=opset)
                result['float_errors'] = exported['errors']
            q = quantize_onnx(float_path, output, mode=mode, calibration=calibration, keep_float=keep,
                              calibration_size=calibration_size)
            # the reference: the float file itself, or the float PyTorch model
            reference = OnnxClassifier(float_path) if from_onnx else load_model(checkpoint)[0]
        result.update(preprocessing_path=q['preprocessing_path'], config=q['config'], quantized=q['quantized'],
                      kept_float=q['kept_float'], reference='float ONNX' if from_onnx else 'float PyTorch')
        run_int8: torch.nn.Module = OnnxClassifier(output)
    else:
        reference, info = load_model(checkpoint)
        reference = reference.eval()
        config = preprocessing_config(reference, info['class_names'], info['model'])
        config.update(format='torchscript', dynamixer_version=__version__, quantization=dict(
            dtype='int8', mode='dynamic', tool=f'torch.ao.quantization.quantize_dynamic (torch {torch.__version__})',
            layers='nn.Linear', keep_float=keep))
        qmodel = quantize_model(reference, backend='torch.ao', keep_float=keep)
        text = json.dumps(config, indent=2)
        export_torchscript(qmodel, output, extra_files={'preprocessing.json': text})
        pre = save_preprocessing(config, output)
        result.update(preprocessing_path=pre, config=config, reference='float PyTorch')
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            run_int8 = torch.jit.load(os.fspath(output), map_location='cpu')
    config = result['config']
    inputs = dict(random=torch.randn(3, *config['input_size'], generator=gen), real=sample_batch(config))
    with torch.inference_mode():
        result['checks'] = {k: compare_logits(run_int8(x), reference.eval()(x)) for k, x in inputs.items()}
    return result


def _print_int8_export(result: Dict[str, Any], fmt: str) -> None:
    """The lines `dynamixer export --quantize int8` prints."""
    cfg = result['config']
    q = cfg['quantization']
    for kind, err in result['float_errors'].items():
        print(f'check float {fmt} vs PyTorch on {kind} inputs: max abs error {err:.3g}')
    size_mb = os.path.getsize(result['path']) / 2 ** 20
    how = q['mode'] + (f", calibrated on {q['calibration_images']} images" if q.get('calibration_images') else '')
    print(f"wrote {result['path']} ({fmt} int8, {how}, {cfg['model']}, {cfg['num_classes']} classes, "
          f"{size_mb:.1f} MiB)")
    if result['quantized'] or result['kept_float']:
        def parts(counts: Dict[str, int]) -> str:
            return ', '.join(f'{k} {v}' for k, v in counts.items()) or 'none'
        print(f"int8 nodes: {parts(result['quantized'])}; float: {parts(result['kept_float'])}")
    print(f"wrote {result['preprocessing_path']} (input {'x'.join(map(str, cfg['input_size']))}, "
          f"{cfg['interpolation']}, crop_pct {cfg['crop_pct']})")
    for kind, c in result['checks'].items():
        what = 'random inputs (batch 3)' if kind == 'random' else 'real images (batch 6, eval transform)'
        print(f"check int8 {fmt} vs {result['reference']} on {what}: max abs logit error "
              f"{c['max_abs_error']:.3g}, top-1 agreement {100 * c['top1_agreement']:.0f}%")


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('checkpoint', help='training checkpoint, authors\' checkpoint or weights file (with '
                                           '--quantize int8 also a float .onnx file from this command)')
    parser.add_argument('--format', default='onnx', choices=list(FORMATS),
                        help='onnx (ONNX Runtime etc.), torchscript (torch only) or safetensors (weights)')
    parser.add_argument('--output', '-o', default=None,
                        help='model file to write (default: next to the checkpoint, with the format\'s '
                             'extension); the preprocessing JSON goes next to it')
    parser.add_argument('--opset', type=Bounded(int, MIN_OPSET), default=DEFAULT_OPSET,
                        help=f'ONNX opset, from {MIN_OPSET} to the newest the installed onnx knows '
                             '(default %(default)s)')
    parser.add_argument('--atol', type=non_negative_float, default=1e-4,
                        help='largest max abs logit error accepted against PyTorch (default %(default)g)')
    int8 = parser.add_argument_group('int8 (see docs/deploy.md)')
    int8.add_argument('--quantize', choices=['int8'], default=None,
                      help='write an int8 model: onnx via ONNX Runtime quantisation (dynamic, or static with '
                           '--calibration), torchscript via dynamic int8 Linear layers')
    int8.add_argument('--calibration', metavar='DIR', default=None,
                      help='folder of images for static int8 ONNX quantisation (eval transform applied)')
    int8.add_argument('--calibration-size', type=positive_int, default=256, help='at most this many calibration images')
    int8.add_argument('--keep-float', nargs='*', default=None, metavar='PART',
                      help='model parts left in float (generator, mix, reduce, proj, reweight, mlp, head, '
                           f'conv); default: {" ".join(DEFAULT_KEEP_FLOAT)} (chosen by measurement, docs/deploy.md)')


def run(args: argparse.Namespace) -> int:
    if args.quantize:
        keep = DEFAULT_KEEP_FLOAT if args.keep_float is None else args.keep_float
        result = export_int8(args.checkpoint, args.format, args.output, args.calibration, keep,
                             args.calibration_size, args.opset)
        _print_int8_export(result, args.format)
        return 0
    if args.calibration or args.keep_float is not None:
        raise DynaMixerError('--calibration and --keep-float are int8 options: add --quantize int8')
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

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
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

PathLike = Union[str, os.PathLike]

__all__ = [
    'FORMATS', 'PREPROCESSING_SUFFIX', 'class_names_for', 'preprocessing_config', 'preprocessing_path',
    'sample_images', 'eval_transform', 'export_onnx', 'export_torchscript', 'export_safetensors',
    'check_onnx', 'check_torchscript', 'export_checkpoint', 'load_preprocessing',
]

FORMATS = {'onnx': '.onnx', 'torchscript': '.pt', 'safetensors': '.safetensors'}
PREPROCESSING_SUFFIX = '.preprocessing.json'
INPUT_NAME, OUTPUT_NAME = 'input', 'logits'
DEFAULT_OPSET = 18


# --------------------------------------------------------------------------------------------
# Preprocessing config
# --------------------------------------------------------------------------------------------

def class_names_for(num_classes: int, class_names: Optional[Sequence[str]] = None) -> List[str]:
    """The names `dynamixer predict` shows: the checkpoint's; ImageNet-1k names for a 1000-class
    head without; else '0', '1', ... (shared with predict, so both paths print the same)."""
    from .predict import class_names_for as _names
    return _names(num_classes, class_names)


def preprocessing_config(
        model: torch.nn.Module,
        class_names: Optional[Sequence[str]] = None,
        model_name: Optional[str] = None,
) -> Dict[str, Any]:
    """Eval preprocessing of `model` (from its pretrained_cfg via timm) and its class names."""
    from timm.data import resolve_data_config
    cfg = resolve_data_config({}, model=model)
    # the size the model was built for (img_size=...), which its pretrained_cfg does not follow
    cfg['input_size'] = (model.in_chans, *model.img_size)
    return dict(
        model=model_name or model.pretrained_cfg.get('architecture'),
        input_name=INPUT_NAME,
        output_name=OUTPUT_NAME,
        input_size=list(cfg['input_size']),
        mean=[float(v) for v in cfg['mean']],
        std=[float(v) for v in cfg['std']],
        crop_pct=float(cfg['crop_pct']),
        crop_mode=cfg.get('crop_mode', 'center'),
        interpolation=cfg['interpolation'],
        num_classes=model.num_classes,
        class_names=class_names_for(model.num_classes, class_names),
    )


def preprocessing_path(model_path: PathLike) -> Path:
    """``dir/name.onnx`` -> ``dir/name.onnx.preprocessing.json`` (one per exported file)."""
    p = Path(model_path)
    return p.with_name(p.name + PREPROCESSING_SUFFIX)


def load_preprocessing(model_path: PathLike) -> Dict[str, Any]:
    """Read the preprocessing JSON written next to an exported model file."""
    path = preprocessing_path(model_path)
    if not path.is_file():
        raise FileNotFoundError(
            f'{path} not found: it is written by `dynamixer export` next to {Path(model_path).name}; '
            f'keep the two files together.')
    with open(path, encoding='utf-8') as f:
        return json.load(f)


def eval_transform(config: Dict[str, Any]):
    """timm's eval transform (RGB, resize by crop_pct, center crop, normalise) for a preprocessing
    config; the same transform `dynamixer.data.eval_transform(model)` builds from the model."""
    from timm.data import create_transform
    from .data import _with_rgb
    return _with_rgb(create_transform(
        input_size=tuple(config['input_size']), is_training=False, mean=tuple(config['mean']),
        std=tuple(config['std']), crop_pct=config['crop_pct'], crop_mode=config.get('crop_mode', 'center'),
        interpolation=config['interpolation']))


def sample_images(num_digits: int = 4) -> list:
    """Real images that ship with scikit-learn (no download): its two photos and some 8x8 digits."""
    from PIL import Image
    from sklearn.datasets import load_digits, load_sample_images
    images = [Image.fromarray(a).convert('RGB') for a in load_sample_images().images]
    digits = load_digits().images[:num_digits]
    images += [Image.fromarray((d * (255 / 16)).astype(np.uint8)).convert('RGB') for d in digits]
    return images


def _real_batch(config: Dict[str, Any]) -> torch.Tensor:
    transform = eval_transform(config)
    return torch.stack([transform(im) for im in sample_images()])


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
    import onnx
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
    path.parent.mkdir(parents=True, exist_ok=True)
    # one file, weights inside (DynaMixer-L is ~390 MB, far below protobuf's 2 GB limit)
    onnx.save_model(proto, os.fspath(path))
    onnx.checker.check_model(os.fspath(path), full_check=True)
    return path


def export_torchscript(
        model: torch.nn.Module,
        path: PathLike,
        extra_files: Optional[Dict[str, str]] = None,
) -> Path:
    """Write `model` scripted (torch.jit.script) with `extra_files` stored inside the archive."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # TorchScript is deprecated upstream but still the torch-only format
        scripted = torch.jit.script(model.eval())
        torch.jit.save(scripted, os.fspath(path), _extra_files=extra_files or {})
    return path


def export_safetensors(
        model: torch.nn.Module,
        path: PathLike,
        metadata: Optional[Dict[str, str]] = None,
) -> Path:
    """Write the weights (no code, no pickle) with `metadata` (str -> str) in the header."""
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state_dict = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state_dict, os.fspath(path), metadata=metadata)
    return path


def _max_abs_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def check_onnx(onnx_path: PathLike, model: torch.nn.Module, inputs: torch.Tensor) -> float:
    """Max abs difference of ONNX Runtime's logits from the PyTorch model's on `inputs` (B, C, H, W)."""
    import onnxruntime as ort
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
    from .checkpoint import load_model
    if fmt not in FORMATS:
        raise ValueError(f'unknown format {fmt!r}; choose one of {", ".join(FORMATS)}')
    model, info = load_model(checkpoint)
    model = model.eval()
    config = preprocessing_config(model, info['class_names'], info['model'])
    config['format'] = fmt
    from . import __version__
    config['dynamixer_version'] = __version__
    if output is None:
        output = Path(checkpoint).with_name(Path(checkpoint).name.split('.')[0] + FORMATS[fmt])
    output = Path(output)
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
        # the metadata `dynamixer train` writes (read back by `dynamixer predict`), plus preprocessing
        meta.update(format='dynamixer', class_names=json.dumps(config['class_names']),
                    model_kwargs=json.dumps(info['config'].get('model_kwargs') or {}))
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
    pre_path.write_text(config_text + '\n', encoding='utf-8')
    return dict(path=output, preprocessing_path=pre_path, config=config, errors=errors)


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
    parser.add_argument('--opset', type=int, default=DEFAULT_OPSET, help='ONNX opset (default %(default)s)')
    parser.add_argument('--atol', type=float, default=1e-4,
                        help='largest max abs logit error accepted against PyTorch (default %(default)g)')
    int8 = parser.add_argument_group('int8 (see docs/deploy.md)')
    int8.add_argument('--quantize', choices=['int8'], default=None,
                      help='write an int8 model: onnx via ONNX Runtime quantisation (dynamic, or static with '
                           '--calibration), torchscript via dynamic int8 Linear layers')
    int8.add_argument('--calibration', metavar='DIR', default=None,
                      help='folder of images for static int8 ONNX quantisation (eval transform applied)')
    int8.add_argument('--calibration-size', type=int, default=256, help='at most this many calibration images')
    int8.add_argument('--keep-float', nargs='*', default=None, metavar='PART',
                      help='model parts left in float (generator, mix, reduce, proj, reweight, mlp, head, '
                           'conv); default: dynamixer.quantize.DEFAULT_KEEP_FLOAT')


def run(args: argparse.Namespace) -> int:
    if getattr(args, 'quantize', None):
        from . import quantize  # imports this module (one way); only needed for int8
        keep = quantize.DEFAULT_KEEP_FLOAT if args.keep_float is None else args.keep_float
        result = quantize.export_int8(args.checkpoint, args.format, args.output, args.calibration, keep,
                                      args.calibration_size, args.opset)
        quantize.print_int8_export(result, args.format)
        return 0
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

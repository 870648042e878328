"""int8 DynaMixer models: ONNX Runtime quantisation of exported ONNX files, and PyTorch int8.

ONNX (`quantize_onnx`, ``dynamixer export CKPT --format onnx --quantize int8``):

* ``dynamic`` (default): ``onnxruntime.quantization.quantize_dynamic``. Weights are stored as int8
  (per output channel); activations are quantised on the fly per call (MatMulInteger,
  ConvInteger). Needs no data.
* ``static``: ``quantize_static`` in QDQ format with activation ranges calibrated (MinMax) on a
  folder of images run through the model's eval transform (from the preprocessing JSON written
  next to the float file), via a ``CalibrationDataReader``.

Which parts stay in float is decided per node from the module path that torch's dynamo ONNX
exporter records in each node's metadata (``pkg.torch.onnx.name_scopes``), mapped to the parts
of the model by `node_parts`:

    generator  DynaMixerOp.generate (the Linear that produces the N x N mixing logits)
    mix        the data-dependent matmul of the softmaxed mixing matrix with the tokens
    reduce     DynaMixerOp.reduce (C -> S*d)
    proj       the mixing outputs' projections (mix_h/mix_w.proj, mix_c, the block's proj)
    reweight   the re-weighting MLP of the three branches
    mlp        the channel MLP (fc1, fc2)
    head       the classifier
    conv       the patch embedding and downsampling convolutions

`DEFAULT_KEEP_FLOAT` lists the parts left in float32 by default; docs/deploy.md has the
measurements behind the choice. LayerNorm, softmax, GELU and the residual adds always stay in
float: dynamic quantisation never touches them, and static quantisation is restricted to
``MatMul``/``Gemm``/``Conv`` (`STATIC_OP_TYPES`) for the same reason.

PyTorch (`quantize_model`): dynamic int8 of the ``nn.Linear`` layers, with
``torch.ao.quantization.quantize_dynamic`` (``backend='torch.ao'``, the default: fbgemm int8
kernels on x86 CPUs, and the form TorchScript serialises, used by
``dynamixer export CKPT --format torchscript --quantize int8``) or torchao's
``Int8DynamicActivationInt8WeightConfig`` (``backend='torchao'``, the route PyTorch recommends now
that ``torch.ao.quantization`` is deprecated; torchao 0.18 installs and runs with torch 2.14 here,
closer to float, but about 13x slower than float32 on this CPU -- see docs/deploy.md).
"""
from __future__ import annotations

import ast
import copy
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch
from torch import nn

from .errors import DynaMixerError, require
from .export import (
    FORMATS, INPUT_NAME, _real_batch, eval_transform, export_checkpoint, export_torchscript, load_preprocessing,
    preprocessing_config, preprocessing_path,
)
from .runtime import OnnxClassifier, is_onnx_file

__all__ = [
    'PARTS', 'DEFAULT_KEEP_FLOAT', 'MODES', 'STATIC_OP_TYPES', 'IMAGE_EXTENSIONS', 'node_parts',
    'calibration_images', 'calibration_batches', 'quantize_onnx', 'quantize_model', 'BACKENDS',
    'INT8_FORMATS', 'export_int8', 'compare_logits',
]

PathLike = Union[str, os.PathLike]

PARTS = ('generator', 'mix', 'reduce', 'proj', 'reweight', 'mlp', 'head', 'conv')
# chosen by the measurements in docs/deploy.md ("Which parts stay in float")
DEFAULT_KEEP_FLOAT = ('generator', 'head')
MODES = ('dynamic', 'static')
# static QDQ quantisation of these only: LayerNorm, softmax and the residual adds stay float
STATIC_OP_TYPES = ('MatMul', 'Gemm', 'Conv')
# ONNX Runtime's dynamic quantiser converts MatMul and Gemm with a constant weight (MatMulInteger)
# and Conv (ConvInteger); the mixing matmul of two activations is left float by it
DYNAMIC_OP_TYPES = ('MatMul', 'Gemm', 'Conv')
GEMM_AS_MATMUL = '_MatMul'  # onnxruntime.quantization.onnx_model.ONNXModel.replace_gemm_with_matmul
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.tif', '.tiff', '.webp')
BACKENDS = ('torchao', 'torch.ao')


# --------------------------------------------------------------------------------------------
# Which node belongs to which part of the model
# --------------------------------------------------------------------------------------------

def _part_of(op_type: str, scopes: Sequence[str]) -> Optional[str]:
    """The model part of a MatMul / Gemm / Conv node from its exporter name scopes
    (['', 'stages', ..., 'stages.0.blocks.1.token_mixer.mix_h.generate', 'linear_3'])."""
    if len(scopes) < 2:
        return None
    module = scopes[-2]           # the innermost module's qualified name
    leaf = module.rsplit('.', 1)[-1]
    op = scopes[-1]
    if op_type == 'Conv':
        return 'conv'
    if module == 'head':
        return 'head'
    if '.reweight.' in module + '.':
        return 'reweight'
    if leaf == 'generate':
        return 'generator'
    if leaf == 'reduce':
        return 'reduce'
    if leaf in ('mix_h', 'mix_w') and op.startswith('matmul'):
        return 'mix'
    if leaf in ('proj', 'mix_c'):
        return 'proj'
    if leaf in ('fc1', 'fc2') and '.mlp.' in module + '.':
        return 'mlp'
    return None


def node_parts(model) -> Dict[str, str]:
    """Node name -> model part (see the module docstring) for every MatMul / Gemm / Conv node of an
    ONNX model (a ``ModelProto`` from ``dynamixer export``) that can be attributed to one."""
    parts: Dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type not in STATIC_OP_TYPES:
            continue
        meta = {p.key: p.value for p in node.metadata_props}
        try:
            scopes = ast.literal_eval(meta.get('pkg.torch.onnx.name_scopes', '[]'))
        except (ValueError, SyntaxError):
            continue
        part = _part_of(node.op_type, scopes)
        if part is not None:
            parts[node.name] = part
    return parts


def _check_parts(keep_float: Iterable[str]) -> List[str]:
    keep = list(keep_float)
    bad = [p for p in keep if p not in PARTS]
    if bad:
        raise DynaMixerError(f'unknown model part(s) {", ".join(bad)} to keep in float; '
                             f'choose from {", ".join(PARTS)}')
    return keep


# --------------------------------------------------------------------------------------------
# Calibration data (static quantisation)
# --------------------------------------------------------------------------------------------

def calibration_images(folder: PathLike, limit: Optional[int] = None) -> List[Path]:
    """Image files under `folder` (recursively, sorted), at most `limit` spread evenly over the
    sorted list (so class sub-folders are all represented). Raises DynaMixerError if none."""
    root = Path(folder)
    if not root.is_dir():
        raise DynaMixerError(f'calibration folder {root} does not exist or is not a folder: give a folder '
                             f'of images (any layout, e.g. a few hundred validation images)')
    files = sorted(p for p in root.rglob('*') if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise DynaMixerError(f'calibration folder {root} has no images ({", ".join(IMAGE_EXTENSIONS)})')
    if limit is not None and len(files) > limit:
        step = len(files) / limit
        files = [files[int(i * step)] for i in range(limit)]
    return files


def calibration_batches(files: Sequence[PathLike], transform: Callable, batch_size: int = 16) -> List[torch.Tensor]:
    """Image files -> list of (B, C, H, W) float batches through `transform` (the eval transform).
    Unreadable images raise DataError naming the file."""
    from .data import load_image
    batches, cur = [], []
    for f in files:
        cur.append(transform(load_image(os.fspath(f))))
        if len(cur) == batch_size:
            batches.append(torch.stack(cur))
            cur = []
    if cur:
        batches.append(torch.stack(cur))
    return batches


def _reader(input_name: str, batches: Sequence[torch.Tensor]):
    """A CalibrationDataReader feeding `batches` (built here: onnxruntime is optional)."""
    from onnxruntime.quantization import CalibrationDataReader

    class _BatchReader(CalibrationDataReader):
        def __init__(self):
            self._it = iter([{input_name: b.numpy()} for b in batches])

        def get_next(self):
            return next(self._it, None)

    return _BatchReader()


# --------------------------------------------------------------------------------------------
# ONNX Runtime quantisation
# --------------------------------------------------------------------------------------------

def quantize_onnx(
        src: PathLike,
        dst: PathLike,
        mode: str = 'dynamic',
        calibration: Optional[Union[PathLike, Sequence[torch.Tensor]]] = None,
        keep_float: Sequence[str] = DEFAULT_KEEP_FLOAT,
        calibration_size: int = 256,
        per_channel: bool = True,
        preprocess: bool = True,
) -> Dict[str, Any]:
    """Quantise the float ONNX file `src` (from ``dynamixer export``) to int8 at `dst`.

    `mode` 'dynamic' or 'static'; static needs `calibration`, a folder of images (read through the
    eval transform of ``src``'s preprocessing JSON, at most `calibration_size` of them) or a list of
    ready (B, C, H, W) batches. `keep_float`: model parts left in float32 (`PARTS`). `preprocess`
    runs ``quant_pre_process`` (ONNX shape inference + graph optimisation) first.

    Writes `dst` and ``dst.preprocessing.json`` (the float file's, plus a 'quantization' entry);
    the file is checked with ``onnx.checker``. Returns dict(path, preprocessing_path, config,
    quantized, kept_float): per model part, the numbers of its MatMul/Gemm/Conv nodes that run in
    int8 and in float in the written file.
    """
    onnx = require('onnx', 'onnx', 'int8 ONNX quantisation')
    ort = require('onnxruntime', 'onnx', 'int8 ONNX quantisation')
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
    if mode not in MODES:
        raise DynaMixerError(f'unknown quantisation mode {mode!r}; choose one of {", ".join(MODES)}')
    if mode == 'static' and calibration is None:
        raise DynaMixerError('static int8 quantisation needs calibration images: give --calibration DIR '
                             '(a folder of a few hundred images like the ones the model will see), or use '
                             'dynamic quantisation (the default), which needs none')
    keep = _check_parts(keep_float)
    src, dst = Path(src), Path(dst)
    config = load_preprocessing(src)
    config = dict(config)

    batches: List[torch.Tensor] = []
    n_images = 0
    if mode == 'static':
        if isinstance(calibration, (str, os.PathLike)):
            files = calibration_images(calibration, calibration_size)
            batches = calibration_batches(files, eval_transform(config))
        else:
            batches = list(calibration)
        n_images = sum(int(b.shape[0]) for b in batches)

    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model_in = src
        if preprocess:
            from onnxruntime.quantization.shape_inference import quant_pre_process
            model_in = Path(tmp) / 'pre.onnx'
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')
                quant_pre_process(os.fspath(src), os.fspath(model_in), skip_symbolic_shape=True)
        proto = onnx.load(os.fspath(model_in))
        parts = node_parts(proto)
        op_types = list(DYNAMIC_OP_TYPES if mode == 'dynamic' else STATIC_OP_TYPES)
        exclude = [n for n, part in parts.items() if part in keep]
        if mode == 'dynamic':  # its quantiser first rewrites Gemm X as MatMul 'X_MatMul' + Add
            exclude += [n + GEMM_AS_MATMUL for n in exclude]
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            if mode == 'dynamic':
                quantize_dynamic(os.fspath(model_in), os.fspath(dst), op_types_to_quantize=op_types,
                                 per_channel=per_channel, weight_type=QuantType.QInt8, nodes_to_exclude=exclude)
            else:
                quantize_static(os.fspath(model_in), os.fspath(dst), _reader(config.get('input_name', INPUT_NAME), batches),
                                quant_format=QuantFormat.QDQ, op_types_to_quantize=op_types,
                                per_channel=per_channel, activation_type=QuantType.QInt8,
                                weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
                                calibrate_method=CalibrationMethod.MinMax,
                                extra_options={'ActivationSymmetric': False, 'WeightSymmetric': True})
    config['quantization'] = dict(
        dtype='int8', mode=mode, tool=f'onnxruntime {ort.__version__}', per_channel=per_channel,
        op_types=op_types, keep_float=keep, calibration_images=n_images if mode == 'static' else None,
        float_file=src.name)
    config_text = json.dumps(config, indent=2)
    out = onnx.load(os.fspath(dst))
    del out.metadata_props[:]
    for k, v in (('preprocessing', config_text), ('model', str(config.get('model')))):
        entry = out.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save_model(out, os.fspath(dst))
    onnx.checker.check_model(os.fspath(dst), full_check=True)
    pre_path = preprocessing_path(dst)
    pre_path.write_text(config_text + '\n', encoding='utf-8')
    int8 = _quantized(out, parts)
    total = {p: sum(1 for q in parts.values() if q == p) for p in PARTS}
    return dict(path=dst, preprocessing_path=pre_path, config=config,
                quantized={p: n for p, n in int8.items() if n},
                kept_float={p: total[p] - int8[p] for p in PARTS if total[p] > int8[p]})


def _quantized(model, parts: Dict[str, str]) -> Dict[str, int]:
    """Part -> number of its MatMul / Gemm / Conv nodes that run in int8 in the quantised `model`:
    replaced by an integer op (dynamic: the float node is gone) or fed by a DequantizeLinear (QDQ)."""
    producer = {o: n.op_type for n in model.graph.node for o in n.output}
    float_nodes = {n.name: n for n in model.graph.node if n.op_type in STATIC_OP_TYPES}
    done = {p: 0 for p in PARTS}
    for name, part in parts.items():
        node = float_nodes.get(name, float_nodes.get(name + GEMM_AS_MATMUL))
        if node is None or (node.input and producer.get(node.input[0]) == 'DequantizeLinear'):
            done[part] += 1
    return done


# --------------------------------------------------------------------------------------------
# PyTorch int8
# --------------------------------------------------------------------------------------------

def _skip_fqn(keep_float: Sequence[str]) -> Callable[[str], bool]:
    """Module qualified name -> keep this Linear in float?"""
    keep = set(keep_float)

    def skip(fqn: str) -> bool:
        leaf = fqn.rsplit('.', 1)[-1]
        return (('head' in keep and fqn == 'head') or ('generator' in keep and leaf == 'generate')
                or ('reduce' in keep and leaf == 'reduce') or ('reweight' in keep and '.reweight.' in fqn + '.')
                or ('mlp' in keep and '.mlp.' in fqn and leaf in ('fc1', 'fc2'))
                or ('proj' in keep and leaf in ('proj', 'mix_c')))
    return skip


def quantize_model(
        model: nn.Module,
        backend: str = 'torch.ao',
        keep_float: Sequence[str] = DEFAULT_KEEP_FLOAT,
        inplace: bool = False,
) -> nn.Module:
    """Dynamic int8 of the model's ``nn.Linear`` layers (weights int8 per channel, activations
    quantised per call), for inference on the CPU. Returns the quantised model in eval mode.

    `backend` 'torch.ao': ``torch.ao.quantization.quantize_dynamic`` (built into torch, deprecated
    upstream, fast on x86 CPUs, the form TorchScript serialises); 'torchao': torchao's
    ``quantize_(model, Int8DynamicActivationInt8WeightConfig())`` (``pip install "dynamixer[int8]"``). Linear layers of
    the parts in `keep_float` (see `PARTS`; 'mix' has no Linear) stay float32.
    """
    if backend not in BACKENDS:
        raise DynaMixerError(f'unknown int8 backend {backend!r}; choose one of {", ".join(BACKENDS)}')
    keep = _check_parts(keep_float)
    if not inplace:
        model = copy.deepcopy(model)
    model = model.eval()
    skip = _skip_fqn(keep)
    if backend == 'torchao':
        ao = require('torchao.quantization', 'int8', 'PyTorch int8 with torchao')
        ao.quantize_(model, ao.Int8DynamicActivationInt8WeightConfig(),
                     filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and not skip(fqn))
        return model
    names = {name for name, m in model.named_modules() if isinstance(m, nn.Linear) and not skip(name)}
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # torch.ao.quantization's deprecation notice
        return torch.ao.quantization.quantize_dynamic(model, names, dtype=torch.qint8, inplace=True)


# --------------------------------------------------------------------------------------------
# `dynamixer export CKPT --quantize int8`
# --------------------------------------------------------------------------------------------

INT8_FORMATS = ('onnx', 'torchscript')


def compare_logits(out: torch.Tensor, ref: torch.Tensor) -> Dict[str, float]:
    """int8 (B, K) logits against float ones: max abs error and top-1 agreement (fraction)."""
    out, ref = out.double(), ref.double()
    return dict(max_abs_error=float((out - ref).abs().max()),
                top1_agreement=float((out.argmax(-1) == ref.argmax(-1)).double().mean()))


def export_int8(
        checkpoint: PathLike,
        fmt: str = 'onnx',
        output: Optional[PathLike] = None,
        calibration: Optional[PathLike] = None,
        keep_float: Sequence[str] = DEFAULT_KEEP_FLOAT,
        calibration_size: int = 256,
        opset: int = 18,
) -> Dict[str, Any]:
    """Export a checkpoint (or quantise a float .onnx file from ``dynamixer export``) as an int8
    model file plus its preprocessing JSON.

    'onnx': the float ONNX export (checked against PyTorch), then `quantize_onnx` (dynamic, or
    static when `calibration` names an image folder). 'torchscript': `quantize_model` with the
    torch.ao backend (TorchScript cannot hold torchao's tensor subclasses), then torch.jit.script.
    The default output is ``NAME.int8.onnx`` / ``NAME.int8.pt`` next to the checkpoint. Returns
    dict(path, preprocessing_path, config, float_errors, checks, quantized, kept_float); `checks`
    maps 'random' / 'real' to `compare_logits` of the int8 file against the float PyTorch model.
    """
    from .checkpoint import load_model
    if fmt not in INT8_FORMATS:
        raise DynaMixerError(f'--quantize int8 works with --format {" or ".join(INT8_FORMATS)}, not {fmt!r} '
                             f'(safetensors stores the float weights; quantise after loading with '
                             f'dynamixer.quantize.quantize_model)')
    if calibration is not None and fmt != 'onnx':
        raise DynaMixerError('--calibration (static int8) is for --format onnx; the TorchScript int8 model '
                             'quantises activations dynamically and needs no calibration images')
    keep = _check_parts(keep_float)
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
            model = OnnxClassifier(float_path) if from_onnx else load_model(checkpoint)[0]
        result.update(preprocessing_path=q['preprocessing_path'], config=q['config'],
                      quantized=q['quantized'], kept_float=q['kept_float'], reference='float ONNX' if from_onnx
                      else 'float PyTorch')
        run_int8: nn.Module = OnnxClassifier(output)
    else:
        model, info = load_model(checkpoint)
        model = model.eval()
        config = preprocessing_config(model, info['class_names'], info['model'])
        from . import __version__
        config.update(format='torchscript', dynamixer_version=__version__, quantization=dict(
            dtype='int8', mode='dynamic', tool=f'torch.ao.quantization.quantize_dynamic (torch {torch.__version__})',
            layers='nn.Linear', keep_float=keep))
        qmodel = quantize_model(model, backend='torch.ao', keep_float=keep)
        text = json.dumps(config, indent=2)
        export_torchscript(qmodel, output, extra_files={'preprocessing.json': text})
        pre = preprocessing_path(output)
        pre.write_text(text + '\n', encoding='utf-8')
        result.update(preprocessing_path=pre, config=config, reference='float PyTorch')
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            run_int8 = torch.jit.load(os.fspath(output), map_location='cpu')
    config = result['config']
    inputs = dict(random=torch.randn(3, *config['input_size'], generator=gen), real=_real_batch(config))
    with torch.inference_mode():
        result['checks'] = {k: compare_logits(run_int8(x), model.eval()(x)) for k, x in inputs.items()}
    return result


def print_int8_export(result: Dict[str, Any], fmt: str) -> None:
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
        fmt_parts = lambda d: ', '.join(f'{k} {v}' for k, v in d.items()) or 'none'  # noqa: E731
        print(f"int8 nodes: {fmt_parts(result['quantized'])}; float: {fmt_parts(result['kept_float'])}")
    print(f"wrote {result['preprocessing_path']} (input {'x'.join(map(str, cfg['input_size']))}, "
          f"{cfg['interpolation']}, crop_pct {cfg['crop_pct']})")
    for kind, c in result['checks'].items():
        what = 'random inputs (batch 3)' if kind == 'random' else 'real images (batch 6, eval transform)'
        print(f"check int8 {fmt} vs {result['reference']} on {what}: max abs logit error {c['max_abs_error']:.3g}, "
              f"top-1 agreement {100 * c['top1_agreement']:.0f}%")

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

The command side (``dynamixer export --quantize int8``: export, quantise, check against float)
is `dynamixer.commands.export.export_int8`; this module only quantises.
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

from .data import IMAGE_EXTENSIONS, DataError, preprocessing_transform
from .errors import DynaMixerError, require
from .files import atomic_write
from .inference import INPUT_NAME, load_onnx, load_preprocessing, preprocess, save_preprocessing

__all__ = [
    'PARTS', 'DEFAULT_KEEP_FLOAT', 'MODES', 'STATIC_OP_TYPES', 'node_parts', 'check_parts',
    'calibration_images', 'calibration_batches', 'quantize_onnx', 'quantize_model', 'BACKENDS',
    'compare_logits',
]

PathLike = Union[str, os.PathLike]

PARTS = ('generator', 'mix', 'reduce', 'proj', 'reweight', 'mlp', 'head', 'conv')
# chosen by the measurements in docs/deploy.md ("Which parts stay in float")
DEFAULT_KEEP_FLOAT = ('generator', 'head', 'conv')
MODES = ('dynamic', 'static')
# static QDQ quantisation of these only: LayerNorm, softmax and the residual adds stay float
STATIC_OP_TYPES = ('MatMul', 'Gemm', 'Conv')
# ONNX Runtime's dynamic quantiser converts MatMul and Gemm with a constant weight (MatMulInteger)
# and Conv (ConvInteger); the mixing matmul of two activations is left float by it
DYNAMIC_OP_TYPES = ('MatMul', 'Gemm', 'Conv')
GEMM_AS_MATMUL = '_MatMul'  # onnxruntime.quantization.onnx_model.ONNXModel.replace_gemm_with_matmul
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


def node_parts(model: Any) -> Dict[str, str]:
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


def check_parts(keep_float: Iterable[str]) -> List[str]:
    """The part names in `keep_float` as a list; DynaMixerError for names not in PARTS."""
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
    Unreadable images raise DataError naming them."""
    paths = [os.fspath(f) for f in files]
    batches = []
    for start in range(0, len(paths), batch_size):
        batch, _, failed = preprocess(paths[start:start + batch_size], transform)
        if failed:
            raise DataError('calibration images that cannot be read (remove them or the folder): '
                            + '; '.join(e for _, e in failed))
        batches.append(batch)
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
    keep = check_parts(keep_float)
    src, dst = Path(src), Path(dst)
    load_onnx(src)  # a broken file gets the message every command gives, not the quantiser's
    config = load_preprocessing(src)
    config = dict(config)

    batches: List[torch.Tensor] = []
    n_images = 0
    if mode == 'static':
        if isinstance(calibration, (str, os.PathLike)):
            files = calibration_images(calibration, calibration_size)
            batches = calibration_batches(files, preprocessing_transform(config))
        else:
            batches = list(calibration or [])
        n_images = sum(int(b.shape[0]) for b in batches)

    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model_in, quantized = src, Path(tmp) / 'int8.onnx'  # then written to dst atomically
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
                quantize_dynamic(os.fspath(model_in), os.fspath(quantized), op_types_to_quantize=op_types,
                                 per_channel=per_channel, weight_type=QuantType.QInt8, nodes_to_exclude=exclude)
            else:
                reader = _reader(config.get('input_name', INPUT_NAME), batches)
                quantize_static(os.fspath(model_in), os.fspath(quantized), reader,
                                quant_format=QuantFormat.QDQ, op_types_to_quantize=op_types,
                                per_channel=per_channel, activation_type=QuantType.QInt8,
                                weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
                                calibrate_method=CalibrationMethod.MinMax,
                                extra_options={'ActivationSymmetric': False, 'WeightSymmetric': True})
        out = onnx.load(os.fspath(quantized))
    config['quantization'] = dict(
        dtype='int8', mode=mode, tool=f'onnxruntime {ort.__version__}', per_channel=per_channel,
        op_types=op_types, keep_float=keep, calibration_images=n_images if mode == 'static' else None,
        float_file=src.name)
    config_text = json.dumps(config, indent=2)
    del out.metadata_props[:]
    for k, v in (('preprocessing', config_text), ('model', str(config.get('model')))):
        entry = out.metadata_props.add()
        entry.key, entry.value = k, v
    atomic_write(dst, lambda f: f.write(out.SerializeToString()))
    onnx.checker.check_model(os.fspath(dst), full_check=True)
    pre_path = save_preprocessing(config, dst)
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
    the parts in `keep_float` (see `PARTS`; 'mix' and 'conv' have no Linear: the mixing matmul and
    the convolutions always stay float32 here) stay float32.
    """
    if backend not in BACKENDS:
        raise DynaMixerError(f'unknown int8 backend {backend!r}; choose one of {", ".join(BACKENDS)}')
    keep = check_parts(keep_float)
    if not inplace:
        model = copy.deepcopy(model)
    model = model.eval()
    skip = _skip_fqn(keep)
    if backend == 'torchao':
        ao = require('torchao.quantization', 'int8', 'PyTorch int8 with torchao')
        ao.quantize_(model, ao.Int8DynamicActivationInt8WeightConfig(),
                     filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and not skip(fqn))
        # torchao keeps the nn.Linear modules and swaps their weights for int8 tensor subclasses;
        # the dispatch sees those and sends their blocks and MLPs to the plain path (docs/fast_path.md)
        return model
    names = {name for name, m in model.named_modules() if isinstance(m, nn.Linear) and not skip(name)}
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # torch.ao.quantization's deprecation notice
        return torch.ao.quantization.quantize_dynamic(model, names, dtype=torch.qint8, inplace=True)


def compare_logits(out: torch.Tensor, ref: torch.Tensor) -> Dict[str, float]:
    """int8 (B, K) logits against float ones: max abs error and top-1 agreement (fraction)."""
    out, ref = out.double(), ref.double()
    return dict(max_abs_error=float((out - ref).abs().max()),
                top1_agreement=float((out.argmax(-1) == ref.argmax(-1)).double().mean()))

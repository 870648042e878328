"""The one place that chooses between the plain path (the spec's step-by-step ops in `model.py`)
and the fast paths (`ops.fast_forms` on the kernels of `ops.mixing`, `ops.mlp`, `ops.triton_mixing`).

The table of `docs/fast_path.md`, as code:

=====================================================  ==========================================
situation                                              path
=====================================================  ==========================================
switch off (`set_fast_path(False)`,                    plain
``DYNAMIXER_FAST_PATH=0``)
TorchScript, FX tracing, `torch.compile`               plain (callers guard `torch.jit.is_scripting`)
``mixing='static'``, a sequence < FAST_PATH_MIN_TOKENS plain token mixing (set at construction)
device other than CPU / CUDA (meta, ...)               plain
an empty input (batch of 0)                            plain (the kernels split by batch)
CPU autocast                                           plain (its casts define the function)
CUDA autocast                                          triton only, else plain
a module the fast path bypasses is not the exact       plain
type it was written for, or carries hooks
(quantised, LoRA, pruned, hooked ...)
autograd records the call                              fast-train / triton-train / cpp-train
otherwise                                              fast-inference / triton-inference / cpp-inference
=====================================================  ==========================================

'cpp' (the compiled CPU mixing) in place of 'fast' on the CPU unless ``DYNAMIXER_CPU_KERNELS=0`` /
``set_cpu_kernels(False)``, the build failed (one warning), the dtype is not float32/float64 or a
sequence is longer than CPP_MAX_TOKENS. A layer's MLP is 'fast-*' (eager), or 'cpp-train' with
``DYNAMIXER_CPU_KERNELS=all``.

One decision per block covers both of its mixing ops (the ops then run their kernels, or their
plain math, without deciding again), and one per layer covers its channel MLP. What is known at
construction (dynamic mixing, sequence lengths) is stored on the module by `static_mixing_ok`;
what can change afterwards (module swaps, hooks, grad mode, device, autocast, tracing, the
switch) is checked per call: a handful of attribute reads.

Backends of the fast mixing (`KERNELS`): 'triton' on CUDA with Triton installed; on the CPU
'cpp', the compiled kernels of `ops.cpu_kernels` (built on first use), when the switch
``DYNAMIXER_CPU_KERNELS`` / `set_cpu_kernels` allows them, they built, the dtype is float32 or
float64 and no sequence is longer than `CPP_MAX_TOKENS`; 'fast' (`ops.mixing`, eager PyTorch)
otherwise. Paths 'cpp-train' / 'cpp-inference'. The training MLP's compiled GELU pair
(`MLP_KERNELS['cpp']`, path 'cpp-train' of an MLP) runs only with ``DYNAMIXER_CPU_KERNELS=all``.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.layers import Mlp
from torch.fx._symbolic_trace import is_fx_symbolic_tracing
from torch.nn.modules import module as _module_state

from ..errors import DynaMixerError
from .cpu_kernels import CppDynamicMix, CppRecomputeGeluMlp, cpp_mix_forward
from .cpu_kernels import available as cpp_available
from .mixing import DynamicMix, dynamic_mix_forward
from .mlp import RecomputeGeluMlp
from .triton_mixing import triton_available, triton_dynamic_mix, triton_mix_forward

__all__ = [
    'FAST_PATH_MIN_TOKENS', 'CPP_MAX_TOKENS', 'PLAIN', 'set_fast_path', 'fast_path_enabled',
    'set_cpu_kernels', 'cpu_kernels_mode', 'static_mixing_ok', 'mixing_path', 'mlp_path',
    'is_training_path', 'mixing_backend', 'mlp_kernel', 'KERNELS', 'MLP_KERNELS', 'explain_paths',
]

# Shorter sequences take the plain mixing: with N x N matrices of 8 x 8 or smaller the copies the
# fast path saves are tiny, and its per-matrix bmm calls and last-axis softmax over a handful of
# elements cost more (dynamixer_nano's blocks measured about 3-6x slower on the CPU).
FAST_PATH_MIN_TOKENS = 16

# The compiled mixing kernel handles sequences of up to 256 tokens (a 1792-pixel side for
# dynamixer_s); longer ones take the eager fast path.
CPP_MAX_TOKENS = 256

PLAIN = 'plain'
# path name = backend + form; the form says which autograd treatment the fast code takes
_PATHS = {(backend, train): f'{backend}-{"train" if train else "inference"}'
          for backend in ('fast', 'triton', 'cpp') for train in (False, True)}


def _env_switch() -> bool:
    """DYNAMIXER_FAST_PATH=0/false/no/off turns the fast paths off for the process (read at import)."""
    value = os.environ.get('DYNAMIXER_FAST_PATH', '1').strip().lower()
    return value not in ('0', 'false', 'no', 'off')


_enabled = _env_switch()


class set_fast_path:
    """Turn the fast paths on or off everywhere; also a context manager restoring the old setting.

    ``dynamixer.set_fast_path(False)`` selects the plain path for every module from now on;
    ``with dynamixer.set_fast_path(False): ...`` only inside the block.
    """

    def __init__(self, enabled: bool) -> None:
        global _enabled
        self.prev = _enabled
        _enabled = bool(enabled)

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        global _enabled
        _enabled = self.prev


def fast_path_enabled() -> bool:
    """The global switch (`set_fast_path`, ``DYNAMIXER_FAST_PATH``)."""
    return _enabled


# the compiled CPU kernels' switch: 'off', 'mixing' (default) or 'all' (mixing and the training
# MLP's GELU pair)
_CPU_KERNEL_MODES = {'0': 'off', 'false': 'off', 'no': 'off', 'off': 'off',
                     '1': 'mixing', 'true': 'mixing', 'yes': 'mixing', 'on': 'mixing', 'mixing': 'mixing',
                     'all': 'all'}


def _cpu_kernels_value(value: Any, where: str) -> str:
    key = str(value).strip().lower() if not isinstance(value, bool) else ('1' if value else '0')
    if key not in _CPU_KERNEL_MODES:
        raise DynaMixerError(
            f'{where} = {value!r} is not understood: use 0 (eager PyTorch kernels only), 1 (the default: '
            'compiled CPU mixing kernels) or all (also the training MLP\'s compiled GELU)')
    return _CPU_KERNEL_MODES[key]


_cpu_kernels = _cpu_kernels_value(os.environ.get('DYNAMIXER_CPU_KERNELS', '1'), 'DYNAMIXER_CPU_KERNELS')


class set_cpu_kernels:
    """Allow or forbid the compiled CPU kernels (`ops.cpu_kernels`) on the fast path; also a
    context manager restoring the old setting. The fast path itself stays on (`set_fast_path`).

    ``set_cpu_kernels(False)`` (or ``DYNAMIXER_CPU_KERNELS=0``): the eager 'fast' kernels only, and
    nothing is compiled. ``True`` / ``1`` (the default): the compiled mixing. ``'all'``: also the
    training MLP's GELU pair (`CppRecomputeGeluMlp`).
    """

    def __init__(self, mode: Any) -> None:
        global _cpu_kernels
        new = _cpu_kernels_value(mode, 'set_cpu_kernels(mode)')
        self.prev = _cpu_kernels
        _cpu_kernels = new

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        global _cpu_kernels
        _cpu_kernels = self.prev


def cpu_kernels_mode() -> str:
    """'off', 'mixing' or 'all' (`set_cpu_kernels`, ``DYNAMIXER_CPU_KERNELS``)."""
    return _cpu_kernels


def static_mixing_ok(dynamic: bool, seq_lens: Sequence[int]) -> bool:
    """What construction decides: only dynamic mixing of sequences of at least FAST_PATH_MIN_TOKENS."""
    return dynamic and min(seq_lens) >= FAST_PATH_MIN_TOKENS


def is_training_path(path: str) -> bool:
    """Does the fast code take its autograd form (Functions that save for backward)?"""
    return path.endswith('-train')


# backend -> (training form, inference form) of the mixing kernel, both called as
# f(x4, r2, weight, bias, s); the inference forms take out= on the CPU. 'triton' wants the
# generator rows permuted [out j, in i] (`generator_rows_out_major`).
KERNELS: Dict[str, Tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]] = {
    'fast': (DynamicMix.apply, dynamic_mix_forward),
    'triton': (triton_dynamic_mix, triton_mix_forward),
    'cpp': (CppDynamicMix.apply, cpp_mix_forward),
}

# backend -> the training MLP, f(x (M, C), fc1.weight, fc1.bias, fc2.weight, fc2.bias, approximate)
MLP_KERNELS: Dict[str, Callable[..., torch.Tensor]] = {
    'fast': RecomputeGeluMlp.apply,
    'cpp': CppRecomputeGeluMlp.apply,
}


def mixing_backend(path: str) -> Tuple[str, Callable[..., torch.Tensor]]:
    """(backend name, kernel) for a fast mixing path: 'fast' -> `ops.mixing`, 'triton' ->
    `ops.triton_mixing`, 'cpp' -> `ops.cpu_kernels` (the compiled CPU slot)."""
    backend = path.rsplit('-', 1)[0]
    train, infer = KERNELS[backend]
    return backend, train if is_training_path(path) else infer


def mlp_kernel(path: str) -> Callable[..., torch.Tensor]:
    """The training MLP for a training path of a layer's MLP: 'fast-train' -> `RecomputeGeluMlp`,
    'cpp-train' -> `CppRecomputeGeluMlp` (the compiled GELU pair)."""
    return MLP_KERNELS[path.rsplit('-', 1)[0]]


# --------------------------------------------------------------------------------------------
# per-call checks
# --------------------------------------------------------------------------------------------

_triton_ok: Optional[bool] = None
_cpp_ok: Optional[bool] = None


def _triton_ready() -> bool:
    global _triton_ok
    if _triton_ok is None:  # cached: Triton and CUDA do not come and go within a process
        _triton_ok = triton_available()
    return _triton_ok


def _cpp_ready() -> bool:
    """The switch allows the compiled kernels and they are built (building them on first use)."""
    global _cpp_ok
    if _cpu_kernels == 'off':
        return False
    if _cpp_ok is None:  # cached: `available()` compiles or loads the extension once
        _cpp_ok = 'cpp' in KERNELS and bool(cpp_available())
    return _cpp_ok


def _cpp_dtype(x: torch.Tensor, weight: torch.Tensor) -> bool:
    # the C++ kernels are float32 / float64 (bf16 and half models keep the eager kernels)
    return x.dtype in (torch.float32, torch.float64) and weight.dtype == x.dtype


def _global_hooks() -> bool:
    # global module hooks fire on every module call; the fast code skips some module calls
    return bool(_module_state._global_forward_hooks or _module_state._global_forward_pre_hooks
                or _module_state._global_backward_hooks or _module_state._global_backward_pre_hooks)


def _no_hooks(module: nn.Module) -> bool:
    """No hooks that the fast code, which skips the module's call, would skip (prune uses a pre-hook)."""
    return not (module._forward_hooks or module._forward_pre_hooks
                or module._backward_hooks or module._backward_pre_hooks)


_PLAIN_TENSOR_TYPES = (nn.Parameter, torch.Tensor)


def _exact(module: Optional[nn.Module], cls: type) -> bool:
    """`module` is exactly `cls` (not a subclass, wrapper or quantised swap), has no hooks, and its
    own weights are plain tensors: torchao's int8 and FSDP's DTensor keep the module and swap its
    weights for tensor subclasses, which the fast code (it reads `.weight` into matmuls) cannot take."""
    return (type(module) is cls and _no_hooks(module)
            and all(type(p) in _PLAIN_TENSOR_TYPES for p in module._parameters.values() if p is not None))


def _eager_device(x: torch.Tensor) -> Optional[str]:
    """'cpu' / 'cuda' when the fast code may run on x at all (eager, switch on), else None."""
    if not _enabled or is_fx_symbolic_tracing() or torch.compiler.is_compiling():
        return None
    if x.numel() == 0:  # an empty batch: the plain path returns an empty result, as timm's models do
        return None
    device = x.device.type
    return device if device in ('cpu', 'cuda') else None


def _records_grad(x: torch.Tensor, module: nn.Module) -> bool:
    """Will autograd record this call? The one 'training' rule of every fast path."""
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters()))


def _mixing_modules_fit(module: nn.Module) -> bool:
    """The modules whose weights the fast mixing reads directly (it does not call them)."""
    ops = [module.mix_h, module.mix_w] if hasattr(module, 'mix_h') else [module]
    for op in ops:
        if not (_exact(op.reduce, nn.Linear) and _exact(op.generate, nn.Linear)):
            return False
        # the block folds the ops' projections and does not call the ops as modules
        if len(ops) == 2 and not (_exact(op.proj, nn.Linear) and _no_hooks(op)):
            return False
    return len(ops) == 1 or _exact(module.mix_c, nn.Linear)


def mixing_path(module: nn.Module, x: torch.Tensor) -> str:
    """The path of a DynaMixerBlock (both of its ops) or of a DynaMixerOp called on its own.

    `module._fast_mixing` is set at construction (`static_mixing_ok`).
    """
    path = _decide_mixing(module, x)
    if _recording is not None:
        _recording.append((module, path))
        for op in (getattr(module, 'mix_h', None), getattr(module, 'mix_w', None)):
            if op is not None:
                _recording.append((op, path))
    return path


def _decide_mixing(module: nn.Module, x: torch.Tensor) -> str:
    if not module._fast_mixing:
        return PLAIN
    device = _eager_device(x)
    if device is None or _global_hooks() or not _mixing_modules_fit(module):
        return PLAIN
    if device == 'cuda' and _triton_ready():
        backend = 'triton'  # also under autocast: the kernel follows the plain path's casts
    elif torch.is_autocast_enabled(device):
        return PLAIN
    elif device == 'cpu' and _cpp_fits(module, x) and _cpp_ready():
        backend = 'cpp'
    else:
        backend = 'fast'
    return _PATHS[backend, _records_grad(x, module)]


def _cpp_fits(module: nn.Module, x: torch.Tensor) -> bool:
    """The compiled mixing takes this call: float32/float64, sequences of at most CPP_MAX_TOKENS."""
    ops = [module.mix_h, module.mix_w] if hasattr(module, 'mix_h') else [module]
    return all(op.seq_len <= CPP_MAX_TOKENS and _cpp_dtype(x, op.generate.weight) for op in ops)


def mlp_path(layer: nn.Module, x: torch.Tensor) -> str:
    """The path of a MixerLayer's channel MLP: 'plain', 'fast-train' (`RecomputeGeluMlp`),
    'cpp-train' (`CppRecomputeGeluMlp`, only with ``DYNAMIXER_CPU_KERNELS=all``) or
    'fast-inference' (chunked, added into the residual stream; CPU, no autograd, eval mode)."""
    path = _decide_mlp(layer, x)
    if _recording is not None:
        _recording.append((layer.mlp, path))
    return path


def _decide_mlp(layer: nn.Module, x: torch.Tensor) -> str:
    device = _eager_device(x)
    if device is None or torch.is_autocast_enabled(device) or _global_hooks():
        return PLAIN
    mlp = layer.mlp
    if not (_exact(mlp, Mlp) and _exact(mlp.fc1, nn.Linear) and _exact(mlp.fc2, nn.Linear)
            and _exact(mlp.act, nn.GELU) and _exact(mlp.norm, nn.Identity) and _exact(layer.norm2, nn.LayerNorm)
            and _exact(mlp.drop1, nn.Dropout) and _exact(mlp.drop2, nn.Dropout)
            and mlp.fc1.bias is not None and mlp.fc2.bias is not None):
        return PLAIN
    if layer.training and (mlp.drop1.p > 0 or mlp.drop2.p > 0):
        return PLAIN
    # the inference form skips the drop-path modules (identities in eval mode) and adds in place
    if device == 'cpu' and not layer.training and not _records_grad(x, layer):
        if _no_hooks(layer.drop_path1) and _no_hooks(layer.drop_path2):
            return _PATHS['fast', False]
    if (device == 'cpu' and _cpu_kernels == 'all' and mlp.act.approximate == 'none'
            and _cpp_dtype(x, mlp.fc1.weight) and _cpp_ready()):
        return _PATHS['cpp', True]
    return _PATHS['fast', True]


# --------------------------------------------------------------------------------------------
# which path each module took
# --------------------------------------------------------------------------------------------

_recording: Optional[List[Tuple[nn.Module, str]]] = None


@contextlib.contextmanager
def _record() -> Iterator[List[Tuple[nn.Module, str]]]:
    global _recording
    prev, _recording = _recording, []
    try:
        yield _recording
    finally:
        _recording = prev


def explain_paths(model: nn.Module, *args: Any, **kwargs: Any) -> Dict[str, str]:
    """Run ``model(*args, **kwargs)`` once and report the path each deciding module took.

    Returns {module name: path}, e.g. ``{'stages.0.blocks.0.token_mixer': 'fast-inference',
    'stages.0.blocks.0.token_mixer.mix_h': 'fast-inference', 'stages.0.blocks.0.mlp': 'fast-inference', ...}``
    with paths 'plain', 'fast-inference', 'fast-train', 'triton-inference', 'triton-train' (and
    'cpp-*' for the compiled CPU backend). Keys are the mixing blocks, their ops and the layers'
    MLPs (named as in ``model.named_modules()``); the call runs under the caller's grad mode,
    autocast and device, so the answer is the one for such a call.
    """
    names = {id(m): n for n, m in model.named_modules()}
    with _record() as seen:
        model(*args, **kwargs)
    return {names.get(id(m), type(m).__name__): path for m, path in seen}

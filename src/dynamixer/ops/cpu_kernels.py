"""Compiled CPU kernels (C++, `torch.utils.cpp_extension`), built on first use and cached.

`cpp_dynamic_mix` / `CppDynamicMix` and `cpp_mix_forward` are drop-in replacements for
`DynamicMix.apply(x4, r2, weight, bias, s)` and `dynamic_mix_forward(x4, r2, weight, bias, s,
out=None)` of the eager path: tokens x4 (B, N, L, C) mixed along N, reduced features r2
(B*L*S, N*d) token-major, generator weight (N*N, N*d) and bias (N*N) with rows [input i,
output j]. One task of ATen's `parallel_for` per sequence generates, normalises and mixes all S
segments; the S x N x N matrices stay in a per-thread scratch buffer and backward recomputes them
(`csrc/mixing.cpp`). Float32 and float64.

Build: the sources in ``csrc/`` are compiled with the system C++ compiler the first time
`available()` (or a kernel) is called, into PyTorch's extension cache
(``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``); later processes load the
cached module. The instruction set is chosen from the running CPU (`torch.backends.cpu.
get_cpu_capability()`): AVX2/AVX-512 CPUs get ``-mavx2 -mfma``, others a portable ``-O3`` build
(``DYNAMIXER_CPU_KERNELS_ISA=portable`` forces the portable one).
The choice is part of the module's name, so a cache shared between different machines never
loads a binary built for another CPU. When no compiler is found or the build fails,
`available()` is False, a warning says so once, and the eager path runs.
"""
import hashlib
import logging
import os
import shutil
import warnings
from typing import Any, List, Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ['available', 'build_error', 'cpp_mix_forward', 'cpp_dynamic_mix', 'CppDynamicMix', 'cpp_gelu_pair',
           'CppRecomputeGeluMlp']

_log = logging.getLogger(__name__)
_CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'csrc')
_SOURCES = ['mixing.cpp', 'gelu.cpp']
_HEADERS = ['vec.h']

_module: Any = None
_error: Optional[str] = None
_tried = False


def _isa_flags() -> Tuple[str, List[str]]:
    """(tag, compiler flags) for the running CPU; the tag goes into the module's cache name.
    DYNAMIXER_CPU_KERNELS_ISA=portable forces the build without -mavx2 (to test it)."""
    if os.environ.get('DYNAMIXER_CPU_KERNELS_ISA', '') == 'portable':
        return 'portable', []
    machine = os.uname().machine if hasattr(os, 'uname') else ''
    if machine in ('x86_64', 'AMD64'):
        cap = torch.backends.cpu.get_cpu_capability()
        if cap in ('AVX2', 'AVX512'):
            return 'avx2', ['-mavx2', '-mfma']
        return 'x86', []
    return machine or 'generic', []


def _build() -> Any:
    from torch.utils import cpp_extension

    compiler = os.environ.get('CXX', 'c++')
    if shutil.which(compiler.split()[0]) is None:
        raise RuntimeError(f'no C++ compiler ({compiler!r}) on PATH')
    tag, isa = _isa_flags()
    # the headers' digest is a build argument, so that editing only a header also rebuilds
    digest = hashlib.sha1()
    for h in _HEADERS:
        with open(os.path.join(_CSRC, h), 'rb') as f:
            digest.update(f.read())
    flags = ['-O3', '-ffp-contract=fast', '-Wno-psabi', f'-DDYNAMIXER_HEADERS={digest.hexdigest()[:12]}'] + isa
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')          # e.g. "No CUDA runtime is found" on CPU machines
        return cpp_extension.load(
            name=f'dynamixer_cpu_kernels_{tag}',
            sources=[os.path.join(_CSRC, s) for s in _SOURCES],
            extra_cflags=flags, extra_include_paths=[_CSRC], verbose=False)


def _load() -> Any:
    global _module, _error, _tried
    if not _tried:
        _tried = True
        try:
            _module = _build()
        except Exception as e:                   # no compiler, compile error, missing headers...
            _error = f'{type(e).__name__}: {e}'.strip()
            warnings.warn(f'dynamixer: the compiled CPU kernels are unavailable ({_error.splitlines()[0]}); '
                          'the eager PyTorch path runs instead.', RuntimeWarning, stacklevel=3)
            _log.info('compiled CPU kernels unavailable: %s', _error)
    return _module


def available() -> bool:
    """True when the C++ kernels are built (building them now if this is the first call)."""
    return _load() is not None


def build_error() -> Optional[str]:
    """Why the kernels are unavailable (None when they built, or were never tried)."""
    return _error


def _ext() -> Any:
    mod = _load()
    if mod is None:
        raise RuntimeError(f'dynamixer: the compiled CPU kernels are unavailable: {_error}')
    return mod


def cpp_mix_forward(x4: torch.Tensor, r2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, s: int,
                    out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Generate, normalise and mix: (B, N, L, C) -> (B, N, L, C), no autograd.

    Writes into `out` when given (any strides with contiguous channels, e.g. one branch's slot of
    a shared buffer); else returns a new tensor.
    """
    if x4.stride(-1) != 1:
        x4 = x4.contiguous()
    return _ext().mix_forward(x4, r2.contiguous(), weight.contiguous(), bias.contiguous(), s, out)


class CppDynamicMix(torch.autograd.Function):
    """Same inputs, output and gradients as `DynamicMix`; saves only x4, r2 and the generator."""

    @staticmethod
    def forward(ctx, x4: torch.Tensor, r2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, s: int):
        if x4.stride(-1) != 1:
            x4 = x4.contiguous()
        r2, weight, bias = r2.contiguous(), weight.contiguous(), bias.contiguous()
        ctx.save_for_backward(x4, r2, weight, bias)
        ctx.s = s
        return _ext().mix_forward(x4, r2, weight, bias, s, None)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x4, r2, weight, bias = ctx.saved_tensors
        need_x, need_r, need_w, need_b = ctx.needs_input_grad[:4]
        if grad.stride(-1) != 1:
            grad = grad.contiguous()
        dx, dr2, dw, db = _ext().mix_backward(x4, r2, weight, bias, grad, ctx.s, need_x,
                                              need_r or need_w or need_b)
        return (dx if need_x else None, dr2 if need_r else None, dw if need_w else None,
                db if need_b else None, None)


def cpp_dynamic_mix(x4: torch.Tensor, r2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                    s: int) -> torch.Tensor:
    """Differentiable fused mixing, (B, N, L, C) -> (B, N, L, C); see the module docstring."""
    return CppDynamicMix.apply(x4, r2, weight, bias, s)


def cpp_gelu_pair(h: torch.Tensor, dy: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(GELU(h), dy * GELU'(h)) in one pass over h (exact-erf GELU; float32 erf to 1.5e-7)."""
    g, dh = _ext().gelu_pair(h, dy)
    return g, dh


class CppRecomputeGeluMlp(torch.autograd.Function):
    """fc2(GELU(fc1(x))) storing x and fc1's output h only, like `ops.mlp.RecomputeGeluMlp`; its
    backward recomputes GELU(h) and takes the GELU's gradient in one pass (`cpp_gelu_pair`)
    instead of two (exact GELU; the tanh approximation uses the eager ops).

    Inputs: x (M, C), fc1 weight (H, C) and bias (H), fc2 weight (C, H) and bias (C), `approximate`.
    Output (M, C).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                approximate: str) -> torch.Tensor:
        h = torch.addmm(b1, x, w1.t())
        out = torch.addmm(b2, F.gelu(h, approximate=approximate), w2.t())
        ctx.save_for_backward(x, h, w1, w2)
        ctx.approximate = approximate
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        x, h, w1, w2 = ctx.saved_tensors
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
        dout = dout.contiguous()
        dg = dout.mm(w2)
        if ctx.approximate == 'none':
            g, dh = cpp_gelu_pair(h, dg)
        else:
            g = F.gelu(h, approximate=ctx.approximate)
            dh = torch.ops.aten.gelu_backward(dg, h, approximate=ctx.approximate)
        dw2 = dout.t().mm(g) if need_w2 else None
        db2 = dout.sum(0) if need_b2 else None
        dw1 = dh.t().mm(x) if need_w1 else None
        db1 = dh.sum(0) if need_b1 else None
        dx = dh.mm(w1) if need_x else None
        return dx, dw1, db1, dw2, db2, None

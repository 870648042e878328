"""Compiled CPU kernels (C++, `torch.utils.cpp_extension`), built on first use and cached.

`CppDynamicMix.apply` / `cpp_dynamic_mix` and `cpp_mix_forward` are drop-in replacements for
`ops.mixing`'s `DynamicMix.apply(x4, r2, weight, bias, s)` and `dynamic_mix_forward(x4, r2,
weight, bias, s, out=None)`: tokens x4 (B, N, L, C) mixed along N, reduced features r2
(B*L*S, N*d) token-major, generator weight (N*N, N*d) and bias (N*N) with rows [input i,
output j]. One task of ATen's `parallel_for` per group of sequences generates, normalises and
mixes all S segments; the S x N x N matrices stay in a per-thread scratch buffer and backward
recomputes them (`csrc/mixing.cpp`). Float32 and float64. `ops.dispatch` registers them as the
'cpp' backend of the fast mixing; `CppRecomputeGeluMlp` is the training MLP with the GELU pair
(`csrc/gelu.cpp`), used by the dispatch only under ``DYNAMIXER_CPU_KERNELS=all``.

Build: the first time `available()` (or a kernel) is called, the sources in ``csrc/`` are
compiled with the system C++ compiler and ninja into PyTorch's extension cache
(``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``); later processes load the
cached library. The module's name holds the instruction set chosen from the running CPU
(`torch.backends.cpu.get_cpu_capability()`: ``-mavx2 -mfma`` on AVX2/AVX-512 CPUs, a portable
``-O3`` build otherwise; ``DYNAMIXER_CPU_KERNELS_ISA=portable`` forces the portable one) and a
digest of the sources, flags and torch version, so a cache shared between machines, versions or
checkouts never loads a library built for another. When no compiler is found or the build fails,
`available()` is False, one warning says why (`build_error()` keeps the full text), and the
dispatch runs the eager fast path.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sysconfig
import threading
import warnings
from typing import Any, List, Optional, Tuple

import torch

from .mlp import RecomputeGeluMlp

__all__ = ['available', 'build_error', 'cpp_mix_forward', 'cpp_dynamic_mix', 'CppDynamicMix', 'cpp_gelu_pair',
           'CppRecomputeGeluMlp', 'threads_used']

_log = logging.getLogger(__name__)
_CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'csrc')
_SOURCES = ['mixing.cpp', 'gelu.cpp', 'ops.cpp']
_HEADERS = ['kernels.h', 'vec.h']

_ops: Any = None              # torch.ops.<module name> once loaded
_error: Optional[str] = None
_tried = False
_lock = threading.Lock()      # one build per process, also when two threads ask at once


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


def _find_tools() -> None:
    """Raise with a clear reason when the C++ compiler or ninja is missing. The `ninja` package
    from PyPI (a dependency) installs its binary into this Python's scripts folder, which is not
    on PATH when a virtual environment's Python runs without activating it; cpp_extension looks
    for 'ninja' on PATH, so that folder goes on PATH then."""
    compiler = os.environ.get('CXX', 'c++')
    if shutil.which(compiler.split()[0]) is None:
        raise RuntimeError(f'no C++ compiler ({compiler!r}) on PATH')
    if shutil.which('ninja') is None:
        scripts = sysconfig.get_path('scripts')
        if shutil.which('ninja', path=scripts) is None:
            raise RuntimeError("no 'ninja' build tool on PATH (pip install ninja)")
        os.environ['PATH'] = scripts + os.pathsep + os.environ.get('PATH', '')


def _build() -> Any:
    """Compile (or load from the cache) and return the operators' namespace, torch.ops.<name>."""
    _find_tools()
    # importing cpp_extension logs "No CUDA runtime is found" on CPU-only machines: not news here
    logger = logging.getLogger('torch.utils.cpp_extension')
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)
    tag, isa = _isa_flags()
    # -fopenmp: ATen's parallel_for is OpenMP in the torch builds this supports; without it the
    # inline parallel_for compiles to a serial loop
    cflags = ['-O3', '-ffp-contract=fast', '-Wno-psabi', '-fopenmp'] + isa
    ldflags = ['-fopenmp']
    digest = hashlib.sha1(f'{torch.__version__} {cflags} {ldflags}'.encode())
    for f in _SOURCES + _HEADERS:
        with open(os.path.join(_CSRC, f), 'rb') as fh:
            digest.update(fh.read())
    name = f'dynamixer_cpu_kernels_{tag}_{digest.hexdigest()[:10]}'
    cpp_extension.load(name=name, sources=[os.path.join(_CSRC, s) for s in _SOURCES], extra_cflags=cflags,
                       extra_ldflags=ldflags, extra_include_paths=[_CSRC], is_python_module=False, verbose=False)
    return getattr(torch.ops, name)


def _load() -> Any:
    global _ops, _error, _tried
    if _tried:
        return _ops
    with _lock:
        if not _tried:
            try:
                _ops = _build()
            except Exception as e:                   # no compiler or ninja, compile error, ...
                _error = f'{type(e).__name__}: {e}'.strip()
                warnings.warn(
                    f'dynamixer: the compiled CPU kernels could not be built ({_summary(_error)}); the eager PyTorch '
                    'fast path runs instead. dynamixer.ops.cpu_kernels.build_error() has the full message; '
                    'set DYNAMIXER_CPU_KERNELS=0 to skip the compiled kernels and this warning.',
                    RuntimeWarning, stacklevel=4)
                _log.info('compiled CPU kernels unavailable: %s', _error)
            _tried = True
    return _ops


def _summary(error: str) -> str:
    """The gist of a build error for one warning line: its first line without the compile
    command ninja prints, and the compiler's first 'error' line."""
    lines = error.splitlines()
    head = lines[0].split(': [', 1)[0][:200]
    detail = next((ln.strip() for ln in lines[1:] if 'error' in ln.lower()), '')
    return f'{head}: {detail[:200]}' if detail else head


def available() -> bool:
    """True when the C++ kernels are built (building them now if this is the first call)."""
    return _load() is not None


def build_error() -> Optional[str]:
    """Why the kernels are unavailable (None when they built, or were never tried)."""
    return _error


def _kernels() -> Any:
    ops = _load()
    if ops is None:
        raise RuntimeError(f'dynamixer: the compiled CPU kernels are unavailable: {_error}')
    return ops


def threads_used(tasks: int) -> int:
    """How many threads the kernels' `parallel_for` runs `tasks` tasks on (at most
    torch.get_num_threads(); 1 would mean a serial build)."""
    return int(_kernels().threads_used(tasks))


def cpp_mix_forward(x4: torch.Tensor, r2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, s: int,
                    out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Generate, normalise and mix: (B, N, L, C) -> (B, N, L, C), no autograd.

    Writes into `out` when given (any strides with contiguous channels, e.g. one branch's slot of
    a shared buffer); else returns a new tensor.
    """
    if x4.stride(-1) != 1:
        x4 = x4.contiguous()
    return _kernels().mix_forward(x4, r2.contiguous(), weight.contiguous(), bias.contiguous(), s, out)


class CppDynamicMix(torch.autograd.Function):
    """Same inputs, output and gradients as `ops.mixing.DynamicMix`; saves only x4, r2 and the
    generator (the mixing matrices are recomputed in backward)."""

    @staticmethod
    def forward(ctx, x4: torch.Tensor, r2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                s: int) -> torch.Tensor:
        if x4.stride(-1) != 1:
            x4 = x4.contiguous()
        r2, weight, bias = r2.contiguous(), weight.contiguous(), bias.contiguous()
        ctx.save_for_backward(x4, r2, weight, bias)
        ctx.s = s
        return _kernels().mix_forward(x4, r2, weight, bias, s, None)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        x4, r2, weight, bias = ctx.saved_tensors
        need_x, need_r, need_w, need_b = ctx.needs_input_grad[:4]
        if grad.stride(-1) != 1:
            grad = grad.contiguous()
        dx, dr2, dw, db = _kernels().mix_backward(x4, r2, weight, bias, grad, ctx.s, need_x,
                                                  need_r or need_w or need_b)
        return (dx if need_x else None, dr2 if need_r else None, dw if need_w else None,
                db if need_b else None, None)


def cpp_dynamic_mix(x4: torch.Tensor, r2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                    s: int) -> torch.Tensor:
    """Differentiable fused mixing, (B, N, L, C) -> (B, N, L, C); see the module docstring."""
    return CppDynamicMix.apply(x4, r2, weight, bias, s)


def cpp_gelu_pair(h: torch.Tensor, dy: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(GELU(h), dy * GELU'(h)) in one pass over h, any shape (exact-erf GELU; float32 erf to 1.5e-7)."""
    g, dh = _kernels().gelu_pair(h, dy)
    return g, dh


class CppRecomputeGeluMlp(RecomputeGeluMlp):
    """`ops.mlp.RecomputeGeluMlp` (same forward and saved tensors: x and fc1's output h) whose
    backward recomputes GELU(h) and takes the GELU's gradient in one pass (`cpp_gelu_pair`)
    instead of two. Exact GELU only; the tanh approximation, or a backward that needs only one
    of the two, keeps the eager ops.

    Inputs: x (M, C), fc1 weight (H, C) and bias (H), fc2 weight (C, H) and bias (C), `approximate`.
    Output (M, C).
    """

    @staticmethod
    def backward(ctx, dout: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
        if ctx.approximate != 'none' or not (need_w2 and (need_x or need_w1 or need_b1)):
            return RecomputeGeluMlp.backward(ctx, dout)
        x, h, w1, w2 = ctx.saved_tensors
        dout = dout.contiguous()
        g, dh = cpp_gelu_pair(h, dout.mm(w2))
        dw2 = dout.t().mm(g)
        db2 = dout.sum(0) if need_b2 else None
        dw1 = dh.t().mm(x) if need_w1 else None
        db1 = dh.sum(0) if need_b1 else None
        dx = dh.mm(w1) if need_x else None
        return dx, dw1, db1, dw2, db2, None

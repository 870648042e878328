"""Fast implementations of the DynaMixer op, block and layer, and the one dispatch that chooses them.

`dispatch` decides plain vs fast per block and per layer; `fast_forms` assembles the fast forms from
the kernels in `mixing` (PyTorch, CPU and CUDA), `mlp` (the channel MLP), `triton_mixing` (CUDA)
and `cpu_kernels` (compiled C++ for the CPU, built on first use).
"""
from .dispatch import (
                       FAST_PATH_MIN_TOKENS,
                       cpu_kernels_mode,
                       explain_paths,
                       fast_path_enabled,
                       set_cpu_kernels,
                       set_fast_path,
)

__all__ = ['FAST_PATH_MIN_TOKENS', 'cpu_kernels_mode', 'explain_paths', 'fast_path_enabled', 'set_cpu_kernels',
           'set_fast_path']

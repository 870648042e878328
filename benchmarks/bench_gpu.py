"""The GPU check: `bench_speed.py` on CUDA with the GPU defaults (the Triton mixing path, bf16
autocast, batch 128 for inference and training, peak memory, no torch.compile rows).

Refused without a CUDA GPU or without Triton, so that a figure is never reported for the wrong
path. Extra flags go to bench_speed.py:

    python benchmarks/bench_gpu.py                                   # dynamixer_s, 5 rounds
    python benchmarks/bench_gpu.py --models dynamixer_s dynamixer_m --rounds 10
"""
import sys
from typing import List, Optional

import torch

import bench_speed  # the neighbour script (Python puts this folder first on the path)
from dynamixer.ops.triton_mixing import triton_available


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not torch.cuda.is_available():
        raise SystemExit('bench_gpu.py needs a CUDA GPU; on the CPU use bench_speed.py')
    if not triton_available():
        raise SystemExit('Triton is not installed (pip install -e ".[triton]"): the library would take '
                         'its PyTorch path on the GPU')
    defaults = ['--device', 'cuda', '--no-compile'] + ([] if '--models' in argv else ['--models', 'dynamixer_s'])
    return bench_speed.main(defaults + argv)


if __name__ == '__main__':
    raise SystemExit(main())

"""GPU measurement: the Triton mixing path against the straightforward reference (not yet run).

bf16 autocast training throughput (forward, backward, AdamW) and inference at batch 128, peak
memory (torch.cuda.max_memory_allocated), after the float32 output/gradient check. The library
model picks the Triton kernels by itself on CUDA (dynamixer.ops.triton_mixing, chosen by dynamixer.ops.dispatch); this script refuses
to run when Triton or a GPU is missing, so that a figure is never reported for the wrong path.
Target: >= 2x training throughput for dynamixer_s on an H100.

    python benchmarks/bench_gpu.py                      # dynamixer_s, 5 rounds
    python benchmarks/bench_gpu.py --models dynamixer_s dynamixer_m --rounds 10
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_speed  # noqa: E402


def main() -> int:
    if not torch.cuda.is_available():
        raise SystemExit('bench_gpu.py needs a CUDA GPU (use bench_speed.py on the CPU).')
    from dynamixer.ops.triton_mixing import triton_available
    if not triton_available():
        raise SystemExit('Triton is not installed: the library would use its PyTorch path.')
    argv = sys.argv[1:]
    defaults = ['--device', 'cuda', '--infer-batch', '128', '--train-batch', '128', '--no-compile']
    if '--models' not in argv:
        defaults += ['--models', 'dynamixer_s']
    return bench_speed.main(defaults + argv)


if __name__ == '__main__':
    raise SystemExit(main())

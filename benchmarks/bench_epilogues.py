"""Epilogue fusion candidates around the GEMMs, eager against Inductor's C++ backend
(torch.compile of the small function), interleaved in one process, medians of per-round times.

    python benchmarks/bench_epilogues.py --threads 1 --rounds 15

Shapes are dynamixer_s stage 1 (C = 192, hidden 576): training batch 8 (8192 tokens) and one
inference MLP chunk (1024 tokens).
"""
import argparse
from typing import List, Optional

import torch
import torch.nn.functional as F

from dynamixer.measure import interleaved_rounds, load_average, median


def gelu_pair(h: torch.Tensor, dy: torch.Tensor):
    """RecomputeGeluMlp.backward's elementwise work: GELU(h) for fc2's weight gradient and the
    GELU backward for fc1's."""
    return F.gelu(h), torch.ops.aten.gelu_backward(dy, h)


def bias_gelu(h: torch.Tensor, b: torch.Tensor):
    return F.gelu(h + b)


def residual_layernorm(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor):
    """x + y, then LayerNorm of the sum (a layer's residual add and the next norm)."""
    s = x + y
    return s, F.layer_norm(s, (s.shape[-1],), w, b)


def layernorm_mean(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor):
    """LayerNorm, and the per-image token mean of its output (the re-weighting's c-branch mean)."""
    n = F.layer_norm(x, (x.shape[-1],), w, b)
    return n, n.mean(1)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--rounds', type=int, default=15)
    p.add_argument('--scale', type=int, default=1, help='divide the token counts by this (a quick check)')
    p.add_argument('--cases', type=int, nargs='+', default=None, help='indices of the cases to run (default: all)')
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t, c, hdim = 8192 // args.scale, 192, 576
    cases = {
        f'GELU + GELU backward ({t} x {hdim})': (gelu_pair, (torch.randn(t, hdim), torch.randn(t, hdim))),
        'bias + GELU (1024 x 576)': (bias_gelu, (torch.randn(1024, hdim), torch.randn(hdim))),
        f'residual add + LayerNorm ({t} x {c})': (residual_layernorm, (torch.randn(t, c), torch.randn(t, c),
                                                                       torch.randn(c), torch.randn(c))),
        'LayerNorm + token mean (8 x 1024 x 192)': (layernorm_mean, (torch.randn(8, 1024, c), torch.randn(c),
                                                                     torch.randn(c))),
    }
    if args.cases is not None:
        cases = {k: v for i, (k, v) in enumerate(cases.items()) if i in args.cases}
    print(f'{args.threads} thread(s), medians of {args.rounds} interleaved rounds; load average {load_average()}')
    print('| candidate | eager ms | Inductor ms | eager / Inductor |')
    print('|---|---|---|---|')
    for name, (fn, inputs) in cases.items():
        compiled = torch.compile(fn, dynamic=False)
        with torch.no_grad():
            calls = {'eager': lambda fn=fn, inputs=inputs: fn(*inputs),
                     'inductor': lambda fn=compiled, inputs=inputs: fn(*inputs)}
            times = interleaved_rounds(calls, args.rounds, warmup=3)
        e, i = median(times['eager']), median(times['inductor'])
        ratio = median([a / b for a, b in zip(times['eager'], times['inductor'])])
        print(f'| {name} | {1e3 * e:.2f} | {1e3 * i:.2f} | {ratio:.2f}x |', flush=True)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())

"""The practical floor of a DynaMixer on this CPU: its own GEMMs alone, at their own shapes.

`time_parts.py` puts the floor at the model's multiply-adds over the rate of one large square
matmul. The model's GEMMs are smaller and thinner than that matmul, so not even a perfect
implementation reaches it. This script records every matrix multiply and convolution the library's
path calls (shapes, strides, out= targets; a TorchDispatchMode around one inference batch and one
training step's forward and backward), replays exactly those calls on random tensors of the same
layout, and times the replay against the whole model, the straightforward reference of
`benchmarks/baseline.py`, in interleaved rounds. Everything the replay leaves out (the mixing
kernels, LayerNorm, GELU, softmax, residual adds, copies, autograd, the optimizer) is what kernel
fusion could still remove; the replay's time is what it cannot.

    PYTHONPATH=src python benchmarks/gemm_floor.py --model dynamixer_s --threads 1

Prints, per task: reference, library and GEMM-replay times (medians), the library's gain over the
reference, the largest gain any implementation that keeps these GEMMs could reach
(reference / replay), and the reference's own GEMMs replayed the same way (how fast its GEMMs
run at its shapes).
"""
import argparse
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple

import timm
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from baseline import baseline_model  # benchmarks/baseline.py, next to this script
from dynamixer.measure import interleaved_rounds, load_average, median

aten = torch.ops.aten
# in inference mode the composite ops (linear, matmul, conv2d) reach the mode undecomposed; under
# autograd they arrive as mm / addmm / bmm / convolution. Either way each GEMM is seen once.
GEMM_OPS = {aten.mm.default, aten.mm.out, aten.addmm.default, aten.addmm.out, aten.addmm_.default,
            aten.bmm.default, aten.bmm.out, aten.baddbmm.default, aten.baddbmm.out, aten.baddbmm_.default,
            aten.linear.default, aten.matmul.default,
            aten.conv2d.default, aten.convolution.default, aten.convolution_backward.default}


def _spec(t: Any) -> Any:
    return (tuple(t.shape), tuple(t.stride()), t.dtype) if isinstance(t, torch.Tensor) else t


class RecordGemms(TorchDispatchMode):
    """Records (op, argument layouts, keyword layouts) of every GEMM / convolution call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: List[Tuple[Any, tuple, dict]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in GEMM_OPS:
            self.calls.append((func, tuple(_spec(a) for a in args), {k: _spec(v) for k, v in kwargs.items()}))
        return func(*args, **kwargs)


def _make(spec: Any, pool: Dict[Any, torch.Tensor]) -> Any:
    """A random tensor of the recorded layout; calls with the same layout share one (as the
    library reuses its buffers), which keeps the replay's memory near the model's own."""
    if isinstance(spec, tuple) and len(spec) == 3 and isinstance(spec[2], torch.dtype):
        if spec not in pool:
            shape, stride, dtype = spec
            pool[spec] = torch.empty_strided(shape, stride, dtype=dtype).uniform_(-0.1, 0.1)
        return pool[spec]
    if isinstance(spec, list):
        return [_make(s, pool) for s in spec]
    return spec


def replay(calls: List[Tuple[Any, tuple, dict]]) -> Callable[[], None]:
    """A function that runs the recorded calls again on random tensors of the same layouts
    (out= and in-place targets preallocated, as the library preallocates them)."""
    pool: Dict[Any, torch.Tensor] = {}
    ready = [(func, [_make(a, pool) for a in args], {k: _make(v, pool) for k, v in kwargs.items()})
             for func, args, kwargs in calls]

    def run() -> None:
        for func, args, kwargs in ready:
            func(*args, **kwargs)
    return run


def median_times(fns: Dict[str, Callable[[], None]], rounds: int, warmup: int) -> Dict[str, float]:
    """Median seconds per call of each function, timed in interleaved rounds."""
    return {k: median(v) for k, v in interleaved_rounds(fns, rounds, warmup=warmup).items()}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--model', default='dynamixer_s')
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--infer-batch', type=int, default=16)
    p.add_argument('--train-batch', type=int, default=8)
    p.add_argument('--rounds', type=int, default=5)
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--img-size', type=int, default=None, help="input size (default: the model's own)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lib = timm.create_model(args.model, **(dict(img_size=args.img_size) if args.img_size else {}))
    ref = baseline_model(lib)
    size = lib.img_size

    # inference
    lib.eval(), ref.eval()
    x = torch.randn(args.infer_batch, 3, *size)
    with torch.inference_mode():
        lib(x)  # builds / loads the compiled kernels outside the recording
        with RecordGemms() as rec:
            lib(x)
        with RecordGemms() as rec_ref:
            ref(x)
    infer_replay, infer_ref_replay = replay(rec.calls), replay(rec_ref.calls)

    def infer(model):
        def run():
            with torch.inference_mode():
                model(x)
        return run

    with torch.inference_mode():
        t = median_times({'reference': infer(ref), 'library': infer(lib), 'GEMM replay': infer_replay,
                          'reference GEMM replay': infer_ref_replay}, args.rounds, args.warmup)
    results = {f'inference (batch {args.infer_batch})': (t, len(rec.calls))}

    # training step: forward and backward (the optimizer has no GEMMs)
    lib.train(), ref.train()
    xt = torch.randn(args.train_batch, 3, *size)
    yt = torch.randint(0, lib.num_classes, (args.train_batch,))

    def step(model):
        def run():
            F.cross_entropy(model(xt), yt).backward()
            model.zero_grad(set_to_none=True)
        return run

    step(lib)()
    with RecordGemms() as rec_t:
        step(lib)()
    with RecordGemms() as rec_tr:
        step(ref)()
    train_replay, train_ref_replay = replay(rec_t.calls), replay(rec_tr.calls)
    t = median_times({'reference': step(ref), 'library': step(lib), 'GEMM replay': train_replay,
                      'reference GEMM replay': train_ref_replay}, args.rounds, args.warmup)
    results[f'training step, forward + backward (batch {args.train_batch})'] = (t, len(rec_t.calls))

    print(f'{args.model}, {args.threads} thread(s), torch {torch.__version__}; load average '
          f'{load_average()}; medians of {args.rounds} interleaved rounds\n')
    print('| task | reference (ms) | library (ms) | GEMM replay (ms) | GEMM calls | library vs reference '
          '| replay share of library | reference / replay (the most any kernel work could reach) '
          "| the reference's GEMMs replayed (ms) |")
    print('|---|---|---|---|---|---|---|---|---|')
    for task, (t, n) in results.items():
        r, lb, g = t['reference'], t['library'], t['GEMM replay']
        print(f'| {task} | {1e3 * r:.0f} | {1e3 * lb:.0f} | {1e3 * g:.0f} | {n} | {r / lb:.2f}x | {g / lb:.0%} '
              f"| {r / g:.2f}x | {1e3 * t['reference GEMM replay']:.0f} |")
    return 0


if __name__ == '__main__':
    sys.exit(main())

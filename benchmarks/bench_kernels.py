"""The compiled CPU kernels (dynamixer.ops.cpu_kernels) as one more interleaved variant.

Variants, interleaved in one process (order reversed every other round), medians of per-round
ratios to the reference:

* ``reference``: benchmarks/baseline.py, the straightforward implementation;
* ``library``: the eager fast path (ops.mixing / ops.mlp);
* ``kernels``: the same with the mixing through the C++ kernels (and, with --kernels-all-sizes,
  also for sequences under 16 tokens, e.g. dynamixer_nano's grids) and the training MLP's
  GELU + GELU backward fused (`CppRecomputeGeluMlp`);
* ``mixkernel``: only the mixing through the kernels (with --split);
* ``compiled``: torch.compile of the library model (unless --no-compile).

Measures inference (batch 16), the training step (batch 8, forward + loss + backward + AdamW) and
batch-1 inference latency, for each --threads value, and the fraction of the float32 matmul rate
(the reference's multiply-adds, a 2048^3 matmul timed every round). Before timing, the kernels'
logits and gradients are checked against the reference (float32 relative error <= 1e-5).

    python benchmarks/bench_kernels.py --models dynamixer_s --threads 1 2 --rounds 5
    python benchmarks/bench_kernels.py --models dynamixer_s dynamixer_nano --latency-only
"""
import argparse
import contextlib
import os
import sys
import time
from typing import Callable, Dict, Iterator, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from baseline import baseline_model  # noqa: E402
from bench_speed import TrainStep, _copy, check_equal, count_macs, matmul_rate, median  # noqa: E402

import timm  # noqa: E402
import dynamixer.model as dm  # noqa: E402
from dynamixer.ops import cpu_kernels  # noqa: E402


@contextlib.contextmanager
def kernels_on(all_sizes: bool, mixing_only: bool = False) -> Iterator[None]:
    """Route the model's mixing (and, unless mixing_only, the training MLP's GELU backward)
    through the C++ kernels for the duration of the block."""
    saved = dm.DynamicMix, dm.dynamic_mix_forward, dm.FAST_PATH_MIN_TOKENS, dm.RecomputeGeluMlp
    dm.DynamicMix, dm.dynamic_mix_forward = cpu_kernels.CppDynamicMix, cpu_kernels.cpp_mix_forward
    if not mixing_only:
        dm.RecomputeGeluMlp = cpu_kernels.CppRecomputeGeluMlp
    if all_sizes:
        dm.FAST_PATH_MIN_TOKENS = 1
    try:
        yield
    finally:
        dm.DynamicMix, dm.dynamic_mix_forward, dm.FAST_PATH_MIN_TOKENS, dm.RecomputeGeluMlp = saved


def _wall(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench(name: str, threads: int, args) -> Dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    lib = timm.create_model(name)
    ref = baseline_model(lib)
    img = lib.img_size
    x2 = torch.randn(2, 3, *img)
    with kernels_on(args.kernels_all_sizes):
        check = check_equal(lib, ref, x2, 1e-5)
    macs_i = count_macs(ref.eval(), x2[:1])
    macs_t = count_macs(ref.train(), x2[:1], backward=True)

    models = {'reference': ref, 'library': lib, 'kernels': lib}
    if args.split:
        models['mixkernel'] = lib
    if args.compile:
        models['compiled'] = torch.compile(lib)
    ctx = {k: contextlib.nullcontext for k in models}
    ctx['kernels'] = lambda: kernels_on(args.kernels_all_sizes)
    ctx['mixkernel'] = lambda: kernels_on(args.kernels_all_sizes, mixing_only=True)
    xi, x1 = torch.randn(args.infer_batch, 3, *img), torch.randn(1, 3, *img)

    def infer(m, k, x):
        def run():
            with torch.inference_mode(), ctx[k]():
                m.eval()(x)
        return run
    fns: Dict[str, Callable[[], object]] = {}
    for k, m in models.items():
        fns[f'latency/{k}'] = infer(m, k, x1)
        if not args.latency_only:
            fns[f'infer/{k}'] = infer(m, k, xi)
    if not args.latency_only:
        train_models = {'reference': baseline_model(lib), 'library': _copy(lib), 'kernels': _copy(lib)}
        if args.split:
            train_models['mixkernel'] = _copy(lib)
        if args.compile:
            train_models['compiled'] = torch.compile(_copy(lib))
        for k, m in train_models.items():
            step = TrainStep(m.train(), args.train_batch, img, lib.num_classes, torch.device('cpu'), None)

            def run(step=step, k=k):
                with ctx[k]():
                    step()
            fns[f'train/{k}'] = run
    for fn in fns.values():
        for _ in range(args.warmup):
            fn()
    mm = matmul_rate(torch.device('cpu'), torch.float32, 2048)
    times: Dict[str, List[float]] = {k: [] for k in fns}
    rates: List[float] = []
    for r in range(args.rounds):
        order = list(fns) if r % 2 == 0 else list(reversed(fns))
        for k in order:
            times[k].append(_wall(fns[k]))
        rates.append(mm()[0])
    rate = median(rates)
    rows = []
    for kind in ('infer', 'train', 'latency'):
        for k in models:
            key = f'{kind}/{k}'
            if key not in times:
                continue
            ratio = median([a / b for a, b in zip(times[f'{kind}/reference'], times[key])])
            batch = {'infer': args.infer_batch, 'train': args.train_batch, 'latency': 1}[kind]
            per_s = batch / median(times[key])
            macs = macs_t if kind == 'train' else macs_i
            rows.append(dict(kind=kind, variant=k, ms=1e3 * median(times[key]), img_s=per_s, ratio=ratio,
                             matmul_pct=100 * per_s * 2 * macs / rate))
    return dict(model=name, threads=threads, rate_gflops=rate / 1e9, check=check, rows=rows)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--models', nargs='+', default=['dynamixer_s'])
    p.add_argument('--threads', nargs='+', type=int, default=[1, 2])
    p.add_argument('--rounds', type=int, default=5)
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--infer-batch', type=int, default=16)
    p.add_argument('--train-batch', type=int, default=8)
    p.add_argument('--latency-only', action='store_true', help='only batch-1 inference')
    p.add_argument('--no-compile', dest='compile', action='store_false')
    p.add_argument('--kernels-all-sizes', action='store_true',
                   help='the kernels also for sequences under 16 tokens (FAST_PATH_MIN_TOKENS = 1)')
    p.add_argument('--split', action='store_true', help='also the mixing kernel alone (variant mixkernel)')
    args = p.parse_args(argv)
    if not cpu_kernels.available():
        raise SystemExit(f'the CPU kernels are unavailable: {cpu_kernels.build_error()}')
    print(f'load average at start: {os.getloadavg()}', flush=True)
    for name in args.models:
        for threads in args.threads:
            res = bench(name, threads, args)
            print(f"\n{name}, {threads} thread(s), matmul rate {res['rate_gflops']:.1f} GFLOP/s, "
                  f"check vs reference: " + ', '.join(f'{k} {v:.1e}' for k, v in res['check'].items()))
            print('| measurement | variant | ms per batch | img/s | ratio to reference | % of matmul rate |')
            print('|---|---|---|---|---|---|')
            for r in res['rows']:
                print(f"| {r['kind']} | {r['variant']} | {r['ms']:.1f} | {r['img_s']:.2f} | {r['ratio']:.2f}x | "
                      f"{r['matmul_pct']:.0f}% |", flush=True)
    print(f'\nload average at end: {os.getloadavg()}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())

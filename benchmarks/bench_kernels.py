"""The compiled CPU kernels (dynamixer.ops.cpu_kernels) against the eager fast path, per thread count.

Variants, interleaved in one process (order reversed every other round), medians of per-round
ratios to the reference:

* ``reference``: benchmarks/baseline.py, the straightforward implementation;
* ``library-eager``: the fast path on eager PyTorch kernels (``DYNAMIXER_CPU_KERNELS=0``);
* ``library``: as shipped, the mixing through the compiled kernels (``DYNAMIXER_CPU_KERNELS=1``);
* ``library-all``: also the training MLP's compiled GELU pair (``DYNAMIXER_CPU_KERNELS=all``);
* ``library-all-sizes`` (with --kernels-all-sizes): ``library-all`` on a copy of the model built
  with FAST_PATH_MIN_TOKENS = 1, so that grids under 16 tokens (dynamixer_nano's) go through the
  kernels too;
* ``compiled``: torch.compile of the library model (unless --no-compile).

Measures inference (batch 16), the training step (batch 8, forward + loss + backward + AdamW) and
batch-1 inference latency, for each --threads value, and the fraction of the float32 matmul rate
(the reference's multiply-adds, a 2048^3 matmul timed every round). Before timing, each library
variant's logits and gradients are checked against the reference (float32 relative error <= 1e-5).
`benchmarks/bench_speed.py` is the issue's measurement (CPU time and wall clock, memory); this is
the quicker comparison of the kernels across thread counts.

    python benchmarks/bench_kernels.py --models dynamixer_s --threads 1 2 --rounds 5
    python benchmarks/bench_kernels.py --models dynamixer_s dynamixer_nano --latency-only
"""
import argparse
import copy
from typing import Callable, Dict, List, Optional

import timm
import torch

# next to this script: the reference network and bench_speed's training step and variant settings
from baseline import baseline_model
from bench_speed import TrainStep, variant_mode
from dynamixer.measure import check_same_function, count_macs, interleaved_rounds, load_average, matmul_rate, median
from dynamixer.ops import cpu_kernels, dispatch


def _all_sizes_copy(lib: torch.nn.Module, name: str) -> torch.nn.Module:
    """The same weights in a model whose grids of any length take the fast path (decided at
    construction)."""
    saved = dispatch.FAST_PATH_MIN_TOKENS
    dispatch.FAST_PATH_MIN_TOKENS = 1
    try:
        m = timm.create_model(name, num_classes=lib.num_classes)
    finally:
        dispatch.FAST_PATH_MIN_TOKENS = saved
    m.load_state_dict(lib.state_dict())
    return m


def bench(name: str, threads: int, args) -> Dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    lib = timm.create_model(name)
    ref = baseline_model(lib)
    img = lib.img_size
    x2 = torch.randn(2, 3, *img)
    models = {'reference': ref, 'library-eager': lib, 'library': lib, 'library-all': lib}
    if args.kernels_all_sizes:
        models['library-all-sizes'] = _all_sizes_copy(lib, name)
    if args.compile:
        models['compiled'] = torch.compile(lib)
    ctx = {k: variant_mode(k) for k in models}
    ctx['library-all-sizes'] = variant_mode('library-all')
    check = {}
    for k, m in models.items():
        if k not in ('reference', 'compiled'):
            with ctx[k]():
                check[k] = max(check_same_function(m, ref, x2, 1e-5).values())
    macs_i = count_macs(ref.eval(), x2.shape[1:])
    macs_t = count_macs(ref.train(), x2.shape[1:], backward=True)
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
        for k, m in models.items():
            tm = (baseline_model(lib) if k == 'reference' else torch.compile(copy.deepcopy(lib)) if k == 'compiled'
                  else copy.deepcopy(m))
            fns[f'train/{k}'] = TrainStep(tm.train(), args.train_batch, img, lib.num_classes, torch.device('cpu'),
                                          None, context=ctx[k])
    mm = matmul_rate(torch.device('cpu'), torch.float32, args.matmul_size)
    rates: List[float] = []
    times = interleaved_rounds(fns, args.rounds, warmup=args.warmup, after_round=lambda r: rates.append(mm()[0]))
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
    p.add_argument('--matmul-size', type=int, default=2048, help='side of the reference matmul (default 2048)')
    p.add_argument('--latency-only', action='store_true', help='only batch-1 inference')
    p.add_argument('--no-compile', dest='compile', action='store_false')
    p.add_argument('--kernels-all-sizes', action='store_true',
                   help='add library-all-sizes: the kernels also for sequences under 16 tokens '
                        '(FAST_PATH_MIN_TOKENS = 1)')
    args = p.parse_args(argv)
    if not cpu_kernels.available():
        raise SystemExit(f'the CPU kernels are unavailable: {cpu_kernels.build_error()}')
    print(f'load average at start: {load_average()}', flush=True)
    for name in args.models:
        for threads in args.threads:
            res = bench(name, threads, args)
            print(f"\n{name}, {threads} thread(s), matmul rate {res['rate_gflops']:.1f} GFLOP/s, "
                  'check vs reference (max relative error): '
              + ', '.join(f'{k} {v:.1e}' for k, v in res['check'].items()))
            print('| measurement | variant | ms per batch | img/s | ratio to reference | % of matmul rate |')
            print('|---|---|---|---|---|---|')
            for r in res['rows']:
                print(f"| {r['kind']} | {r['variant']} | {r['ms']:.1f} | {r['img_s']:.2f} | {r['ratio']:.2f}x | "
                      f"{r['matmul_pct']:.0f}% |", flush=True)
    print(f'\nload average at end: {load_average()}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())

"""Where the library's time goes: wall-clock time inside each part of the fast path, measured by
wrapping the parts with timers (no profiler: torch.profiler's per-op overhead inflated elementwise
ops such as gelu_backward up to 8x on this CPU), next to the GEMM floor (each part's
multiply-adds, counted with FlopCounterMode in a separate pass, at the rate of a large matmul
timed in the same run).

    python benchmarks/time_parts.py --model dynamixer_s --threads 1

Inference (batch 16, eval, inference_mode): dynamic mixing (`dynamic_mix_forward`), re-weighted
branch projections (`reweighted_sum`), the chunked MLP (`mlp_residual_inference_`), the rest
(LayerNorm, the reduction and output projections, means, stem, head). Training step (batch 8,
AdamW): forward, backward, optimizer, and inside them the autograd Functions `DynamicMix`,
`ReweightedSum` and `RecomputeGeluMlp`. Where the compiled CPU kernels run (the default on the
CPU, `--cpu-kernels` 0 / 1 / all as DYNAMIXER_CPU_KERNELS), their parts are `cpp_mix_forward`,
`CppDynamicMix` and `CppRecomputeGeluMlp.backward`.

    python benchmarks/time_parts.py --model dynamixer_s --threads 1 --cpu-kernels 0
"""
import argparse
import sys
import time
from collections import defaultdict
from typing import Callable, Dict, List, Optional

import timm
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import dynamixer  # noqa: F401  (registers the models)
import dynamixer.model as dm
from dynamixer.measure import load_average, matmul_rate, median
from dynamixer.ops import cpu_kernels, dispatch, explain_paths, fast_forms, mixing, mlp

TIMES: Dict[str, float] = defaultdict(float)


def _timed(name: str, fn: Callable) -> Callable:
    def run(*args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        TIMES[name] += time.perf_counter() - t0
        return out
    return run


def part_macs(model: torch.nn.Module, infer_batch: int, train_batch: int) -> Dict[str, Dict[str, float]]:
    """Multiply-adds of each timed part, from the layer shapes (the spec's cost formulas); the
    totals from FlopCounterMode on the plain path (meta device), whose op sequence is the spec's.
    (FlopCounterMode does not count the out= and in-place GEMMs the fast path uses.)"""
    mix = rsum = mlp = 0.0                                     # per image, forward
    for layer in model.modules():
        if isinstance(layer, dm.MixerLayer):
            blk = layer.token_mixer
            c, n_h, n_w = blk.dim, blk.mix_h.seq_len, blk.mix_w.seq_len
            s, d, t = blk.mix_h.num_segments, blk.mix_h.reduced_dim, n_h * n_w
            mix += t * sum(s * d * n * n + c * n for n in (n_h, n_w))   # generate + mix, both branches
            rsum += t * 3 * c * c
            mlp += t * 2 * c * layer.mlp.fc1.out_features
    with torch.device('meta'):
        plain = timm.create_model(model.pretrained_cfg['architecture'], img_size=model.img_size)
    totals = {}
    for label, batch, backward in (('inference', infer_batch, False), ('training step', train_batch, True)):
        x = torch.randn(batch, 3, *model.img_size, device='meta')
        with FlopCounterMode(display=False) as fc:
            if backward:
                plain.train()(x).sum().backward()
            else:
                with torch.no_grad():
                    plain.eval()(x)
        totals[label] = fc.get_total_flops() / 2
    b, bt = infer_batch, train_batch
    fwd = totals['training step'] / 3
    counts = {
        'inference': {'total': totals['inference'], 'dynamic_mix_forward': b * mix, 'reweighted_sum': b * rsum,
                      'mlp_residual_inference_': b * mlp},
        'training step': {
            'total': totals['training step'], 'forward': fwd, 'backward': 2 * fwd, 'optimizer': 0.0,
            'DynamicMix.forward': bt * mix, 'DynamicMix.backward': 2 * bt * mix,   # + the regenerated logits
            'ReweightedSum.forward': bt * rsum, 'ReweightedSum.backward': 2 * bt * rsum,
            'RecomputeGeluMlp.forward': bt * mlp, 'RecomputeGeluMlp.backward': 2 * bt * mlp},
    }
    # the compiled CPU kernels' parts, where they run
    counts['inference']['cpp_mix_forward'] = b * mix
    counts['training step'].update({'CppDynamicMix.forward': bt * mix, 'CppDynamicMix.backward': 2 * bt * mix,
                                    'CppRecomputeGeluMlp.backward': 2 * bt * mlp})
    return counts


def instrument() -> None:
    # timing wrappers where the fast forms look the kernels up (ops.dispatch picks the path)
    for backend, label in (('fast', 'dynamic_mix_forward'), ('cpp', 'cpp_mix_forward')):
        train, infer = dispatch.KERNELS[backend]
        dispatch.KERNELS[backend] = (train, _timed(label, infer))
    for name in ('reweighted_sum', 'mlp_residual_inference_'):
        setattr(fast_forms, name, _timed(name, getattr(fast_forms, name)))
    for cls in (mixing.DynamicMix, cpu_kernels.CppDynamicMix, mixing.ReweightedSum, mlp.RecomputeGeluMlp):
        for meth in ('forward', 'backward'):
            setattr(cls, meth, staticmethod(_timed(f'{cls.__name__}.{meth}', getattr(cls, meth))))
    # its forward is RecomputeGeluMlp's (timed above)
    cls = cpu_kernels.CppRecomputeGeluMlp
    cls.backward = staticmethod(_timed('CppRecomputeGeluMlp.backward', cls.backward))


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--model', default='dynamixer_s')
    p.add_argument('--threads', type=int, default=None)
    p.add_argument('--infer-batch', type=int, default=16)
    p.add_argument('--train-batch', type=int, default=8)
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--matmul-size', type=int, default=2048, help='side of the reference matmul (default 2048)')
    p.add_argument('--cpu-kernels', default=None, choices=['0', '1', 'all'],
                   help='the compiled CPU kernels: as DYNAMIXER_CPU_KERNELS (default: as configured)')
    args = p.parse_args(argv)
    if args.cpu_kernels is not None:
        dynamixer.set_cpu_kernels(args.cpu_kernels)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(args.model)
    xi = torch.randn(args.infer_batch, 3, *model.img_size)
    xt = torch.randn(args.train_batch, 3, *model.img_size)
    yt = torch.randint(0, model.num_classes, (args.train_batch,))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def infer():
        with torch.inference_mode():
            model.eval()(xi)

    def step():
        opt.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss = F.cross_entropy(model.train()(xt), yt)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        TIMES['forward'] += t1 - t0
        TIMES['backward'] += t2 - t1
        TIMES['optimizer'] += time.perf_counter() - t2

    for _ in range(3):   # warm-up: the allocator and AdamW state
        infer()
        step()
    counts = part_macs(model, args.infer_batch, args.train_batch)
    with torch.inference_mode():
        paths = explain_paths(model.eval(), xi)
    taken = list(paths.values())
    print('paths (inference): ' + ', '.join(f'{p} x{taken.count(p)}' for p in sorted(set(taken))))
    instrument()
    results = {}
    for label, fn in (('inference', infer), ('training step', step)):
        totals = defaultdict(list)
        for _ in range(args.rounds):
            TIMES.clear()
            t0 = time.perf_counter()
            fn()
            totals['total'].append(time.perf_counter() - t0)
            for k, v in TIMES.items():
                totals[k].append(v)
        results[label] = {k: sorted(v)[len(v) // 2] for k, v in totals.items()}
    mm = matmul_rate(torch.device('cpu'), torch.float32, args.matmul_size)
    rate = median([mm()[0] for _ in range(3)]) / 2          # multiply-adds per second

    print(f'\n{args.model}, {torch.get_num_threads()} thread(s), load average {load_average()}, '
          f'matmul rate {2 * rate / 1e9:.1f} GFLOP/s; '
          f'medians of {args.rounds} runs, milliseconds per batch\n')
    for label, res in results.items():
        macs = counts[label]
        batch = args.infer_batch if label == 'inference' else args.train_batch
        total = res.pop('total')
        floor = macs['total'] / rate
        print(f'{label} (batch {batch}): {1e3 * total:.0f} ms; GEMM floor {1e3 * floor:.0f} ms '
              f'({100 * floor / total:.0f}% of the matmul rate)\n')
        print('| part | ms | share of the total | its GEMM floor (ms) | floor / time |')
        print('|---|---|---|---|---|')
        rows = sorted(res.items(), key=lambda kv: -kv[1])
        if label == 'inference':
            rows.append(('rest', total - sum(res.values())))
            # the parts that ran (the eager or the compiled mixing, not both)
            macs = dict(macs, rest=macs['total'] - sum(macs.get(k, 0.0) for k in res))
        for k, v in rows:
            f = macs.get(k, 0.0) / rate
            print(f'| {k} | {1e3 * v:.0f} | {100 * v / total:.0f}% | {1e3 * f:.0f} | {100 * f / v:.0f}% |')
        print()
    return 0


if __name__ == '__main__':
    sys.exit(main())

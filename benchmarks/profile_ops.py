"""Where the time goes: torch.profiler op totals of one forward (or training step), library vs
reference, grouped by kind (GEMM, copies, softmax, elementwise, norm, GELU, other).

    python benchmarks/profile_ops.py --model dynamixer_s --batch 16 --threads 1
    python benchmarks/profile_ops.py --model dynamixer_s --batch 8 --train

The profiler adds a little time per recorded op, which weighs most on the library's many small
per-chunk bmm calls; use bench_speed.py for throughput.
"""
import argparse
import os
import sys
from collections import defaultdict

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from baseline import baseline_model  # noqa: E402
import timm  # noqa: E402
import dynamixer  # noqa: E402,F401

KINDS = {
    'GEMM': ('aten::addmm', 'aten::mm', 'aten::bmm', 'aten::baddbmm', 'aten::baddbmm_', 'aten::addmm_',
             'aten::mkldnn_convolution', 'aten::convolution_backward'),
    'copy': ('aten::copy_', 'aten::clone', 'aten::contiguous'),
    'softmax': ('aten::_softmax', 'aten::_softmax_backward_data'),
    'GELU': ('aten::gelu', 'aten::gelu_backward'),
    'LayerNorm': ('aten::native_layer_norm', 'aten::native_layer_norm_backward'),
    'elementwise/reduce': ('aten::add', 'aten::add_', 'aten::mul', 'aten::mul_', 'aten::sum', 'aten::mean',
                           'aten::addcmul_', 'aten::div', 'aten::sub', 'aten::zeros_like', 'aten::fill_',
                           'aten::zero_', 'aten::_foreach_mul_', 'aten::_foreach_add_', 'aten::_foreach_addcmul_',
                           'aten::_foreach_addcdiv_', 'aten::_foreach_sqrt', 'aten::_foreach_div_',
                           'aten::_foreach_lerp_', 'aten::_foreach_add', 'aten::_foreach_div'),
}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument('--model', default='dynamixer_s')
    p.add_argument('--batch', type=int, default=16)
    p.add_argument('--threads', type=int, default=None)
    p.add_argument('--train', action='store_true', help='a training step (forward, backward, AdamW)')
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lib = timm.create_model(args.model)
    models = {'reference': baseline_model(lib), 'library': lib}
    x = torch.randn(args.batch, 3, *lib.img_size)
    y = torch.randint(0, lib.num_classes, (args.batch,))
    rows = {}
    for name, m in models.items():
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4)

        def run():
            if args.train:
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(m.train()(x), y).backward()
                opt.step()
            else:
                with torch.inference_mode():
                    m.eval()(x)
        run()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            run()
        totals = defaultdict(float)
        for e in prof.key_averages():
            kind = next((k for k, names in KINDS.items() if e.key in names), None)
            if kind is None:
                kind = 'other'
            totals[kind] += e.self_cpu_time_total / 1e6
        rows[name] = totals
    kinds = list(KINDS) + ['other']
    what = 'training step' if args.train else 'inference'
    print(f'\n{args.model} {what}, batch {args.batch}, self CPU seconds by op kind (torch.profiler)\n')
    print('| kind | ' + ' | '.join(rows) + ' |')
    print('|---|' + '---|' * len(rows))
    for k in kinds + ['total']:
        vals = [sum(r.values()) if k == 'total' else r.get(k, 0.0) for r in rows.values()]
        print(f'| {k} | ' + ' | '.join(f'{v:.2f}' for v in vals) + ' |')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())

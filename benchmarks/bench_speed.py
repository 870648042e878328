"""Speed and memory of the library's DynaMixer models against the straightforward reference.

One process, variants interleaved over several rounds, medians and ratios:

* inference images/s (batch 16 fp32 on CPU; batch 128 bf16 autocast on a GPU),
* training-step images/s (forward, backward, AdamW step; batch 8 on CPU, 128 bf16 on a GPU),
* peak memory of one training step,
* the fraction of the machine's float32 (GPU: bf16) matmul rate each model reaches: the model's
  multiply-adds (FlopCounterMode) times images/s, over the rate of a large matmul timed in the
  same rounds.

Variants: ``reference`` (benchmarks/baseline.py, the step-by-step implementation); ``library``
(eager, as configured: on the CPU the fast path with the compiled CPU kernels of
`dynamixer.ops.cpu_kernels` when they build, which they do on first use); ``library-eager`` (the
same model with ``set_cpu_kernels(False)``, i.e. DYNAMIXER_CPU_KERNELS=0: the fast path on eager
PyTorch kernels only, so the compiled kernels' gain is the ratio of the two rows);
``library-all`` (with --cpu-kernels-all: ``set_cpu_kernels('all')``, also the training MLP's
compiled GELU pair); ``compiled`` (torch.compile of the library model). Before timing, every
library variant's outputs and gradients are checked against the reference (float32 relative
error <= 1e-5), and the paths each one takes (`dynamixer.explain_paths`) are printed, so a
'library' row without 'cpp-*' paths shows that the compiled kernels did not run.
--latency adds batch-1 inference (latency per image).

CPU peak memory: PyTorch has no CPU allocator statistics, so the step runs once under
torch.profiler(profile_memory=True); every allocation and free of the CPU allocator is an event,
and the running sum of their sizes, in time order, peaks at the step's peak above what was live
before it. 'total' adds what was live before the step (weights and AdamW state; gradients are
freed by zero_grad(set_to_none=True)). On CUDA: torch.cuda.max_memory_allocated.

Time: every call is timed both by the wall clock and by the CPU time of this process
(time.process_time). On a CPU shared with other work the wall clock mostly measures the share the
scheduler gives; with --threads 1 the CPU time is the work itself, and is reported first.

Page faults: the CPU time includes the kernel's (system) time, and a step that takes memory fresh
from the OS pays a page fault per 4 KiB page, which glibc's allocator does whenever it has handed
memory back. Per call, the user and system CPU seconds and the minor page faults are reported for
every variant, with a 'user-time ratio' (the work alone). How often pages come fresh depends on
the allocator (MALLOC_* environment variables, LD_PRELOAD), which is printed with the results.

    python benchmarks/bench_speed.py --models dynamixer_s --rounds 5
    python benchmarks/bench_speed.py --models dynamixer_nano dynamixer_s dynamixer_m dynamixer_l
    python benchmarks/bench_speed.py --models dynamixer_s dynamixer_nano --latency --threads 1

On a GPU (the Triton mixing path; refused without Triton, so that a figure is never reported for
the wrong path): bf16 autocast, batch 128 for inference and training, peak memory from
torch.cuda.max_memory_allocated.

    python benchmarks/bench_speed.py --device cuda --models dynamixer_s --no-compile --rounds 5
"""
import argparse
import contextlib
import copy
from typing import Callable, Dict, List, Optional

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import dynamixer
from baseline import baseline_model  # benchmarks/baseline.py, next to this script
from dynamixer.experiments import write_json
from dynamixer.measure import (
    check_same_function,
    count_macs,
    interleaved_rounds,
    load_average,
    machine_info,
    matmul_rate,
    median,
    timed_with_usage,
)
from dynamixer.ops import cpu_kernels
from dynamixer.ops.triton_mixing import triton_available

# library variants -> the compiled CPU kernels' setting they run under (None: as configured)
LIBRARY_VARIANTS = {'library': None, 'library-eager': False, 'library-all': 'all'}


def variant_mode(variant: str) -> Callable[[], contextlib.AbstractContextManager]:
    """A context-manager factory selecting the variant's CPU-kernel setting for a call."""
    mode = LIBRARY_VARIANTS.get(variant)
    if mode is None:
        return contextlib.nullcontext
    return lambda: dynamixer.set_cpu_kernels(mode)


class TrainStep:
    """forward, cross-entropy, backward, AdamW step (under `context()`, e.g. a variant's setting)."""

    def __init__(self, model: nn.Module, batch: int, img_size, num_classes: int, device, amp_dtype,
                 context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
        self.model = model
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
        self.x = torch.randn(batch, 3, *img_size, device=device)
        self.y = torch.randint(0, num_classes, (batch,), device=device)
        self.device, self.amp_dtype, self.context = device, amp_dtype, context

    def __call__(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        with self.context():
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                loss = F.cross_entropy(self.model(self.x), self.y)
            loss.backward()
        self.opt.step()


def live_bytes(step: TrainStep) -> int:
    """Bytes held between steps: weights and optimizer state."""
    seen, total = set(), 0
    tensors = list(step.model.parameters()) + list(step.model.buffers())
    for st in step.opt.state.values():
        tensors += [v for v in st.values() if torch.is_tensor(v)]
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def step_peak_bytes(step: TrainStep) -> int:
    """Peak bytes allocated during one call of `step` above the level before it."""
    if step.device.type == 'cuda':
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == '[memory]' and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


def _path_counts(model: nn.Module, x: torch.Tensor, train: bool) -> Dict[str, int]:
    """How many deciding modules take each path (ops.dispatch), for one call like the timed ones."""
    if train:
        paths = list(dynamixer.explain_paths(model.train(), x).values())
        model.zero_grad(set_to_none=True)
    else:
        with torch.inference_mode():
            paths = list(dynamixer.explain_paths(model.eval(), x).values())
    return {p: paths.count(p) for p in sorted(set(paths))}


def bench_model(name: str, args, device: torch.device, mm_rates: List[float], mm: Callable[[], float]) -> Dict:
    torch.manual_seed(0)
    gpu = device.type == 'cuda'
    amp = torch.bfloat16 if gpu else None
    lib = timm.create_model(name, **(dict(img_size=args.img_size) if args.img_size else {})).to(device)
    ref = baseline_model(lib)
    img = lib.img_size
    res: Dict = dict(model=name, img_size=list(img))

    names = ['reference', 'library', 'library-eager'] + (['library-all'] if args.cpu_kernels_all else [])
    if args.compile:
        names.append('compiled')
    res['variants'] = names

    # 1. same function: outputs and gradients, float32, for every library variant; and the paths
    # each takes (the first call of a 'cpp' variant builds or loads the compiled kernels)
    x = torch.randn(2, 3, *img, device=device)
    res['check'], res['paths_inference'], res['paths_train'] = {}, {}, {}
    for k in names:
        if k in LIBRARY_VARIANTS:
            with variant_mode(k)():
                res['check'][k] = check_same_function(lib, ref, x, args.tol)
                res['paths_inference'][k] = _path_counts(lib, x, train=False)
                res['paths_train'][k] = _path_counts(lib, x, train=True)
    res['cpu_kernels_error'] = cpu_kernels.build_error()
    res['gmacs_per_image'] = count_macs(ref.eval(), x.shape[1:]) / 1e9
    res['train_gmacs_per_image'] = count_macs(ref.train(), x.shape[1:], backward=True) / 1e9

    bi, bt = args.infer_batch, args.train_batch
    xi = torch.randn(bi, 3, *img, device=device)
    x1 = torch.randn(1, 3, *img, device=device)

    def infer(m, k, xb):
        ctx = variant_mode(k)

        def run():
            with ctx(), torch.inference_mode(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                m(xb)
        return run
    models = {'reference': ref.eval(), 'compiled': torch.compile(lib) if args.compile else None}
    kinds = {'infer': bi, 'train': bt}
    if args.latency:
        kinds['latency'] = 1
    fns: Dict[str, Callable[[], object]] = {}
    train_steps: Dict[str, TrainStep] = {}
    for k in names:
        m = models[k] if models.get(k) is not None else lib.eval()
        fns[f'infer/{k}'] = infer(m, k, xi)
        if args.latency:
            fns[f'latency/{k}'] = infer(m, k, x1)
        # training steps work on their own copies so that each variant's AdamW state is its own
        if k == 'reference':
            tm = baseline_model(lib)
        else:
            tm = torch.compile(copy.deepcopy(lib)) if k == 'compiled' else copy.deepcopy(lib)
        train_steps[k] = TrainStep(tm.train(), bt, img, lib.num_classes, device, amp, context=variant_mode(k))
        fns[f'train/{k}'] = train_steps[k]

    # warm-up (and compilation), then every call timed by the wall clock and the process's CPU time
    keys = [f'{kind}/{k}' for k in names for kind in kinds]

    def after_round(r: int) -> None:
        mm_rates.append(mm())
        if args.verbose:
            print(f'  round {r + 1}/{args.rounds} done; matmul {mm_rates[-1][0] / 1e9:.1f} GFLOP/s', flush=True)
    measured = interleaved_rounds({k: fns[k] for k in keys}, args.rounds, warmup=args.warmup,
                                  timer=lambda fn: timed_with_usage(fn, device), after_round=after_round)
    times = {k: [kinds[k.split('/')[0]] / m[0] for m in v] for k, v in measured.items()}
    cpu = {k: [m[1] for m in v] for k, v in measured.items()}
    usage = {k: [m[2] for m in v] for k, v in measured.items()}
    res['images_per_s'] = {k: median(v) for k, v in times.items()}
    # images per CPU-second of this process: on a shared CPU, wall-clock time mostly measures the
    # scheduler's share; with --threads 1 the process's CPU time measures the work itself
    res['images_per_cpu_s'] = {k: median([kinds[k.split('/')[0]] / c for c in v]) for k, v in cpu.items()}
    res['images_per_s_rounds'] = times
    # the kernel's share: page faults (fresh memory from the OS, zeroed by the kernel) are system
    # time, and differ between variants that allocate differently; user time is the work itself
    res['per_call_usage'] = {k: dict(user_s=median([u[0] for u in v]), sys_s=median([u[1] for u in v]),
                                     minor_faults=median([u[2] for u in v])) for k, v in usage.items()}
    for kind in kinds:
        for k in names:
            if k == 'reference':
                continue
            per_round = [a / b for a, b in zip(times[f'{kind}/{k}'], times[f'{kind}/reference'])]
            res.setdefault('speedup', {})[f'{kind}/{k}'] = median(per_round)
            per_round = [b / a for a, b in zip(cpu[f'{kind}/{k}'], cpu[f'{kind}/reference'])]
            res.setdefault('speedup_cpu_time', {})[f'{kind}/{k}'] = median(per_round)
            per_round = [b[0] / a[0] for a, b in zip(usage[f'{kind}/{k}'], usage[f'{kind}/reference']) if a[0] > 0]
            if per_round:
                res.setdefault('speedup_user_time', {})[f'{kind}/{k}'] = median(per_round)

    if args.memory:
        mem = {}
        for k, step in train_steps.items():
            with step.context():
                step_peak = step_peak_bytes(step)
            mem[k] = dict(step_peak_mib=step_peak / 2 ** 20, live_before_mib=live_bytes(step) / 2 ** 20,
                          total_peak_mib=(step_peak + live_bytes(step)) / 2 ** 20)
        res['memory'] = mem
    return res


def print_tables(results: List[Dict], info: Dict) -> None:
    mm = info['matmul_gflops']
    print(f"\nmatmul rate (median of rounds): {mm:.1f} GFLOP/s; load avg start {info.get('load_avg_start')} "
          f"end {info.get('load_avg_end')}; allocator settings: {info.get('allocator_env') or 'defaults'}")
    print('\npaths taken (ops.dispatch: deciding modules per path), inference | training step:')
    for r in results:
        for k, p in r['paths_inference'].items():
            print(f"  {r['model']} {k}: {p} | {r['paths_train'][k]}")
        if r.get('cpu_kernels_error'):
            print(f"  (the compiled CPU kernels did not build: {r['cpu_kernels_error'].splitlines()[0]})")
    latency = any(k.startswith('latency/') for r in results for k in r['images_per_s'])
    for label, key, ratio_key, rate in (
            ('CPU time of this process', 'images_per_cpu_s', 'speedup_cpu_time', info['matmul_gflops_cpu_time']),
            ('wall clock', 'images_per_s', 'speedup', mm)):
        print(f'\n{label} (matmul rate {rate:.1f} GFLOP/s)')
        head = '| model | variant | inference img/s | ratio | % matmul rate | train img/s | ratio | % matmul rate |'
        if latency:
            head += ' batch-1 latency ms | ratio |'
        print('\n' + head)
        print('|' + '---|' * (head.count('|') - 1))
        for r in results:
            for k in r['variants']:
                ips, tps = r[key][f'infer/{k}'], r[key][f'train/{k}']
                ri = r.get(ratio_key, {}).get(f'infer/{k}', 1.0)
                rt = r.get(ratio_key, {}).get(f'train/{k}', 1.0)
                fi = 100 * ips * 2e9 * r['gmacs_per_image'] / (rate * 1e9)
                ft = 100 * tps * 2e9 * r['train_gmacs_per_image'] / (rate * 1e9)
                row = f"| {r['model']} | {k} | {ips:.2f} | {ri:.2f}x | {fi:.0f}% | {tps:.2f} | {rt:.2f}x | {ft:.0f}% |"
                if latency:
                    lat = 1e3 / r[key][f'latency/{k}']
                    row += f" {lat:.1f} | {r.get(ratio_key, {}).get(f'latency/{k}', 1.0):.2f}x |"
                print(row)
    if any('per_call_usage' in r for r in results):
        print('\nper call, medians: user CPU s | system CPU s | minor page faults | ratio of user CPU time to '
              "the reference's (the work without the kernel's page handling)")
        print('\n| model | variant | kind | user s | system s | minor faults | user-time ratio |')
        print('|---|---|---|---|---|---|---|')
        for r in results:
            for key, u in r.get('per_call_usage', {}).items():
                kind, k = key.split('/', 1)
                ratio = r.get('speedup_user_time', {}).get(key, 1.0)
                print(f"| {r['model']} | {k} | {kind} | {u['user_s']:.3f} | {u['sys_s']:.3f} | "
                      f"{u['minor_faults']:.0f} | {ratio:.2f}x |")
    if any('memory' in r for r in results):
        print('\n| model | variant | step peak above live (MiB) | ratio | live before step (MiB) | total peak (MiB) '
              '| ratio |')
        print('|---|---|---|---|---|---|---|')
        for r in results:
            mem = r.get('memory')
            if not mem:
                continue
            ref = mem['reference']
            for k, v in mem.items():
                print(f"| {r['model']} | {k} | {v['step_peak_mib']:.0f} | "
                      f"{v['step_peak_mib'] / ref['step_peak_mib']:.2f}x | "
                      f"{v['live_before_mib']:.0f} | {v['total_peak_mib']:.0f} | "
                      f"{v['total_peak_mib'] / ref['total_peak_mib']:.2f}x |")
    print('\nequality checks against the reference (relative error, float32):')
    for r in results:
        for k, errs in r['check'].items():
            print(f"  {r['model']} {k}: " + ', '.join(f'{e} {v:.1e}' for e, v in errs.items()))


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--models', nargs='+', default=['dynamixer_s'])
    p.add_argument('--rounds', type=int, default=5, help='interleaved timing rounds (median reported)')
    p.add_argument('--warmup', type=int, default=3,
                   help='untimed calls per variant first; the reference training step needs about 3 to settle')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--infer-batch', type=int, default=None, help='default 16 (CPU) or 128 (GPU)')
    p.add_argument('--train-batch', type=int, default=None, help='default 8 (CPU) or 128 (GPU)')
    p.add_argument('--no-memory', dest='memory', action='store_false')
    p.add_argument('--no-compile', dest='compile', action='store_false', help='skip the torch.compile rows')
    p.add_argument('--cpu-kernels-all', action='store_true',
                   help="add the variant 'library-all': DYNAMIXER_CPU_KERNELS=all (also the training MLP's "
                        "compiled GELU)")
    p.add_argument('--latency', action='store_true', help='also batch-1 inference latency')
    p.add_argument('--img-size', type=int, default=None, help="input size (default: the model's own)")
    p.add_argument('--matmul-size', type=int, default=None, help='default 2048 (CPU), 8192 (GPU)')
    p.add_argument('--tol', type=float, default=1e-5)
    p.add_argument('--threads', type=int, default=None)
    p.add_argument('--json', default=None, help='also write the results here')
    p.add_argument('--verbose', action='store_true')
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == 'cuda'
    if gpu and not triton_available():
        # the library would take its PyTorch path: a figure must never be reported for the wrong path
        raise SystemExit('on a GPU the library runs its Triton kernels, and Triton is not installed here')
    if args.threads:
        torch.set_num_threads(args.threads)
    args.infer_batch = args.infer_batch or (128 if gpu else 16)
    args.train_batch = args.train_batch or (128 if gpu else 8)
    mm = matmul_rate(device, torch.bfloat16 if gpu else torch.float32, args.matmul_size or (8192 if gpu else 2048))
    info = machine_info(device)
    info['load_avg_start'] = info['load_avg']
    mm_rates: List[float] = []
    results = []
    for name in args.models:
        print(f'== {name}', flush=True)
        results.append(bench_model(name, args, device, mm_rates, mm))
    info['matmul_gflops'] = median([r[0] for r in mm_rates]) / 1e9
    info['matmul_gflops_cpu_time'] = median([r[1] for r in mm_rates]) / 1e9
    info['load_avg_end'] = load_average()
    info['args'] = vars(args)
    info['cpu_kernels'] = dynamixer.cpu_kernels_mode()
    print_tables(results, info)
    if args.json:
        write_json(dict(info=info, results=results), args.json)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())

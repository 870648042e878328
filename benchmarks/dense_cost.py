"""Cost of one detector training step: FasterRCNN on dynamixer_s's pyramid vs torchvision's
ResNet-50 FPN, side by side in one process, at several input sizes.

Both detectors are torchvision's FasterRCNN with its default heads (sized for COCO: 91 classes,
2000/1000 proposals, 512 RoIs per image, a 1024-wide box head) and the same transform: every image
resized to exactly SIZE x SIZE, no padding (`detector_kwargs`). Only the backbone differs:
`pyramid_backbone('dynamixer_s', img_size=SIZE, out_channels=256)` (FPN over its stride-7 and
stride-14 stages, 5 levels) against `resnet_fpn_backbone('resnet50')` (torchvision's, trainable
layers all, FrozenBatchNorm as in torchvision's detection models). Random weights: cost does not
depend on them.

Time: a training step (forward with losses, backward, SGD step) on a batch of --batch images with
3 random boxes each, after --warmup steps; the two models alternate in --rounds interleaved rounds
(the order reversed every other round, so that load from other processes hits both alike), and
the median per model is reported, with the ratio dynamixer_s / resnet50. Peak memory: each (model,
size) runs 2 steps in a fresh child process; on the CPU the peak resident set size
(VmHWM) of that process and its growth over the steps (peak minus the resident size after building
the model), on a GPU torch.cuda.max_memory_allocated. The machine load (`uptime`) is printed before
and after: figures taken under load are not comparable to quiet ones.

DynaMixer sizes must be multiples of 14 for dynamixer_s; a --sizes value that is not is rounded to
the nearest that is (640 -> 644) and used for both models.

    python benchmarks/dense_cost.py --sizes 224 448 640 --batch 2 --rounds 7 --threads 2
    python benchmarks/dense_cost.py --sizes 112 --batch 1 --rounds 2 --warmup 1   # a quick check
"""
import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import time

import torch

MODELS = ('dynamixer_s', 'resnet50_fpn')


def build(name: str, size: int) -> torch.nn.Module:
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    from dynamixer.dense import detector_kwargs, pyramid_backbone
    if name == 'dynamixer_s':
        backbone = pyramid_backbone('dynamixer_s', img_size=size, out_channels=256)
        kwargs = detector_kwargs(backbone)
    else:
        backbone = resnet_fpn_backbone(backbone_name='resnet50', weights=None, trainable_layers=5)
        kwargs = dict(min_size=size, max_size=size, fixed_size=(size, size), size_divisible=1)
    return FasterRCNN(backbone, num_classes=91, **kwargs)


def batch(size: int, n: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, size, size, generator=g).to(device) for _ in range(n)]
    targets = []
    for _ in range(n):
        xy = torch.rand(3, 2, generator=g) * size * 0.6
        wh = torch.rand(3, 2, generator=g) * size * 0.3 + 8
        targets.append(dict(boxes=torch.cat([xy, xy + wh], 1).to(device),
                            labels=torch.randint(1, 91, (3,), generator=g).to(device)))
    return images, targets


def make_step(model: torch.nn.Module, images, targets):
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def step():
        loss = sum(model(images, targets).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _status_mib(field: str) -> float:
    """VmRSS / VmHWM of this process from /proc (Linux), in MiB."""
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1]) / 1024
    raise OSError(f'no {field} in /proc/self/status')


def memory_child(name: str, size: int, n: int, device_name: str, threads: int, queue) -> None:
    """In a fresh process: build, 2 steps; peak memory. (ru_maxrss would not do: Linux keeps the
    parent's through fork and exec. VmHWM belongs to this process's own address space.)"""
    torch.set_num_threads(threads)
    device = torch.device(device_name)
    model = build(name, size).to(device).train()
    images, targets = batch(size, n, device)
    step = make_step(model, images, targets)
    before = _status_mib('VmRSS')
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(2):
        step()
    sync(device)
    peak = _status_mib('VmHWM')
    out = dict(peak_rss_mib=round(peak), step_growth_mib=round(peak - before))
    if device.type == 'cuda':
        out['cuda_peak_mib'] = round(torch.cuda.max_memory_allocated(device) / 2 ** 20)
    queue.put(out)


def uptime() -> str:
    try:
        return subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()
    except OSError:
        return f'load average {os.getloadavg()}'


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--sizes', type=int, nargs='+', default=[224, 448, 640])
    p.add_argument('--batch', type=int, default=2, help='images per step (default: 2)')
    p.add_argument('--rounds', type=int, default=7, help='interleaved timing rounds (default: 7)')
    p.add_argument('--warmup', type=int, default=2, help='untimed steps per model first (default: 2)')
    p.add_argument('--threads', type=int, default=2, help='torch CPU threads (default: 2)')
    p.add_argument('--device', default='cpu')
    p.add_argument('--json', default=None, help='also write the results to this JSON file')
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f'before: {uptime()}')
    print(f'torch {torch.__version__}, {args.threads} threads, device {device}, batch {args.batch}, '
          f'{args.rounds} rounds after {args.warmup} warm-up steps')
    results = []
    ctx = multiprocessing.get_context('spawn')
    for asked in args.sizes:
        size = int(round(asked / 14)) * 14
        steps = {}
        for name in MODELS:
            torch.manual_seed(0)
            model = build(name, size).to(device).train()
            images, targets = batch(size, args.batch, device)
            steps[name] = make_step(model, images, targets)
            for _ in range(args.warmup):
                steps[name]()
        times = {name: [] for name in MODELS}
        for r in range(args.rounds):
            for name in (MODELS if r % 2 == 0 else MODELS[::-1]):
                sync(device)
                t = time.perf_counter()
                steps[name]()
                sync(device)
                times[name].append(time.perf_counter() - t)
        del steps
        row = dict(size=size, asked=asked)
        for name in MODELS:
            q = ctx.Queue()
            proc = ctx.Process(target=memory_child, args=(name, size, args.batch, args.device, args.threads, q))
            proc.start()
            mem = q.get()
            proc.join()
            row[name] = dict(median_s=statistics.median(times[name]), rounds_s=[round(t, 4) for t in times[name]],
                             **mem)
        row['time_ratio'] = row['dynamixer_s']['median_s'] / row['resnet50_fpn']['median_s']
        results.append(row)
        d, r = row['dynamixer_s'], row['resnet50_fpn']
        mem_key = 'cuda_peak_mib' if device.type == 'cuda' else 'peak_rss_mib'
        print(f"{size}x{size}{'' if size == asked else f' (asked {asked})'}: step dynamixer_s {d['median_s']:.3f} s, "
              f"resnet50-FPN {r['median_s']:.3f} s, ratio {row['time_ratio']:.2f}; peak memory "
              f"{d[mem_key]} vs {r[mem_key]} MiB ({mem_key}; growth over the steps {d['step_growth_mib']} vs "
              f"{r['step_growth_mib']} MiB)", flush=True)
    print(f'after: {uptime()}')
    print('| size | dynamixer_s step (s) | resnet50-FPN step (s) | time ratio | peak memory dynamixer_s (MiB) | '
          'peak memory resnet50-FPN (MiB) |')
    print('|---|---|---|---|---|---|')
    for row in results:
        d, r = row['dynamixer_s'], row['resnet50_fpn']
        key = 'cuda_peak_mib' if device.type == 'cuda' else 'peak_rss_mib'
        print(f"| {row['size']} | {d['median_s']:.3f} | {r['median_s']:.3f} | {row['time_ratio']:.2f} | {d[key]} | "
              f"{r[key]} |")
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(args=vars(args), results=results), f, indent=1)


if __name__ == '__main__':
    main()

"""Does resampling the mixing generators carry what a model learned to another input size?

Trains dynamixer_nano on scikit-learn's bundled digits (8x8 images, upsampled to 32x32; seeded
stratified split), then, without further training, evaluates at other sizes:

* resampled: the trained weights converted by `dynamixer.resample_state_dict` (several settings);
* baseline "resize input": the native 32x32 model, the test images resized back to 32x32;
* baseline "random generators": every weight loaded except the generators, which are freshly
  initialised (the model's own init);

and finally fine-tunes at the new size for a few steps from the resampled weights and from the
random-generator baseline, reporting test accuracy along the way.

Every image at every size is made from the same 8x8 original (bilinear, antialiased), so the
sizes show the same content at different resolutions. The script prints Markdown tables
(docs/resolution.md holds a copy); with --out they are also written to a file.

    PYTHONPATH=src python benchmarks/resolution_transfer.py --seeds 0 1 2
"""
import argparse
import math
import platform
import sys
import time
from typing import Dict, List, Sequence, Tuple

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.loss import LabelSmoothingCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

from dynamixer import experiments
from dynamixer.resample import resample_state_dict

NATIVE = 32
MODEL = 'dynamixer_nano'


def load_digits_split(seed: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits as (N, 1, 8, 8) floats in [0, 1] and labels; stratified 75/25 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(
        torch.arange(len(y)).numpy(), test_size=0.25, stratify=y.numpy(), random_state=seed)
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


def to_size(x8: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 1, h, w) in [0, 1] -> (N, 3, size, size), normalised to mean 0.5 std 0.5."""
    x = F.interpolate(x8, size=(size, size), mode='bilinear', align_corners=False, antialias=True)
    return ((x - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(y), batch):
        correct += (model(x[i:i + batch]).argmax(-1) == y[i:i + batch]).sum().item()
    return 100.0 * correct / len(y)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, batch: int,
          seed: int, warmup_epochs: int = 1, eval_fn=None, eval_steps: Sequence[int] = ()) -> Dict[int, float]:
    """AdamW + warm-up/cosine (timm factories), label smoothing 0.1. Returns {step: eval_fn()}."""
    torch.manual_seed(seed)
    steps_per_epoch = math.ceil(len(y) / batch)
    opt = create_optimizer_v2(model, 'adamw', lr=lr, weight_decay=0.05)
    sched, _ = create_scheduler_v2(
        opt, 'cosine', num_epochs=epochs, warmup_epochs=min(warmup_epochs, epochs - 1),
        warmup_lr=lr * 0.01, min_lr=lr * 0.01, step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    loss_fn = LabelSmoothingCrossEntropy(0.1)
    log = {}
    step = 0
    if eval_fn is not None and 0 in eval_steps:
        log[0] = eval_fn()
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(y))
        for i in range(0, len(y), batch):
            j = perm[i:i + batch]
            loss = loss_fn(model(x[j]), y[j])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            sched.step_update(step)
            if eval_fn is not None and step in eval_steps:
                log[step] = eval_fn()
                model.train()
            if eval_steps and step >= max(eval_steps):
                return log
    return log


def create(size: int) -> nn.Module:
    return timm.create_model(MODEL, num_classes=10, img_size=size)


def variant_state(state: Dict[str, torch.Tensor], size: int, name: str, seed: int = 0) -> Dict[str, torch.Tensor]:
    """The trained weights prepared for `size` by one of the compared methods."""
    if name == 'linear (default)':
        return resample_state_dict(state, size)
    if name == 'linear, no N/N\' input scale':
        out = resample_state_dict(state, size)
        for k, v in out.items():
            if k.endswith('generate.weight'):
                n_old = math.isqrt(state[k].shape[0])
                n_new = math.isqrt(v.shape[0])
                out[k] = v * (n_new / n_old)
        return out
    if name == 'linear, temperature log':
        return resample_state_dict(state, size, temperature='log')
    if name == 'linear, pinv input axis':
        return resample_state_dict(state, size, method='pinv')
    if name == 'cubic':
        return resample_state_dict(state, size, mode='cubic')
    if name == 'nearest':
        return resample_state_dict(state, size, mode='nearest')
    if name == 'random generators':
        torch.manual_seed(seed)  # the same fresh generators in the zero-shot and fine-tuning tables
        fresh = create(size).state_dict()
        out = dict(state)
        for k, v in fresh.items():
            if '.generate.' in k:
                out[k] = v
        return out
    raise KeyError(name)


RESAMPLED = ['linear (default)', 'linear, no N/N\' input scale', 'linear, temperature log',
             'linear, pinv input axis', 'cubic', 'nearest']


def run_seed(seed: int, sizes: Sequence[int], epochs: int, ft_steps: Sequence[int], ft_sizes: Sequence[int],
             batch: int) -> Dict[str, object]:
    x8_tr, y_tr, x8_te, y_te = load_digits_split(seed)
    torch.manual_seed(seed)
    model = create(NATIVE)
    t0 = time.perf_counter()
    train(model, to_size(x8_tr, NATIVE), y_tr, epochs=epochs, lr=2e-3, batch=batch, seed=seed)
    train_s = time.perf_counter() - t0
    state = {k: v.clone() for k, v in model.state_dict().items()}
    native_acc = accuracy(model, to_size(x8_te, NATIVE), y_te)

    zero_shot: Dict[Tuple[str, int], float] = {}
    for size in sizes:
        x_te = to_size(x8_te, size)
        # baseline: the native model on the test images resized back to 32x32
        back = F.interpolate(x_te, size=(NATIVE, NATIVE), mode='bilinear', align_corners=False, antialias=True)
        zero_shot[('resize input to 32 (native model)', size)] = accuracy(model, back, y_te)
        for name in RESAMPLED + ['random generators']:
            m = create(size)
            m.load_state_dict(variant_state(state, size, name, seed))
            zero_shot[(name, size)] = accuracy(m, x_te, y_te)

    finetune: Dict[Tuple[str, int], Dict[int, float]] = {}
    for size in ft_sizes:
        x_tr, x_te = to_size(x8_tr, size), to_size(x8_te, size)
        for name in ('linear (default)', 'random generators'):
            m = create(size)
            m.load_state_dict(variant_state(state, size, name, seed))
            finetune[(name, size)] = train(
                m, x_tr, y_tr, epochs=max(1, math.ceil(max(ft_steps) * batch / len(y_tr))), lr=5e-4,
                batch=batch, seed=seed + 1000, warmup_epochs=0, eval_fn=lambda m=m, x=x_te, y=y_te: accuracy(m, x, y),
                eval_steps=ft_steps)
    return dict(native=native_acc, train_s=train_s, zero_shot=zero_shot, finetune=finetune)


def mean_std(values: List[float]) -> str:
    """'mean ± sample std' over seeds; the value alone for one seed."""
    if len(values) == 1:
        return f'{values[0]:.1f}'
    return experiments.format_mean_std(*experiments.mean_std(values))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--seeds', type=int, nargs='+', default=[0])
    p.add_argument('--sizes', type=int, nargs='+', default=[24, 40, 48, 64],
                   help='test sizes (multiples of 8 for dynamixer_nano); the native size is 32')
    p.add_argument('--epochs', type=int, default=10, help='training epochs at 32x32')
    p.add_argument('--batch', type=int, default=64)
    p.add_argument('--ft-sizes', type=int, nargs='*', default=[24, 48])
    p.add_argument('--ft-steps', type=int, nargs='+', default=[0, 10, 20, 40, 60])
    p.add_argument('--threads', type=int, default=1,
                   help='torch threads (1 by default: on a shared 2-core machine more threads oversubscribe and run '
                        'several times slower; 0 leaves torch\'s default)')
    p.add_argument('--out', default='', help='also write the Markdown tables to this file')
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    results = [run_seed(s, args.sizes, args.epochs, args.ft_steps, args.ft_sizes, args.batch) for s in args.seeds]
    total_s = time.perf_counter() - t0

    lines = []
    lines.append(f'Zero-shot test accuracy (%) of {MODEL} trained at {NATIVE}x{NATIVE} for {args.epochs} epochs, '
                 f'mean ± std over seeds {args.seeds}; '
                 f'native accuracy at 32x32: {mean_std([r["native"] for r in results])}.')
    lines.append('')
    header = '| weights at the new size | ' + ' | '.join(
        f'{s}x{s} ({s / NATIVE:g}x)' for s in args.sizes) + ' |'
    lines.append(header)
    lines.append('|---' * (len(args.sizes) + 1) + '|')
    names = RESAMPLED + ['random generators', 'resize input to 32 (native model)']
    for name in names:
        label = {'random generators': 'baseline: random generators',
                 'resize input to 32 (native model)': 'baseline: resize input to 32 (native model)'}.get(
                     name, f'resampled: {name}')
        cells = [mean_std([r['zero_shot'][(name, s)] for r in results]) for s in args.sizes]
        lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
    if args.ft_sizes:
        lines.append('')
        lines.append(f'Fine-tuning at the new size (AdamW lr 5e-4, batch {args.batch}, cosine; '
                     f'{math.ceil(len(load_digits_split(0)[1]) / args.batch)} steps = 1 epoch): '
                     'test accuracy (%) after k steps.')
        lines.append('')
        lines.append('| size | start from | ' + ' | '.join(f'k={k}' for k in args.ft_steps) + ' |')
        lines.append('|---|---' + '|---' * len(args.ft_steps) + '|')
        for s in args.ft_sizes:
            for name, label in (('linear (default)', 'resampled (default)'),
                                ('random generators', 'random generators')):
                cells = [mean_std([r['finetune'][(name, s)][k] for r in results]) for k in args.ft_steps]
                lines.append(f'| {s}x{s} | {label} | ' + ' | '.join(cells) + ' |')
    lines.append('')
    lines.append(f'Measured with torch {torch.__version__}, timm {timm.__version__}, '
                 f'torch threads: {torch.get_num_threads()} '
                 f'({platform.processor() or platform.machine()}); training at 32x32 took '
                 f'{mean_std([r["train_s"] for r in results])} s per seed, the whole run {total_s:.0f} s.')
    text = '\n'.join(lines)
    print(text)
    if args.out:
        experiments.write_markdown(text, args.out)
    return 0


if __name__ == '__main__':
    sys.exit(main())

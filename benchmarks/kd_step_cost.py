"""Cost of a training step with a distillation teacher: the median time of one optimiser step with
and without the teacher, timed in interleaved rounds in one process, and their ratio.

Both are `engine.train_one_epoch` steps of the same student on the same left-digit batches (the
task of docs/training.md's distillation table), one driving timm's `ClassificationTask`, the other
the distillation task `dynamixer train --kd-*` builds. Machine load (`uptime`) is printed before and
after; run it on a quiet machine:

    PYTHONPATH=src python benchmarks/kd_step_cost.py --kd-checkpoint runs/kd-teacher/last.pth --threads 1
"""
import argparse
import os
import platform
import statistics
import subprocess
import sys

import timm
import torch
from timm.loss import LabelSmoothingCrossEntropy
from timm.task import ClassificationTask

from dynamixer.data import build_datasets
from dynamixer.distill import build_teacher, distillation_task, input_normalisation
from dynamixer.engine import Process, train_one_epoch
from dynamixer.recipes import resolve_config


class _ConstantLR:
    def step_update(self, step):
        pass


def _uptime() -> str:
    try:
        return subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()
    except OSError:
        return f'load average {os.getloadavg()}'


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--model', default='dynamixer_nano', help='the student')
    p.add_argument('--kd-model', default=None, help='teacher: a timm name (random weights without --kd-checkpoint)')
    p.add_argument('--kd-checkpoint', default=None, help="teacher's weights (e.g. a run's last.pth)")
    p.add_argument('--kd-type', default='logit', choices=['logit', 'hard'])
    p.add_argument('--batch-size', type=int, default=64)
    p.add_argument('--rounds', type=int, default=30, help='interleaved rounds (each times both)')
    p.add_argument('--steps', type=int, default=3, help='optimiser steps per round and variant')
    p.add_argument('--warmup', type=int, default=3, help='untimed steps of each first')
    p.add_argument('--threads', type=int, default=1)
    args = p.parse_args(argv)
    if not (args.kd_model or args.kd_checkpoint):
        p.error('give the teacher: --kd-checkpoint FILE and/or --kd-model NAME')
    torch.set_num_threads(args.threads)
    print(f'before: {_uptime()}')
    print(f'torch {torch.__version__}, timm {timm.__version__}, python {platform.python_version()}, '
          f'{platform.machine()}, threads {torch.get_num_threads()}')

    config = resolve_config('scratch', overrides=dict(
        dataset='left-digit', model=args.model, kd_model=args.kd_model, kd_checkpoint=args.kd_checkpoint,
        kd_type=args.kd_type, batch_size=args.batch_size))
    train_set, _, class_names, report = build_datasets(config, None)
    loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(0))
    batches = [b for b, _ in zip(loader, range(8))]

    def student():
        torch.manual_seed(0)
        return timm.create_model(args.model, num_classes=len(class_names), **report['model_kwargs'])
    models = {'plain': student(), 'teacher': student()}
    norm = input_normalisation(models['plain'], train_set)
    teacher = build_teacher(config, class_names, models['teacher'], norm, report['model_kwargs'])
    criterion = LabelSmoothingCrossEntropy(0.1)
    device = torch.device('cpu')
    tasks = {'plain': ClassificationTask(models['plain'], criterion, device=device, verbose=False),
             'teacher': distillation_task(models['teacher'], teacher, criterion, args.kd_type, 4.0, 0.5, norm,
                                          device)}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-3) for k, m in models.items()}

    def step_seconds(k: str, steps: int) -> float:
        data = (batches[i % len(batches)] for i in range(steps))
        r = train_one_epoch(tasks[k], data, steps, opts[k], _ConstantLR(), Process(), epoch=0, step=0)
        return r['seconds'] / steps

    for k in tasks:
        step_seconds(k, args.warmup)
    times = {k: [] for k in tasks}
    for i in range(args.rounds):
        for k in (tasks if i % 2 == 0 else reversed(list(tasks))):  # alternate which goes first
            times[k].append(step_seconds(k, args.steps))
    med = {k: statistics.median(v) for k, v in times.items()}
    teacher_name = args.kd_checkpoint or args.kd_model
    print(f'student {args.model}, teacher {teacher_name} ({type(teacher.model).__name__}, input '
          f'{teacher.input_size[0]}x{teacher.input_size[1]}), kd_type {args.kd_type}, batch {args.batch_size}, '
          f'{args.rounds} rounds x {args.steps} steps')
    for k, v in times.items():
        q = statistics.quantiles(v, n=4) if len(v) > 1 else [v[0]] * 3
        print(f'{k:8s} median {1e3 * med[k]:8.2f} ms/step  (quartiles {1e3 * q[0]:.2f} - {1e3 * q[2]:.2f})')
    print(f'ratio teacher / plain: {med["teacher"] / med["plain"]:.2f}x')
    print(f'after: {_uptime()}')
    return 0


if __name__ == '__main__':
    sys.exit(main())

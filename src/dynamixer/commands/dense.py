"""`dynamixer dense`: the digits detection benchmark, a grid of `detect train` / `segment train` runs.

Writes the digits detection canvases to disk once (OUT/data: COCO JSON + PNGs + class-index
masks, `dense.digits_coco.write_digits_coco`), then trains every combination of --tasks x
--backbones x --pyramids x --seeds with the one dense training loop (`dense.trainer.train_dense`,
the loop of `dynamixer detect train` and `dynamixer segment train`; each run's folder is
OUT/runs/<setting>__seed<k>), and tabulates the last epoch's validation scores over seeds with
`experiments` (OUT/dense_runs.csv, one row per run; OUT/dense_table.md and .csv, mean ± std). A
finished run's record (OUT/records/) is reused when the grid is run again with the same settings,
so an interrupted grid continues where it stopped.

    dynamixer dense --tasks retinanet segmentation --backbones dynamixer_nano lcnet_100 \
        --seeds 0 1 2 --epochs 4 --threads 1 --out docs/dense_grid      # docs/dense.md
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import multiprocessing
import os
import time
from typing import Any, Dict, List, Tuple

import torch

from ..argtypes import Bounded, non_negative_int, positive_float, positive_int, probability
from ..data.images import DataError
from ..dense.backbone import PYRAMIDS, DenseError
from ..dense.detectors import DETECTORS
from ..dense.digits_coco import write_digits_coco
from ..dense.trainer import resolve_settings, train_dense
from ..engine import Process
from ..experiments import Job, format_mean_std, markdown_table, run_grid, summarize, write_csv, write_markdown
from ..files import check_output_folder, validate_checkpoint_file

__all__ = ['TASKS', 'METRICS', 'add_arguments', 'run', 'run_one']

TASKS = DETECTORS + ('segmentation',)
METRICS = ('AP', 'AP50', 'AP75', 'mask_AP', 'mask_AP50', 'mIoU', 'pixel_acc', 'train_cpu_s', 'train_s')


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument('--tasks', nargs='+', default=['retinanet', 'segmentation'], choices=TASKS,
                   help='detectors and/or segmentation to train (default: retinanet segmentation)')
    p.add_argument('--backbones', nargs='+', default=['dynamixer_nano', 'lcnet_100'],
                   help='DynaMixer or timm model names (default: dynamixer_nano lcnet_100)')
    p.add_argument('--pyramids', nargs='+', default=['fpn'], choices=PYRAMIDS, help='default: fpn')
    p.add_argument('--seeds', nargs='+', type=non_negative_int, default=[0, 1, 2],
                   help='training seeds (default: 0 1 2)')
    p.add_argument('--data', default=None,
                   help='an existing digits data folder (`dynamixer detect make-digits`); default: OUT/data, '
                        'written from the --canvas / --digit-size / --train-size / --val-size / --data-seed flags')
    p.add_argument('--canvas', type=Bounded(int, 16), default=48, help='canvas side in pixels (default: 48)')
    p.add_argument('--digit-size', type=Bounded(int, 8), nargs='+', default=[10, 20], metavar='SIZE',
                   help='side of a pasted digit in px: MIN MAX, or one size (default: 10 20)')
    p.add_argument('--max-digits', type=positive_int, default=3, help='digits per canvas at most (default: 3)')
    p.add_argument('--train-size', type=positive_int, default=1000, help='training canvases (default: 1000)')
    p.add_argument('--val-size', type=positive_int, default=300, help='validation canvases (default: 300)')
    p.add_argument('--data-seed', type=non_negative_int, default=0, help='seed of the data set (default: 0)')
    p.add_argument('--epochs', type=positive_int, default=6, help='epochs per run (default: 6)')
    p.add_argument('--warmup-epochs', type=non_negative_int, default=1, help='linear warm-up epochs (default: 1)')
    p.add_argument('--batch-size', type=positive_int, default=8, help='default: 8')
    p.add_argument('--lr', type=positive_float, default=1e-3, help='AdamW peak learning rate (default: 1e-3)')
    p.add_argument('--out-channels', type=positive_int, default=64, help='pyramid width (default: 64)')
    p.add_argument('--hflip', type=probability, default=0.0, help='flip probability (default 0: digits)')
    p.add_argument('--crop-scale', type=Bounded(float, 0, 1, exclusive=True), nargs='+', default=[1.0, 1.0],
                   metavar='X', help='scale jitter + crop area range (default 1 1: off)')
    p.add_argument('--pretrained-file', default=None,
                   help='classification checkpoint every trunk starts from (each of --backbones must fit it)')
    p.add_argument('--out', default='dense_results', help='results folder (default: dense_results)')
    p.add_argument('--threads', type=non_negative_int, default=1,
                   help='CPU threads per run (default 1: these small models gain little from more)')
    p.add_argument('--jobs', type=positive_int, default=1, help='runs in parallel worker processes (default: 1)')
    p.add_argument('--fresh', action='store_true', help='run every job again, even those with a finished record')


def _data_folder(args: argparse.Namespace) -> str:
    """The digits data folder: --data as given, or OUT/data written (once) from the flags."""
    if args.data:
        return os.path.abspath(args.data)
    folder = os.path.join(args.out, 'data')
    params = dict(num_train=args.train_size, num_val=args.val_size, canvas=args.canvas,
                  digit_size=list(args.digit_size), max_digits=args.max_digits, seed=args.data_seed)
    marker = os.path.join(folder, 'params.json')
    if os.path.isfile(marker):
        with open(marker) as f:
            if json.load(f) == params:
                return folder
        raise DataError(f'{folder} holds a digits data set made with other flags ({marker}); use another --out')
    write_digits_coco(folder, args.train_size, args.val_size, args.canvas, seed=args.data_seed,
                      digit_size=tuple(args.digit_size), max_digits=args.max_digits)
    with open(marker, 'w') as f:   # written last: a data folder without it is rewritten
        json.dump(params, f)
    return folder


def _settings(job: Job, recipe: Dict[str, Any]) -> Dict[str, Any]:
    task, backbone, pyramid = job.options
    overrides = {k: v for k, v in recipe.items() if k not in ('data', 'out')}
    overrides.update(model=backbone, pyramid=pyramid, seed=job.seed, progress=False, workers=0,
                     output=os.path.join(recipe['out'], 'runs', job.name))
    if task == 'segmentation':
        settings = resolve_settings('segment', overrides=overrides)
        d = recipe['data']
        settings['data'] = dict(train_images=os.path.join(d, 'train', 'images'),
                                train_masks=os.path.join(d, 'train', 'masks'), classes=os.path.join(d, 'classes.txt'),
                                val_images=os.path.join(d, 'val', 'images'), val_masks=os.path.join(d, 'val', 'masks'))
    else:
        settings = resolve_settings('detect', overrides=dict(overrides, detector=task))
        d = recipe['data']
        settings['data'] = dict(train=os.path.join(d, 'train', 'annotations.json'),
                                val=os.path.join(d, 'val', 'annotations.json'))
    return settings


def run_one(a: Tuple[Job, Dict[str, Any]]) -> Dict[str, Any]:
    """One run of the grid in this process (one CPU process, `threads` threads): the last epoch's
    scores, the model's size and the training time (wall and this process's CPU seconds)."""
    job, recipe = a
    settings = _settings(job, recipe)
    torch.set_num_threads(max(settings['threads'], 1))
    start, start_cpu = time.perf_counter(), time.process_time()
    result = train_dense(settings, overwrite=True, process=Process())
    last = result['history'][-1]
    task, backbone, pyramid = job.options
    ckpt = torch.load(os.path.join(result['output'], 'last.pth'), map_location='cpu', weights_only=True)
    trunk = sum(v.numel() for k, v in ckpt['state_dict'].items() if '.body.' in f'.{k}')
    record = dict(task=task, backbone=backbone, pyramid=pyramid, seed=job.seed, epochs=last['epoch'],
                  steps=last['step'], trunk_params=trunk, final_loss=round(last['train_loss'], 4),
                  train_s=round(time.perf_counter() - start, 1), train_cpu_s=round(time.process_time() - start_cpu, 1),
                  run=result['output'])
    record.update({k: last[k] for k in METRICS if k in last})
    print(f'{job.setting} seed {job.seed}: ' + '  '.join(f'{k} {record[k]}' for k in METRICS if k in record),
          flush=True)
    return record


def _tables(out: str, records: List[Dict[str, Any]], order: List[str], header: str) -> str:
    rows = summarize(records, key=lambda r: f"{r['task']}/{r['backbone']}/{r['pyramid']}", metrics=METRICS,
                     order=order)
    by_setting = {f"{r['task']}/{r['backbone']}/{r['pyramid']}": r for r in records}

    def cell(s: Dict[str, Any], m: str) -> str:
        return format_mean_std(s[m + '_mean'], s[m + '_std']) if m + '_mean' in s else '-'
    table = markdown_table(
        ['task', 'backbone', 'pyramid', 'trunk params', 'seeds', 'box AP', 'box AP50', 'mask AP', 'mIoU',
         'train CPU s / run'],
        [[*s['setting'].split('/'), f"{by_setting[s['setting']]['trunk_params'] / 1e6:.2f}M", s['seeds'],
          cell(s, 'AP'), cell(s, 'AP50'), cell(s, 'mask_AP'), cell(s, 'mIoU'), f"{s['train_cpu_s_mean']:.0f}"]
         for s in rows])
    write_csv(records, os.path.join(out, 'dense_runs.csv'))
    write_csv(rows, os.path.join(out, 'dense_table.csv'))
    write_markdown(header + '\n\n' + table, os.path.join(out, 'dense_table.md'))
    return table


def run(args: argparse.Namespace) -> int:
    # everything that can be wrong with the flags is refused before any data is made
    if len(args.digit_size) > 2 or len(args.crop_scale) > 2:
        raise DenseError('--digit-size and --crop-scale take one or two values (LOW HIGH)')
    args.digit_size = [args.digit_size[0], args.digit_size[-1]]
    args.crop_scale = [args.crop_scale[0], args.crop_scale[-1]]
    if args.digit_size[0] > args.digit_size[1] or args.digit_size[1] > args.canvas:
        raise DenseError(f'--digit-size takes MIN MAX with MIN <= MAX <= --canvas ({args.canvas}); got '
                         f'{args.digit_size}')
    if args.train_size < args.batch_size:
        raise DenseError(f'--train-size ({args.train_size}) must be at least --batch-size ({args.batch_size})')
    if args.warmup_epochs > args.epochs:
        raise DenseError(f'--warmup-epochs must be at most --epochs ({args.epochs}); got {args.warmup_epochs}')
    if args.crop_scale[0] > args.crop_scale[1]:
        raise DenseError(f'--crop-scale takes LOW HIGH with LOW <= HIGH; got {args.crop_scale}')
    if args.pretrained_file is not None:
        validate_checkpoint_file(args.pretrained_file)
        args.pretrained_file = os.path.abspath(args.pretrained_file)
    for split in ('train', 'val') if args.data else ():
        if not os.path.isfile(os.path.join(args.data, split, 'annotations.json')):
            raise DataError(f'{args.data}: no {split}/annotations.json; write the data set with '
                            f'`dynamixer detect make-digits {args.data}`')
    args.out = check_output_folder(args.out, 'results folder (--out)')
    logging.basicConfig(level=logging.INFO, format='%(message)s')   # each run's epoch lines
    os.makedirs(args.out, exist_ok=True)
    data = _data_folder(args)
    recipe = dict(data=data, out=args.out, img_size=[args.canvas], epochs=args.epochs,
                  warmup_epochs=args.warmup_epochs, batch_size=args.batch_size, lr=args.lr,
                  out_channels=args.out_channels, hflip=args.hflip, crop_scale=list(args.crop_scale),
                  pretrained_file=args.pretrained_file, threads=args.threads)
    settings = [(task, backbone, pyramid) for task in args.tasks for backbone in args.backbones
                for pyramid in args.pyramids]
    names = ['/'.join(s) for s in settings]
    jobs = [Job(f'{t}-{b}-{p}', [t, b, p], seed) for t, b, p in settings for seed in args.seeds]
    header = (f'Digits detection ({data}): {args.canvas}x{args.canvas} canvases, {args.epochs} epochs of batch '
              f'{args.batch_size}, seeds {" ".join(map(str, args.seeds))}; the last epoch\'s validation scores, '
              'mean ± std over seeds, in %.')

    def written(job: Job, record: Dict[str, Any], records: List[Dict[str, Any]]) -> None:
        # every finished run rewrites the tables, so an interrupted grid leaves what it measured
        _tables(args.out, records, names, header if len(records) == len(jobs)
                else f'{header} PARTIAL: {len(records)} of {len(jobs)} runs.')

    executor = None
    if args.jobs > 1:   # independent runs in worker processes, `--threads` threads each
        executor = concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context('spawn'))
    try:
        records = run_grid(jobs, _Runner(recipe), os.path.join(args.out, 'records'), recipe, fresh=args.fresh,
                           executor=executor, on_record=written)
    finally:
        if executor is not None:
            executor.shutdown()
    if not records:
        return 0
    table = _tables(args.out, records, names, header)
    print(table)
    print(f'wrote {args.out}/dense_runs.csv, dense_table.md, dense_table.csv')
    return 0


class _Runner:
    """run_one with the recipe bound, picklable for worker processes."""

    def __init__(self, recipe: Dict[str, Any]):
        self.recipe = recipe

    def __call__(self, job: Job) -> Dict[str, Any]:
        return run_one((job, self.recipe))

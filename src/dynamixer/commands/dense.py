"""`dynamixer dense`: train and evaluate detectors and a segmenter on the digits detection task.

Every combination of --tasks x --backbones x --pyramids x --seeds is one run: build the model on
``pyramid_backbone`` (no pretrained weights unless --pretrained-file), train it for --steps AdamW
steps on the fixed train split, evaluate on the fixed val split (COCO mAP and mAP@50 with
torchmetrics' MeanAveragePrecision for detectors, mIoU with torchmetrics' JaccardIndex for the
segmenter). After every finished run it rewrites OUT/dense_runs.csv (one row per run) and the
mean +- std table over seeds, OUT/dense_table.md (and .csv), and, once a first-seed run has
finished, the predictions on a few val images, OUT/dense_predictions.png. The runs are independent
(no wall-clock limits), so pausing the process group (SIGSTOP / SIGCONT) only delays them.

    dynamixer dense --tasks retinanet segmentation --backbones dynamixer_nano lcnet_100 \
        --pyramids fpn --seeds 0 1 2 --steps 800 --jobs 2 --threads 1 --out docs   # docs/dense.md
"""
from __future__ import annotations

import argparse
import concurrent.futures
import csv
import io
import math
import multiprocessing
import os
import statistics
import time
from typing import Any, Dict, List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import require
from ..argtypes import Bounded, non_negative_int, positive_float, positive_int
from ..files import atomic_write_text, check_output_folder, validate_checkpoint_file
from ..dense.backbone import PYRAMIDS, DenseError, pyramid_backbone
from ..dense.detectors import DETECTORS, build_detector
from ..dense.digits_detection import CLASS_NAMES, NUM_CLASSES, DigitsDetection, validate_targets
from ..dense.segmentation import SegmentationModel

__all__ = ['build_detector', 'train_and_evaluate', 'DETECTORS', 'add_arguments', 'run']

TASKS = DETECTORS + ('segmentation',)


def _lr_lambda(steps: int, warmup: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))
    return f


def _batches(data: DigitsDetection, batch_size: int, seed: int):
    """Endless shuffled batches of (images (B, 3, H, W), targets, semantic (B, H, W))."""
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(len(data), generator=g)
        for i in range(0, len(perm) - batch_size + 1, batch_size):
            idx = perm[i:i + batch_size]
            yield data.images[idx], [data.targets[int(j)] for j in idx], data.semantic[idx]


def train_and_evaluate(task: str, backbone_name: str, pyramid: str, seed: int, train: DigitsDetection,
                       val: DigitsDetection, steps: int, batch_size: int = 16, lr: float = 1e-3,
                       out_channels: int = 64, pretrained_file: str | None = None,
                       keep_predictions: int = 0, log_every: int = 0, warmup: int | None = None) -> Dict[str, Any]:
    """One run: train `task` on `train` (AdamW, linear warm-up over `warmup` steps, default
    min(steps // 10, 100), then cosine to zero), evaluate on `val`; returns a row of metrics (in %)
    with the training time as wall seconds (`train_s`) and this process's CPU seconds
    (`train_cpu_s`: unaffected by other jobs' load or by the process being paused)."""
    torch.manual_seed(seed)
    backbone = pyramid_backbone(backbone_name, img_size=train.img_size, out_channels=out_channels,
                                pyramid=pyramid, pretrained_file=pretrained_file)
    if task == 'segmentation':
        model: nn.Module = SegmentationModel(backbone, NUM_CLASSES)
    else:
        model = build_detector(task, backbone, NUM_CLASSES)
    params = sum(p.numel() for p in model.parameters())
    trunk_params = sum(p.numel() for p in backbone.body.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    warmup = min(steps // 10, 100) if warmup is None else warmup
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(steps, warmup))
    start, start_cpu = time.perf_counter(), time.process_time()
    model.train()
    batches = _batches(train, batch_size, seed)
    loss_value = float('nan')
    for step in range(steps):
        images, targets, semantic = next(batches)
        if task == 'segmentation':
            loss = F.cross_entropy(model(images), semantic)
        else:
            validate_targets(images, targets, need_masks=task == 'maskrcnn')
            loss = sum(model(list(images), targets).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        sched.step()
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise DenseError(f'{task}/{backbone_name}: the loss became {loss_value} at step {step}; lower --lr')
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f'  step {step:5d}  loss {loss_value:.4f}', flush=True)
    train_s, train_cpu_s = time.perf_counter() - start, time.process_time() - start_cpu
    row: Dict[str, Any] = dict(task=task, backbone=backbone_name, pyramid=pyramid, seed=seed, steps=steps,
                               params=params, trunk_params=trunk_params, final_loss=round(loss_value, 4),
                               warmup=warmup, lr=lr, train_s=round(train_s, 1), train_cpu_s=round(train_cpu_s, 1))
    row.update(evaluate(task, model, val, keep_predictions))
    row['eval_s'] = round(time.perf_counter() - start - train_s, 1)
    return row


def evaluate(task: str, model: nn.Module, val: DigitsDetection, keep_predictions: int = 0,
             batch_size: int = 64) -> Dict[str, Any]:
    """Metrics (in %) of a trained model on `val`: box mAP / mAP@50 (and mask mAP for maskrcnn)
    with torchmetrics' MeanAveragePrecision (pycocotools backend), or mIoU / pixel accuracy with
    torchmetrics' MulticlassJaccardIndex / MulticlassAccuracy. With `keep_predictions`, the
    predictions on the first val images come back under '_predictions'."""
    model.eval()
    kept: List[Any] = []
    row: Dict[str, Any] = {}
    with torch.no_grad():
        if task == 'segmentation':
            tm = require('torchmetrics.classification', 'dense', 'the segmentation metrics')
            iou = tm.MulticlassJaccardIndex(NUM_CLASSES, average='macro')
            acc = tm.MulticlassAccuracy(NUM_CLASSES, average='micro')
            for i in range(0, len(val), batch_size):
                pred = model(val.images[i:i + batch_size]).argmax(1)
                iou.update(pred, val.semantic[i:i + batch_size])
                acc.update(pred, val.semantic[i:i + batch_size])
                kept += list(pred[:max(keep_predictions - len(kept), 0)])
            row.update(mIoU=round(100 * float(iou.compute()), 2), pixel_acc=round(100 * float(acc.compute()), 2))
        else:
            det_metrics = require('torchmetrics.detection', 'dense', 'the detection metrics (with pycocotools)')
            iou_types = ('bbox', 'segm') if task == 'maskrcnn' else ('bbox',)
            metric = det_metrics.MeanAveragePrecision(iou_type=list(iou_types), backend='pycocotools')
            for i in range(0, len(val), batch_size):
                preds = model(list(val.images[i:i + batch_size]))
                targets = val.targets[i:i + batch_size]
                if task == 'maskrcnn':
                    preds = [dict(p, masks=p['masks'][:, 0] > 0.5) for p in preds]
                    targets = [dict(t, masks=t['masks'].bool()) for t in targets]
                metric.update(preds, targets)
                kept += preds[:max(keep_predictions - len(kept), 0)]
            res = metric.compute()
            prefix = 'bbox_' if task == 'maskrcnn' else ''
            row.update(mAP=round(100 * float(res[prefix + 'map']), 2),
                       mAP50=round(100 * float(res[prefix + 'map_50']), 2))
            if task == 'maskrcnn':
                row.update(mask_mAP=round(100 * float(res['segm_map']), 2),
                           mask_mAP50=round(100 * float(res['segm_map_50']), 2))
    if keep_predictions:
        row['_predictions'] = kept
    return row


METRICS = ('mAP', 'mAP50', 'mask_mAP', 'mask_mAP50', 'mIoU', 'pixel_acc')


def summarize(rows: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Mean and sample std over seeds of every metric, per (task, backbone, pyramid)."""
    groups: Dict[Tuple[str, str, str], List[Dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r['task'], r['backbone'], r['pyramid']), []).append(r)
    out = []
    for (task, backbone, pyramid), rs in groups.items():
        s: Dict[str, Any] = dict(task=task, backbone=backbone, pyramid=pyramid, seeds=len(rs),
                                 trunk_params=rs[0]['trunk_params'], params=rs[0]['params'],
                                 train_s=round(statistics.mean(r['train_s'] for r in rs), 1),
                                 train_cpu_s=round(statistics.mean(r['train_cpu_s'] for r in rs), 1))
        for m in METRICS:
            vals = [r[m] for r in rs if m in r]
            if vals:
                s[m] = round(statistics.mean(vals), 2)
                s[m + '_std'] = round(statistics.stdev(vals), 2) if len(vals) > 1 else 0.0
        out.append(s)
    return out


def markdown_table(summary: Sequence[Dict[str, Any]]) -> str:
    lines = ['| task | backbone | pyramid | trunk params | seeds | box mAP | box mAP@50 | mask mAP | mIoU | '
             'train s / run (wall) | train CPU s / run |', '|---|---|---|---|---|---|---|---|---|---|---|']

    def cell(s: Dict[str, Any], m: str) -> str:
        return f'{s[m]:.1f} ± {s[m + "_std"]:.1f}' if m in s else '-'
    for s in summary:
        lines.append(f'| {s["task"]} | {s["backbone"]} | {s["pyramid"]} | {s["trunk_params"] / 1e6:.2f}M | '
                     f'{s["seeds"]} | {cell(s, "mAP")} | {cell(s, "mAP50")} | {cell(s, "mask_mAP")} | '
                     f'{cell(s, "mIoU")} | {s["train_s"]:.0f} | {s["train_cpu_s"]:.0f} |')
    return '\n'.join(lines) + '\n'


def draw_predictions(path: str, val: DigitsDetection, shown: Sequence[Tuple[str, Any]], score: float = 0.3) -> None:
    """A grid: ground truth on top, then one row per kept run, on the first val images: the
    detections with score >= `score` (after class-agnostic NMS at IoU 0.5, so that each place shows
    its best class; label and score written), or the predicted label map."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
    n = len(shown[0][1]) if shown else 0
    rows = 1 + len(shown)
    fig, axes = plt.subplots(rows, n, figsize=(1.6 * n, 1.7 * rows), squeeze=False)
    cmap = plt.get_cmap('tab20', NUM_CLASSES)

    ops = require('torchvision.ops', 'dense', 'drawing detections')

    def boxes(ax, b, labels, colour, scores=None):
        for k, ((x1, y1, x2, y2), lab) in enumerate(zip(b.tolist(), labels.tolist())):
            ax.add_patch(Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, color=colour, lw=1))
            text = CLASS_NAMES[lab] if scores is None else f'{CLASS_NAMES[lab]} {float(scores[k]):.2f}'
            ax.text(x1, y1 - 1, text, color=colour, fontsize=6, va='bottom')
    for j in range(n):
        img = val.images[j].permute(1, 2, 0).numpy()
        axes[0, j].imshow(img)
        boxes(axes[0, j], val.targets[j]['boxes'], val.targets[j]['labels'], 'lime')
        for r, (title, preds) in enumerate(shown, start=1):
            ax = axes[r, j]
            if isinstance(preds[j], dict):
                ax.imshow(img)
                p = preds[j]
                keep = ops.nms(p['boxes'], p['scores'], 0.5)
                keep = keep[p['scores'][keep] >= score]
                boxes(ax, p['boxes'][keep], p['labels'][keep], 'yellow', p['scores'][keep])
            else:
                ax.imshow(preds[j].numpy(), cmap=cmap, vmin=0, vmax=NUM_CLASSES - 1, interpolation='nearest')
    for r, title in enumerate(['ground truth'] + [t for t, _ in shown]):
        axes[r, 0].set_ylabel(title, fontsize=7, rotation=0, ha='right', va='center')
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _write_results(out: str, rows: Sequence[Dict[str, Any]], header: str) -> None:
    """OUT/dense_runs.csv (one row per run), dense_table.csv and dense_table.md (mean ± std over
    seeds), each written atomically."""
    def as_csv(records: Sequence[Dict[str, Any]]) -> str:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in records for k in r)), lineterminator='\n')
        w.writeheader()
        w.writerows(records)
        return buf.getvalue()
    summary = summarize(rows)
    atomic_write_text(as_csv(rows), os.path.join(out, 'dense_runs.csv'))
    atomic_write_text(as_csv(summary), os.path.join(out, 'dense_table.csv'))
    atomic_write_text(header + '\n\n' + markdown_table(summary), os.path.join(out, 'dense_table.md'))


_DATA: Dict[Tuple[Any, ...], Tuple[DigitsDetection, DigitsDetection]] = {}


def _data(num_train: int, num_val: int, canvas: Tuple[int, int], digit_size: Tuple[int, int],
          seed: int) -> Tuple[DigitsDetection, DigitsDetection]:
    key = (num_train, num_val, canvas, digit_size, seed)
    if key not in _DATA:   # once per process
        _DATA[key] = (DigitsDetection(num_train, 'train', canvas, digit_size=digit_size, seed=seed),
                      DigitsDetection(num_val, 'val', canvas, digit_size=digit_size, seed=seed))
    return _DATA[key]


def _one_run(a: Tuple[Tuple[Any, ...], Tuple[Any, ...]]) -> Dict[str, Any]:
    data_args, (task, backbone, pyramid, seed, *rest) = a
    train, val = _data(*data_args)
    row = train_and_evaluate(task, backbone, pyramid, seed, train, val, *rest)
    print(f'{task} / {backbone} / {pyramid} / seed {seed}: '
          + '  '.join(f'{k} {v}' for k, v in row.items() if k in METRICS + ('train_s',)), flush=True)
    return row


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument('--tasks', nargs='+', default=['retinanet', 'segmentation'], choices=TASKS,
                   help='detectors and/or segmentation to train (default: retinanet segmentation)')
    p.add_argument('--backbones', nargs='+', default=['dynamixer_nano', 'lcnet_100'],
                   help='DynaMixer or timm model names (default: dynamixer_nano lcnet_100)')
    p.add_argument('--pyramids', nargs='+', default=['fpn'], choices=PYRAMIDS, help='default: fpn')
    p.add_argument('--seeds', nargs='+', type=non_negative_int, default=[0, 1, 2],
                   help='training seeds (default: 0 1 2)')
    p.add_argument('--canvas', type=Bounded(int, 8), nargs='+', default=[48], metavar='SIZE',
                   help='image size: H, or H W (default: 48)')
    p.add_argument('--digit-size', type=Bounded(int, 8), nargs='+', default=[10, 20], metavar='SIZE',
                   help='side of a pasted digit in px: SMALLEST LARGEST, or one size (default: 10 20)')
    p.add_argument('--train-size', type=positive_int, default=1000, help='training canvases (default: 1000)')
    p.add_argument('--val-size', type=positive_int, default=300, help='validation canvases (default: 300)')
    p.add_argument('--data-seed', type=non_negative_int, default=0, help='seed of the fixed splits (default: 0)')
    p.add_argument('--steps', type=positive_int, default=800, help='training steps per run (default: 800)')
    p.add_argument('--warmup', type=non_negative_int, default=None,
                   help='linear learning-rate warm-up steps (default: steps / 10, at most 100)')
    p.add_argument('--batch-size', type=positive_int, default=8, help='default: 8')
    p.add_argument('--lr', type=positive_float, default=1e-3, help='AdamW peak learning rate (default: 1e-3)')
    p.add_argument('--out-channels', type=positive_int, default=64, help='pyramid width (default: 64)')
    p.add_argument('--pretrained-file', default=None,
                   help='classification checkpoint every trunk starts from (each of --backbones must fit it)')
    p.add_argument('--out', default='dense_results', help='folder for the csv / md / png (default: dense_results)')
    p.add_argument('--show', type=non_negative_int, default=6,
                   help='val images in the predictions picture (0: none)')
    p.add_argument('--threads', type=non_negative_int, default=1,
                   help='intra-op CPU threads per run (default 1: these small models gain little from more, and '
                        'spin on a busy machine; 0: torch\'s default)')
    p.add_argument('--jobs', type=positive_int, default=1, help='runs in parallel worker processes (default: 1)')
    p.add_argument('--log-every', type=non_negative_int, default=0, help='print the loss every N steps (0: never)')


def run(args: argparse.Namespace) -> int:
    # everything that can be wrong with the flags is refused before any data is made
    if args.train_size < args.batch_size:
        raise DenseError(f'--train-size ({args.train_size}) must be at least --batch-size ({args.batch_size})')
    if args.warmup is not None and args.warmup > args.steps:
        raise DenseError(f'--warmup must be at most --steps ({args.steps}); got {args.warmup}')
    if len(args.canvas) not in (1, 2):
        raise DenseError(f'--canvas takes H or H W; got {len(args.canvas)} values')
    if len(args.digit_size) not in (1, 2) or args.digit_size[0] > args.digit_size[-1]:
        raise DenseError(f'--digit-size takes SMALLEST LARGEST (smallest <= largest) or one size; '
                         f'got {args.digit_size}')
    if args.digit_size[-1] > min(args.canvas):
        raise DenseError(f'--digit-size {args.digit_size[-1]} does not fit the {min(args.canvas)}-px canvas')
    if args.pretrained_file is not None:
        validate_checkpoint_file(args.pretrained_file)
    args.out = check_output_folder(args.out, 'results folder (--out)')
    canvas = (args.canvas[0], args.canvas[-1])
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    grid = [(task, backbone, pyramid, seed) for task in args.tasks for backbone in args.backbones
            for pyramid in args.pyramids for seed in args.seeds]
    digit_size = (args.digit_size[0], args.digit_size[-1])
    data_args = (args.train_size, args.val_size, canvas, digit_size, args.data_seed)
    run_args = [(data_args, (task, backbone, pyramid, seed, args.steps, args.batch_size, args.lr, args.out_channels,
                             args.pretrained_file, args.show if seed == args.seeds[0] else 0, args.log_every,
                             args.warmup))
                for task, backbone, pyramid, seed in grid]
    _, val = _data(*data_args)
    header = (f'Digits detection, {canvas[0]}x{canvas[1]} canvases, {args.train_size} train / {args.val_size} val, '
              f'digits of {digit_size[0]}-{digit_size[1]} px, {args.steps} steps of batch '
              f'{args.batch_size}, seeds {" ".join(map(str, args.seeds))}; mean ± std over seeds, metrics in %.')
    done: Dict[int, Dict[str, Any]] = {}
    shown: Dict[int, Tuple[str, Any]] = {}

    def finished(i: int, row: Dict[str, Any]) -> None:
        # every finished run updates the files, so an interrupted grid leaves what it measured
        if '_predictions' in row:
            shown[i] = (f'{row["task"]}\n{row["backbone"]}\n{row["pyramid"]}', row.pop('_predictions'))
        done[i] = row
        rows = [done[k] for k in sorted(done)]
        _write_results(args.out, rows, header if len(rows) == len(grid) else
                       f'{header} PARTIAL: {len(rows)} of {len(grid)} runs.')
        if i in shown:
            draw_predictions(os.path.join(args.out, 'dense_predictions.png'), val,
                             [shown[k] for k in sorted(shown)])

    if args.jobs > 1:
        # independent runs in worker processes (`--threads` threads each), written as they finish
        with concurrent.futures.ProcessPoolExecutor(
                args.jobs, mp_context=multiprocessing.get_context('spawn'),
                initializer=torch.set_num_threads, initargs=(max(args.threads, 1),)) as pool:
            futures = {pool.submit(_one_run, a): i for i, a in enumerate(run_args)}
            for future in concurrent.futures.as_completed(futures):
                finished(futures[future], future.result())
    else:
        for i, a in enumerate(run_args):
            finished(i, _one_run(a))
    table = markdown_table(summarize([done[k] for k in sorted(done)]))
    print(table)
    print(f'wrote {args.out}/dense_runs.csv, dense_table.md, dense_table.csv'
          + (', dense_predictions.png' if shown else ''))
    return 0

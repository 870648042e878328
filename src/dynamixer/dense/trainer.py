"""Training detectors and segmenters on the user's data, on the same engine and run folders as
`dynamixer train`.

One loop for dense tasks: `train_dense(settings)` builds the data (`CocoDetection` or
`MaskFolder`, with v2 augmentation), the model (`tasks.build_dense_model`) and its task
(`DetectionTask` / `SegmentationTask`), and runs `engine.train_one_epoch` epoch by epoch, then
scores the validation set (COCO AP or mIoU) and writes last.pth through `runs.save_training_state`.
So it gives what `dynamixer train` gives: the global batch split over torchrun processes (DDP,
gloo on CPUs) and gradient-accumulation steps, AMP on GPUs, every epoch's randomness seeded from
(seed, epoch, rank) so that a run resumed from last.pth (after Ctrl-C or kill -9) continues
bit-identically, run folders that are never overwritten unasked (`runs.claim_run_folder`),
config.yaml, metrics.csv / .json, a progress bar and curves.png.

Settings: `OPTIONS` (name -> default, kind, help), merged defaults < a resumed run's settings <
YAML file < command line by `resolve_settings`; data paths live in settings['data'].
"""
from __future__ import annotations

import argparse
import copy
import difflib
import io
import os
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import yaml
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import NativeScaler

from ..argtypes import Bounded, OrWord, non_negative_float, non_negative_int, positive_float, positive_int, probability
from ..data.images import DataError
from ..engine import (
    NonFiniteLoss,
    Process,
    resolve_amp,
    resolve_device,
    seed_epoch,
    setup_process,
    train_one_epoch,
    worker_init,
)
from ..errors import require
from ..files import CheckpointError, atomic_write, read_checkpoint, validate_checkpoint_file
from ..recipes import ConfigError, load_yaml
from ..runlog import RunLog
from ..runs import (
    TrainingError,
    claim_run_folder,
    default_output,
    restore_training_state,
    run_folder,
    save_training_state,
)
from .coco import CocoDetection
from .digits_detection import collate_detection
from .evaluation import CocoEvaluator, SegmentationMetrics
from .mask_folder import MaskFolder, read_class_names
from .tasks import DetectionTask, SegmentationTask, build_dense_model
from .transforms import detection_train_transform, segmentation_eval_transform, segmentation_train_transform

CPU = torch.device('cpu')  # the default device of the functions below

__all__ = ['OPTIONS', 'TASK_OPTIONS', 'CHECKPOINT_KIND', 'resolve_settings', 'train_dense', 'build_datasets',
           'evaluate_detection', 'evaluate_segmentation', 'load_dense_checkpoint']

CHECKPOINT_KIND = 'dynamixer-dense'

# name -> (default, kind, help); kind: 'int', 'float', 'str', 'bool', 'floats', 'ints' (lists), '?' = or None
OPTIONS: Dict[str, Tuple[Any, str, str]] = {
    'model': ('dynamixer_nano', 'str', 'backbone: a DynaMixer model or any timm model with features_only'),
    'img_size': (None, 'ints?', 'input size H [W] the backbone is built for (default: the model\'s own)'),
    'pretrained_file': (None, 'str?', 'classification checkpoint for the trunk (resampled to --img-size); '
                                      'none: from scratch'),
    'pyramid': ('fpn', 'str', "feature pyramid: 'fpn' or 'simple' (ViTDet)"),
    'out_channels': (64, 'int', 'channels of every pyramid map'),
    'epochs': (12, 'int', 'epochs of the schedule'),
    'batch_size': (8, 'int', 'GLOBAL batch size, over all processes and accumulation steps'),
    'grad_accum': (1, 'int', 'gradient accumulation steps per optimiser step'),
    'val_batch_size': (0, 'int', 'validation batch per process (0: the training micro-batch)'),
    'opt': ('adamw', 'str', 'timm optimiser name'),
    'lr': (1e-3, 'float', 'peak learning rate'),
    'weight_decay': (0.05, 'float', 'weight decay (not on biases and norm weights)'),
    'momentum': (0.9, 'float', 'SGD momentum'),
    'sched': ('cosine', 'str', 'timm scheduler name'),
    'warmup_epochs': (1, 'int', 'linear warm-up epochs'),
    'warmup_lr': (1e-5, 'float', 'learning rate at the start of warm-up'),
    'min_lr': (1e-6, 'float', 'learning rate at the end of the cosine'),
    'clip_grad': (5.0, 'float?', 'gradient norm clipping threshold (none: off)'),
    'clip_mode': ('norm', 'str', "'norm', 'value' or 'agc'"),
    'hflip': (0.5, 'float', 'horizontal flip probability (0 for text, digits, ...)'),
    'crop_scale': ([0.5, 1.0], 'floats', 'scale jitter + crop: area range of the random crop (1 1: off)'),
    'amp': ('auto', 'str', "mixed precision: 'auto' (bf16/fp16 on GPUs, off on CPUs), 'bf16', 'fp16', 'none'"),
    'device': ('auto', 'str', "'auto', 'cpu', 'cuda'"),
    'threads': (0, 'int', 'CPU threads per process (0: the cores / processes per node)'),
    'workers': (2, 'int', 'data loading processes per training process'),
    'seed': (0, 'int', 'random seed (same seed, same data, same run)'),
    'output': (None, 'str?', 'run folder (default: runs/<task>-<model>, numbered if it holds a run)'),
    'progress': (True, 'bool', 'show a progress bar'),
}
# settings of one task only
TASK_OPTIONS: Dict[str, Dict[str, Tuple[Any, str, str]]] = {
    'detect': {'detector': ('retinanet', 'str', "'fasterrcnn', 'retinanet' or 'maskrcnn' (masks)")},
    'segment': {'ignore_index': (255, 'int', 'mask value of unlabelled pixels (not trained on or scored)'),
                'head_channels': (64, 'int', 'width of the segmentation head')},
}
RANGES: Dict[str, Bounded] = {
    'img_size': positive_int, 'out_channels': positive_int, 'epochs': positive_int, 'batch_size': positive_int,
    'grad_accum': positive_int, 'val_batch_size': non_negative_int, 'lr': positive_float,
    'weight_decay': non_negative_float, 'momentum': probability, 'warmup_epochs': non_negative_int,
    'warmup_lr': non_negative_float, 'min_lr': non_negative_float, 'clip_grad': positive_float,
    'hflip': probability, 'crop_scale': Bounded(float, 0, 1, exclusive=True), 'threads': non_negative_int,
    'workers': non_negative_int, 'seed': non_negative_int, 'ignore_index': Bounded(int, 0),
    'head_channels': positive_int,
}
CHOICES = {'pyramid': ('fpn', 'simple'), 'clip_mode': ('norm', 'value', 'agc'),
           'amp': ('auto', 'bf16', 'fp16', 'none'), 'detector': ('fasterrcnn', 'retinanet', 'maskrcnn')}
FIELDS = ['epoch', 'step', 'lr', 'train_loss', 'AP', 'AP50', 'AP75', 'AP_small', 'AP_medium', 'AP_large',
          'mask_AP', 'mask_AP50', 'mask_AP75', 'mIoU', 'pixel_acc', 'images_per_s', 'epoch_s']


def task_options(task: str) -> Dict[str, Tuple[Any, str, str]]:
    return {**OPTIONS, **TASK_OPTIONS[task]}


def _coerce(key: str, value: Any, kind: str, source: str) -> Any:
    """A setting's value checked for its kind and range; ConfigError naming `source` otherwise."""
    def bad(what: str) -> ConfigError:
        return ConfigError(f'{source}: {key} must be {what}; got {value!r}')
    base = kind.rstrip('?')
    if value is None or (isinstance(value, str) and value.lower() == 'none' and kind.endswith('?')):
        if kind.endswith('?'):
            return None
        raise bad(f'a {base} value')
    if base in ('floats', 'ints'):
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        num = float if base == 'floats' else int
        if not items or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items):
            raise bad(f'a list of {"numbers" if num is float else "integers"}')
        if num is int and not all(float(v).is_integer() for v in items):
            raise bad('a list of integers')
        value = [num(v) for v in items]
        items = value
    elif base == 'bool':
        if not isinstance(value, bool):
            raise bad('true or false')
        items = []
    elif base in ('int', 'float'):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                (base == 'int' and not float(value).is_integer()):
            raise bad('an integer' if base == 'int' else 'a number')
        value = int(value) if base == 'int' else float(value)
        items = [value]
    else:
        value, items = str(value), []
    if key in RANGES:
        for v in items:
            problem = RANGES[key].check(v)
            if problem:
                raise ConfigError(f'{source}: {key} {problem}')
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f'{source}: {key} must be one of {", ".join(CHOICES[key])}; got {value!r}')
    return value


def resolve_settings(task: str, yaml_file: Optional[str] = None, overrides: Optional[Mapping[str, Any]] = None,
                     base: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Defaults < `base` (a resumed run's settings) < YAML file < `overrides` (the command line),
    each name and value checked. settings['task'] is `task`, settings['data'] the data paths."""
    options = task_options(task)
    settings = {k: copy.deepcopy(v[0]) for k, v in options.items()}
    layers = [('the checkpoint', dict(base))] if base else []
    if yaml_file:
        layers.append((yaml_file, load_yaml(yaml_file)))
    if overrides:
        layers.append(('command line', dict(overrides)))
    data = dict((base or {}).get('data') or {})
    for source, values in layers:
        for key, value in values.items():
            key = key.replace('-', '_')
            if key in ('task', 'recipe', 'data', 'num_classes', 'class_names'):
                if key == 'data' and source != 'the checkpoint':
                    raise ConfigError(f'{source}: data paths are given as arguments, not as a setting')
                continue
            if key not in options:
                close = difflib.get_close_matches(key, list(options), n=1)
                hint = f" Did you mean '{close[0]}'?" if close else ''
                raise ConfigError(f"{source}: unknown setting '{key}'.{hint}")
            settings[key] = _coerce(key, value, options[key][1], source)
    if settings['img_size'] is not None and len(settings['img_size']) not in (1, 2):
        raise ConfigError(f"img_size takes H or H W; got {settings['img_size']}")
    if len(settings['crop_scale']) != 2 or settings['crop_scale'][0] > settings['crop_scale'][1]:
        raise ConfigError(f"crop_scale is a range LOW HIGH (low <= high); got {settings['crop_scale']}")
    settings.update(task=task, data=data,
                    recipe=task if task == 'segment' else f"{task}-{settings['detector']}")
    return settings


# ---- data -----------------------------------------------------------------------------------------

def model_size(model: nn.Module) -> Tuple[int, int]:
    """The (H, W) a dense model's backbone is built for."""
    return tuple(model.backbone.img_size)


def build_datasets(settings: Dict[str, Any], classes: Optional[Tuple[List[str], Optional[List[int]]]] = None,
                   train: bool = True) -> Tuple[Any, Any, List[str], Optional[List[int]]]:
    """(train set or None, val set, class names, COCO category ids or None) from settings['data']
    (absolute paths); `classes` imposes a checkpoint's class list. No transforms yet."""
    d = settings['data']
    names, ids = classes if classes else (None, None)
    if settings['task'] == 'detect':
        masks = settings['detector'] == 'maskrcnn'
        tr = CocoDetection(d['train'], d.get('train_images'), masks=masks, category_ids=ids,
                           class_names=names) if train else None
        # the validation file must have the training file's classes (or the checkpoint's)
        val = CocoDetection(d['val'], d.get('val_images'), masks=masks,
                            category_ids=tr.category_ids if tr else ids, class_names=tr.class_names if tr else names)
        return tr, val, val.class_names, val.category_ids
    names = names or read_class_names(d['classes'])
    tr = MaskFolder(d['train_images'], d['train_masks'], names, settings['ignore_index']) if train else None
    val = MaskFolder(d['val_images'], d['val_masks'], names, settings['ignore_index'])
    return tr, val, names, None


def _collate_segmentation_eval(batch: Sequence[Tuple[torch.Tensor, torch.Tensor]]):
    """Images resized to the model's size, stacked; masks of their own sizes, in a list."""
    return torch.stack([b[0] for b in batch]), [b[1] for b in batch]


# ---- evaluation -----------------------------------------------------------------------------------

@torch.no_grad()
def evaluate_detection(model: nn.Module, dataset: CocoDetection, device: torch.device, batch_size: int = 4,
                       indices: Optional[Sequence[int]] = None, world: int = 1,
                       amp_dtype: Optional[torch.dtype] = None) -> Tuple[Dict[str, float], List[Dict[str, Any]]]:
    """COCO AP of `model` on `dataset` (this process scores `indices`, default all; the results of
    `world` processes are gathered). Returns (metrics: AP, AP50, ... and mask_AP, ... for masks; in %,
    the COCO results list)."""
    model.eval()
    masks = getattr(model, 'roi_heads', None) is not None and model.roi_heads.has_mask()
    ev = CocoEvaluator(dataset.coco_ground_truth(), dataset.category_ids, ('bbox', 'segm') if masks else ('bbox',))
    idx = list(range(len(dataset))) if indices is None else list(indices)
    for start in range(0, len(idx), batch_size):
        chunk = idx[start:start + batch_size]
        images = [dataset.load(i).to(device) for i in chunk]
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            preds = model(images)
        ev.update(preds, [dataset.images[i].id for i in chunk])
    scores = ev.compute(world)
    metrics = dict(scores['bbox'])
    if 'segm' in scores:
        metrics.update({f'mask_{k}': v for k, v in scores['segm'].items()})
    return metrics, ev.results


@torch.no_grad()
def evaluate_segmentation(model: nn.Module, dataset: MaskFolder, size: Tuple[int, int], device: torch.device,
                          batch_size: int = 8, indices: Optional[Sequence[int]] = None, world: int = 1,
                          amp_dtype: Optional[torch.dtype] = None) -> Dict[str, Any]:
    """mIoU, pixel accuracy and per-class IoU (%) at each mask's own resolution: images are
    resized to the model's `size`, the logits resized back to the mask's."""
    model.eval()
    resize = segmentation_eval_transform(size)
    metrics = SegmentationMetrics(dataset.num_classes, dataset.ignore_index, dataset.class_names)
    idx = list(range(len(dataset))) if indices is None else list(indices)
    for start in range(0, len(idx), batch_size):
        items = [resize(*dataset.load(i)) for i in idx[start:start + batch_size]]
        images, targets = _collate_segmentation_eval(items)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images.to(device))
        for lg, t in zip(logits.float(), targets):
            up = torch.nn.functional.interpolate(lg[None], size=t.shape, mode='bilinear', align_corners=False)
            metrics.update(up[0].argmax(0), t)
    return metrics.compute(world)


# ---- checkpoints ----------------------------------------------------------------------------------

def load_dense_checkpoint(path: str, task: str, device: torch.device = CPU
                          ) -> Tuple[nn.Module, Dict[str, Any], List[str], Optional[List[int]]]:
    """(model in eval mode with the checkpoint's weights, its settings, class names, category ids)
    from a `train_dense` last.pth; CheckpointError for a file of another kind or task."""
    ckpt = read_checkpoint(path)
    if ckpt.get('kind') != CHECKPOINT_KIND:
        raise CheckpointError(f'{path} is not a detection / segmentation checkpoint (it has no '
                              f"'{CHECKPOINT_KIND}' mark: a classification checkpoint goes to "
                              '`dynamixer validate` / `predict`, and to --pretrained-file of a dense run)')
    settings = ckpt.get('config') or {}
    if settings.get('task') != task:
        raise CheckpointError(f'{path} is a {settings.get("task")} checkpoint, not a {task} one; use '
                              f'`dynamixer {settings.get("task")} ...` with it')
    names = list(ckpt.get('class_names') or [])
    model = build_dense_model(settings, len(names) + (1 if task == 'detect' else 0), pretrained=False)
    try:
        model.load_state_dict(ckpt['state_dict'])
    except (RuntimeError, KeyError) as e:
        raise CheckpointError(f'{path}: the weights do not fit the model its settings describe ({e})') from None
    return model.to(device).eval(), settings, names, ckpt.get('category_ids')


def _check_resume(ckpt: Dict[str, Any], settings: Dict[str, Any], path: str) -> None:
    if ckpt.get('kind') != CHECKPOINT_KIND or 'optimizer' not in ckpt:
        raise CheckpointError(f'{path}: not a dense training checkpoint (last.pth of `dynamixer detect|segment '
                              'train`); a classification checkpoint goes to --pretrained-file')
    was = ckpt.get('config') or {}
    for key in ('task', 'detector', 'model', 'opt'):
        if was.get(key) != settings.get(key):
            raise CheckpointError(f'{path} was trained with {key} {was.get(key)!r}, this run has '
                                  f'{settings.get(key)!r}; '
                                  'a resumed run keeps them (leave the flag out, or start a new run)')
    if was.get('data') != settings['data']:
        raise ConfigError(f'{path} was trained on {was.get("data")}, not on {settings["data"]}: a resumed run '
                          'continues on its own data; start a new run (another --output) for other data')


# ---- the loop -------------------------------------------------------------------------------------

def _summary(m: Dict[str, Any]) -> str:
    score = (f"AP {m['AP']:.2f}  AP50 {m['AP50']:.2f}" + (f"  mask AP {m['mask_AP']:.2f}" if 'mask_AP' in m else '')
             if 'AP' in m else f"mIoU {m['mIoU']:.2f}  pixel acc {m['pixel_acc']:.2f}")
    return (f"epoch {m['epoch']:>3}  train loss {m['train_loss']:.4f}  {score}  lr {m['lr']:.2e}  "
            f"{m['images_per_s']:.1f} img/s  {m['epoch_s']:.1f} s")


def plot_dense_history(history: List[Dict[str, Any]], path: str) -> None:
    """Training loss and the validation scores (AP / AP50 / mask AP, or mIoU / pixel accuracy) per epoch."""
    matplotlib = require('matplotlib', None, 'the training curves plot')
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    epochs = [h['epoch'] for h in history]
    fig, (ax_loss, ax_score) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    ax_loss.plot(epochs, [h['train_loss'] for h in history], 'o-', label='train (sum of the task\'s losses)')
    ax_loss.set(title='Training loss', xlabel='epoch', ylabel='loss')
    for key, label in (('AP', 'box AP'), ('AP50', 'box AP50'), ('mask_AP', 'mask AP'), ('mIoU', 'mIoU'),
                       ('pixel_acc', 'pixel accuracy')):
        if key in history[-1]:
            ax_score.plot(epochs, [h.get(key) for h in history], 's-', label=label)
    ax_score.set(title='Validation', xlabel='epoch', ylabel='%')
    for ax in (ax_loss, ax_score):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format='png')
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def _advice(output: str) -> str:
    last = os.path.join(output, 'last.pth')
    kept = f'The last good checkpoint is {last}; ' if os.path.exists(last) else 'No checkpoint was written yet; '
    return kept + 'lower the learning rate (--lr) or the gradient clipping threshold (--clip-grad), then ' + \
        ('--resume it.' if os.path.exists(last) else 'start again.')


def train_dense(settings: Dict[str, Any], resume: Optional[str] = None, overwrite: bool = False,
                hooks: Optional[Dict[str, Callable]] = None, process: Optional[Process] = None) -> Dict[str, Any]:
    """Train as `settings` (resolve_settings) say; returns dict(history, output, rank, world, seconds,
    class_names). hooks: 'loss'(loss, step) -> loss on each micro-batch (tests inject NaNs),
    'epoch_end'(epoch) after each checkpoint."""
    hooks = hooks or {}
    settings = copy.deepcopy(dict(settings))
    settings['output'] = run_folder(settings, resume)
    output = settings['output']
    start_time = time.perf_counter()
    process = process or setup_process(settings['device'], settings['threads'])
    claim_run_folder(output, resume, overwrite, process.is_main)
    ckpt = None
    if resume:
        ckpt = read_checkpoint(resume)
        _check_resume(ckpt, settings, resume)

    # data and model
    classes = (list(ckpt['class_names']), ckpt.get('category_ids')) if ckpt else None
    train_set, val_set, class_names, category_ids = build_datasets(settings, classes)
    detect = settings['task'] == 'detect'
    torch.manual_seed(settings['seed'])   # the same initial weights on every process
    model = build_dense_model(settings, len(class_names) + (1 if detect else 0)).to(process.device)
    size = model_size(model)
    if detect:
        train_set.transform = detection_train_transform(size, settings['hflip'], settings['crop_scale'])
    else:
        train_set.transform = segmentation_train_transform(size, settings['hflip'], settings['crop_scale'])

    # loaders: the global batch split over processes and accumulation steps
    world, accum = process.world, settings['grad_accum']
    micro, rest = divmod(settings['batch_size'], world * accum)
    if rest or micro == 0:
        raise ConfigError(f"batch_size {settings['batch_size']} does not split evenly over {world} processes x "
                          f'{accum} accumulation steps; choose a multiple of {world * accum}')
    generator = torch.Generator()
    sampler: torch.utils.data.DistributedSampler = torch.utils.data.DistributedSampler(
        train_set, num_replicas=world, rank=process.rank, shuffle=True,
        seed=settings['seed'], drop_last=False)
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=micro, sampler=sampler, drop_last=True, generator=generator,
        num_workers=settings['workers'], worker_init_fn=worker_init, pin_memory=process.device.type == 'cuda',
        collate_fn=collate_detection if detect else None)
    steps_per_epoch = len(loader) // accum
    if steps_per_epoch == 0:
        raise DataError(f'the training set has {len(train_set)} images: each of {world} process(es) gets fewer than '
                        f'{micro * accum} per epoch; lower --batch-size')

    # optimisation
    try:
        optimizer = create_optimizer_v2(model, settings['opt'], lr=settings['lr'],
                                        weight_decay=settings['weight_decay'], momentum=settings['momentum'])
        scheduler, total_epochs = create_scheduler_v2(
            optimizer, sched=settings['sched'], num_epochs=settings['epochs'], warmup_epochs=settings['warmup_epochs'],
            warmup_lr=settings['warmup_lr'], min_lr=settings['min_lr'], step_on_epochs=False,
            updates_per_epoch=steps_per_epoch)
    except (ValueError, AssertionError) as e:
        raise ConfigError(f"--opt {settings['opt']} / --sched {settings['sched']}: {e}") from None
    amp_dtype = resolve_amp(settings['amp'], process.device)
    scaler = NativeScaler(device=process.device.type) if amp_dtype == torch.float16 else None

    start_epoch, step = 0, 0
    history: List[Dict[str, Any]] = []
    if ckpt is not None:
        start_epoch, step, history = restore_training_state(ckpt, resume, model, optimizer, scaler, None, generator,
                                                            total_epochs)
    task = (DetectionTask(model, process.device) if detect
            else SegmentationTask(model, settings['ignore_index'], process.device))
    if world > 1:   # a detector leaves heads unused on batches without objects
        task.prepare_distributed(device_ids=[process.device.index] if process.device.type == 'cuda' else None,
                                 find_unused_parameters=detect)
    log = RunLog(output, settings, enabled=process.is_main, history=history, fields=FIELDS, summary=_summary,
                 plot=plot_dense_history)
    log.info(f"{settings['recipe']} on {settings['model']} ({size[0]}x{size[1]}): {train_set.describe()}; "
             f"validation {val_set.describe()}; {world} process(es) on {process.device.type}, batch "
             f"{settings['batch_size']} = {world} x {accum} x {micro}; {total_epochs} epochs of {steps_per_epoch} "
             f"steps; precision {amp_dtype or 'float32'}; run folder {output}")
    val_indices = range(process.rank, len(val_set), world)
    val_batch = settings['val_batch_size'] or micro

    for epoch in range(start_epoch, total_epochs):
        seed_epoch(settings['seed'], epoch, process.rank, generator)
        sampler.set_epoch(epoch)
        bar = log.progress(steps_per_epoch, f'epoch {epoch + 1}/{total_epochs}', settings['progress'])
        try:
            r = train_one_epoch(task, loader, steps_per_epoch, optimizer, scheduler, process, epoch, step,
                                accum=accum, amp_dtype=amp_dtype, scaler=scaler, clip_grad=settings['clip_grad'],
                                clip_mode=settings['clip_mode'], loss_hook=hooks.get('loss'),
                                on_step=lambda loss, lr, ips, bar=bar: log.advance(bar, loss=loss, lr=lr, ips=ips))
        except NonFiniteLoss as e:
            raise TrainingError(f'the loss became {e.loss} at epoch {e.epoch + 1}, update {e.step + 1}: training '
                                f'diverged and was stopped. {_advice(output)}') from None
        bar.close()
        step = r['step']
        metrics: Dict[str, Any] = dict(epoch=epoch + 1, step=step, lr=r['lr'], train_loss=r['train_loss'],
                                       images_per_s=r['images'] / r['seconds'], epoch_s=r['seconds'])
        if detect:
            scores, _ = evaluate_detection(model, val_set, process.device, val_batch, val_indices, world, amp_dtype)
        else:
            scores = evaluate_segmentation(model, val_set, size, process.device, val_batch, val_indices, world,
                                           amp_dtype)
            scores.pop('iou')
        metrics.update(scores)
        log.epoch(metrics)
        save_training_state(output, model, optimizer, scheduler, scaler, None, generator, settings, class_names,
                            epoch + 1, step, metrics, log.history, process.is_main, _advice(output),
                            extra=dict(kind=CHECKPOINT_KIND, category_ids=category_ids))
        if 'epoch_end' in hooks:
            hooks['epoch_end'](epoch + 1)

    if process.is_main:
        log.finish()
    if world > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return dict(history=log.history, output=output, rank=process.rank, world=world,
                seconds=time.perf_counter() - start_time, class_names=class_names)


# ---- command-line flags of the settings ------------------------------------------------------------

def add_train_arguments(parser: argparse.ArgumentParser, task: str) -> None:
    """The flags every dense `train` sub-command has: --config, --resume, --overwrite,
    --print-config, then one flag per setting of `task` (add_settings_arguments)."""
    parser.add_argument('--config', metavar='YAML', help='YAML file of settings')
    parser.add_argument('--resume', metavar='CHECKPOINT',
                        help="continue a run from its last.pth ('auto': the run folder's, if there is one)")
    parser.add_argument('--overwrite', action='store_true', help='replace the run already in the --output folder')
    parser.add_argument('--print-config', action='store_true', help='print the resolved settings as YAML and exit')
    add_settings_arguments(parser, task)


def add_runtime_arguments(parser: argparse.ArgumentParser, batch_size: int) -> None:
    """--device, --threads and --batch-size of the validate and predict sub-commands."""
    parser.add_argument('--device', default='auto', help="'auto', 'cpu', 'cuda' (default: auto)")
    parser.add_argument('--threads', type=non_negative_int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument('--batch-size', type=positive_int, default=batch_size,
                        help=f'images per forward pass (default: {batch_size})')


def inference_device(args: argparse.Namespace) -> torch.device:
    """Threads set, the checkpoint file checked (a clear error before anything loads), the device."""
    if args.threads:
        torch.set_num_threads(args.threads)
    validate_checkpoint_file(args.checkpoint)
    return resolve_device(args.device)


def train_from_args(task: str, args: argparse.Namespace, data: Optional[Dict[str, Optional[str]]],
                    data_usage: str) -> Optional[Dict[str, Any]]:
    """Run a dense `train` sub-command: settings from its flags, --print-config (returns None), or
    train_dense's result. `data_usage` says what to give when there is no data; Ctrl-C names the
    checkpoint to resume from."""
    settings, resume = settings_from_args(task, args, data)
    if not settings['data']:
        raise DataError(f'no data: give {data_usage} (or --resume a run, which keeps its data)')
    if args.print_config:
        print(yaml.safe_dump(settings, sort_keys=False), end='')
        return None
    try:
        return train_dense(settings, resume=resume, overwrite=args.overwrite)
    except KeyboardInterrupt:
        last = os.path.join(settings['output'], 'last.pth')
        hint = (f'continue with: dynamixer {task} train --resume {last}' if os.path.exists(last)
                else 'no epoch was completed')
        raise KeyboardInterrupt(hint) from None


def add_settings_arguments(parser: argparse.ArgumentParser, task: str) -> None:
    """One --flag per setting of `task`, default None so that only flags given override."""
    group = parser.add_argument_group('settings (override --config and a resumed run\'s; see --print-config)')
    for key, (default, kind, help_text) in task_options(task).items():
        flag = '--' + key.replace('_', '-')
        base = kind.rstrip('?')
        text = f'{help_text} [default: {default}]'
        if base == 'bool':
            group.add_argument(flag, dest=key, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif base in ('floats', 'ints'):
            group.add_argument(flag, dest=key, nargs='+', default=None, metavar='N', help=text,
                               type=RANGES.get(key, float if base == 'floats' else int))
        elif base in ('int', 'float'):
            conv = RANGES.get(key) or (int if base == 'int' else float)
            if kind.endswith('?'):
                conv = OrWord(conv, 'none')
            group.add_argument(flag, dest=key, type=conv, default=None, help=text)
        else:
            group.add_argument(flag, dest=key, default=None, choices=CHOICES.get(key), help=text)


def settings_overrides(args: argparse.Namespace, task: str) -> Dict[str, Any]:
    """The settings given on the command line ('none' -> None)."""
    return {k: (None if getattr(args, k) == 'none' else getattr(args, k))
            for k in task_options(task) if getattr(args, k, None) is not None}


def settings_from_args(task: str, args: argparse.Namespace, data: Optional[Dict[str, Optional[str]]]
                       ) -> Tuple[Dict[str, Any], Optional[str]]:
    """(settings, checkpoint to resume or None) from a train command's flags (--config, --resume
    PATH|auto and the settings) and its data paths (`data`: None or empty on a resume that keeps
    its data). Paths are made absolute."""
    overrides = settings_overrides(args, task)
    if overrides.get('pretrained_file'):   # absolute, so that a resume from elsewhere finds it
        overrides['pretrained_file'] = os.path.abspath(overrides['pretrained_file'])
    data = {k: os.path.abspath(v) for k, v in (data or {}).items() if v}
    resume = args.resume
    if resume == 'auto':   # the run folder's last.pth when there is one, else a fresh start
        fresh = resolve_settings(task, args.config, overrides)
        path = os.path.join(fresh['output'] or default_output(fresh, create=False), 'last.pth')
        resume = path if os.path.isfile(path) else None
    if resume:
        base = read_checkpoint(resume).get('config')
        if not isinstance(base, dict) or base.get('task') != task:
            raise CheckpointError(f'{resume}: not a `dynamixer {task} train` checkpoint'
                                  + (f" (it is a {base.get('task')} one)" if isinstance(base, dict) and base.get('task')
                                     else ''))
        settings = resolve_settings(task, args.config, overrides, base=base)
        if data:
            settings['data'] = data
        settings['output'] = os.path.abspath(overrides['output']) if overrides.get('output') else \
            os.path.dirname(os.path.abspath(resume))
        return settings, resume
    settings = resolve_settings(task, args.config, overrides)
    settings['data'] = data
    if not args.print_config:   # the folder is chosen now, so that Ctrl-C can name its checkpoint
        settings['output'] = run_folder(settings)
    return settings, None

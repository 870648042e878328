"""`dynamixer train`: the training loop, top to bottom.

The same command runs on one process or many (``torchrun --nproc_per_node N -m dynamixer train``):
``batch_size`` is the global batch, split over processes and accumulation steps, so the
optimisation does not depend on how many processes share it.

Reproducibility: every epoch's randomness (shuffling, augmentation, mixup, drop-path) is seeded
from (seed, epoch, rank), so a run resumed from an epoch's checkpoint continues exactly as if it
had never stopped, on any number of processes. Checkpoints also record the RNG states.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import random
import sys
import time
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

import timm
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, NativeScaler, dispatch_clip_grad

from . import __version__
from .checkpoint import CheckpointError, read_checkpoint
from .data import DataError, build_datasets, build_transforms
from .recipes import RECIPES, ConfigError, add_config_arguments, config_overrides, resolve_config
from .runlog import RunLog, atomic_torch_save, save_safetensors

_logger = logging.getLogger('dynamixer.train')

__all__ = ['train', 'TrainingError', 'add_arguments', 'run']


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, a resume checkpoint that does not fit)."""


# ---- command line -------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('data', nargs='?', default=None,
                        help='data folder with train/<class>/ and val/<class>/ (or --data-dir of a timm '
                             'data set); none: the embedded digits example')
    parser.add_argument('--recipe', default=None, choices=list(RECIPES),
                        help="named settings (default: 'digits' without data, 'scratch' with a folder)")
    parser.add_argument('--config', metavar='YAML', default=None, help='YAML file of settings (override the recipe)')
    parser.add_argument('--resume', metavar='CHECKPOINT', default=None,
                        help="continue from a checkpoint (its settings, then overrides); 'auto': the run "
                             'folder\'s last.pth if there is one')
    parser.add_argument('--print-config', action='store_true', help='print the resolved settings as YAML and exit')
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    try:
        config, resume = _config_from_args(args)
        if args.print_config:
            import yaml
            print(yaml.safe_dump(config, sort_keys=False), end='')
            return 0
        result = train(config, data=config.get('data'), resume=resume)
    except (ConfigError, DataError, CheckpointError, TrainingError, FileNotFoundError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        out = config.get('output') or _default_output(config, create=False)
        last = os.path.join(out, 'last.pth')
        hint = f'continue with: dynamixer train --resume {last}' if os.path.exists(last) else 'no epoch was completed'
        print(f'\ninterrupted; {hint}', file=sys.stderr)
        return 130
    if result['rank'] == 0:
        last = result['history'][-1]
        acc = last.get('ema_top1', last['val_top1']) if config['ema_decay'] else last['val_top1']
        print(f"validation accuracy: {acc:.2f}% top-1 after {last['epoch']} epochs "
              f"({result['seconds']:.0f} s); run folder: {result['output']}")
    return 0


def _config_from_args(args: argparse.Namespace):
    """(resolved config, checkpoint to resume from or None)."""
    overrides = config_overrides(args)
    resume = args.resume
    recipe = args.recipe or ('digits' if not args.data and not overrides.get('dataset') else 'scratch')
    if resume == 'auto':  # the run folder's last.pth when there is one, else a fresh start
        fresh = resolve_config(recipe, args.config, overrides)
        path = os.path.join(fresh['output'] or _default_output(fresh, create=False), 'last.pth')
        resume = path if os.path.isfile(path) else None
        if resume is None:
            fresh['data'] = args.data
            return fresh, None
    if resume:
        # a resumed run keeps its own settings; flags given now override them (e.g. --epochs)
        base = read_checkpoint(resume).get('config')
        if not isinstance(base, dict):
            raise CheckpointError(f'{resume}: not a dynamixer training checkpoint (no config); '
                                  'use --pretrained to start from foreign weights')
        config = resolve_config(base.get('recipe', 'digits'), args.config, overrides, base=base)
        if args.data:
            config['data'] = args.data
        return config, resume
    config = resolve_config(recipe, args.config, overrides)
    config['data'] = args.data
    return config, None


# ---- processes, devices, randomness -------------------------------------------------------------

def _setup_distributed(device_name: str, threads: int = 0):
    """(rank, world size, device) from torchrun's environment; one process without it."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    rank = int(os.environ.get('RANK', '0'))
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    use_cuda = torch.cuda.is_available() if device_name == 'auto' else device_name.startswith('cuda')
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError(f"device '{device_name}' asked for, but no CUDA GPU is available")
    device = torch.device('cuda', local_rank) if use_cuda else torch.device('cpu')
    if use_cuda:
        torch.cuda.set_device(device)
    else:
        # OpenMP threads that outnumber free cores spin and slow CPU training down many times over
        local = int(os.environ.get('LOCAL_WORLD_SIZE', '1'))
        torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // local))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend='nccl' if use_cuda else 'gloo')
    return rank, world, device


def _seed_epoch(seed: int, epoch: int, rank: int, generator: torch.Generator) -> None:
    """Seed torch, numpy, python and the loader's generator from (seed, epoch, rank)."""
    s = int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)
    generator.manual_seed(s)


def _worker_init(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; derive numpy's and python's from it
    s = torch.initial_seed() % 2 ** 32
    np.random.seed(s)
    random.seed(s)


def _rng_state(generator: torch.Generator) -> Dict[str, Any]:
    """RNG states as tensors and plain types (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        'torch': torch.get_rng_state(),
        'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        'numpy': {'keys': torch.from_numpy(np_state[1].astype(np.int64)), 'pos': int(np_state[2]),
                  'has_gauss': int(np_state[3]), 'cached_gaussian': float(np_state[4])},
        'python': [py_state[0], list(py_state[1]), py_state[2]],
        'loader_generator': generator.get_state(),
    }


def _set_rng_state(state: Dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state['torch'])
    if state.get('cuda') and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])
    n = state['numpy']
    np.random.set_state(('MT19937', n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'],
                         n['cached_gaussian']))
    p = state['python']
    random.setstate((p[0], tuple(p[1]), p[2]))
    generator.set_state(state['loader_generator'])


def _resolve_amp(amp: str, device: torch.device) -> Optional[torch.dtype]:
    if amp == 'auto':
        if device.type != 'cuda':
            return None  # CPU autocast is slower than float32 for these layer sizes
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {'bf16': torch.bfloat16, 'fp16': torch.float16, 'none': None}[amp]


# ---- model, optimiser ---------------------------------------------------------------------------

def _build_model(config: Dict[str, Any], num_classes: int) -> nn.Module:
    kwargs: Dict[str, Any] = dict(num_classes=num_classes, drop_path_rate=config['drop_path'])
    if config['img_size']:
        kwargs['img_size'] = config['img_size']
    config['model_kwargs'] = dict(kwargs)
    try:
        model = timm.create_model(config['model'], **kwargs)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"cannot build {config['model']} with {kwargs}: {e}") from None
    if config['pretrained']:
        _load_pretrained(model, config['pretrained'], config['new_head'])
    return model


def _load_pretrained(model: nn.Module, path: str, new_head: bool) -> None:
    """Start from the weights in `path` (any layout load_model reads); optionally a fresh head."""
    from .layout import unwrap_state_dict
    from .model import checkpoint_filter_fn
    raw = dict(unwrap_state_dict(read_checkpoint(path)))
    head = {f'head.{k}': v.clone() for k, v in model.head.state_dict().items()}
    if new_head:
        raw.update(head)  # the old head is dropped; the model's freshly initialised one is kept
    try:
        state_dict = checkpoint_filter_fn(raw, model)
        model.load_state_dict(state_dict)
    except (ValueError, RuntimeError) as e:
        raise CheckpointError(f'{path}: cannot start from these weights: {e}') from None


def _param_groups(model: nn.Module, weight_decay: float, body_lr_scale: float) -> List[Dict[str, Any]]:
    """Four groups: {body, head} x {decay, no decay}; no weight decay on biases and norm weights.

    'lr_scale' is applied by timm's schedulers, so the body follows the same schedule at a fraction
    of the head's learning rate (transfer recipe)."""
    skip = set(getattr(model, 'no_weight_decay', lambda: set())())
    groups: Dict[Any, Dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_head = name.startswith('head.')
        decay = p.ndim > 1 and name not in skip
        key = (is_head, decay)
        if key not in groups:
            groups[key] = dict(params=[], weight_decay=weight_decay if decay else 0.0,
                               lr_scale=1.0 if is_head else body_lr_scale)
        groups[key]['params'].append(p)
    return [groups[k] for k in sorted(groups)]


def _default_output(config: Dict[str, Any], create: bool = True) -> str:
    base = os.path.join('runs', f"{config.get('recipe', 'run')}-{config['model']}")
    if not create:
        return base
    path, n = base, 1
    while os.path.exists(os.path.join(path, 'last.pth')):  # never overwrite a finished run
        n += 1
        path = f'{base}-{n}'
    return path


# ---- evaluation ---------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp_dtype: Optional[torch.dtype],
             world: int = 1) -> Dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy over the loader (summed over processes)."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, count
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)
        logits = logits.float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top == y[:, None]
        sums += torch.stack([
            nn.functional.cross_entropy(logits, y, reduction='sum').double(),
            hit[:, :1].sum().double(), hit.sum().double(), torch.tensor(float(len(y)), device=device).double()])
    if world > 1:
        dist.all_reduce(sums)
    loss, top1, top5, n = sums.tolist()
    n = max(n, 1.0)
    return dict(loss=loss / n, top1=100.0 * top1 / n, top5=100.0 * top5 / n)


# ---- the loop -----------------------------------------------------------------------------------

def train(
        config: Dict[str, Any],
        data: Optional[str] = None,
        resume: Optional[str] = None,
        hooks: Optional[Dict[str, Callable]] = None,
) -> Dict[str, Any]:
    """Train as `config` says (see recipes.OPTIONS); returns dict(history, output, rank, seconds).

    hooks (for tests and tools): 'loss'(loss, step) -> loss, called on each micro-batch's loss;
    'epoch_end'(epoch) called after the epoch's checkpoint is written.
    """
    hooks = hooks or {}
    caller_config, config = config, dict(config)
    config['data'] = data
    start_time = time.perf_counter()
    rank, world, device = _setup_distributed(config['device'], config['threads'])
    is_main = rank == 0
    seed = config['seed']

    # --- data and model
    train_set, val_set, class_names, data_report = build_datasets(config, data)
    torch.manual_seed(seed)  # the same initial weights on every process (DDP also broadcasts rank 0's)
    model = _build_model(config, len(class_names)).to(device)
    train_set.transform, val_set.transform = build_transforms(config, model)

    accum = config['grad_accum']
    micro, rest = divmod(config['batch_size'], world * accum)
    if rest or micro == 0:
        raise ConfigError(f"batch_size {config['batch_size']} does not split evenly over {world} processes x "
                          f'{accum} accumulation steps; choose a multiple of {world * accum}')
    mixup_on = config['mixup'] > 0 or config['cutmix'] > 0
    if mixup_on and micro % 2:
        raise ConfigError(f'mixup/cutmix need an even batch per process and step, got {micro}')
    if len(train_set) < config['batch_size']:
        raise DataError(f"the training set has {len(train_set)} images, fewer than one batch "
                        f"(batch_size {config['batch_size']}); lower --batch-size")

    generator = torch.Generator()
    sampler = torch.utils.data.DistributedSampler(
        train_set, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=False)
    loader_kw = dict(num_workers=config['workers'], pin_memory=device.type == 'cuda',
                     worker_init_fn=_worker_init, persistent_workers=False)
    train_loader = torch.utils.data.DataLoader(
        train_set, batch_size=micro, sampler=sampler, drop_last=True, generator=generator, **loader_kw)
    steps_per_epoch = len(train_loader) // accum
    val_shard = torch.utils.data.Subset(val_set, range(rank, len(val_set), world))  # no padding: exact metrics
    val_loader = torch.utils.data.DataLoader(
        val_shard, batch_size=config['val_batch_size'] or 2 * micro, shuffle=False, **loader_kw)

    # --- optimiser, schedule, loss, precision, EMA
    optimizer = create_optimizer_v2(
        model, config['opt'], lr=config['lr'], weight_decay=config['weight_decay'],
        momentum=config['momentum'],
        param_group_fn=lambda m: _param_groups(m, config['weight_decay'], config['body_lr_scale']),
        **{k: v for k, v in (('eps', config['opt_eps']), ('betas', config['opt_betas'])) if v is not None})
    scheduler, total_epochs = create_scheduler_v2(
        optimizer, sched=config['sched'], num_epochs=config['epochs'], warmup_epochs=config['warmup_epochs'],
        warmup_lr=config['warmup_lr'], min_lr=config['min_lr'], cooldown_epochs=config['cooldown_epochs'],
        step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    mixup_fn = Mixup(mixup_alpha=config['mixup'], cutmix_alpha=config['cutmix'], prob=config['mixup_prob'],
                     switch_prob=config['mixup_switch_prob'], label_smoothing=config['smoothing'],
                     num_classes=len(class_names)) if mixup_on else None
    if mixup_on:
        criterion: nn.Module = SoftTargetCrossEntropy()  # mixup builds the smoothed soft targets
    elif config['smoothing'] > 0:
        criterion = LabelSmoothingCrossEntropy(config['smoothing'])
    else:
        criterion = nn.CrossEntropyLoss()
    amp_dtype = _resolve_amp(config['amp'], device)
    scaler = NativeScaler(device=device.type) if amp_dtype == torch.float16 else None
    ema = ModelEmaV3(model, decay=config['ema_decay']) if config['ema_decay'] else None

    # --- resume
    start_epoch, step = 0, 0
    history: List[Dict[str, Any]] = []
    if resume:
        ckpt = read_checkpoint(resume)
        _check_resume(ckpt, config, class_names, resume)
        try:
            model.load_state_dict(ckpt['state_dict'])
            if ema is not None and 'state_dict_ema' in ckpt:
                ema.module.load_state_dict(ckpt['state_dict_ema'])
            optimizer.load_state_dict(ckpt['optimizer'])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f'{resume}: does not fit this run ({e})') from None
        if scaler is not None and ckpt.get('scaler'):
            scaler.load_state_dict(ckpt['scaler'])
        # The schedule is rebuilt from the settings rather than loaded: the lr is a function of the
        # update count, so this continues it exactly, and a resume with a new --epochs or --lr follows them.
        _set_rng_state(ckpt['rng'], generator)
        start_epoch, step = int(ckpt['epoch']), int(ckpt['step'])
        history = list((ckpt.get('metrics') or {}).get('history', []))
        if start_epoch >= total_epochs:
            raise TrainingError(f'{resume} already finished all {total_epochs} epochs; '
                                'pass a larger --epochs to train on')

    raw_model = model
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None)
    if config['compile']:
        model = torch.compile(model, backend=config['compile_backend'])

    output = config['output'] or (os.path.dirname(os.path.abspath(resume)) if resume else _default_output(config))
    config['output'] = caller_config['output'] = output  # the caller learns the folder even if interrupted
    log = RunLog(output, config, enabled=is_main, tensorboard=config['tensorboard'], history=history)
    if is_main:
        log.info(f"{config['model']} on {len(train_set)} training / {len(val_set)} validation images, "
                 f"{len(class_names)} classes; {world} process(es) on {device.type}, batch {config['batch_size']} "
                 f"= {world} x {accum} x {micro}; {total_epochs} epochs of {steps_per_epoch} steps; "
                 f"precision {amp_dtype or 'float32'}; run folder {output}")
        if data_report['bad_images']:
            log.write_bad_images(data_report['bad_images'])
    if steps_per_epoch == 0:
        raise DataError(f'each process gets fewer than {micro * accum} training images per epoch; lower --batch-size')

    def save_checkpoint(epoch: int, metrics: Dict[str, Any]) -> None:
        for name, p in raw_model.state_dict().items():
            if p.is_floating_point() and not torch.isfinite(p).all():
                raise TrainingError(f'the weights became non-finite ({name}) in epoch {epoch}; '
                                    f'not saving them. {_advice(output)}')
        if not is_main:
            return
        state = {
            'state_dict': raw_model.state_dict(),
            'optimizer': optimizer.state_dict(),
            'scheduler': scheduler.state_dict(),
            'scaler': scaler.state_dict() if scaler is not None else None,
            'rng': _rng_state(generator),
            'epoch': epoch, 'step': step,
            'config': config, 'class_names': class_names,
            'metrics': {**metrics, 'history': log.history},
            'version': __version__,
        }
        if ema is not None:
            state['state_dict_ema'] = ema.module.state_dict()
        atomic_torch_save(state, os.path.join(output, 'last.pth'))

    for epoch in range(start_epoch, total_epochs):
        _seed_epoch(seed, epoch, rank, generator)
        sampler.set_epoch(epoch)
        model.train()
        epoch_start = time.perf_counter()
        loss_sum, images = 0.0, 0
        bar = log.progress(steps_per_epoch, f'epoch {epoch + 1}/{total_epochs}', config['progress'])
        batches = iter(train_loader)
        for _ in range(steps_per_epoch):
            scheduler.step_update(step)  # the lr is a function of the update count alone
            step_loss = torch.zeros((), device=device)
            for k in range(accum):
                x, y = next(batches)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if mixup_fn is not None:
                    x, y = mixup_fn(x, y)
                last = k == accum - 1
                sync = model.no_sync() if world > 1 and not last else contextlib.nullcontext()
                with sync:
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                        loss = criterion(model(x), y)
                    if 'loss' in hooks:
                        loss = hooks['loss'](loss, step)
                    _check_finite(loss.detach(), world, epoch, step, output)
                    if scaler is not None:  # fp16: scaled backward; steps (with clipping) on the last micro-batch
                        scaler(loss / accum, optimizer, clip_grad=config['clip_grad'], clip_mode=config['clip_mode'],
                               parameters=raw_model.parameters(), need_update=last)
                    else:
                        (loss / accum).backward()
                step_loss += loss.detach() / accum
            if scaler is None:
                if config['clip_grad'] is not None:
                    dispatch_clip_grad(raw_model.parameters(), config['clip_grad'], mode=config['clip_mode'])
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if ema is not None:
                ema.update(raw_model, step=step)
            loss_value = float(step_loss)
            loss_sum += loss_value
            images += micro * accum * world
            lr = optimizer.param_groups[-1]['lr']  # the head's group: the recipe's lr
            log.advance(bar, loss=loss_value, lr=lr, ips=images / (time.perf_counter() - epoch_start))
        bar.close()

        seconds = time.perf_counter() - epoch_start
        metrics = dict(epoch=epoch + 1, step=step, lr=lr, train_loss=loss_sum / steps_per_epoch,
                       images_per_s=images / seconds, epoch_s=seconds)
        val = evaluate(model, val_loader, device, amp_dtype, world)
        metrics.update(val_loss=val['loss'], val_top1=val['top1'], val_top5=val['top5'])
        if ema is not None:
            ev = evaluate(ema.module, val_loader, device, amp_dtype, world)
            metrics.update(ema_loss=ev['loss'], ema_top1=ev['top1'], ema_top5=ev['top5'])
        log.epoch(metrics)
        save_checkpoint(epoch + 1, metrics)
        if 'epoch_end' in hooks:
            hooks['epoch_end'](epoch + 1)

    if is_main:
        final = ema.module if ema is not None else raw_model
        if config['save_safetensors']:
            save_safetensors(final, os.path.join(output, 'model.safetensors'), config, class_names)
        log.finish()
    if config['save_rank_weights']:
        save_safetensors(raw_model, os.path.join(output, f'rank{rank}.safetensors'), config, class_names)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return dict(history=log.history, output=output, rank=rank, world=world,
                seconds=time.perf_counter() - start_time, class_names=class_names)


def _advice(output: str) -> str:
    last = os.path.join(output, 'last.pth')
    kept = f'The last good checkpoint is {last}; ' if os.path.exists(last) else 'No checkpoint was written yet; '
    return (kept + 'lower the learning rate (--lr), add gradient clipping (--clip-grad 1.0) or use '
            '--amp bf16/none, then ' + ('--resume it.' if os.path.exists(last) else 'start again.'))


def _check_finite(loss: torch.Tensor, world: int, epoch: int, step: int, output: str) -> None:
    """Stop every process together when any process sees a NaN or infinite loss."""
    bad = (~torch.isfinite(loss)).float().reshape(1)
    if world > 1:
        dist.all_reduce(bad)
    if bad.item() > 0:
        raise TrainingError(f'the loss became {float(loss)} at epoch {epoch + 1}, update {step + 1}: training '
                            f'diverged and was stopped. {_advice(output)}')


def _check_resume(ckpt: Dict[str, Any], config: Dict[str, Any], class_names: List[str], path: str) -> None:
    """Clear errors for a resume checkpoint from another model or another class list."""
    if not isinstance(ckpt.get('config'), dict) or 'state_dict' not in ckpt or 'optimizer' not in ckpt:
        raise CheckpointError(f'{path}: not a dynamixer training checkpoint (no config / optimizer state); '
                              'to start from its weights use --pretrained instead of --resume')
    if ckpt['config'].get('model') != config['model']:
        raise CheckpointError(f"{path} is a {ckpt['config'].get('model')} checkpoint, this run trains "
                              f"{config['model']}; resume with --model {ckpt['config'].get('model')}")
    if ckpt['config'].get('opt', config['opt']) != config['opt']:
        raise CheckpointError(f"{path} was trained with the {ckpt['config']['opt']} optimiser, whose state does not "
                              f"fit {config['opt']}; resume with --opt {ckpt['config']['opt']}")
    names = list(ckpt.get('class_names') or [])
    if names != list(class_names):
        raise CheckpointError(f'{path} was trained on {len(names)} classes ({", ".join(names[:5])}...), the data '
                              f'has {len(class_names)} ({", ".join(class_names[:5])}...); resume on the same data')

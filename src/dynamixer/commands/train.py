"""`dynamixer train`: the training loop, top to bottom.

The same command runs on one process or many (``torchrun --nproc_per_node N -m dynamixer train``):
``batch_size`` is the global batch, split over processes and accumulation steps, so the
optimisation does not depend on how many processes share it.

Reproducibility: every epoch's randomness (shuffling, augmentation, mixup, drop-path) is seeded
from (seed, epoch, rank), so a run resumed from an epoch's checkpoint continues exactly as if it
had never stopped, on any number of processes. Checkpoints also record the RNG states.

Run folders cannot be lost: a run's folder (and its data folder) is made absolute when the run is
created; a resumed run writes next to the checkpoint it resumes (wherever the command is run
from) unless --output says otherwise; a folder that holds another run (`RUN_FILES`) is refused
unless --overwrite is given or the run resumes that folder's own checkpoint; and a resumed run
handed other data is refused (--pretrained starts a new run from the same weights).

Distillation (--kd-model / --kd-checkpoint): the teacher and the timm task come from
`dynamixer.distill`; the loop is the same, driving that task instead of the classification one.
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import timm
import torch
import torch.distributed as dist
import torch.nn as nn
import yaml
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.task import ClassificationTask, TrainingTask
from timm.utils import ModelEmaV3, NativeScaler

from ..data import DataError, build_datasets, build_transforms
from ..distill import Teacher, build_teacher, distillation_task, input_normalisation, teacher_digest
from ..engine import (
    NonFiniteLoss,
    Process,
    evaluate,
    resolve_amp,
    seed_epoch,
    setup_process,
    train_one_epoch,
    worker_init,
)
from ..files import CheckpointError, read_checkpoint
from ..layout import unwrap_state_dict
from ..model import checkpoint_filter_fn
from ..recipes import RECIPES, ConfigError, add_config_arguments, config_overrides, resolve_config
from ..runlog import RunLog, save_safetensors
from ..runs import (
    RUN_FILES,
    RunFolderError,
    TrainingError,
    holds_run,
    restore_training_state,
    run_folder,
    save_training_state,
)
from ..runs import claim_run_folder as _claim_run_folder
from ..runs import default_output as _default_output

_logger = logging.getLogger('dynamixer.train')

__all__ = ['train', 'TrainingError', 'RunFolderError', 'RUN_FILES', 'holds_run', 'run_folder', 'evaluate',
           'add_arguments', 'run']


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
    parser.add_argument('--overwrite', action='store_true',
                        help='let --output replace the run already in that folder (its last.pth, model.safetensors, '
                             'metrics, curves); without it such a folder is refused')
    parser.add_argument('--print-config', action='store_true', help='print the resolved settings as YAML and exit')
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Errors are raised (`DynaMixerError`s) for `cli.main` to report."""
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    config, resume = _config_from_args(args)
    if args.print_config:
        print(yaml.safe_dump(config, sort_keys=False), end='')
        return 0
    config['output'] = run_folder(config, resume)
    try:
        result = train(config, data=config.get('data'), resume=resume, overwrite=args.overwrite)
    except KeyboardInterrupt:
        last = os.path.join(config['output'], 'last.pth')
        hint = f'continue with: dynamixer train --resume {last}' if os.path.exists(last) else 'no epoch was completed'
        raise KeyboardInterrupt(hint) from None  # cli.main reports it, exit code 130
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
                                  f'to start a new run from its weights use --pretrained {resume}')
        config = resolve_config(base.get('recipe', 'digits'), args.config, overrides, base=base)
        _check_same_data(resume, base, args.data, overrides.get('dataset'))
        config['data'] = args.data or base.get('data')
        # next to the checkpoint, wherever the command runs; the run's stored folder may be relative
        config['output'] = os.path.abspath(overrides['output']) if overrides.get('output') else \
            os.path.dirname(os.path.abspath(resume))
        return config, resume
    config = resolve_config(recipe, args.config, overrides)
    config['data'] = args.data
    return config, None


def _data_source(dataset: str, data: Optional[str]) -> str:
    """What a run trains on, in words: the built-in set, 'image folder /abs/path' or "'torch/cifar10' (in DIR)"."""
    if dataset in _BUILT_IN:
        return f"the built-in '{dataset}' data set"
    where = os.path.realpath(data) if data else None
    return f'image folder {where}' if not dataset else f"'{dataset}'" + (f' (in {where})' if where else '')


_BUILT_IN = ('digits', 'left-digit')  # data sets that take no data folder


def _check_same_data(resume: str, base: Dict[str, Any], data: Optional[str], dataset: Optional[str]) -> None:
    """A resumed run continues on the data it was trained on; other data (`data`, `dataset` from the
    command line) is refused, with the command that starts a new run from the same weights."""
    was_set = base.get('dataset', '')
    now_set = was_set if dataset is None else dataset
    if data and dataset is None and now_set in _BUILT_IN:
        now_set = ''  # DATA on the command line is an image folder, which the built-in sets would ignore
    was = _data_source(was_set, base.get('data'))
    now = _data_source(now_set, data or base.get('data'))
    if was == now:
        return
    new = ' '.join(x for x in ('dynamixer train', data or '', f'--dataset {now_set}' if now_set else '') if x)
    raise ConfigError(
        f'{resume} was trained on {was}, not on {now}: a resumed run continues on its own data. To '
        f'train on {now} starting from these weights, start a new run: {new} --pretrained {resume} '
        '(a new classifier head is made; --output names the new run\'s folder).')


# ---- model, optimiser ---------------------------------------------------------------------------

def _build_model(config: Dict[str, Any], num_classes: int,
                 data_kwargs: Optional[Dict[str, Any]] = None) -> nn.Module:
    """The timm model the config names; what the data set needs (e.g. in_chans=1 for the left-digit
    canvases) < config['model_options'] (e.g. mixing='static') < classes, drop-path and size.
    Records the arguments in config['model_kwargs'] (checkpoints, safetensors metadata)."""
    kwargs: Dict[str, Any] = dict(data_kwargs or {})
    kwargs.update(config.get('model_options') or {})
    kwargs.update(num_classes=num_classes, drop_path_rate=config['drop_path'])
    if config['img_size']:
        kwargs['img_size'] = config['img_size']
    config['model_kwargs'] = dict(kwargs)
    try:
        model = timm.create_model(config['model'], **kwargs)
    except (RuntimeError, ValueError, TypeError) as e:  # unknown model, size or option (--model-options)
        raise ConfigError(f"cannot build {config['model']} with {kwargs}: {e}") from None
    if config['pretrained']:
        _load_pretrained(model, config['pretrained'], config['new_head'])
    return model


def _load_pretrained(model: nn.Module, path: str, new_head: bool) -> None:
    """Start from the weights in `path` (any layout load_model reads); optionally a fresh head."""
    raw = dict(unwrap_state_dict(read_checkpoint(path)))
    head = {f'head.{k}': v.clone() for k, v in model.head.state_dict().items()}  # type: ignore[union-attr]
    if new_head:
        raw.update(head)  # the old head is dropped; the model's freshly initialised one is kept
    try:
        state_dict = checkpoint_filter_fn(raw, model)  # type: ignore[arg-type]  # any DynaMixer
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


# ---- the loop -----------------------------------------------------------------------------------

def train(
        config: Dict[str, Any],
        data: Optional[str] = None,
        resume: Optional[str] = None,
        hooks: Optional[Dict[str, Callable]] = None,
        process: Optional[Process] = None,
        overwrite: bool = False,
) -> Dict[str, Any]:
    """Train as `config` says (see recipes.OPTIONS); returns dict(history, output, rank, world,
    seconds, class_names). `config` is not modified.

    hooks (for tests and tools): 'loss'(loss, step) -> loss, called on each micro-batch's loss;
    'epoch_end'(epoch) called after the epoch's checkpoint is written.
    process: where to run (default: from torchrun's environment); `dynamixer ablate` passes its
    rank's device with world 1, so each of its runs is an ordinary one-process training.
    overwrite: replace a run already in the run folder (refused otherwise, RunFolderError).
    """
    hooks = hooks or {}
    config = copy.deepcopy(dict(config))
    # absolute, so that a resume from another working directory finds them
    config['data'] = os.path.abspath(data) if data else data
    if config.get('kd_checkpoint'):
        config['kd_checkpoint'] = os.path.abspath(config['kd_checkpoint'])
    config['output'] = run_folder(config, resume)
    data = config['data']
    start_time = time.perf_counter()
    process = process or setup_process(config['device'], config['threads'])
    _claim_run_folder(config['output'], resume, overwrite, process.is_main)

    # setup: data, model, loaders, optimisation
    train_set, val_set, class_names, data_report = build_datasets(config, data)
    torch.manual_seed(config['seed'])  # the same initial weights on every process (DDP also broadcasts rank 0's)
    model = _build_model(config, len(class_names), data_report.get('model_kwargs')).to(process.device)
    try:
        train_set.transform, val_set.transform = build_transforms(config, model)
    except (ValueError, AssertionError, KeyError) as e:  # timm's transform factory on unknown policies
        raise ConfigError(f"the augmentation settings do not work (auto_augment {config['auto_augment']!r}): "
                          f'{e or type(e).__name__}') from None
    student_norm = input_normalisation(model, train_set)
    teacher = _build_teacher(config, class_names, model, student_norm, data_report)
    loaders = _make_loaders(config, train_set, val_set, process)
    opt = _make_optimisation(config, model, loaders.steps_per_epoch, len(class_names), process.device)

    # resume
    start_epoch, step, history = 0, 0, []  # type: ignore[var-annotated]
    if resume:
        start_epoch, step, history = _resume(resume, config, class_names, model, opt, loaders.generator, teacher)

    net = _wrap_model(model, config, process)
    task = _make_task(net, opt, teacher, config, student_norm, process)
    output = config['output']
    log = RunLog(output, config, enabled=process.is_main, tensorboard=config['tensorboard'], history=history)
    _announce(log, config, process, loaders, opt, len(train_set), len(val_set), len(class_names), data_report)
    if teacher is not None:
        _announce_teacher(log, config, teacher)

    # per epoch: train, evaluate, save
    for epoch in range(start_epoch, opt.total_epochs):
        metrics = _train_epoch(task, loaders, opt, config, process, epoch, step, log, hooks.get('loss'))
        step = metrics['step']
        metrics.update(_validate(net, opt.ema, loaders.val, opt.amp_dtype, process))
        log.epoch(metrics)
        _save_checkpoint(model, opt, loaders.generator, config, class_names, log, epoch + 1, step, metrics,
                         process, teacher)
        if 'epoch_end' in hooks:
            hooks['epoch_end'](epoch + 1)

    _finish(model, opt.ema, config, class_names, log, process)
    return dict(history=log.history, output=output, rank=process.rank, world=process.world,
                seconds=time.perf_counter() - start_time, class_names=class_names)


class _Loaders(NamedTuple):
    train: torch.utils.data.DataLoader
    val: torch.utils.data.DataLoader
    sampler: torch.utils.data.DistributedSampler
    generator: torch.Generator
    micro: int
    accum: int
    steps_per_epoch: int


def _make_loaders(config: Dict[str, Any], train_set: Any, val_set: Any, process: Process) -> _Loaders:
    """The global batch split over processes and accumulation steps; a sharded validation set."""
    world, accum = process.world, config['grad_accum']
    micro, rest = divmod(config['batch_size'], world * accum)
    if rest or micro == 0:
        raise ConfigError(f"batch_size {config['batch_size']} does not split evenly over {world} processes x "
                          f'{accum} accumulation steps; choose a multiple of {world * accum}')
    if (config['mixup'] > 0 or config['cutmix'] > 0) and micro % 2:
        raise ConfigError(f'mixup/cutmix need an even batch per process and step, got {micro}')
    if len(train_set) < config['batch_size']:
        raise DataError(f"the training set has {len(train_set)} images, fewer than one batch "
                        f"(batch_size {config['batch_size']}); lower --batch-size")
    generator = torch.Generator()
    sampler: Any = torch.utils.data.DistributedSampler(
        train_set, num_replicas=world, rank=process.rank, shuffle=True, seed=config['seed'], drop_last=False)
    loader_kw = dict(num_workers=config['workers'], pin_memory=process.device.type == 'cuda',
                     worker_init_fn=worker_init, persistent_workers=False)
    train_loader = torch.utils.data.DataLoader(
        train_set, batch_size=micro, sampler=sampler, drop_last=True, generator=generator, **loader_kw)
    # every rank-th image, no padding: exact metrics
    val_shard = torch.utils.data.Subset(val_set, range(process.rank, len(val_set), world))
    val_loader = torch.utils.data.DataLoader(
        val_shard, batch_size=config['val_batch_size'] or 2 * micro, shuffle=False, **loader_kw)
    return _Loaders(train_loader, val_loader, sampler, generator, micro, accum, len(train_loader) // accum)


class _Optimisation(NamedTuple):
    optimizer: torch.optim.Optimizer
    scheduler: Any
    total_epochs: int
    mixup_fn: Optional[Mixup]
    criterion: nn.Module
    amp_dtype: Optional[torch.dtype]
    scaler: Optional[NativeScaler]
    ema: Optional[ModelEmaV3]


def _make_optimisation(config: Dict[str, Any], model: nn.Module, steps_per_epoch: int, num_classes: int,
                       device: torch.device) -> _Optimisation:
    """Optimiser, schedule, mixup, loss, precision and EMA, as the config says."""
    try:  # timm refuses unknown names with ValueError / AssertionError
        optimizer = create_optimizer_v2(
            model, config['opt'], lr=config['lr'], weight_decay=config['weight_decay'],
            momentum=config['momentum'],
            param_group_fn=lambda m: _param_groups(m, config['weight_decay'], config['body_lr_scale']),
            **{k: v for k, v in (('eps', config['opt_eps']), ('betas', config['opt_betas'])) if v is not None})
    except (ValueError, AssertionError) as e:
        raise ConfigError(f"--opt {config['opt']}: {e} (timm's optimisers: timm.optim.list_optimizers())") from None
    try:
        scheduler, total_epochs = create_scheduler_v2(
            optimizer, sched=config['sched'], num_epochs=config['epochs'], warmup_epochs=config['warmup_epochs'],
            warmup_lr=config['warmup_lr'], min_lr=config['min_lr'], cooldown_epochs=config['cooldown_epochs'],
            step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    except (ValueError, AssertionError) as e:
        raise ConfigError(f"--sched {config['sched']}: {e}") from None
    mixup_on = config['mixup'] > 0 or config['cutmix'] > 0
    mixup_fn = Mixup(mixup_alpha=config['mixup'], cutmix_alpha=config['cutmix'], prob=config['mixup_prob'],
                     switch_prob=config['mixup_switch_prob'], label_smoothing=config['smoothing'],
                     num_classes=num_classes) if mixup_on else None
    if mixup_on:
        criterion: nn.Module = SoftTargetCrossEntropy()  # mixup builds the smoothed soft targets
    elif config['smoothing'] > 0:
        criterion = LabelSmoothingCrossEntropy(config['smoothing'])
    else:
        criterion = nn.CrossEntropyLoss()
    amp_dtype = resolve_amp(config['amp'], device)
    scaler = NativeScaler(device=device.type) if amp_dtype == torch.float16 else None
    ema = ModelEmaV3(model, decay=config['ema_decay']) if config['ema_decay'] else None
    return _Optimisation(optimizer, scheduler, total_epochs, mixup_fn, criterion, amp_dtype, scaler, ema)


def _resume(path: str, config: Dict[str, Any], class_names: List[str], model: nn.Module, opt: _Optimisation,
            generator: torch.Generator, teacher: Optional[Teacher]) -> Tuple[int, int, List[Dict[str, Any]]]:
    """Load weights, optimiser, scaler and RNG states; returns (epoch, step, history) to continue from."""
    ckpt = read_checkpoint(path)
    _check_resume(ckpt, config, class_names, path)
    _check_resume_teacher(ckpt, teacher, path)
    return restore_training_state(ckpt, path, model, opt.optimizer, opt.scaler, opt.ema, generator, opt.total_epochs)


def _wrap_model(model: nn.Module, config: Dict[str, Any], process: Process) -> nn.Module:
    """DDP over several processes, then torch.compile when asked for."""
    if process.world > 1:
        device = process.device
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None)
    if config['compile']:
        if config['compile_backend'] not in torch.compiler.list_backends(exclude_tags=()):
            raise ConfigError(f"unknown --compile-backend {config['compile_backend']!r}; torch has "
                              f"{', '.join(torch.compiler.list_backends())} and debug ones such as aot_eager")
        model = torch.compile(model, backend=config['compile_backend'])  # type: ignore[assignment]
    return model


def _build_teacher(config: Dict[str, Any], class_names: List[str], model: nn.Module,
                   student_norm: Tuple[Any, Any], data_report: Dict[str, Any]) -> Optional[Teacher]:
    """The distillation teacher when config['kd_model'] or config['kd_checkpoint'] names one, else None;
    refused (a DynaMixerError) before training when it does not fit the data."""
    if not (config.get('kd_model') or config.get('kd_checkpoint')):
        return None
    return build_teacher(config, class_names, model, student_norm, data_report.get('model_kwargs'))


def _make_task(net: nn.Module, opt: _Optimisation, teacher: Optional[Teacher], config: Dict[str, Any],
               student_norm: Tuple[Any, Any], process: Process) -> TrainingTask:
    """What turns a batch into a loss for `engine.train_one_epoch`: the model (`net`, DDP / compiled
    when asked for) and the criterion, with the teacher's distillation loss when there is one."""
    if teacher is None:
        return ClassificationTask(net, criterion=opt.criterion, device=process.device, verbose=False)
    return distillation_task(net, teacher, opt.criterion, config['kd_type'], config['kd_temperature'],
                             config['kd_weight'], student_norm, process.device)


def _announce(log: RunLog, config: Dict[str, Any], process: Process, loaders: _Loaders, opt: _Optimisation,
              n_train: int, n_val: int, n_classes: int, data_report: Dict[str, Any]) -> None:
    world, accum, micro = process.world, loaders.accum, loaders.micro
    log.info(f"{config['model']} on {n_train} training / {n_val} validation images, "
             f"{n_classes} classes; {world} process(es) on {process.device.type}, batch {config['batch_size']} "
             f"= {world} x {accum} x {micro}; {opt.total_epochs} epochs of {loaders.steps_per_epoch} steps; "
             f"precision {opt.amp_dtype or 'float32'}; run folder {config['output']}")
    if process.is_main and data_report['bad_images']:
        log.write_bad_images(data_report['bad_images'])
    if loaders.steps_per_epoch == 0:
        raise DataError(f'each process gets fewer than {micro * accum} training images per epoch; lower --batch-size')


def _announce_teacher(log: RunLog, config: Dict[str, Any], teacher: Teacher) -> None:
    temperature = f", temperature {config['kd_temperature']}" if config['kd_type'] == 'logit' else ''
    log.info(f"distilling ({config['kd_type']}, weight {config['kd_weight']}{temperature}) from "
             f"{config.get('kd_checkpoint') or config['kd_model']} ({type(teacher.model).__name__}, input "
             f"{teacher.input_size[0]}x{teacher.input_size[1]})")


def _train_epoch(task: TrainingTask, loaders: _Loaders, opt: _Optimisation, config: Dict[str, Any],
                 process: Process, epoch: int, step: int, log: RunLog,
                 loss_hook: Optional[Callable]) -> Dict[str, Any]:
    """One epoch with its own seeds (seed, epoch, rank); the epoch's metrics."""
    seed_epoch(config['seed'], epoch, process.rank, loaders.generator)
    loaders.sampler.set_epoch(epoch)
    bar = log.progress(loaders.steps_per_epoch, f'epoch {epoch + 1}/{opt.total_epochs}', config['progress'])
    try:
        r = train_one_epoch(
            task, loaders.train, loaders.steps_per_epoch, opt.optimizer, opt.scheduler,
            process, epoch, step, accum=loaders.accum, amp_dtype=opt.amp_dtype,
            scaler=opt.scaler, clip_grad=config['clip_grad'], clip_mode=config['clip_mode'],
            mixup_fn=opt.mixup_fn, ema=opt.ema, loss_hook=loss_hook,
            on_step=lambda loss, lr, ips: log.advance(bar, loss=loss, lr=lr, ips=ips))
    except NonFiniteLoss as e:
        raise TrainingError(f'the loss became {e.loss} at epoch {e.epoch + 1}, update {e.step + 1}: training '
                            f"diverged and was stopped. {_advice(config['output'])}") from None
    bar.close()
    return dict(epoch=epoch + 1, step=r['step'], lr=r['lr'], train_loss=r['train_loss'],
                images_per_s=r['images'] / r['seconds'], epoch_s=r['seconds'])


def _validate(net: nn.Module, ema: Optional[ModelEmaV3], val_loader: Any, amp_dtype: Optional[torch.dtype],
              process: Process) -> Dict[str, float]:
    """Validation loss and accuracy of the model, and of its EMA when there is one."""
    val = evaluate(net, val_loader, process.device, amp_dtype, process.world)
    metrics = dict(val_loss=val['loss'], val_top1=val['top1'], val_top5=val['top5'])
    if ema is not None:
        ev = evaluate(ema.module, val_loader, process.device, amp_dtype, process.world)
        metrics.update(ema_loss=ev['loss'], ema_top1=ev['top1'], ema_top5=ev['top5'])
    return metrics


def _save_checkpoint(model: nn.Module, opt: _Optimisation, generator: torch.Generator, config: Dict[str, Any],
                     class_names: List[str], log: RunLog, epoch: int, step: int, metrics: Dict[str, Any],
                     process: Process, teacher: Optional[Teacher] = None) -> None:
    """last.pth (atomically): everything a bit-identical resume needs; refused for non-finite weights."""
    save_training_state(config['output'], model, opt.optimizer, opt.scheduler, opt.scaler, opt.ema, generator, config,
                        class_names, epoch, step, metrics, log.history, process.is_main, _advice(config['output']),
                        # a resume checks it is the same teacher
                        extra={'kd_teacher_sha256': teacher_digest(teacher)} if teacher is not None else None)


def _finish(model: nn.Module, ema: Optional[ModelEmaV3], config: Dict[str, Any], class_names: List[str],
            log: RunLog, process: Process) -> None:
    """model.safetensors (the EMA weights when EMA is on), the curves; leave the process group."""
    output = config['output']
    if process.is_main:
        final = ema.module if ema is not None else model
        if config['save_safetensors']:
            save_safetensors(final, os.path.join(output, 'model.safetensors'), config, class_names)
        log.finish()
    if config['save_rank_weights']:
        save_safetensors(model, os.path.join(output, f'rank{process.rank}.safetensors'), config, class_names)
    if process.world > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _advice(output: str) -> str:
    last = os.path.join(output, 'last.pth')
    kept = f'The last good checkpoint is {last}; ' if os.path.exists(last) else 'No checkpoint was written yet; '
    return (kept + 'lower the learning rate (--lr), add gradient clipping (--clip-grad 1.0) or use '
            '--amp bf16/none, then ' + ('--resume it.' if os.path.exists(last) else 'start again.'))


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
                              f'has {len(class_names)} ({", ".join(class_names[:5])}...): a resumed run continues '
                              f'on its own data. To train on these classes starting from its weights, start a '
                              f'new run with --pretrained {path}.')


def _check_resume_teacher(ckpt: Dict[str, Any], teacher: Optional[Teacher], path: str) -> None:
    """A resumed run distils from the teacher it started with (the same weights) or from none."""
    was = ckpt.get('kd_teacher_sha256')
    now = teacher_digest(teacher) if teacher is not None else None
    if was == now:
        return
    new_run = f'start a new run from its weights with --pretrained {path}'
    if was is None:
        raise CheckpointError(f'{path} was trained without a teacher: a resumed run cannot start distilling; '
                              f'{new_run}.')
    named = ckpt['config'].get('kd_checkpoint') or ckpt['config'].get('kd_model')
    if now is None:
        raise CheckpointError(f'{path} was trained with the teacher {named}: a resumed run keeps distilling '
                              f'from it; to go on without it, {new_run}.')
    raise CheckpointError(f'{path} was trained with the teacher {named}, whose weights differ from the teacher '
                          'given now: a resumed run continues with the teacher it started with. Restore that '
                          f'file, or {new_run}.')

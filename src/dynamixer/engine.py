"""What training, validation and the ablation grid share: processes and devices, randomness,
one training epoch (driving a task: see `train_one_epoch`), evaluation and multiply-add counting.

Nothing here parses flags or writes files; the commands (`train`, `validate`, `ablate`) do.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode
from timm.utils import dispatch_clip_grad, unwrap_model

from .errors import DynaMixerError

__all__ = ['Process', 'DeviceError', 'resolve_device', 'setup_process', 'seed_epoch', 'worker_init',
           'rng_state', 'set_rng_state', 'resolve_amp', 'evaluate', 'to_device', 'train_one_epoch', 'count_macs',
           'NonFiniteLoss']


class DeviceError(DynaMixerError, ValueError):
    """A device that is asked for but not there."""


class NonFiniteLoss(DynaMixerError, ArithmeticError):
    """The loss became NaN or infinite (on any process); `loss`, `epoch` (0-based) and `step` say where."""

    def __init__(self, loss: float, epoch: int, step: int):
        super().__init__(f'loss {loss} at epoch {epoch + 1}, update {step + 1}')
        self.loss, self.epoch, self.step = loss, epoch, step


# ---- processes and devices ----------------------------------------------------------------------

@dataclass(frozen=True)
class Process:
    """Where this process runs: its rank among `world` processes and its device."""
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device('cpu')

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str = 'auto', local_rank: int = 0) -> torch.device:
    """'auto' (cuda:local_rank when CUDA is present, else cpu), 'cpu', 'cuda', 'cuda:N'."""
    use_cuda = torch.cuda.is_available() if name == 'auto' else name.startswith('cuda')
    if use_cuda and not torch.cuda.is_available():
        raise DeviceError(f"device '{name}' asked for, but no CUDA GPU is available")
    try:
        if not use_cuda:
            return torch.device(name if name not in ('auto',) else 'cpu')
        device = torch.device(name) if ':' in name else torch.device('cuda', local_rank)
    except RuntimeError as e:  # 'gpu', 'cuda:x', ...
        raise DeviceError(f"unknown device '{name}'; use 'auto', 'cpu', 'cuda' or 'cuda:N' ({e})") from None
    if device.type == 'cuda' and device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceError(f"device '{name}' asked for, but there are {torch.cuda.device_count()} CUDA GPUs")
    return device


def setup_process(device_name: str = 'auto', threads: int = 0, distributed: bool = True,
                  timeout_s: Optional[float] = None) -> Process:
    """Rank, world size and device from torchrun's environment (one process without it).

    With `distributed` the process group is initialised when WORLD_SIZE > 1 (nccl on GPUs, gloo on
    CPUs). `threads` sets torch's CPU threads (0: the cores divided among this node's processes).
    """
    world = int(os.environ.get('WORLD_SIZE', '1'))
    rank = int(os.environ.get('RANK', '0'))
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    device = resolve_device(device_name, local_rank)
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    else:
        # OpenMP threads that outnumber free cores spin and slow CPU training down many times over
        local = int(os.environ.get('LOCAL_WORLD_SIZE', '1'))
        torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // local))
    if distributed and world > 1 and not dist.is_initialized():
        kw: Dict[str, Any] = {}
        if timeout_s is not None:
            kw['timeout'] = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(backend='nccl' if device.type == 'cuda' else 'gloo', **kw)
    return Process(rank, world, device)


def resolve_amp(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """'auto' | 'bf16' | 'fp16' | 'none' -> the autocast dtype (None: float32)."""
    if amp == 'auto':
        if device.type != 'cuda':
            return None  # CPU autocast is slower than float32 for these layer sizes
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {'bf16': torch.bfloat16, 'fp16': torch.float16, 'none': None}[amp]


# ---- randomness ---------------------------------------------------------------------------------

def seed_epoch(seed: int, epoch: int, rank: int, generator: torch.Generator) -> None:
    """Seed torch, numpy, python and the loader's generator from (seed, epoch, rank)."""
    s = int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)
    generator.manual_seed(s)


def worker_init(worker_id: int) -> None:
    """DataLoader worker_init_fn: numpy's and python's seeds from the one torch gave the worker."""
    s = torch.initial_seed() % 2 ** 32
    np.random.seed(s)
    random.seed(s)


def rng_state(generator: torch.Generator) -> Dict[str, Any]:
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


def set_rng_state(state: Dict[str, Any], generator: torch.Generator) -> None:
    """Restore what `rng_state` recorded."""
    torch.set_rng_state(state['torch'])
    if state.get('cuda') and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])
    n = state['numpy']
    np.random.set_state(('MT19937', n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'],
                         n['cached_gaussian']))
    p = state['python']
    random.setstate((p[0], tuple(p[1]), p[2]))
    generator.set_state(state['loader_generator'])


# ---- evaluation ---------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device, amp_dtype: Optional[torch.dtype] = None,
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


# ---- one training epoch -------------------------------------------------------------------------

def _check_finite(loss: torch.Tensor, world: int, epoch: int, step: int) -> None:
    """Stop every process together when any process sees a NaN or infinite loss."""
    bad = (~torch.isfinite(loss)).float().reshape(1)
    if world > 1:
        dist.all_reduce(bad)
    if bad.item() > 0:
        raise NonFiniteLoss(float(loss), epoch, step)


def to_device(batch: Any, device: torch.device) -> Any:
    """`batch` with every tensor in it moved to `device`, through tuples, lists and dicts (a
    detection batch: a list of images and a list of target dicts)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def train_one_epoch(
        task: nn.Module,
        batches: Iterable,
        steps: int,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        process: Process,
        epoch: int,
        step: int,
        accum: int = 1,
        amp_dtype: Optional[torch.dtype] = None,
        scaler: Any = None,
        clip_grad: Optional[float] = None,
        clip_mode: str = 'norm',
        mixup_fn: Optional[Callable] = None,
        ema: Any = None,
        loss_hook: Optional[Callable] = None,
        on_step: Optional[Callable[[float, float, float], None]] = None,
) -> Dict[str, float]:
    """`steps` optimiser updates of `accum` micro-batches each; returns dict(step, lr, train_loss,
    images, seconds).

    The task turns a batch into a loss, so one loop trains plain classification, distillation and
    other targets alike. A task is a `timm.task.TrainingTask` (or has the same methods):

    - ``task(input, target)`` -> dict with at least ``'loss'`` (a scalar tensor to back-propagate);
      `input` and `target` are what the loader yields, moved to the device by `to_device`
      (tensors [B, C, H, W] and [B] for classification; lists of images and of target dicts work too);
    - ``task.no_sync()``: the context that skips DDP's gradient all-reduce on the micro-batches
      before the last one of an update;
    - ``task.get_clip_parameters()``: the parameters whose gradients are clipped;
    - ``task.get_eval_model()``: the trained model (possibly DDP / compiled; `ema` follows its
      unwrapped module, e.g. the student, not a teacher);
    - ``task.train()`` puts what trains in training mode (a teacher stays in eval mode).

    The lr follows `scheduler.step_update(step)` before each update, so it depends on the update
    count alone. `mixup_fn(input, target)` (tensors only) runs on each micro-batch before the task.
    `loss_hook(loss, step)` -> loss sees each micro-batch's loss (tests inject NaNs with it).
    Raises NonFiniteLoss when the loss is NaN or infinite on any process.
    `on_step(loss, lr, images_per_s)` is called after each update (progress bars).
    """
    device, world = process.device, process.world
    task.train()
    start = time.perf_counter()
    loss_sum, images, lr = 0.0, 0, float('nan')
    it = iter(batches)
    for _ in range(steps):
        scheduler.step_update(step)
        step_loss = torch.zeros((), device=device)
        for k in range(accum):
            x, y = to_device(next(it), device)
            if mixup_fn is not None:
                x, y = mixup_fn(x, y)
            last = k == accum - 1
            sync = task.no_sync() if world > 1 and not last else contextlib.nullcontext()
            with sync:
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    loss = task(x, y)['loss']
                if loss_hook is not None:
                    loss = loss_hook(loss, step)
                _check_finite(loss.detach(), world, epoch, step)
                if scaler is not None:  # fp16: scaled backward; steps (with clipping) on the last micro-batch
                    scaler(loss / accum, optimizer, clip_grad=clip_grad, clip_mode=clip_mode,
                           parameters=task.get_clip_parameters(), need_update=last)
                else:
                    (loss / accum).backward()
            step_loss += loss.detach() / accum
            images += len(x) * world  # every process takes a batch of the same size (drop_last)
        if scaler is None:
            if clip_grad is not None:
                dispatch_clip_grad(task.get_clip_parameters(), clip_grad, mode=clip_mode)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if ema is not None:
            ema.update(unwrap_model(task.get_eval_model()), step=step)
        loss_value = float(step_loss)
        loss_sum += loss_value
        lr = optimizer.param_groups[-1]['lr']  # the head's group: the recipe's lr
        if on_step is not None:
            on_step(loss_value, lr, images / (time.perf_counter() - start))
    return dict(step=step, lr=lr, train_loss=loss_sum / max(steps, 1), images=images,
                seconds=time.perf_counter() - start)


# ---- cost ---------------------------------------------------------------------------------------

def count_macs(model: nn.Module, input_size: Optional[Sequence[int]] = None) -> int:
    """Multiply-adds of one image (torch's FLOP counter / 2) at `input_size` (C, H, W); default
    the model's own (``in_chans``, ``img_size``). Puts the model in eval mode."""
    if input_size is None:
        input_size = (model.in_chans, *model.img_size)
    model = model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, *input_size))
    return int(counter.get_total_flops() // 2)

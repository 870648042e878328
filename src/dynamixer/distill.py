"""Knowledge distillation: the teacher and the tasks that train a student against it.

The tasks are timm's (`timm.task`), driven by `engine.train_one_epoch` like plain training:

- ``kd_type: logit``: `timm.task.LogitDistillationTask` as it is: the label loss mixed with
  ``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` (Hinton et al. 2015);
- ``kd_type: hard``: DeiT's hard distillation (Touvron et al. 2021) on the class head,
  `HardDistillationTask`: the label loss mixed with the cross-entropy against the teacher's argmax.
  timm has it only in `TokenDistillationTask`, for models with a second (distillation) head.

Either way the loss is ``(1 - kd_weight) * label loss + kd_weight * distillation loss`` (timm's
complementary weighting, ``task_loss_weight = 1 - kd_weight``).

The teacher (`build_teacher`) is a timm model name (random weights unless a checkpoint is given:
nothing is downloaded) or any checkpoint `checkpoint.load_model` reads (read without running
pickled code). It is `Teacher`, a `timm.task.DistillationTeacher` in eval mode with no gradients,
that feeds the teacher its own input normalisation and size: the student's batch is
un-normalised, normalised as the teacher's training was, and resized (bilinear) when the sizes
differ.
"""
from __future__ import annotations

import difflib
import hashlib
import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple, cast

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import resolve_data_config
from timm.task import DistillationTeacher, LogitDistillationTask, TrainingTask

from .checkpoint import load_model, read_checkpoint
from .data import LeftDigitDataset
from .data.transforms import model_img_size
from .errors import DynaMixerError
from .files import read_safetensors_metadata
from .inference import load_inference_model
from .layout import unwrap_state_dict
from .recipes import KD_TYPES, ConfigError

__all__ = ['TeacherError', 'Teacher', 'HardDistillationTask', 'KD_TYPES', 'build_teacher', 'distillation_task',
           'input_normalisation', 'teacher_digest']

_logger = logging.getLogger('dynamixer.distill')


class TeacherError(DynaMixerError, ValueError):
    """A teacher that does not fit the data (other classes, other image channels)."""


class Teacher(DistillationTeacher):
    """timm's `DistillationTeacher` with the teacher's own normalisation and input size.

    `mean` / `std`: what the teacher's inputs were normalised with (one value per channel);
    `input_size`: (H, W) it takes. `normalize_input` (what timm's tasks call on the student's batch,
    [B, C, H, W] normalised with the student's mean / std) returns the teacher's input, resized
    when the sizes differ. The model is in eval mode and its parameters need no gradients.
    """

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float], input_size: Sequence[int]):
        super().__init__(model)
        self.mean_kd = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std_kd = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.input_size = tuple(int(s) for s in input_size)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> 'Teacher':
        return super().train(False)  # a teacher never trains (dropout, batch norm statistics)

    def normalize_input(self, input: torch.Tensor, student_mean: Optional[torch.Tensor] = None,
                        student_std: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = super().normalize_input(input, student_mean, student_std)
        if tuple(x.shape[-2:]) != self.input_size:
            # normalisation and bilinear resizing commute (per-channel affine vs. weights summing to 1)
            x = F.interpolate(x, size=self.input_size, mode='bilinear', align_corners=False, antialias=True)
        return x


class HardDistillationTask(LogitDistillationTask):
    """DeiT's hard distillation on the class head: ``task_loss_weight * criterion(student, target) +
    distill_loss_weight * cross_entropy(student, argmax(teacher))``; arguments as
    `timm.task.LogitDistillationTask` (its temperature is not used). Returns dict(loss, output,
    task_loss, kd_loss)."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        student_logits = self.trainable_module(input)
        task_loss = self.criterion(student_logits, target)
        with torch.no_grad():
            mean, std = cast(torch.Tensor, self.student_mean), cast(torch.Tensor, self.student_std)  # buffers
            teacher_logits = self.teacher(self.teacher.normalize_input(input, mean, std))
        kd_loss = F.cross_entropy(student_logits, teacher_logits.argmax(dim=-1))
        loss = self.task_loss_weight * task_loss + self.distill_loss_weight * kd_loss
        return {'loss': loss, 'output': student_logits, 'task_loss': task_loss, 'kd_loss': kd_loss}


def input_normalisation(model: nn.Module, dataset: Any) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """(mean, std) per channel that `dataset`'s images reach `model` normalised with: the data set's
    own for the left-digit canvases, else the model's pretrained config (timm's transforms)."""
    if isinstance(dataset, LeftDigitDataset):
        return (float(dataset.mean),), (float(dataset.std),)
    cfg = resolve_data_config({}, model=model)
    return tuple(float(v) for v in cfg['mean']), tuple(float(v) for v in cfg['std'])


def build_teacher(config: Dict[str, Any], class_names: List[str], student: nn.Module,
                  student_norm: Tuple[Sequence[float], Sequence[float]],
                  data_kwargs: Optional[Dict[str, Any]] = None) -> Teacher:
    """The teacher config['kd_model'] / config['kd_checkpoint'] name, checked against the data.

    `student_norm`: the (mean, std) of the student's batches (`input_normalisation`); a teacher
    trained on the same built-in data set as the student (left-digit) gets the same, any other its
    own pretrained config's. `data_kwargs`: what the data set asks of a model (in_chans, img_size).
    Raises ConfigError (unknown name), CheckpointError (a missing, corrupt or unsafe file, weights
    that fit no model) or TeacherError (other classes or channels than the data) before training.
    """
    name, path = config.get('kd_model'), config.get('kd_checkpoint')
    if name and not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ''
        raise ConfigError(f"unknown teacher model '{name}' (--kd-model): not a timm model name.{hint}")
    n_classes = len(class_names)
    in_chans = getattr(student, 'in_chans', 3)
    teacher_names: Optional[List[str]] = None
    teacher_config: Dict[str, Any] = {}
    if path:
        if str(path).endswith('.safetensors') and read_safetensors_metadata(path):
            # a model.safetensors this project wrote: its metadata names the model and its arguments
            model, info = load_inference_model(path, name)
            info['class_names'] = info['class_names'] if info['has_class_names'] else None
        else:
            classes = _checkpoint_classes(path, name)
            model, info = load_model(path, model_name=name, **({'num_classes': classes} if classes else {}))
        teacher_names, teacher_config = info['class_names'], info['config']
        where = f'the teacher {path}'
    else:
        assert name, 'build_teacher is called with kd_model or kd_checkpoint set'
        kwargs: Dict[str, Any] = dict(num_classes=n_classes, in_chans=in_chans)
        with torch.random.fork_rng():  # the same random teacher on every process and on resume
            torch.manual_seed(config['seed'])
            try:
                model = timm.create_model(name, pretrained=False, **kwargs, **_size_kwargs(data_kwargs))
            except TypeError:  # a model without img_size: it gets the batch resized to its own size
                model = timm.create_model(name, pretrained=False, **kwargs)
        _logger.warning(f"the teacher {name} has random weights (--kd-model without --kd-checkpoint; "
                        'nothing is downloaded): it teaches nothing useful. Give a trained teacher with '
                        '--kd-checkpoint FILE.')
        where = f'the teacher {name}'
    teacher_classes = getattr(model, 'num_classes', None)
    if teacher_classes != n_classes:
        raise TeacherError(f'{where} predicts {teacher_classes} classes, the data has {n_classes} '
                           f'({", ".join(class_names[:5])}...): a teacher must be trained on the same classes.')
    if teacher_names is not None and list(teacher_names) != list(class_names):
        raise TeacherError(f'{where} was trained on the classes {", ".join(teacher_names[:5])}..., the data has '
                           f'{", ".join(class_names[:5])}... (other names or order): a teacher must be '
                           'trained on the same classes.')
    teacher_chans = getattr(model, 'in_chans', None) or resolve_data_config({}, model=model)['input_size'][0]
    if teacher_chans != in_chans:
        raise TeacherError(f'{where} takes {teacher_chans}-channel images, the data has {in_chans} channels.')
    if config.get('dataset') in ('left-digit',):
        # normalised by the data set's statistics: the teacher must come from the same data set
        # (a file without a training config, e.g. a model.safetensors, cannot be checked: trusted)
        if path and teacher_config and teacher_config.get('dataset') != config['dataset']:
            raise TeacherError(f"{where} was not trained on the {config['dataset']} data set, whose canvases "
                               'are normalised by their own statistics; train the teacher on it first.')
        differ = [k for k in _LEFT_DIGIT_DATA if teacher_config.get(k, config[k]) != config[k]]
        if differ:
            raise TeacherError(f'{where} was trained on other left-digit data ('
                               + ', '.join(f'{k} {teacher_config[k]} vs {config[k]}' for k in differ)
                               + '): the canvases and their normalisation differ. Train the teacher with '
                               + ' '.join(f"--{k.replace('_', '-')} {config[k]}" for k in differ) + '.')
        mean, std = student_norm
    else:
        cfg = resolve_data_config({}, model=model)
        mean, std = cfg['mean'], cfg['std']
    return Teacher(model, mean, std, model_img_size(model))


def _checkpoint_classes(path: str, name: Optional[str]) -> Optional[int]:
    """The class count of the weights in `path` for the timm model `name`, read from its classifier
    (timm's pretrained config names it: 'fc', 'head', 'classifier', ...); None when not found
    (`load_model` then reads it from a DynaMixer head)."""
    cfg = timm.get_pretrained_cfg(name) if name else None
    key = getattr(cfg, 'classifier', None)
    if not key or key == 'head':
        return None
    weight = unwrap_state_dict(read_checkpoint(path)).get(f'{key}.weight')
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.ndim >= 1 else None


# the left-digit settings that change the training canvases (and so their mean / std)
_LEFT_DIGIT_DATA = ('canvas', 'align', 'num_train', 'data_seed')


def _size_kwargs(data_kwargs: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    return {'img_size': data_kwargs['img_size']} if data_kwargs and data_kwargs.get('img_size') else {}


def teacher_digest(teacher: nn.Module) -> str:
    """SHA-256 of the teacher's weights (names, shapes, bytes): a resumed run checks that its
    teacher is still the one it started with."""
    h = hashlib.sha256()
    for k, v in teacher.state_dict().items():
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                 if v.numel() else b'')
    return h.hexdigest()


def distillation_task(student: nn.Module, teacher: Teacher, criterion: nn.Module, kd_type: str,
                      temperature: float, weight: float,
                      student_norm: Tuple[Sequence[float], Sequence[float]],
                      device: torch.device) -> TrainingTask:
    """The timm task that trains `student` (possibly DDP / compiled) against `teacher`:
    ``(1 - weight) * criterion + weight * distillation loss``. `student_norm`: the (mean, std) of
    the student's batches."""
    if kd_type not in KD_TYPES:
        raise ConfigError(f"unknown kd_type {kd_type!r}; choose one of: {', '.join(KD_TYPES)}")
    cls = LogitDistillationTask if kd_type == 'logit' else HardDistillationTask
    task = cls(student, teacher.to(device), criterion=criterion, task_loss_weight=1.0 - weight,
               temperature=temperature, device=device, verbose=False)
    # timm reads the student's normalisation from its pretrained config; the batches may differ (left-digit)
    task.student_mean = torch.tensor(student_norm[0], device=device).view(1, -1, 1, 1)
    task.student_std = torch.tensor(student_norm[1], device=device).view(1, -1, 1, 1)
    return task

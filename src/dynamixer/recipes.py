"""Training recipes: named dicts of settings, merged with a YAML file and command-line overrides.

Every setting has a default in OPTIONS; a recipe overrides some of them; a YAML file (``--config``)
overrides the recipe; command-line flags override everything. ``resolve_config`` does the merge and
checks names, types and ranges, so a typo in a YAML file is an error, not a silently ignored key, and
``workers: -1`` in a YAML file is refused with the same message as ``--workers -1`` (each numeric
setting's range is one `argtypes.Bounded` in RANGES, used by both).

``batch_size`` is the GLOBAL batch (all processes, all accumulation steps together), so the same
command gives the same optimisation on 1 process or 64.
"""
from __future__ import annotations

import argparse
import copy
import difflib
import json
import os
from typing import Any, Dict, List, Mapping, Optional, Tuple

import yaml

from .argtypes import (
    Bounded,
    OrWord,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    probability,
    unit_interval,
)
from .errors import DynaMixerError

__all__ = ['OPTIONS', 'RANGES', 'RECIPES', 'DEFAULTS', 'KD_TYPES', 'ConfigError', 'get_recipe', 'resolve_config',
           'check_config', 'add_config_arguments', 'config_overrides', 'load_yaml']


class ConfigError(DynaMixerError, ValueError):
    """An unknown recipe, setting name, or a value of the wrong type or out of range."""


# name -> (default, type, help). type: float, int, str, bool, 'floats' (list of floats), 'str?' (str or None),
# 'dict' (a mapping; JSON text on the command line)
OPTIONS: Dict[str, Tuple[Any, Any, str]] = {
    # model
    'model': ('dynamixer_nano', str, 'timm model name'),
    'img_size': (None, 'int?', 'input size (square); default: the model\'s own'),
    'pretrained': (None, 'str?', 'weights file to start from (checkpoint / safetensors; never downloaded)'),
    'new_head': (True, bool, 'with --pretrained: replace the classifier by a freshly initialised one'),
    'body_lr_scale': (1.0, float, 'lr multiplier of everything except the classifier head'),
    'drop_path': (0.0, float, 'stochastic depth rate (grows linearly to this value over the layers)'),
    'model_options': ({}, 'dict', 'extra timm.create_model arguments as JSON, e.g. \'{"mixing": "static"}\''),
    # data
    'dataset': ('', str, "timm dataset name ('' = image folder, 'torch/cifar10', 'hfds/...', 'digits', "
                         "'left-digit')"),
    'num_train': (4000, int, 'left-digit: training canvases'),
    'num_val': (2000, int, 'left-digit: validation canvases'),
    'canvas': (24, int, 'left-digit: canvas size in pixels'),
    'align': (4, int, 'left-digit: digit positions on multiples of this many pixels'),
    'data_seed': (0, int, 'left-digit: seed of the generated data set'),
    'train_split': ('train', str, 'training split (sub-folder of the data folder)'),
    'val_split': ('validation', str, 'validation split (val/, valid/, validation/ are searched)'),
    'dataset_download': (False, bool, 'let torchvision/HF datasets download the data set'),
    'bad_images': ('skip', str, "unreadable images: 'skip' (count and warn), 'error' (stop), 'off' (no scan)"),
    'allow_single_class': (False, bool, 'train on data with a single class (refused by default: the loss '
                                        'is then 0 and the accuracy 100%% whatever the model learns)'),
    'workers': (2, int, 'data loading processes per training process'),
    # schedule and optimiser
    'epochs': (10, int, 'epochs of the main schedule (cool-down epochs come on top)'),
    'batch_size': (64, int, 'GLOBAL batch size, over all processes and accumulation steps'),
    'grad_accum': (1, int, 'gradient accumulation steps per optimiser step'),
    'val_batch_size': (0, int, 'validation batch per process (0: 2x the training micro-batch)'),
    'opt': ('adamw', str, 'timm optimiser name'),
    'lr': (1e-3, float, 'peak learning rate (of the head, when body_lr_scale != 1)'),
    'weight_decay': (0.05, float, 'weight decay (never applied to biases and norm weights)'),
    'momentum': (0.9, float, 'SGD momentum'),
    'opt_eps': (None, 'float?', 'optimiser epsilon'),
    'opt_betas': (None, 'floats?', 'Adam betas'),
    'clip_grad': (None, 'float?', 'gradient clipping threshold (off when unset)'),
    'clip_mode': ('norm', str, "'norm', 'value' or 'agc'"),
    'sched': ('cosine', str, 'timm scheduler name'),
    'warmup_epochs': (0, int, 'linear warm-up epochs'),
    'warmup_lr': (1e-6, float, 'learning rate at the start of warm-up'),
    'min_lr': (1e-6, float, 'learning rate at the end of the cosine and during cool-down'),
    'cooldown_epochs': (0, int, 'epochs at min_lr after the main schedule'),
    # augmentation and regularisation
    'hflip': (0.5, float, 'horizontal flip probability'),
    'scale': ([0.08, 1.0], 'floats', 'random-resized-crop area range'),
    'ratio': ([0.75, 1.3333333333333333], 'floats', 'random-resized-crop aspect range'),
    'color_jitter': (0.4, float, 'colour jitter (unused when auto_augment is set)'),
    'auto_augment': (None, 'str?', "timm auto-augment policy, e.g. 'rand-m9-mstd0.5-inc1'"),
    'reprob': (0.0, float, 'random erasing probability'),
    'remode': ('pixel', str, 'random erasing mode'),
    'recount': (1, int, 'random erasing count'),
    'mixup': (0.0, float, 'mixup alpha (0: off)'),
    'cutmix': (0.0, float, 'cutmix alpha (0: off)'),
    'mixup_prob': (1.0, float, 'probability of applying mixup or cutmix to a batch'),
    'mixup_switch_prob': (0.5, float, 'probability of cutmix instead of mixup when both are on'),
    'smoothing': (0.0, float, 'label smoothing'),
    'ema_decay': (None, 'float?', 'model EMA decay (off when unset); the EMA weights are evaluated too'),
    # knowledge distillation (on when kd_model or kd_checkpoint is set)
    'kd_model': (None, 'str?', 'teacher: a timm model name; random weights unless --kd-checkpoint is given '
                               '(nothing is downloaded); default with --kd-checkpoint: the model it records'),
    'kd_checkpoint': (None, 'str?', "teacher's weights: any checkpoint dynamixer reads (a run's last.pth, "
                                    'model.safetensors, the authors\' files)'),
    'kd_type': ('logit', str, "'logit' (KL divergence at --kd-temperature) or 'hard' (DeiT: cross-entropy "
                              "against the teacher's argmax)"),
    'kd_temperature': (4.0, float, "softmax temperature of 'logit' distillation"),
    'kd_weight': (0.5, float, 'weight of the distillation loss; the label loss gets 1 - kd_weight'),
    # runtime
    'amp': ('auto', str, "mixed precision: 'auto' (bf16 or fp16 on GPUs, off on CPUs), 'bf16', 'fp16', 'none'"),
    'compile': (False, bool, 'torch.compile the model'),
    'compile_backend': ('inductor', str,
                        "torch.compile backend ('inductor'; 'aot_eager' compiles without code generation)"),
    'device': ('auto', str, "'auto', 'cpu', 'cuda'"),
    'threads': (0, int, 'CPU threads per process (0: all cores / processes per node); 1 is fastest on a busy machine'),
    'seed': (0, int, 'random seed (same seed, same data, same run)'),
    'output': (None, 'str?', 'run folder (default: runs/<recipe>-<model>, numbered if it exists)'),
    'tensorboard': (False, bool, 'also log to TensorBoard (in the run folder)'),
    'save_safetensors': (True, bool, 'write model.safetensors (EMA weights when EMA is on) at the end'),
    'save_rank_weights': (False, bool, 'debug: every process writes its final weights as rank<N>.safetensors'),
    'progress': (True, bool, 'show a progress bar'),
}

DEFAULTS: Dict[str, Any] = {k: v[0] for k, v in OPTIONS.items()}

# The range of every numeric setting (for 'floats' settings: of each number). The command-line
# flags parse with these, and `check_config` checks every config with them (recipes, YAML files,
# a resumed run's settings), so a value out of range never reaches the trainer.
RANGES: Dict[str, Bounded] = {
    'img_size': positive_int,
    'body_lr_scale': non_negative_float,
    'drop_path': unit_interval,
    'num_train': positive_int,
    'num_val': positive_int,
    'canvas': positive_int,
    'align': positive_int,
    'data_seed': non_negative_int,
    'workers': non_negative_int,
    'epochs': positive_int,
    'batch_size': positive_int,
    'grad_accum': positive_int,
    'val_batch_size': non_negative_int,
    'lr': positive_float,
    'weight_decay': non_negative_float,
    'momentum': probability,
    'opt_eps': positive_float,
    'opt_betas': unit_interval,
    'clip_grad': positive_float,
    'warmup_epochs': non_negative_int,
    'warmup_lr': non_negative_float,
    'min_lr': non_negative_float,
    'cooldown_epochs': non_negative_int,
    'hflip': probability,
    'scale': Bounded(float, 0, 1, exclusive=True),
    'ratio': positive_float,
    'color_jitter': non_negative_float,
    'reprob': probability,
    'recount': positive_int,
    'mixup': non_negative_float,
    'cutmix': non_negative_float,
    'mixup_prob': probability,
    'mixup_switch_prob': probability,
    'smoothing': unit_interval,
    'ema_decay': probability,
    'kd_temperature': positive_float,
    'kd_weight': probability,
    'threads': non_negative_int,
    'seed': non_negative_int,
}

KD_TYPES = ('logit', 'hard')  # knowledge distillation losses (`dynamixer.distill`)

# The paper's ImageNet-1K recipe (spec section 5), one per size: identical except batch and drop-path.
_IMAGENET = dict(
    dataset='', epochs=300, opt='adamw', lr=2e-3, weight_decay=0.05, sched='cosine',
    warmup_epochs=20, warmup_lr=1e-6, min_lr=1e-5, cooldown_epochs=10,
    hflip=0.5, auto_augment='rand-m9-mstd0.5-inc1', reprob=0.25, remode='pixel',
    mixup=0.8, cutmix=1.0, smoothing=0.1, ema_decay=0.99996, clip_grad=None, amp='auto',
    workers=8, bad_images='skip',
)

RECIPES: Dict[str, Dict[str, Any]] = {
    # The embedded default: dynamixer_nano on scikit-learn's 8x8 digits upsampled to 16x16 (4x4 then
    # 2x2 tokens). At 16x16 a step costs 2.4x less than at 32x32 and it learns faster (97% in 6 epochs;
    # at 32x32, 8 epochs give 94.4%): the run fits a busy 2-core machine. --img-size 32 works too.
    'digits': dict(
        model='dynamixer_nano', dataset='digits', img_size=16, epochs=6, batch_size=16, opt='adamw', lr=2e-3,
        weight_decay=0.05, sched='cosine', warmup_epochs=0, min_lr=1e-5, hflip=0.0,
        scale=[0.85, 1.0], ratio=[0.9, 1.1], color_jitter=0.0, smoothing=0.1, workers=0, threads=1,
    ),
    'imagenet-s': dict(_IMAGENET, model='dynamixer_s', batch_size=2048, drop_path=0.1),
    'imagenet-m': dict(_IMAGENET, model='dynamixer_m', batch_size=1024, drop_path=0.1),
    'imagenet-l': dict(_IMAGENET, model='dynamixer_l', batch_size=512, drop_path=0.3),
    # Transfer learning (spec section 5; 'momentum' is timm's plain SGD with momentum, 'sgd' is
    # Nesterov): pretrained body at 0.01x the head's lr, new head, 224x224.
    'transfer': dict(
        model='dynamixer_s', img_size=224, new_head=True, body_lr_scale=0.01, opt='momentum', lr=0.01,
        momentum=0.9, weight_decay=5e-4, batch_size=128, epochs=60, sched='cosine',
        warmup_epochs=0, min_lr=0.0, hflip=0.5,
    ),
    # Training from scratch on a small folder of images on a laptop (nano, 32x32).
    'scratch': dict(
        model='dynamixer_nano', epochs=30, batch_size=64, opt='adamw', lr=1e-3, weight_decay=0.05,
        warmup_epochs=1, min_lr=1e-5, smoothing=0.1, auto_augment='rand-m9-mstd0.5-inc1',
    ),
}


def get_recipe(name: str) -> Dict[str, Any]:
    """A copy of the named recipe, merged over the defaults."""
    if name not in RECIPES:
        close = difflib.get_close_matches(name, list(RECIPES), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ''
        raise ConfigError(f"unknown recipe '{name}'; choose one of: {', '.join(RECIPES)}.{hint}")
    config = copy.deepcopy(DEFAULTS)
    config.update(copy.deepcopy(RECIPES[name]))
    return config


def _coerce(key: str, value: Any, source: str) -> Any:
    """Check and convert one setting's value to the type OPTIONS declares for it."""
    kind = OPTIONS[key][1]
    if (isinstance(kind, str) and kind.endswith('?') and isinstance(value, str)
            and value.lower() in ('none', 'null', '')):
        value = None  # lets the command line switch off a setting a recipe turns on
    if value is None:
        if isinstance(kind, str) and kind.endswith('?'):
            return None
        raise ConfigError(f"{source}: '{key}' may not be empty")
    base = kind.rstrip('?') if isinstance(kind, str) else kind
    try:
        if base == 'dict':
            if isinstance(value, str):
                value = json.loads(value)
            if not isinstance(value, dict):
                raise TypeError('expected a mapping, e.g. {"mixing": "static"}')
            return dict(value)
        if base in ('floats',):
            if not isinstance(value, (list, tuple)):
                raise TypeError('expected a list of numbers')
            return [float(v) for v in value]
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ('true', 'false', 'yes', 'no', '1', '0'):
                return value.lower() in ('true', 'yes', '1')
            raise TypeError('expected true or false')
        if base in ('int', int):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError('expected an integer')
            return int(value)
        if base in ('float', float):
            if isinstance(value, bool):
                raise TypeError('expected a number')
            return float(value)
        if base in ('str', str):
            if not isinstance(value, (str, int, float)):
                raise TypeError('expected a string')
            return str(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: bad value {value!r} for '{key}' ({e})") from None
    raise AssertionError(kind)


def _check_range(key: str, value: Any, source: str) -> None:
    """ConfigError when a numeric setting (each number of a list) is outside RANGES[key]."""
    bounded = RANGES.get(key)
    if bounded is None or value is None:
        return
    for v in (value if isinstance(value, (list, tuple)) else [value]):
        problem = bounded.check(v)
        if problem:
            raise ConfigError(f"{source}: '{key}' (--{key.replace('_', '-')}) {problem}")


def load_yaml(path: str) -> Dict[str, Any]:
    """Settings from a YAML file (a mapping of setting name -> value)."""
    if not os.path.isfile(path):
        raise ConfigError(f'config file not found: {path}')
    with open(path) as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f'{path}: not valid YAML ({e})') from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f'{path}: expected a mapping of setting: value, found {type(data).__name__}')
    return data


def resolve_config(
        recipe: str = 'digits',
        yaml_file: Optional[str] = None,
        overrides: Optional[Mapping[str, Any]] = None,
        base: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Any]:
    """Defaults < recipe (or `base`, e.g. a resumed run's config) < YAML file < overrides."""
    if base is not None:
        config = copy.deepcopy(DEFAULTS)
        config.update(copy.deepcopy(dict(base)))
    else:
        config = get_recipe(recipe)
    layers: List[Tuple[str, Mapping[str, Any]]] = []
    if yaml_file:
        layers.append((yaml_file, load_yaml(yaml_file)))
    if overrides:
        layers.append(('command line', overrides))
    for source, values in layers:
        for key, value in values.items():
            key = key.replace('-', '_')
            if key in ('recipe',):
                continue
            if key not in OPTIONS:
                close = difflib.get_close_matches(key, list(OPTIONS), n=1)
                hint = f" Did you mean '{close[0]}'?" if close else ''
                raise ConfigError(f"{source}: unknown setting '{key}'.{hint}")
            config[key] = _coerce(key, value, source)
            _check_range(key, config[key], source)
    config['recipe'] = recipe
    check_config(config)
    return config


def check_config(config: Mapping[str, Any]) -> None:
    """Value checks that do not need the data or the device."""
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)
    for key in RANGES:
        _check_range(key, config.get(key), 'settings')
    need(config['bad_images'] in ('skip', 'error', 'off'),
         f"bad_images must be 'skip', 'error' or 'off', got {config['bad_images']!r}")
    need(config['amp'] in ('auto', 'bf16', 'fp16', 'none'),
         f"amp must be 'auto', 'bf16', 'fp16' or 'none', got {config['amp']!r}")
    need(config['clip_mode'] in ('norm', 'value', 'agc'),
         f"clip_mode must be 'norm', 'value' or 'agc', got {config['clip_mode']!r}")
    need(config['remode'] in ('pixel', 'rand', 'const'),
         f"remode (random erasing) must be 'pixel', 'rand' or 'const', got {config['remode']!r}")
    need(len(config['scale']) == 2 and len(config['ratio']) == 2, 'scale and ratio take two numbers each')
    for key in ('scale', 'ratio'):
        need(config[key][0] <= config[key][1], f'{key} is a range (low high); got {config[key]}')
    need(config['kd_type'] in KD_TYPES, f"kd_type must be one of {', '.join(map(repr, KD_TYPES))}, "
                                        f"got {config['kd_type']!r}")
    need(config['opt_betas'] is None or len(config['opt_betas']) == 2,
         f"opt_betas takes two numbers; got {config['opt_betas']}")


# ---- command line -------------------------------------------------------------------------------

def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One --flag per setting, default None so that only flags given on the command line override."""
    group = parser.add_argument_group('settings (override the recipe and --config; see --print-config)')
    for key, (default, kind, help_text) in OPTIONS.items():
        flag = '--' + key.replace('_', '-')
        base = kind.rstrip('?') if isinstance(kind, str) else kind
        text = f'{help_text} [default: {default}]'
        if base is bool:
            group.add_argument(flag, dest=key, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif base == 'floats':
            group.add_argument(flag, dest=key, type=RANGES.get(key, float), nargs='+', default=None, metavar='X',
                               help=text)
        else:
            # numbers parse with their range (a number setting without one stays a bare type, which
            # tests/test_user_errors.py refuses); 'none' switches off an optional one
            conv = RANGES.get(key) or {'int': int, int: int, 'float': float, float: float}.get(base, str)
            if isinstance(kind, str) and kind.endswith('?') and conv is not str and key in RANGES:
                conv = OrWord(conv, 'none')  # type: ignore[arg-type,assignment]  # a RANGES entry: a Bounded
            group.add_argument(flag, dest=key, type=conv, default=None, help=text)


def config_overrides(args: argparse.Namespace) -> Dict[str, Any]:
    """The settings given explicitly on the command line."""
    return {k: getattr(args, k) for k in OPTIONS if getattr(args, k, None) is not None}

"""Transforms: the one evaluation transform (from a model, or from the preprocessing config an
export writes next to its file) and the training transform of a recipe. Every image is converted
to 8-bit RGB first, whatever its mode."""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

from .images import to_rgb

__all__ = ['eval_transform', 'preprocessing_transform', 'build_transforms', 'model_img_size']


class _WithRGB:
    """Convert to 8-bit RGB first (picklable, for data-loader workers)."""

    def __init__(self, transform: Callable):
        self.transform = transform

    def __call__(self, img: Any) -> Any:
        return self.transform(to_rgb(img) if isinstance(img, Image.Image) else img)

    def __repr__(self) -> str:
        return f'ToRGB + {self.transform!r}'


def model_img_size(model: torch.nn.Module, img_size: Optional[int] = None) -> Tuple[int, int]:
    """(H, W): `img_size` when given, else the size the model was built for."""
    if img_size:
        return (img_size, img_size)
    timm_model: Any = model  # timm keeps the config in plain attributes
    size = getattr(model, 'img_size', None) or timm_model.pretrained_cfg['input_size'][-2:]
    return tuple(size) if isinstance(size, (tuple, list)) else (size, size)


def preprocessing_transform(config: Dict[str, Any]) -> Callable:
    """timm's eval transform (RGB, resize by crop_pct, centre crop, normalise) for a preprocessing
    config (input_size, mean, std, crop_pct, crop_mode, interpolation), e.g. an export's JSON."""
    return _WithRGB(create_transform(
        input_size=tuple(config['input_size']), is_training=False, mean=tuple(config['mean']),
        std=tuple(config['std']), crop_pct=config['crop_pct'], crop_mode=config.get('crop_mode', 'center'),
        interpolation=config['interpolation']))


def eval_transform(model: torch.nn.Module, img_size: Optional[int] = None) -> Callable:
    """The model's evaluation transform (resize by crop_pct, centre crop, normalise) from its
    pretrained config, for images of any mode. (C, H, W) tensors out."""
    args = {'img_size': img_size} if img_size else {}
    cfg = resolve_data_config(args, model=model)
    cfg['input_size'] = (3, *model_img_size(model, img_size))
    return preprocessing_transform(cfg)


def build_transforms(config: Dict[str, Any], model: torch.nn.Module) -> Tuple[Optional[Callable], Optional[Callable]]:
    """(train transform, eval transform) from the config and the model's pretrained config.

    The left-digit canvases are tensors, normalised by their data set, and flips would swap the
    label: no transforms (None, None)."""
    if config.get('dataset') == 'left-digit':
        return None, None
    cfg = resolve_data_config({}, model=model)
    size = model_img_size(model, config['img_size'])
    train_tf = create_transform(
        input_size=(3, *size), is_training=True, scale=tuple(config['scale']), ratio=tuple(config['ratio']),
        hflip=config['hflip'], vflip=0.0, color_jitter=config['color_jitter'] or None,  # type: ignore[arg-type]  # timm: None = off
        auto_augment=config['auto_augment'], interpolation=cfg['interpolation'],
        mean=cfg['mean'], std=cfg['std'], re_prob=config['reprob'], re_mode=config['remode'],
        re_count=config['recount'])
    return _WithRGB(train_tf), eval_transform(model, config['img_size'])

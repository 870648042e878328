"""A multi-scale feature pyramid on a DynaMixer (or any timm) trunk, for torchvision's detectors.

DynaMixer has maps at two strides only (dynamixer_s: 7 and 14; dynamixer_nano: 4 and 8), while
detection heads expect a pyramid of maps at doubling strides. `pyramid_backbone` builds one of two
pyramids on the trunk's ``features_only`` maps:

- ``'fpn'``: torchvision's FeaturePyramidNetwork over the last map of every distinct stride,
  topped up with stride-2 3x3 convolutions and a max-pool level (as in torchvision's ResNet-FPN);
- ``'simple'``: the plain pyramid of ViTDet (Li et al., 2022): every level is made from the last
  stage alone, by 2x transposed convolutions (finer levels) or 2x max-pooling (coarser levels),
  then a 1x1 and a 3x3 convolution with GroupNorm.

Both return ``OrderedDict`` maps named '0', '1', ... and 'pool' with ``out_channels`` channels at
strides s, 2s, 4s, ... (s = the trunk's finest stride), which is what torchvision's FasterRCNN,
RetinaNet and MaskRCNN expect from a backbone (their default anchor generators want 5 levels).
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import DynaMixerError, UsageError, require
from ..files import read_checkpoint
from ..grids import token_grids
from ..layout import unwrap_state_dict
from ..model import MODEL_ARGS

__all__ = ['DenseError', 'PyramidBackbone', 'pyramid_backbone', 'detector_kwargs', 'PYRAMIDS']

PYRAMIDS = ('fpn', 'simple')
SizeLike = Union[int, Tuple[int, int]]


class DenseError(UsageError):
    """A mistake in building or feeding a dense-prediction model (a DynaMixerError and a
    ValueError): the message says what to do."""


def _pair(size: SizeLike) -> Tuple[int, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        return size, size
    try:
        h, w = size
        return int(h), int(w)
    except (TypeError, ValueError):
        raise DenseError(f'img_size must be an int or a pair (height, width); got {size!r}') from None


def _is_dynamixer(model_name: str) -> bool:
    return model_name in MODEL_ARGS


def _build_trunk(model_name: str, img_size: Tuple[int, int], pretrained_file: Optional[str],
                 in_chans: int, model_kwargs: Dict[str, Any]) -> nn.Module:
    """timm features_only trunk; DynaMixer weights of another size are resampled on load."""
    kwargs = dict(model_kwargs, features_only=True, in_chans=in_chans)
    if _is_dynamixer(model_name):
        kwargs['img_size'] = img_size
    if pretrained_file is not None:
        # num_classes=0: no classifier to fill, so a checkpoint with any head loads (timm drops the
        # classifier named by the model's pretrained_cfg, DynaMixer's included)
        kwargs.update(pretrained=True, num_classes=0,
                      pretrained_cfg_overlay=dict(state_dict=_trunk_weights(pretrained_file)))
    try:
        return timm.create_model(model_name, **kwargs)
    except RuntimeError as e:
        if 'Unknown model' in str(e):
            raise DenseError(f'unknown model {model_name!r}: pass a DynaMixer name '
                             f'(dynamixer.list_models()) or any timm model with features_only') from None
        if pretrained_file is None:
            raise
        # weights that do not fit: torch's size mismatch for other trunks, DynaMixer's
        # WeightsMismatchError (also a RuntimeError; it names the variant the weights fit)
        raise DenseError(f'{pretrained_file}: the weights do not fit {model_name}: {e}') from None
    except DynaMixerError:
        raise
    except ValueError as e:
        if pretrained_file is None:
            raise DenseError(str(e)) from None
        # another ValueError from building the trunk with these weights
        raise DenseError(f'{pretrained_file}: cannot build the {model_name} backbone from it: {e}') from None


def _trunk_weights(path: str) -> Dict[str, torch.Tensor]:
    """A checkpoint's weights, read safely (files.read_checkpoint: no pickled code), EMA weights
    first, 'module.' stripped (layout.unwrap_state_dict); for DynaMixer the filter then converts
    the authors' layout and resamples."""
    weights = unwrap_state_dict(read_checkpoint(path))
    return {k: v for k, v in weights.items() if isinstance(v, torch.Tensor)}


def _pyramid_inputs(reductions: Sequence[int]) -> List[int]:
    """Index of the last stage of every distinct stride (the finest map of each scale)."""
    keep: List[int] = []
    for i, r in enumerate(reductions):
        if keep and reductions[keep[-1]] == r:
            keep[-1] = i
        else:
            keep.append(i)
    return keep


def _gn(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


class _FPN(nn.Module):
    """FPN over the trunk's maps: list of (B, C_i, H_i, W_i) -> OrderedDict of num_levels maps.

    torchvision's FeaturePyramidNetwork, then (as its ResNet-FPN's P6/P7 and max-pool blocks)
    stride-2 3x3 convs on the last map until num_levels - 1 maps, and a max-pool level 'pool'."""

    def __init__(self, in_channels: Sequence[int], out_channels: int, num_levels: int):
        super().__init__()
        ops = require('torchvision.ops', 'dense', 'the FPN pyramid')
        extra = num_levels - 1 - len(in_channels)
        if extra < 0:
            raise DenseError(f'num_levels={num_levels} is fewer than the trunk\'s {len(in_channels)} scales + 1; '
                             f'use num_levels={len(in_channels) + 1} or more')
        self.fpn = ops.FeaturePyramidNetwork(list(in_channels), out_channels)
        self.extra = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1) for _ in range(extra))

    def forward(self, feats: List[torch.Tensor]) -> 'OrderedDict[str, torch.Tensor]':
        out = self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))
        x = out[str(len(feats) - 1)]
        for i, conv in enumerate(self.extra):
            x = conv(F.relu(x) if i else x)
            out[str(len(out))] = x
        out['pool'] = F.max_pool2d(x, kernel_size=1, stride=2)
        return out


class _SimplePyramid(nn.Module):
    """ViTDet's simple pyramid from the last map (B, C, H, W) at stride s_last: levels at strides
    s_last * 2^k for k = -num_up .. num_levels - num_up - 2, plus a max-pool level."""

    def __init__(self, in_channels: int, out_channels: int, num_up: int, num_levels: int):
        super().__init__()
        self.scales = nn.ModuleList()
        for k in range(-num_up, num_levels - num_up - 1):
            layers: List[nn.Module] = []
            c = in_channels
            for j in range(-k):  # 2x up per step, halving the width, norm + GELU between (as ViTDet)
                if j:
                    layers += [_gn(c), nn.GELU()]
                layers.append(nn.ConvTranspose2d(c, max(c // 2, 16), 2, stride=2))
                c = max(c // 2, 16)
            layers += [nn.MaxPool2d(2) for _ in range(k)]
            layers += [nn.Conv2d(c, out_channels, 1, bias=False), _gn(out_channels),
                       nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), _gn(out_channels)]
            self.scales.append(nn.Sequential(*layers))

    def forward(self, feats: List[torch.Tensor]) -> 'OrderedDict[str, torch.Tensor]':
        x = feats[-1]
        out = OrderedDict((str(i), scale(x)) for i, scale in enumerate(self.scales))
        out['pool'] = F.max_pool2d(out[str(len(self.scales) - 1)], kernel_size=1, stride=2)
        return out


class PyramidBackbone(nn.Module):
    """Images (B, in_chans, H, W) -> OrderedDict of (B, out_channels, H / s_i, W / s_i) maps.

    Attributes: ``out_channels`` (what torchvision's detectors read), ``strides`` (one per map, in
    order), ``names`` (the dict keys), ``img_size`` (H, W) and ``fixed_size`` (whether the trunk
    takes only that size: true for DynaMixer, whose mixing weights are shaped by the token grid).
    """

    def __init__(self, trunk: nn.Module, model_name: str, img_size: Tuple[int, int], out_channels: int,
                 pyramid: str, num_levels: int, fixed_size: bool):
        super().__init__()
        if pyramid not in PYRAMIDS:
            raise DenseError(f"pyramid must be one of {PYRAMIDS}; got {pyramid!r}")
        if num_levels < 2:
            raise DenseError(f'num_levels must be at least 2; got {num_levels}')
        self.body = trunk
        self.model_name = model_name
        self.img_size = img_size
        self.fixed_size = fixed_size
        self.pyramid = pyramid
        self.out_channels = out_channels
        reductions = list(trunk.feature_info.reduction())
        channels = list(trunk.feature_info.channels())
        self.take = _pyramid_inputs(reductions)
        base, last = reductions[self.take[0]], reductions[self.take[-1]]
        if pyramid == 'fpn':
            self.neck: nn.Module = _FPN([channels[i] for i in self.take], out_channels, num_levels)
        else:
            num_up = round(math.log2(last / base))
            if 2 ** num_up * base != last:
                raise DenseError(f'the simple pyramid needs power-of-2 stride ratios; {model_name} has strides '
                                 f'{reductions}. Use pyramid="fpn".')
            self.neck = _SimplePyramid(channels[-1], out_channels, num_up, num_levels)
        self.strides = [base * 2 ** i for i in range(num_levels)]
        self.names = [str(i) for i in range(num_levels - 1)] + ['pool']

    def check_input(self, x: torch.Tensor) -> None:
        """Raise DenseError unless x is a batch of images of the backbone's size (fixed-size trunks)."""
        if x.dim() != 4:
            raise DenseError(f'expected images (B, C, H, W); got a tensor of shape {list(x.shape)}')
        if self.fixed_size and tuple(x.shape[-2:]) != tuple(self.img_size):
            h, w = self.img_size
            raise DenseError(
                f'this {self.model_name} pyramid backbone was built for {h}x{w} images (its mixing weights '
                f'are shaped by the token grid); got {x.shape[-2]}x{x.shape[-1]}. Either build it for that '
                f'size: pyramid_backbone({self.model_name!r}, img_size=({x.shape[-2]}, {x.shape[-1]}), ...) '
                f'(sizes must be multiples of the trunk\'s largest stride; trained weights are resampled), '
                f'or make the detector resize every image to {h}x{w}: pass '
                f'**dynamixer.dense.detector_kwargs(backbone) (= min_size={min(h, w)}, max_size={max(h, w)}, '
                f'fixed_size=({w}, {h}), size_divisible=1) to FasterRCNN / RetinaNet / MaskRCNN.')

    def forward(self, x: torch.Tensor) -> 'OrderedDict[str, torch.Tensor]':
        self.check_input(x)
        feats = self.body(x)
        return self.neck([feats[i] for i in self.take])


def pyramid_backbone(
        model_name: str,
        img_size: Optional[SizeLike] = None,
        out_channels: int = 256,
        pretrained_file: Optional[Union[str, os.PathLike]] = None,
        pyramid: str = 'fpn',
        num_levels: int = 5,
        in_chans: int = 3,
        **model_kwargs: Any,
) -> PyramidBackbone:
    """A feature-pyramid backbone for torchvision's FasterRCNN / RetinaNet / MaskRCNN.

    Args:
        model_name: a DynaMixer model (dynamixer.list_models()) or any timm model that supports
            ``features_only`` (maps of stride < 4 are not used).
        img_size: (H, W) or an int; the input size the backbone takes. DynaMixer models are built
            for this one size (default: the model's own, e.g. 224, or 32 for dynamixer_nano).
        out_channels: channels of every pyramid map.
        pretrained_file: classification weights for the trunk: this project's checkpoints, the
            authors' checkpoints ('state_dict' / 'state_dict_ema', 'module.'), bare state dicts or
            safetensors. Weights trained at another input size are resampled to `img_size`; the
            classifier is dropped.
        pyramid: 'fpn' (FPN over the stages, default: better on the digits benchmark, see
            docs/dense.md) or 'simple' (ViTDet-style from the last stage).
        num_levels: number of maps (default 5, as torchvision's default anchor generators expect).
        in_chans: image channels.
        **model_kwargs: passed to timm.create_model (e.g. drop_path_rate).

    Returns a PyramidBackbone: (B, in_chans, H, W) -> OrderedDict {'0': stride s, '1': 2s, ...,
    'pool': 2^(num_levels-1) s} of (B, out_channels, H / stride, W / stride) maps.
    """
    if img_size is None:
        if _is_dynamixer(model_name):
            cfg = timm.models.get_pretrained_cfg(model_name)
            img_size = tuple(cfg.input_size[1:]) if cfg is not None else 224
        else:
            img_size = 224
    size = _pair(img_size)
    if _is_dynamixer(model_name):
        args = dict(MODEL_ARGS[model_name], **model_kwargs)
        try:
            token_grids(size, args.get('patch_size', 7), args['downsamples'])
        except ValueError as e:
            raise DenseError(f'{model_name} pyramid backbone: {e}') from None
    elif 'out_indices' not in model_kwargs:
        # stride-2 stem maps are too fine for a pyramid and the costliest to compute: leave them out
        try:
            with torch.device('meta'):
                probe = timm.create_model(model_name, features_only=True, in_chans=in_chans, **model_kwargs)
        except RuntimeError as e:
            raise DenseError(f'unknown model {model_name!r}: pass a DynaMixer name (dynamixer.list_models()) '
                             f'or any timm model with features_only ({e})') from None
        info = probe.feature_info
        model_kwargs = dict(model_kwargs, out_indices=tuple(
            i for i, r in zip(info.out_indices, info.reduction()) if r >= 4))
    trunk = _build_trunk(model_name, size, None if pretrained_file is None else os.fspath(pretrained_file),
                         in_chans, model_kwargs)
    return PyramidBackbone(trunk, model_name, size, out_channels, pyramid, num_levels,
                           fixed_size=_is_dynamixer(model_name))


def detector_kwargs(backbone: PyramidBackbone) -> Dict[str, Any]:
    """Arguments for torchvision's FasterRCNN / RetinaNet / MaskRCNN so that their
    GeneralizedRCNNTransform resizes every image to the backbone's (H, W) and does not pad it:
    ``dict(min_size=min(H, W), max_size=max(H, W), fixed_size=(W, H), size_divisible=1)``.
    (torchvision's fixed_size is (width, height).) Predictions come back in the input images' size."""
    h, w = backbone.img_size
    return dict(min_size=min(h, w), max_size=max(h, w), fixed_size=(w, h), size_divisible=1)

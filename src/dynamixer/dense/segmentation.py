"""Semantic segmentation on the feature pyramid: a light Semantic-FPN head, per-pixel logits.

The head (after Kirillov et al.'s Panoptic FPN semantic branch, lightened) takes the pyramid's
finest `num_levels` maps, gives each a 3x3 conv + GroupNorm + ReLU, upsamples them to the finest
map's size and sums them; a 1x1 conv gives class logits, bilinearly upsampled to the input size.
"""
from __future__ import annotations

import math
import os
from typing import Any, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbone import PyramidBackbone, SizeLike, pyramid_backbone

__all__ = ['SemanticHead', 'SegmentationModel', 'segmentation_model']


class SemanticHead(nn.Module):
    """Pyramid maps {'0': (B, C, H0, W0), '1': ...} -> logits (B, num_classes, H0, W0)."""

    def __init__(self, in_channels: int, num_classes: int, num_levels: int = 3, channels: int = 64):
        super().__init__()
        self.num_levels = num_levels
        self.convs = nn.ModuleList(nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),
            nn.GroupNorm(math.gcd(32, channels), channels), nn.ReLU(inplace=True)) for _ in range(num_levels))
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: 'dict[str, torch.Tensor]') -> torch.Tensor:
        maps = list(feats.values())[:self.num_levels]
        size = maps[0].shape[-2:]
        x = self.convs[0](maps[0])
        for conv, f in zip(self.convs[1:], maps[1:]):
            x = x + F.interpolate(conv(f), size=size, mode='bilinear', align_corners=False)
        return self.classifier(x)


class SegmentationModel(nn.Module):
    """Images (B, C, H, W) -> per-pixel class logits (B, num_classes, H, W)."""

    def __init__(self, backbone: PyramidBackbone, num_classes: int, num_levels: int = 3, channels: int = 64):
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.head = SemanticHead(backbone.out_channels, num_classes, min(num_levels, len(backbone.names)), channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.backbone(x))
        return F.interpolate(logits, size=x.shape[-2:], mode='bilinear', align_corners=False)


def segmentation_model(
        model_name: str,
        num_classes: int,
        img_size: Optional[SizeLike] = None,
        out_channels: int = 128,
        pretrained_file: Optional[Union[str, os.PathLike]] = None,
        pyramid: str = 'fpn',
        head_levels: int = 3,
        head_channels: int = 64,
        **kwargs: Any,
) -> SegmentationModel:
    """A semantic segmentation model: pyramid_backbone(model_name, ...) + SemanticHead.

    Arguments as `pyramid_backbone` (kwargs go to it), plus the number of classes (background
    included), how many of the finest pyramid levels the head reads and its width. The model
    maps (B, in_chans, *img_size) images to (B, num_classes, *img_size) logits; train it with
    cross-entropy against (B, H, W) int64 labels.
    """
    backbone = pyramid_backbone(model_name, img_size=img_size, out_channels=out_channels,
                                pretrained_file=pretrained_file, pyramid=pyramid, **kwargs)
    return SegmentationModel(backbone, num_classes, head_levels, head_channels)

"""Augmentation for dense tasks with torchvision.transforms.v2, so that boxes and masks follow the
image: horizontal flip, then scale jitter and crop in one (a random crop of `crop_scale` of the
area and an aspect ratio in [3/4, 4/3], resized to the model's input size), then for detection the
boxes that the crop emptied are dropped with their labels and masks (SanitizeBoundingBoxes).

Detection items are (image (3, H, W) float, target dict with 'boxes' x1 y1 x2 y2 and optional
'masks'); segmentation items are (image, mask (H, W) int64). The transforms return plain tensors.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Sequence, Tuple

import torch

__all__ = ['detection_train_transform', 'segmentation_train_transform', 'segmentation_eval_transform']


def _v2():
    from torchvision import tv_tensors  # torchvision: the 'dense' extra
    from torchvision.transforms import v2
    return v2, tv_tensors


def _crop(v2: Any, size: Tuple[int, int], crop_scale: Sequence[float]) -> Any:
    if tuple(crop_scale) == (1.0, 1.0):
        return v2.Resize(size, antialias=True)
    return v2.RandomResizedCrop(size, scale=tuple(crop_scale), ratio=(3 / 4, 4 / 3), antialias=True)


class _DetectionTransform:
    """(image, target) through a v2 pipeline with boxes (and masks) as tv_tensors; plain tensors out.
    A class rather than a closure, so that DataLoader workers started by 'spawn' can pickle it."""

    def __init__(self, pipeline: Any):
        self.pipeline = pipeline

    def __call__(self, image: torch.Tensor, target: Dict[str, torch.Tensor]):
        _, tv = _v2()
        h, w = image.shape[-2:]
        t = dict(target, boxes=tv.BoundingBoxes(target['boxes'], format='XYXY', canvas_size=(h, w)))
        if 'masks' in t:
            t['masks'] = tv.Mask(t['masks'])
        image, t = self.pipeline(tv.Image(image), t)
        out = {k: (v.as_subclass(torch.Tensor) if isinstance(v, torch.Tensor) else v) for k, v in t.items()}
        return image.as_subclass(torch.Tensor), out


class _SegmentationTransform:
    """(image, mask) through a v2 pipeline (`mask_too`: the mask as a tv_tensors.Mask, else kept)."""

    def __init__(self, pipeline: Any, mask_too: bool = True):
        self.pipeline, self.mask_too = pipeline, mask_too

    def __call__(self, image: torch.Tensor, mask: torch.Tensor):
        _, tv = _v2()
        if not self.mask_too:
            return self.pipeline(tv.Image(image)).as_subclass(torch.Tensor), mask
        image, mask = self.pipeline(tv.Image(image), tv.Mask(mask))
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)


def detection_train_transform(size: Tuple[int, int], hflip: float = 0.5,
                              crop_scale: Sequence[float] = (0.5, 1.0)) -> Callable:
    """(image, target) -> (image (3, *size), target) with boxes (and masks) moved along; boxes
    smaller than a pixel after the crop are dropped with their labels and masks."""
    v2, _ = _v2()
    ops = [v2.RandomHorizontalFlip(hflip)] if hflip > 0 else []
    ops += [_crop(v2, size, crop_scale), v2.SanitizeBoundingBoxes(min_size=1)]
    return _DetectionTransform(v2.Compose(ops))


def segmentation_train_transform(size: Tuple[int, int], hflip: float = 0.5,
                                 crop_scale: Sequence[float] = (0.5, 1.0)) -> Callable:
    """(image, mask) -> (image (3, *size), mask (*size)); the mask is resized by nearest neighbour."""
    v2, _ = _v2()
    ops = [v2.RandomHorizontalFlip(hflip)] if hflip > 0 else []
    return _SegmentationTransform(v2.Compose(ops + [_crop(v2, size, crop_scale)]))


def segmentation_eval_transform(size: Tuple[int, int]) -> Callable:
    """(image, mask) -> (image resized to `size`, mask unchanged): scores are taken at the
    label's own resolution (the logits are resized back)."""
    v2, _ = _v2()
    return _SegmentationTransform(v2.Resize(size, antialias=True), mask_too=False)

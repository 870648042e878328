"""Training tasks for `engine.train_one_epoch` (timm.task's interface): a batch in, a loss dict out.

- `DetectionTask`: torchvision's detectors compute their own losses in training mode; the task
  sums them (``loss``) and passes the parts on (``loss_classifier``, ``loss_box_reg``, ...).
- `SegmentationTask`: per-pixel cross-entropy of the logits against class-index masks, pixels at
  the ignore index left out.

`build_dense_model(settings, num_classes)` builds the model a dense run's settings describe.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.task import TrainingTask

from .backbone import pyramid_backbone
from .detectors import DETECTORS, build_detector
from .segmentation import SegmentationModel

__all__ = ['DetectionTask', 'SegmentationTask', 'build_dense_model']


class _ModelTask(TrainingTask):
    """A task around one trainable model (DDP-wrapped by `prepare_distributed`)."""

    def __init__(self, model: nn.Module, device: Optional[torch.device] = None):
        super().__init__(device=device, verbose=False)
        self.trainable_module = model

    def prepare_distributed(self, device_ids: Optional[list] = None, **ddp_kwargs: Any) -> '_ModelTask':
        self.trainable_module = nn.parallel.DistributedDataParallel(self.trainable_module, device_ids=device_ids,
                                                                    **ddp_kwargs)
        return self


class DetectionTask(_ModelTask):
    """(list of images (3, H, W), list of target dicts) -> dict(loss=sum of the detector's losses, **losses)."""

    # a detection batch is lists, not the (B, ...) tensors timm's TrainingTask.forward declares
    def forward(self, images: List[torch.Tensor],  # type: ignore[override]
                targets: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        losses = self.trainable_module(list(images), list(targets))
        return dict(loss=sum(losses.values()), **losses)


class SegmentationTask(_ModelTask):
    """(images (B, 3, H, W), masks (B, H, W) int64) -> dict(loss=cross-entropy, output=logits)."""

    def __init__(self, model: nn.Module, ignore_index: int = 255, device: Optional[torch.device] = None):
        super().__init__(model, device)
        self.ignore_index = ignore_index

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> Dict[str, torch.Tensor]:
        logits = self.trainable_module(images)
        return dict(loss=F.cross_entropy(logits.float(), masks, ignore_index=self.ignore_index), output=logits)


def build_dense_model(settings: Dict[str, Any], num_classes: int, pretrained: bool = True) -> nn.Module:
    """The detector (settings['detector'] in DETECTORS) or segmentation model (settings['task'] ==
    'segment') on pyramid_backbone(settings['model'], img_size, out_channels, pyramid, and the
    classification weights settings['pretrained_file'] when `pretrained`). `num_classes` counts the
    background: torchvision's detectors take K + 1, the segmenter K (its class 0 is whatever the
    masks say, usually background)."""
    size = settings.get('img_size')
    size = None if not size else (size[0], size[-1]) if isinstance(size, (list, tuple)) else size
    backbone = pyramid_backbone(settings['model'], img_size=size, out_channels=settings['out_channels'],
                                pyramid=settings['pyramid'],
                                pretrained_file=settings.get('pretrained_file') if pretrained else None)
    if settings['task'] == 'segment':
        return SegmentationModel(backbone, num_classes, channels=settings.get('head_channels', 64))
    assert settings['detector'] in DETECTORS
    return build_detector(settings['detector'], backbone, num_classes)

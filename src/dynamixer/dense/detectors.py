"""torchvision's FasterRCNN, RetinaNet and MaskRCNN on a `PyramidBackbone`, sized for small images."""
from __future__ import annotations

from typing import Any, Dict

import torch.nn as nn

from ..errors import require
from .backbone import DenseError, PyramidBackbone, detector_kwargs

__all__ = ['DETECTORS', 'build_detector']

DETECTORS = ('fasterrcnn', 'retinanet', 'maskrcnn')


def build_detector(kind: str, backbone: PyramidBackbone, num_classes: int, **kwargs: Any) -> nn.Module:
    """torchvision FasterRCNN / RetinaNet / MaskRCNN on `backbone`, sized for small images.

    The transform resizes to the backbone's input size (detector_kwargs); anchors are 2x each
    level's stride (3 scales per octave for RetinaNet), aspect ratios 0.5, 1, 2; 100 detections per
    image (what COCO mAP scores). The two-stage detectors keep 300 proposals in training and 100 in
    evaluation (torchvision: 2000 and 1000, for 800-px images), sample 64 RoIs per image, and their
    box and mask heads are as wide as the pyramid (C = backbone.out_channels: a 2-layer MLP of 4C,
    four 3x3 convs of C; torchvision: 1024 and 256), which makes them several times cheaper on
    small images. kwargs go to the torchvision constructor and override all of these.
    """
    det = require('torchvision.models.detection', 'dense', 'the detectors')
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    if kind not in DETECTORS:
        raise DenseError(f'detector must be one of {DETECTORS}; got {kind!r}')
    ratios = ((0.5, 1.0, 2.0),) * len(backbone.strides)
    if kind == 'retinanet':
        sizes = tuple(tuple(int(round(2 * s * 2 ** (k / 3))) for k in range(3)) for s in backbone.strides)
    else:
        sizes = tuple((2 * s,) for s in backbone.strides)
    args: Dict[str, Any] = dict(detector_kwargs(backbone), **kwargs)
    if kind == 'retinanet':
        args.setdefault('anchor_generator', AnchorGenerator(sizes, ratios))
        args.setdefault('detections_per_img', 100)   # torchvision keeps 300
        return det.RetinaNet(backbone, num_classes, **args)
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    c = backbone.out_channels
    args.setdefault('rpn_anchor_generator', AnchorGenerator(sizes, ratios))
    for key, value in dict(rpn_pre_nms_top_n_train=600, rpn_post_nms_top_n_train=300, rpn_pre_nms_top_n_test=300,
                           rpn_post_nms_top_n_test=100, box_batch_size_per_image=64).items():
        args.setdefault(key, value)
    if 'box_head' not in args and 'box_predictor' not in args:
        args.update(box_head=TwoMLPHead(c * 7 * 7, 4 * c), box_predictor=FastRCNNPredictor(4 * c, num_classes))
    if kind == 'fasterrcnn':
        return det.FasterRCNN(backbone, None if 'box_predictor' in args else num_classes, **args)
    if 'mask_head' not in args and 'mask_predictor' not in args:
        args.update(mask_head=MaskRCNNHeads(c, [c] * 4, 1), mask_predictor=MaskRCNNPredictor(c, c, num_classes))
    return det.MaskRCNN(backbone, None if 'box_predictor' in args else num_classes, **args)

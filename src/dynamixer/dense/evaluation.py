"""Scoring dense predictions: COCO AP by pycocotools itself, mIoU from a confusion matrix.

`CocoEvaluator` turns torchvision detector outputs into a COCO results list (original category
ids, boxes as x y w h, masks as compressed RLE) and scores it with pycocotools' COCOeval, the
reference implementation, for boxes and for masks: AP (IoU .50:.95), AP50, AP75, AP for small /
medium / large objects and the recalls, in %. pycocotools reports -1 for a size range without any
ground truth; so do we. tests/test_dense_data.py checks that the numbers are pycocotools' own on
the same predictions read from JSON files, and torchmetrics' MeanAveragePrecision's.

`SegmentationMetrics` accumulates a (K, K) confusion matrix over pixels that are not the ignore
index: mIoU (the mean over classes that occur in the labels or the predictions), pixel accuracy
and per-class IoU, in %.
"""
from __future__ import annotations

import contextlib
import copy
import io
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from ..errors import require

__all__ = ['COCO_STATS', 'CocoEvaluator', 'detections_to_coco', 'SegmentationMetrics', 'gather_lists']

# COCOeval.stats, in its order
COCO_STATS = ('AP', 'AP50', 'AP75', 'AP_small', 'AP_medium', 'AP_large',
              'AR1', 'AR10', 'AR100', 'AR_small', 'AR_medium', 'AR_large')


def detections_to_coco(prediction: Dict[str, torch.Tensor], image_id: int, category_ids: Sequence[int],
                       mask_threshold: float = 0.5) -> List[Dict[str, Any]]:
    """One image's detector output ('boxes' (n, 4) x1 y1 x2 y2, 'scores', 'labels' 1..K, optionally
    'masks' (n, 1, H, W) probabilities) -> COCO result dicts (category_id = category_ids[label - 1],
    bbox x y w h, segmentation = the mask above `mask_threshold` as compressed RLE, counts a str)."""
    boxes = prediction['boxes'].detach().float().cpu()
    scores = prediction['scores'].detach().float().cpu().tolist()
    labels = prediction['labels'].detach().cpu().tolist()
    out = []
    rles = None
    if 'masks' in prediction:
        mask_utils = require('pycocotools.mask', 'dense', 'COCO mask results')
        m = prediction['masks'].detach().cpu()
        m = (m[:, 0] if m.dim() == 4 else m) > mask_threshold
        rles = mask_utils.encode(np.asfortranarray(m.numpy().transpose(1, 2, 0).astype(np.uint8)))
    for k, ((x1, y1, x2, y2), s, lab) in enumerate(zip(boxes.tolist(), scores, labels)):
        r = dict(image_id=int(image_id), category_id=int(category_ids[lab - 1]),
                 bbox=[round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)], score=round(float(s), 5))
        if rles is not None:
            r['segmentation'] = dict(size=list(rles[k]['size']), counts=rles[k]['counts'].decode('ascii'))
        out.append(r)
    return out


def gather_lists(items: List[Any], world: int) -> List[Any]:
    """All processes' lists concatenated (on every process); `items` itself when world is 1."""
    if world <= 1 or not dist.is_initialized():
        return items
    parts: List[Any] = [None] * world
    dist.all_gather_object(parts, items)
    return [x for p in parts for x in p]


class CocoEvaluator:
    """COCO AP of detections against a ground truth (a COCO dict, e.g. CocoDetection.coco_ground_truth()).

    ``update(predictions, image_ids)`` with torchvision's outputs; ``compute()`` -> {'bbox': {stat: %},
    'segm': ...} for `iou_types`. ``results`` is the COCO results list (what --results writes)."""

    def __init__(self, ground_truth: Dict[str, Any], category_ids: Sequence[int], iou_types: Sequence[str] = ('bbox',)):
        self.ground_truth = ground_truth
        self.category_ids = list(category_ids)
        self.iou_types = tuple(iou_types)
        self.results: List[Dict[str, Any]] = []

    def update(self, predictions: Sequence[Dict[str, torch.Tensor]], image_ids: Sequence[int]) -> None:
        for p, i in zip(predictions, image_ids):
            self.results += detections_to_coco(p, int(i), self.category_ids)

    def compute(self, world: int = 1) -> Dict[str, Dict[str, float]]:
        """Scores in % (every process gets them; the results of all processes are gathered first)."""
        self.results = gather_lists(self.results, world)
        return coco_scores(self.ground_truth, self.results, self.iou_types)


def coco_scores(ground_truth: Dict[str, Any], results: List[Dict[str, Any]],
                iou_types: Sequence[str] = ('bbox',)) -> Dict[str, Dict[str, float]]:
    """pycocotools' COCOeval on a ground-truth dict and a results list: {iou_type: {stat: %}}
    (all 0 when there are no results; -1 where a size range has no ground truth)."""
    coco_mod = require('pycocotools.coco', 'dense', 'COCO AP')
    cocoeval = require('pycocotools.cocoeval', 'dense', 'COCO AP')
    quiet = contextlib.redirect_stdout(io.StringIO())   # pycocotools prints its progress and table
    with quiet:
        gt = coco_mod.COCO()
        gt.dataset = copy.deepcopy(ground_truth)
        gt.createIndex()
    scores: Dict[str, Dict[str, float]] = {}
    for iou_type in iou_types:
        if not results:
            scores[iou_type] = {k: 0.0 for k in COCO_STATS}
            continue
        with quiet:
            dt = gt.loadRes(copy.deepcopy(results))
            e = cocoeval.COCOeval(gt, dt, iou_type)
            e.evaluate()
            e.accumulate()
            e.summarize()
        scores[iou_type] = {k: (round(100 * float(v), 4) if v >= 0 else -1.0) for k, v in zip(COCO_STATS, e.stats)}
    return scores


class SegmentationMetrics:
    """Confusion matrix over pixels: ``update(pred (B, H, W) or (H, W), target same shape)``;
    ``compute()`` -> dict(mIoU, pixel_acc, iou: {class: %}) in %."""

    def __init__(self, num_classes: int, ignore_index: Optional[int] = 255,
                 class_names: Optional[Sequence[str]] = None):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        pred, target = pred.reshape(-1).cpu().long(), target.reshape(-1).cpu().long()
        keep = (target >= 0) & (target < self.num_classes)
        if self.ignore_index is not None:
            keep &= target != self.ignore_index
        k = self.num_classes
        self.confusion += torch.bincount(target[keep] * k + pred[keep].clamp(0, k - 1), minlength=k * k).reshape(k, k)

    def compute(self, world: int = 1) -> Dict[str, Any]:
        conf = self.confusion.clone()
        if world > 1 and dist.is_initialized():
            dist.all_reduce(conf)
        conf = conf.double()
        tp = conf.diag()
        union = conf.sum(0) + conf.sum(1) - tp
        present = union > 0
        iou = torch.where(present, tp / union.clamp(min=1), torch.full_like(tp, float('nan')))
        total = conf.sum()
        return dict(mIoU=round(100 * float(iou[present].mean()) if present.any() else 0.0, 4),
                    pixel_acc=round(100 * float(tp.sum() / total) if total > 0 else 0.0, 4),
                    iou={n: (round(100 * float(v), 4) if present[i] else None)
                         for i, (n, v) in enumerate(zip(self.class_names, iou))})

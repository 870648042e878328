"""COCO AP (dynamixer.dense.evaluation.CocoEvaluator) is pycocotools' own on the same predictions,
and torchmetrics' MeanAveragePrecision's; mIoU / pixel accuracy agree with torchmetrics."""
import contextlib
import io
import json

import pytest
import torch

pytest.importorskip('pycocotools')
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

from dynamixer.dense.coco import CocoDetection  # noqa: E402
from dynamixer.dense.evaluation import COCO_STATS, CocoEvaluator, SegmentationMetrics  # noqa: E402


def _noisy_predictions(ds, seed=0):
    """Detector-like outputs: every object found with jittered boxes and a random score (some
    with the wrong class), plus false positives; masks = the true masks, some shifted."""
    g = torch.Generator().manual_seed(seed)
    preds = []
    for i in range(len(ds)):
        t = ds.target(i)
        n = len(t['labels'])
        boxes = t['boxes'] + torch.randn(n, 4, generator=g) * 1.5
        labels = t['labels'].clone()
        wrong = torch.rand(n, generator=g) < 0.2
        labels[wrong] = labels[wrong] % 10 + 1
        fp = torch.rand(2, 2, generator=g) * 20
        boxes = torch.cat([boxes, torch.cat([fp, fp + 8], 1)])
        labels = torch.cat([labels, torch.randint(1, 11, (2,), generator=g)])
        scores = torch.rand(n + 2, generator=g)
        masks = torch.cat([t['masks'], torch.zeros(2, 32, 32, dtype=torch.uint8)]).float()
        masks[:n] = torch.roll(masks[:n], shifts=int(torch.randint(0, 3, (1,), generator=g)), dims=-1)
        preds.append(dict(boxes=boxes.clamp(0, 32), labels=labels, scores=scores, masks=masks[:, None]))
    return preds


def test_coco_evaluator_is_pycocotools_on_the_json_files(digits_coco, tmp_path):
    """Our path (tensors -> results list, ground truth from the reader) vs pycocotools reading the
    annotation file and a results JSON file itself: the same 12 numbers, for boxes and masks."""
    ann = str(digits_coco / 'train' / 'annotations.json')
    ds = CocoDetection(ann, masks=True)
    preds = _noisy_predictions(ds)
    ev = CocoEvaluator(ds.coco_ground_truth(), ds.category_ids, ('bbox', 'segm'))
    ev.update(preds, [im.id for im in ds.images])
    ours = ev.compute()
    results = tmp_path / 'results.json'
    results.write_text(json.dumps(ev.results))
    for iou_type in ('bbox', 'segm'):
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO(ann)
            e = COCOeval(gt, gt.loadRes(str(results)), iou_type)
            e.evaluate()
            e.accumulate()
            e.summarize()
        ref = {k: 100 * v if v >= 0 else -1.0 for k, v in zip(COCO_STATS, e.stats)}
        assert ours[iou_type] == pytest.approx(ref, abs=1e-3)
    assert 20 < ours['bbox']['AP50'] < 100 and ours['segm']['AP'] > 0   # a real, imperfect score


def test_coco_evaluator_agrees_with_torchmetrics(digits_coco):
    tm = pytest.importorskip('torchmetrics.detection')
    ds = CocoDetection(str(digits_coco / 'train' / 'annotations.json'), masks=True)
    preds = _noisy_predictions(ds, seed=1)
    ev = CocoEvaluator(ds.coco_ground_truth(), ds.category_ids, ('bbox',))
    ev.update(preds, [im.id for im in ds.images])
    ours = ev.compute()['bbox']
    metric = tm.MeanAveragePrecision(iou_type='bbox', backend='pycocotools')
    metric.update([{k: v for k, v in p.items() if k != 'masks'} for p in preds],
                  [dict(boxes=ds.target(i)['boxes'], labels=ds.target(i)['labels']) for i in range(len(ds))])
    res = metric.compute()
    # torchmetrics takes areas from the boxes; the file's areas are the masks', so compare AP over all sizes
    for ours_key, tm_key in (('AP', 'map'), ('AP50', 'map_50'), ('AP75', 'map_75'), ('AR100', 'mar_100')):
        assert ours[ours_key] == pytest.approx(100 * float(res[tm_key]), abs=1e-3)


def test_no_predictions_scores_zero(digits_coco):
    ds = CocoDetection(str(digits_coco / 'val' / 'annotations.json'))
    ev = CocoEvaluator(ds.coco_ground_truth(), ds.category_ids)
    empty = dict(boxes=torch.zeros(0, 4), scores=torch.zeros(0), labels=torch.zeros(0, dtype=torch.int64))
    ev.update([empty] * len(ds), [im.id for im in ds.images])
    assert ev.compute()['bbox']['AP'] == 0.0


def test_segmentation_metrics_agree_with_torchmetrics():
    tmc = pytest.importorskip('torchmetrics.classification')
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 5, (4, 16, 16), generator=g)
    target[:, :2] = 255   # ignored
    pred = torch.where(torch.rand(4, 16, 16, generator=g) < 0.7, target.clamp(max=4),
                       torch.randint(0, 5, (4, 16, 16), generator=g))
    m = SegmentationMetrics(5, 255)
    m.update(pred[:2], target[:2])
    m.update(pred[2:], target[2:])
    out = m.compute()
    iou = tmc.MulticlassJaccardIndex(5, average='macro', ignore_index=255)(pred, target)
    acc = tmc.MulticlassAccuracy(5, average='micro', ignore_index=255)(pred, target)
    assert out['mIoU'] == pytest.approx(100 * float(iou), abs=1e-3)
    assert out['pixel_acc'] == pytest.approx(100 * float(acc), abs=1e-3)
    keep = target != 255
    assert out['pixel_acc'] == pytest.approx(100 * float((pred[keep] == target[keep]).double().mean()), abs=1e-3)


def test_segmentation_miou_skips_absent_classes():
    m = SegmentationMetrics(4, 255, ['bg', 'a', 'b', 'c'])
    m.update(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 1, 1]))
    out = m.compute()
    # bg: 1 / 2, a: 2 / 3; b and c neither labelled nor predicted
    assert out['mIoU'] == pytest.approx(100 * (0.5 + 2 / 3) / 2, abs=1e-3)
    assert out['iou']['b'] is None and out['pixel_acc'] == 75.0

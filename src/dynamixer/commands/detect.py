"""`dynamixer detect`: object detection and instance segmentation on COCO-format data.

    dynamixer detect make-digits DIR                         # the digits canvases as a COCO data set
    dynamixer detect train TRAIN.json --val VAL.json [--images DIR] [--detector retinanet] ...
    dynamixer detect validate RUN/last.pth VAL.json [--results results.json]
    dynamixer detect predict RUN/last.pth IMAGE_OR_FOLDER ... --out DIR [--score 0.5]

Data: a COCO annotation JSON plus its images (CVAT, Label Studio and Roboflow export this);
FasterRCNN, RetinaNet or MaskRCNN (masks from the COCO polygons / RLE) on `pyramid_backbone` of
any DynaMixer or timm model. Training is `dense.trainer.train_dense` (the engine and run folders
of `dynamixer train`); docs/dense.md has the details and the numbers.
"""
from __future__ import annotations

import argparse
import json
import logging
import os

from ..argtypes import Bounded, non_negative_int, positive_int
from ..data.images import DataError
from ..dense.coco import CocoDetection
from ..dense.digits_coco import write_digits_coco
from ..dense.evaluation import COCO_STATS
from ..dense.predict import list_images, predict_detection
from ..dense.trainer import (
    add_runtime_arguments,
    add_train_arguments,
    evaluate_detection,
    inference_device,
    load_dense_checkpoint,
    train_from_args,
)
from ..files import atomic_write_text, check_output_file, check_output_folder

__all__ = ['add_arguments', 'run']


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest='action', metavar='ACTION', required=True)

    t = sub.add_parser('train', help='train a detector on a COCO annotation file and its images')
    t.add_argument('train', nargs='?', help='training annotations (COCO JSON); may be left out with --resume')
    t.add_argument('--images', help='folder of the training images (default: next to the JSON, or its images/)')
    t.add_argument('--val', help='validation annotations (COCO JSON), scored after every epoch')
    t.add_argument('--val-images', help='folder of the validation images (default: next to its JSON, or images/)')
    add_train_arguments(t, 'detect')

    v = sub.add_parser('validate', help='COCO AP of a trained detector on a COCO annotation file')
    v.add_argument('checkpoint', help='last.pth of `dynamixer detect train`')
    v.add_argument('annotations', help='COCO JSON of the images to score')
    v.add_argument('--images', help='folder of the images (default: next to the JSON, or its images/)')
    v.add_argument('--results', metavar='JSON', help='also write the detections as a COCO results JSON')
    add_runtime_arguments(v, batch_size=4)

    q = sub.add_parser('predict', help='detect objects in image files; COCO results JSON and drawn pictures')
    q.add_argument('checkpoint', help='last.pth of `dynamixer detect train`')
    q.add_argument('inputs', nargs='+', help='image files and/or folders of images')
    q.add_argument('--out', required=True, help='output folder: predictions.json and one drawn PNG per image')
    q.add_argument('--score', type=Bounded(float, 0, 1), default=0.5, help='keep detections of at least this score '
                   '(default: 0.5)')
    q.add_argument('--no-draw', action='store_true', help='write predictions.json only')
    add_runtime_arguments(q, batch_size=4)

    m = sub.add_parser('make-digits', help='write the digits detection canvases as a COCO data set (+ masks)')
    m.add_argument('out', help='folder to write train/ val/ classes.txt into')
    m.add_argument('--train-size', type=positive_int, default=600, help='training canvases (default: 600)')
    m.add_argument('--val-size', type=positive_int, default=200, help='validation canvases (default: 200)')
    m.add_argument('--canvas', type=Bounded(int, 16), default=64, help='canvas side in pixels (default: 64)')
    m.add_argument('--digit-size', type=Bounded(int, 8), nargs='+', default=[12, 28], metavar='SIZE',
                   help='side of a pasted digit: MIN MAX, or one size (default: 12 28)')
    m.add_argument('--max-digits', type=positive_int, default=4, help='at most this many per canvas (default: 4)')
    m.add_argument('--seed', type=non_negative_int, default=0, help='data seed (default: 0)')


def run(args: argparse.Namespace) -> int:
    return {'train': _train, 'validate': _validate, 'predict': _predict, 'make-digits': _make_digits}[args.action](args)


def _train(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    data = None
    if args.train or args.val:
        if not (args.train and args.val):
            raise DataError('give the training annotations (TRAIN.json) and --val VAL.json (scored every epoch)')
        data = dict(train=args.train, train_images=args.images, val=args.val, val_images=args.val_images)
    result = train_from_args('detect', args, data, 'TRAIN.json --val VAL.json')
    if result is None:  # --print-config
        return 0
    if result['rank'] == 0:
        m = result['history'][-1]
        masks = f", mask AP {m['mask_AP']:.2f}" if 'mask_AP' in m else ''
        print(f"box AP {m['AP']:.2f} (AP50 {m['AP50']:.2f})" + masks
              + f" after {m['epoch']} epochs ({result['seconds']:.0f} s); run folder: {result['output']}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    device = inference_device(args)
    model, settings, names, category_ids = load_dense_checkpoint(args.checkpoint, 'detect', device)
    if args.results:
        args.results = check_output_file(args.results, 'results file (--results)', 'results.json')
    ds = CocoDetection(args.annotations, args.images, masks=settings['detector'] == 'maskrcnn',
                       category_ids=category_ids, class_names=names)
    print(ds.describe())
    metrics, results = evaluate_detection(model, ds, device, args.batch_size)
    for prefix, title in (('', 'boxes'), ('mask_', 'masks')):
        if prefix + 'AP' in metrics:
            print(f'{title}: ' + '  '.join(f'{k} {metrics[prefix + k]:.2f}' for k in COCO_STATS[:6]))
    if args.results:
        atomic_write_text(json.dumps(results), args.results)
        print(f'wrote {len(results)} detections to {args.results}')
    return 0


def _predict(args: argparse.Namespace) -> int:
    device = inference_device(args)
    out = check_output_folder(args.out, 'output folder (--out)')
    paths = list_images(args.inputs)
    model, settings, names, category_ids = load_dense_checkpoint(args.checkpoint, 'detect', device)
    ids = category_ids or list(range(1, len(names) + 1))  # COCO's own numbering when none was recorded
    report = predict_detection(model, paths, out, names, ids, args.score, device, draw=not args.no_draw)
    if report.count == 0:
        raise DataError(f'none of the {len(paths)} images could be read (see the lines above)')
    print(f'{report.count} images: detections in {report.written[0]}'
          + (f', pictures in {out}' if not args.no_draw else '')
          + (f'; {len(report.skipped)} unreadable files skipped' if report.skipped else ''))
    return 0


def _make_digits(args: argparse.Namespace) -> int:
    if len(args.digit_size) > 2:
        raise DataError(f'--digit-size takes MIN MAX or one size; got {args.digit_size}')
    args.digit_size = [args.digit_size[0], args.digit_size[-1]]
    if args.digit_size[0] > args.digit_size[1] or args.digit_size[1] > args.canvas:
        raise DataError(f'--digit-size {args.digit_size} must be MIN <= MAX <= --canvas {args.canvas}')
    written = write_digits_coco(args.out, args.train_size, args.val_size, args.canvas, seed=args.seed,
                                digit_size=tuple(args.digit_size), max_digits=args.max_digits)
    out = os.path.abspath(args.out)
    for split, w in written.items():
        print(f"{split}: {w['images']} images, {w['objects']} digits -> {os.path.join(out, split, 'annotations.json')}")
    print(f'class-index masks in {out}/*/masks, class names in {out}/classes.txt')
    return 0

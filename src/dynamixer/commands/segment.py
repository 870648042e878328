"""`dynamixer segment`: semantic segmentation on an image folder plus class-index PNG masks.

    dynamixer segment train IMAGES MASKS --classes classes.txt --val-images DIR --val-masks DIR ...
    dynamixer segment validate RUN/last.pth IMAGES MASKS
    dynamixer segment predict RUN/last.pth IMAGE_OR_FOLDER ... --out DIR

Data: the VOC / ADE20K layout, every image NAME.* with a mask NAME.png of class indices
0..K-1 (K = the lines of the class-names file) and an ignore index (255) for unlabelled pixels.
The model is `dense.segmentation.SegmentationModel` on `pyramid_backbone`; training is
`dense.trainer.train_dense` (the engine and run folders of `dynamixer train`). `dynamixer detect
make-digits DIR` writes a data set in this layout too (DIR/*/images, DIR/*/masks, DIR/classes.txt).
"""
from __future__ import annotations

import argparse
import logging

from ..data.images import DataError
from ..dense.mask_folder import MaskFolder, read_class_names
from ..dense.predict import list_images, predict_segmentation
from ..dense.trainer import (
    add_runtime_arguments,
    add_train_arguments,
    evaluate_segmentation,
    inference_device,
    load_dense_checkpoint,
    model_size,
    train_from_args,
)
from ..files import check_output_folder

__all__ = ['add_arguments', 'run']


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest='action', metavar='ACTION', required=True)

    t = sub.add_parser('train', help='train a segmenter on images and class-index masks')
    t.add_argument('images', nargs='?', help='folder of training images; may be left out with --resume')
    t.add_argument('masks', nargs='?', help='folder of their masks, NAME.png for image NAME.*')
    t.add_argument('--classes', help='text file of the class names, one per line, in index order')
    t.add_argument('--val-images', help='folder of validation images (scored after every epoch)')
    t.add_argument('--val-masks', help='folder of their masks')
    add_train_arguments(t, 'segment')

    v = sub.add_parser('validate', help='mIoU and pixel accuracy of a trained segmenter')
    v.add_argument('checkpoint', help='last.pth of `dynamixer segment train`')
    v.add_argument('images', help='folder of images')
    v.add_argument('masks', help='folder of their class-index masks')
    v.add_argument('--classes', help='class-names file; must match the checkpoint\'s (default: the checkpoint\'s)')
    add_runtime_arguments(v, batch_size=8)

    q = sub.add_parser('predict', help='segment image files: class-index mask PNGs and coloured overlays')
    q.add_argument('checkpoint', help='last.pth of `dynamixer segment train`')
    q.add_argument('inputs', nargs='+', help='image files and/or folders of images')
    q.add_argument('--out', required=True, help='output folder: NAME.png (class indices) and NAME_overlay.png')
    q.add_argument('--no-draw', action='store_true', help='write the mask PNGs only')
    add_runtime_arguments(q, batch_size=8)


def run(args: argparse.Namespace) -> int:
    return {'train': _train, 'validate': _validate, 'predict': _predict}[args.action](args)


def _train(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    data = None
    given = [args.images, args.masks, args.classes, args.val_images, args.val_masks]
    if any(given):
        if not all(given):
            raise DataError('give IMAGES MASKS --classes FILE --val-images DIR --val-masks DIR')
        data = dict(train_images=args.images, train_masks=args.masks, classes=args.classes,
                    val_images=args.val_images, val_masks=args.val_masks)
    result = train_from_args('segment', args, data, 'IMAGES MASKS --classes FILE --val-images DIR --val-masks DIR')
    if result is None:  # --print-config
        return 0
    if result['rank'] == 0:
        m = result['history'][-1]
        print(f"mIoU {m['mIoU']:.2f}, pixel accuracy {m['pixel_acc']:.2f} after {m['epoch']} epochs "
              f"({result['seconds']:.0f} s); run folder: {result['output']}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    device = inference_device(args)
    model, settings, names, _ = load_dense_checkpoint(args.checkpoint, 'segment', device)
    if args.classes and read_class_names(args.classes) != names:
        raise DataError(f'{args.classes} lists {len(read_class_names(args.classes))} classes, the checkpoint was '
                        f'trained on {len(names)} ({", ".join(names[:6])}...): give the classes it was trained on')
    ds = MaskFolder(args.images, args.masks, names, settings['ignore_index'])
    print(ds.describe())
    m = evaluate_segmentation(model, ds, model_size(model), device, args.batch_size)
    print(f"mIoU {m['mIoU']:.2f}  pixel accuracy {m['pixel_acc']:.2f}")
    print('IoU per class: ' + '  '.join(f'{n} {v:.1f}' for n, v in m['iou'].items() if v is not None))
    return 0


def _predict(args: argparse.Namespace) -> int:
    device = inference_device(args)
    out = check_output_folder(args.out, 'output folder (--out)')
    paths = list_images(args.inputs)
    model, settings, names, _ = load_dense_checkpoint(args.checkpoint, 'segment', device)
    report = predict_segmentation(model, paths, out, names, model_size(model), device, draw=not args.no_draw)
    if report.count == 0:
        raise DataError(f'none of the {len(paths)} images could be read (see the lines above)')
    print(f'{report.count} images: class-index masks' + (' and overlays' if not args.no_draw else '') + f' in {out}'
          + (f'; {len(report.skipped)} unreadable files skipped' if report.skipped else ''))
    return 0

"""`dynamixer validate`: top-1 / top-5 accuracy and loss of a checkpoint on a labelled data set.

The images go through the model's own evaluation transform (resize by its crop_pct with its
interpolation, centre crop, normalise), from its pretrained config. An exported ``.onnx`` file
(float32 or int8) is evaluated the same way in ONNX Runtime on the CPU, with the transform and
class names of its preprocessing JSON (`dynamixer.inference.OnnxClassifier`).
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any, Dict, List, Optional

import torch

from ..argtypes import non_negative_int, positive_int
from ..data import DataError, DigitsDataset, check_image_folder, eval_transform, find_split, image_folder_dataset
from ..engine import evaluate, resolve_device
from ..inference import OnnxClassifier, is_onnx_file, load_inference_model

__all__ = ['validate', 'add_arguments', 'run']


def _folder_dataset(data: str, split: str, class_names: List[str], bad_images: str):
    """An ImageDataset of DATA/<split>/<class>/ (or DATA/<class>/) labelled by the checkpoint's classes."""
    if os.path.isdir(data) and find_split(data, split) is None:
        folder, classes = check_image_folder(os.path.dirname(os.path.abspath(data)) or '.',
                                             os.path.basename(os.path.abspath(data)))
    else:
        folder, classes = check_image_folder(data, split)
    unknown = [c for c in classes if c not in class_names]
    if unknown:
        raise DataError(
            f'{folder} has classes the checkpoint does not know: {", ".join(unknown[:10])}'
            f'{" ..." if len(unknown) > 10 else ""}. The checkpoint has {len(class_names)} classes '
            f'({", ".join(class_names[:5])}{", ..." if len(class_names) > 5 else ""}).')
    return image_folder_dataset(folder, {c: class_names.index(c) for c in classes}, bad_images)


def validate(checkpoint: str, data: Optional[str], split: str = 'validation', model_name: Optional[str] = None,
             dataset: str = '', batch_size: int = 64, workers: int = 2, bad_images: str = 'skip',
             device: str = 'auto') -> Dict[str, Any]:
    """Evaluate `checkpoint` (or an exported .onnx file) on `data`; returns dict(top1, top5, loss,
    images, model, checkpoint)."""
    if is_onnx_file(checkpoint):
        model: Any = OnnxClassifier(checkpoint)
        info = dict(model=model.config.get('model'), class_names=model.class_names, has_class_names=True,
                    num_classes=model.num_classes)
        transform, device = model.transform, 'cpu'  # ONNX Runtime's CPU provider
    else:
        model, info = load_inference_model(checkpoint, model_name)
        transform = eval_transform(model)
    names = info['class_names']
    if dataset == 'digits':
        # upsampled straight to the model's input size, as in training
        ds = DigitsDataset('val' if split != 'train' else 'train', size=int(model.img_size[0]))
        if info['num_classes'] != 10:
            raise DataError(f"the digits have 10 classes, the checkpoint {info['num_classes']}")
    else:
        if not data:
            raise DataError('give a data folder (DATA/val/<class>/*.jpg), or --dataset digits')
        if not os.path.isdir(data):
            raise DataError(f'data folder not found: {data}')
        if not info['has_class_names']:  # authors' checkpoints have no class names: folder order
            folders = check_image_folder(data, split)[1] if find_split(data, split) else sorted(os.listdir(data))
            if len(folders) != info['num_classes']:
                raise DataError(f"the checkpoint has {info['num_classes']} classes, the data "
                                f'{len(folders)} class folders')
            names = folders
        ds = _folder_dataset(data, split, names, bad_images)
    ds.transform = transform
    dev = resolve_device(device)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers, shuffle=False)
    result = evaluate(model.to(dev), loader, dev, None)
    return dict(result, images=len(ds), model=info['model'], checkpoint=checkpoint)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('checkpoint', help="checkpoint: this project's (.pth), the authors', or .safetensors; "
                                           'or an .onnx file from `dynamixer export` (float32 or int8)')
    parser.add_argument('data', nargs='?', default=None, help='data folder (DATA/val/<class>/ or DATA/<class>/)')
    parser.add_argument('--split', default='validation', help='sub-folder to evaluate (val/validation searched)')
    parser.add_argument('--dataset', default='', help="'digits' for the embedded validation split")
    parser.add_argument('--model', default=None, help='model name, when the checkpoint does not record it')
    parser.add_argument('--batch-size', type=positive_int, default=64, help='images per forward pass')
    parser.add_argument('--workers', type=non_negative_int, default=2, help='data loading processes (0: none)')
    parser.add_argument('--bad-images', default='skip', choices=['skip', 'error', 'off'])
    parser.add_argument('--device', default='auto')
    parser.add_argument('--json', action='store_true', help='print the result as JSON')


def run(args: argparse.Namespace) -> int:
    r = validate(args.checkpoint, args.data, args.split, args.model, args.dataset, args.batch_size,
                 args.workers, args.bad_images, args.device)
    if args.json:
        print(json.dumps(r, indent=1))
    else:
        print(f"{r['model']}: top-1 {r['top1']:.2f}%  top-5 {r['top5']:.2f}%  loss {r['loss']:.4f}  "
              f"({r['images']} images)")
    return 0

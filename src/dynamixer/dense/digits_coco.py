"""The digits detection canvases written to disk in the formats users' own data comes in.

`write_digits_coco(out)` writes, for a train and a val split (disjoint source digits, see
digits_detection)::

    out/train/images/000000.png ...     the canvases (RGB PNG)
    out/train/annotations.json          COCO: boxes, instance masks as compressed RLE, categories '0'..'9'
    out/train/masks/000000.png ...      class-index PNGs for semantic segmentation (0 background, 1 + digit)
    out/val/...                         the same for the val split
    out/classes.txt                     the 11 semantic class names, in index order

so that `dynamixer detect train out/train/annotations.json --val out/val/annotations.json` and
`dynamixer segment train out/train/images out/train/masks --classes out/classes.txt ...` run on it.
The COCO category ids are 1..10 for the digits 0..9.
"""
from __future__ import annotations

import io
import json
import os
from typing import Any, Dict, List, Tuple

import numpy as np
from PIL import Image

from ..errors import require
from ..files import atomic_write, atomic_write_text, check_output_folder
from .digits_detection import CLASS_NAMES, DigitsDetection

__all__ = ['write_digits_coco']


def _png(array: np.ndarray, path: str, mode: str) -> None:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format='PNG')
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def _write_split(ds: DigitsDetection, folder: str) -> Dict[str, Any]:
    mask_utils = require('pycocotools.mask', 'dense', 'writing COCO masks')
    os.makedirs(os.path.join(folder, 'images'), exist_ok=True)
    os.makedirs(os.path.join(folder, 'masks'), exist_ok=True)
    h, w = ds.img_size
    images: List[Dict[str, Any]] = []
    annotations: List[Dict[str, Any]] = []
    for i in range(len(ds)):
        name = f'{i:06d}.png'
        rgb = (ds.images[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        _png(rgb, os.path.join(folder, 'images', name), 'RGB')
        _png(ds.semantic[i].numpy().astype(np.uint8), os.path.join(folder, 'masks', name), 'L')
        images.append(dict(id=i + 1, file_name=name, width=w, height=h))
        t = ds.targets[i]
        for box, label, mask in zip(t['boxes'].tolist(), t['labels'].tolist(), t['masks'].numpy()):
            rle = mask_utils.encode(np.asfortranarray(mask))
            x1, y1, x2, y2 = box
            annotations.append(dict(
                id=len(annotations) + 1, image_id=i + 1, category_id=int(label), iscrowd=0,
                bbox=[x1, y1, x2 - x1, y2 - y1], area=float(mask_utils.area(rle)),
                segmentation=dict(size=[h, w], counts=rle['counts'].decode('ascii'))))
    coco = dict(info=dict(description='dynamixer digits detection canvases (scikit-learn 8x8 digits)'),
                images=images, annotations=annotations,
                categories=[dict(id=k, name=CLASS_NAMES[k], supercategory='digit') for k in range(1, len(CLASS_NAMES))])
    atomic_write_text(json.dumps(coco), os.path.join(folder, 'annotations.json'))
    return dict(images=len(images), objects=len(annotations))


def write_digits_coco(out: str, num_train: int = 600, num_val: int = 200, canvas: Tuple[int, int] | int = 64,
                      seed: int = 0, **kwargs: Any) -> Dict[str, Dict[str, Any]]:
    """Write the digits detection set under `out` (layout in the module docstring); kwargs as
    DigitsDetection (max_digits, digit_size, ...). Returns {'train': {images, objects}, 'val': ...}."""
    out = check_output_folder(out, 'digits data folder')
    os.makedirs(out, exist_ok=True)
    written = {}
    for split, num in (('train', num_train), ('val', num_val)):
        ds = DigitsDetection(num, split, canvas, seed=seed, **kwargs)
        written[split] = _write_split(ds, os.path.join(out, split))
    atomic_write_text('\n'.join(CLASS_NAMES) + '\n', os.path.join(out, 'classes.txt'))
    return written

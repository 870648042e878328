"""COCO-format detection data on disk: an annotation JSON plus an image folder.

This is the format COCO itself, CVAT, Label Studio and Roboflow export. `CocoDetection` reads
it for torchvision's detectors, checking everything up front so that a mistake in the data is an
error naming the file and what is wrong (a `DataError`, exit code 2 on the command line) before
any training starts, never a crash in the middle of an epoch or a silently wrong model.

What is refused (DataError): a file that is not valid JSON (truncated, malformed), a top level
that is not an object or lacks ``images``, ``annotations`` or ``categories``; an annotation whose
image or category is not listed; a listed image that is not on disk or whose size on disk differs
from its ``width`` / ``height``; a ``bbox`` that is not four finite numbers; a mask (RLE) of
another size than its image; with masks, an annotation without ``segmentation``.

What is kept, adjusted or left out, and counted in `report` (every count is printed by the
commands):

- category ids need not be contiguous (COCO's own run 1..90 with gaps): they are mapped, in
  increasing id order, to labels 1..K (0 is torchvision's background); `class_names` and
  `category_ids` keep the names and the original ids (checkpoints store both, results JSONs use
  the original ids);
- images without annotations are kept as negatives (all background), ``negatives``;
- boxes that reach outside the image are clipped to it, ``clipped``; boxes with zero or negative
  width or height (also after clipping) are left out of training, ``empty_boxes``;
- crowd annotations (``iscrowd: 1``) are not trained on (torchvision's detectors have no notion
  of them), ``crowd``; the evaluator gives them to pycocotools, which ignores detections on them.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from ..data.images import DataError, load_image
from ..errors import require

__all__ = ['CocoDetection', 'read_coco_json', 'CocoAnnotation', 'decode_mask']


def read_coco_json(path: str, need: Sequence[str] = ('images', 'annotations', 'categories')) -> Dict[str, Any]:
    """The parsed annotation file; DataError naming the file for anything that is not a COCO
    object with the `need`ed lists."""
    if not os.path.isfile(path):
        raise DataError(f'annotation file not found: {path}')
    try:
        with open(path, 'rb') as f:
            data = json.loads(f.read())
    except json.JSONDecodeError as e:
        raise DataError(f'{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); the file is '
                        'malformed or was cut short (truncated): export it again') from None
    except UnicodeDecodeError as e:
        raise DataError(f'{path}: not a text JSON file ({e})') from None
    if not isinstance(data, dict):
        raise DataError(f'{path}: a COCO annotation file is a JSON object with "images", "annotations" and '
                        f'"categories"; this one is a JSON {type(data).__name__}')
    missing = [k for k in need if k not in data]
    if missing:
        raise DataError(f'{path}: no {", ".join(repr(k) for k in missing)} list (has {sorted(data)}); a COCO '
                        'annotation file needs "images", "annotations" and "categories"')
    for k in need:
        if not isinstance(data[k], list):
            raise DataError(f'{path}: "{k}" must be a list, found a {type(data[k]).__name__}')
    return data


@dataclass
class CocoAnnotation:
    """One object as trained on: box x1 y1 x2 y2 (pixels, clipped), contiguous label 1..K, the raw
    segmentation (polygons / RLE, decoded lazily) and what pycocotools needs (id, area, crowd)."""
    box: Tuple[float, float, float, float]
    label: int
    segmentation: Any
    ann_id: int
    area: float
    iscrowd: int


@dataclass
class _Image:
    id: int
    file: str          # absolute path
    width: int
    height: int
    anns: List[CocoAnnotation] = field(default_factory=list)


def decode_mask(segmentation: Any, height: int, width: int, where: str) -> np.ndarray:
    """A COCO segmentation (polygons, uncompressed or compressed RLE) -> (H, W) uint8 mask;
    DataError (naming `where`) for a malformed one or an RLE of another size than the image."""
    mask_utils = require('pycocotools.mask', 'dense', 'COCO masks')
    try:
        if isinstance(segmentation, list):   # polygons [[x1, y1, x2, y2, ...], ...]
            polys = [p for p in segmentation if isinstance(p, list) and len(p) >= 6]
            if not polys:
                raise DataError(f'{where}: segmentation has no polygon of 3 or more points')
            rle = mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
        elif isinstance(segmentation, dict) and 'counts' in segmentation and 'size' in segmentation:
            size = list(segmentation['size'])
            if size != [height, width]:
                raise DataError(f'{where}: the mask (RLE) is {size[0]}x{size[1]} but its image is {height}x{width}')
            rle = (mask_utils.frPyObjects(segmentation, height, width)
                   if isinstance(segmentation['counts'], list) else segmentation)
            if isinstance(rle['counts'], str):
                rle = dict(rle, counts=rle['counts'].encode('ascii'))
        else:
            raise DataError(f'{where}: segmentation must be a list of polygons or an RLE dict with "counts" '
                            f'and "size"; got {type(segmentation).__name__}')
        return mask_utils.decode(rle).astype(np.uint8)
    except DataError:
        raise
    except (TypeError, ValueError, KeyError, IndexError, OverflowError) as e:
        raise DataError(f'{where}: malformed segmentation ({e})') from None


def _number_box(bbox: Any, where: str) -> Tuple[float, float, float, float]:
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        raise DataError(f'{where}: "bbox" must be [x, y, width, height]; got {bbox!r}')
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        raise DataError(f'{where}: "bbox" must hold four numbers; got {bbox!r}') from None
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        raise DataError(f'{where}: "bbox" has a non-finite number: {bbox!r}')
    return x, y, w, h


def _image_size(path: str) -> Optional[Tuple[int, int]]:
    """(width, height) from the file's header; None if it cannot be read as an image."""
    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


class CocoDetection(torch.utils.data.Dataset):
    """COCO-format annotations + images, as torchvision's detectors take them.

    Item i is (image, target): image a float tensor (3, H, W) in [0, 1] (any mode on disk:
    grayscale, RGBA, CMYK, 16-bit are converted by `data.images.load_image`), target a dict with
    'boxes' (n, 4) float x1 y1 x2 y2, 'labels' (n,) int64 in 1..K, 'image_id' (the COCO id) and,
    with `masks`, 'masks' (n, H, W) uint8. `transform(image, target)` (torchvision.transforms.v2,
    with boxes and masks as tv_tensors) runs on each item when given.

    Args:
        annotation_file: the COCO JSON.
        image_dir: the folder the images' ``file_name``s are relative to (default: the JSON's folder,
            then its ``images/`` sub-folder).
        masks: decode instance masks (MaskRCNN).
        transform: a v2 transform of (image, target), or None.
        class_names / category_ids: impose a class list (a checkpoint's): the file's categories must
            have the same ids and names (DataError otherwise: another data set's classes).
    """

    def __init__(self, annotation_file: str, image_dir: Optional[str] = None, masks: bool = False,
                 transform: Optional[Callable] = None, category_ids: Optional[Sequence[int]] = None,
                 class_names: Optional[Sequence[str]] = None):
        self.annotation_file = os.path.abspath(annotation_file)
        data = read_coco_json(annotation_file)
        where = self.annotation_file
        self.masks = masks
        self.transform = transform
        self.report: Dict[str, int] = dict(images=0, annotations=0, negatives=0, clipped=0, empty_boxes=0, crowd=0)

        # categories: sorted ids -> labels 1..K
        cats: Dict[int, str] = {}
        for c in data['categories']:
            if not isinstance(c, dict) or 'id' not in c:
                raise DataError(f'{where}: every category needs an "id" (and a "name"); found {c!r}')
            cats[int(c['id'])] = str(c.get('name', c['id']))
        if not cats:
            raise DataError(f'{where}: "categories" is empty: there are no classes to detect')
        ids = sorted(cats)
        if category_ids is not None:
            want = dict(zip(category_ids, class_names or [cats.get(i) for i in category_ids]))
            if {i: cats[i] for i in ids} != want:
                raise DataError(f'{where}: its categories {[(i, cats[i]) for i in ids][:8]} are not the ones the '
                                f'model was trained on {list(want.items())[:8]}; give the annotations of the data '
                                'set the checkpoint was trained on')
        self.category_ids: List[int] = ids
        self.class_names: List[str] = [cats[i] for i in ids]
        self.label_of = {cid: k + 1 for k, cid in enumerate(ids)}
        self.categories = [dict(id=i, name=cats[i]) for i in ids]

        # images
        root = image_dir
        if root is None:
            base = os.path.dirname(self.annotation_file)
            root = base
            first = next((im.get('file_name') for im in data['images'] if isinstance(im, dict)), None)
            if first and not os.path.isfile(os.path.join(base, first)) and \
                    os.path.isfile(os.path.join(base, 'images', first)):
                root = os.path.join(base, 'images')
        self.image_dir = os.path.abspath(root)
        images: Dict[int, _Image] = {}
        missing, unreadable, resized = [], [], []
        for im in data['images']:
            if not isinstance(im, dict) or 'id' not in im or 'file_name' not in im:
                raise DataError(f'{where}: every image needs "id" and "file_name"; found {im!r}'[:300])
            path = os.path.join(self.image_dir, str(im['file_name']))
            if not os.path.isfile(path):
                missing.append(path)
                continue
            size = _image_size(path)
            if size is None:
                unreadable.append(path)
                continue
            w, h = int(im.get('width') or size[0]), int(im.get('height') or size[1])
            if (w, h) != size:
                resized.append(f'{path} is {size[0]}x{size[1]}, the JSON says {w}x{h}')
            images[int(im['id'])] = _Image(int(im['id']), path, w, h)
        if missing:
            raise DataError(f'{where}: {len(missing)} of its {len(data["images"])} images are not on disk under '
                            f'{self.image_dir}, e.g. {", ".join(missing[:3])}; pass the image folder '
                            '(--images) or fix the file names')
        if unreadable:
            raise DataError(f'{where}: {len(unreadable)} images cannot be read as images, e.g. '
                            f'{", ".join(unreadable[:3])}; replace them or remove them from the JSON')
        if resized:
            raise DataError(f'{where}: {len(resized)} images do not have the size the JSON gives them, so their '
                            f'boxes would be wrong: {"; ".join(resized[:3])}')

        # annotations
        for a in data['annotations']:
            if not isinstance(a, dict) or 'image_id' not in a or 'category_id' not in a:
                raise DataError(f'{where}: every annotation needs "image_id", "category_id" and "bbox"; found '
                                f'{a!r}'[:300])
            aw = f'{where}: annotation {a.get("id", "?")}'
            img = images.get(int(a['image_id']))
            if img is None:
                raise DataError(f'{aw} is for image id {a["image_id"]}, which is not in "images"')
            if int(a['category_id']) not in self.label_of:
                raise DataError(f'{aw} has category_id {a["category_id"]}, which is not in "categories" '
                                f'({ids[:20]})')
            if 'bbox' not in a:
                raise DataError(f'{aw} has no "bbox"')
            x, y, w, h = _number_box(a['bbox'], aw)
            crowd = int(a.get('iscrowd', 0) or 0)
            if masks and not crowd and 'segmentation' not in a:
                raise DataError(f'{aw} has no "segmentation": MaskRCNN needs a mask for every object; use '
                                'FasterRCNN or RetinaNet for boxes alone')
            x1, y1 = min(max(x, 0.0), img.width), min(max(y, 0.0), img.height)
            x2, y2 = min(max(x + w, 0.0), img.width), min(max(y + h, 0.0), img.height)
            if (x1, y1, x2, y2) != (x, y, x + w, y + h):
                self.report['clipped'] += 1
            ann = CocoAnnotation((x1, y1, x2, y2), self.label_of[int(a['category_id'])], a.get('segmentation'),
                                 int(a.get('id', len(img.anns))), float(a.get('area') or max(w, 0) * max(h, 0)),
                                 crowd)
            if crowd:
                self.report['crowd'] += 1
            elif x2 <= x1 or y2 <= y1:
                self.report['empty_boxes'] += 1
                continue
            img.anns.append(ann)
            self.report['annotations'] += 1 - crowd
        self.images: List[_Image] = [images[k] for k in sorted(images)]
        if not self.images:
            raise DataError(f'{where}: "images" is empty: there is nothing to train or evaluate on')
        self.report['images'] = len(self.images)
        self.report['negatives'] = sum(1 for im in self.images if not any(not a.iscrowd for a in im.anns))

    @property
    def num_classes(self) -> int:
        """Classes including torchvision's background (label 0)."""
        return len(self.class_names) + 1

    def __len__(self) -> int:
        return len(self.images)

    def describe(self) -> str:
        """One line: what was read, and every adjustment made (see the module docstring)."""
        r = self.report
        notes = [f'{r[k]} {text}' for k, text in (
            ('negatives', 'images without objects (kept as negatives)'),
            ('crowd', 'crowd annotations (not trained on)'),
            ('clipped', 'boxes clipped to their image'), ('empty_boxes', 'empty boxes left out')) if r[k]]
        return (f'{self.annotation_file}: {r["images"]} images, {r["annotations"]} objects of '
                f'{len(self.class_names)} classes' + (f'; {", ".join(notes)}' if notes else ''))

    def target(self, i: int) -> Dict[str, torch.Tensor]:
        """Item i's target without loading its image (boxes in the image's own pixels)."""
        img = self.images[i]
        anns = [a for a in img.anns if not a.iscrowd]
        t = dict(boxes=torch.tensor([a.box for a in anns], dtype=torch.float32).reshape(-1, 4),
                 labels=torch.tensor([a.label for a in anns], dtype=torch.int64),
                 image_id=torch.tensor(img.id))
        if self.masks:
            ms = [decode_mask(a.segmentation, img.height, img.width, f'{self.annotation_file}: annotation {a.ann_id}')
                  for a in anns]
            t['masks'] = (torch.from_numpy(np.stack(ms)) if ms
                          else torch.zeros(0, img.height, img.width, dtype=torch.uint8))
        return t

    def load(self, i: int) -> torch.Tensor:
        """Item i's image, (3, H, W) float in [0, 1]."""
        img = load_image(self.images[i].file)
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        image, target = self.load(i), self.target(i)
        if self.transform is not None:
            image, target = self.transform(image, target)
        return image, target

    def coco_ground_truth(self) -> Dict[str, Any]:
        """The annotations as pycocotools' COCO takes them (original category ids, crowd kept,
        boxes as trained on: clipped, empty ones left out)."""
        anns: List[Dict[str, Any]] = []
        for img in self.images:
            for a in img.anns:
                x1, y1, x2, y2 = a.box
                ann = dict(id=len(anns) + 1, image_id=img.id, category_id=self.category_ids[a.label - 1],
                           bbox=[x1, y1, x2 - x1, y2 - y1], area=a.area, iscrowd=a.iscrowd)
                if a.segmentation is not None:
                    ann['segmentation'] = a.segmentation
                anns.append(ann)
        return dict(images=[dict(id=im.id, width=im.width, height=im.height, file_name=im.file) for im in self.images],
                    annotations=anns, categories=self.categories)

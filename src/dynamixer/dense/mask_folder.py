"""Semantic segmentation data on disk: an image folder plus a folder of class-index PNG masks.

The layout of Pascal VOC (JPEGImages/ + SegmentationClass/) and ADE20K (images/ + annotations/):
every image ``NAME.jpg|png`` has a mask ``NAME.png`` in the mask folder, a one-channel PNG (mode
L, P or 16-bit I) whose pixel values are class indices 0..K-1, and ``ignore_index`` (default 255,
VOC's object borders) for pixels that are not scored or trained on. The class list comes from a
text file of names, one per line, in index order (``--classes``).

Everything is checked up front (each mask is decoded once): a DataError names the file for an
image without its mask, a mask of another size than its image, a colour (RGB) mask, and a mask
with values outside 0..K-1 other than the ignore index (which values, and what K is). Masks
without an image are ignored (VOC ships masks for a subset of its images, the other way round).
"""
from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from ..data.images import IMAGE_EXTENSIONS, DataError, load_image

__all__ = ['MaskFolder', 'read_class_names', 'load_mask']


def read_class_names(path: str) -> List[str]:
    """Class names, one per line (blank lines and surrounding spaces ignored); DataError for a
    missing or empty file or a repeated name."""
    if not os.path.isfile(path):
        raise DataError(f'class-names file not found: {path}')
    try:
        with open(path, encoding='utf-8') as f:
            names = [line.strip() for line in f if line.strip()]
    except UnicodeDecodeError as e:
        raise DataError(f'{path}: not a text file of class names ({e})') from None
    if not names:
        raise DataError(f'{path}: no class names in it (one name per line, in class-index order)')
    seen = set()
    for n in names:
        if n in seen:
            raise DataError(f'{path}: the class name {n!r} appears twice')
        seen.add(n)
    return names


def load_mask(path: str) -> np.ndarray:
    """A class-index PNG -> (H, W) int64; DataError for an unreadable or colour mask."""
    try:
        with Image.open(path) as m:
            m.load()
            if m.mode not in ('L', 'P', 'I', 'I;16', 'I;16L', 'I;16B', '1'):
                raise DataError(f'{path}: a mask must be a one-channel class-index PNG (mode L, P or I;16); this '
                                f'one is {m.mode}: convert colour-coded masks to class indices first')
            return np.asarray(m, dtype=np.int64) if m.mode != 'P' else np.asarray(m).astype(np.int64)
    except DataError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f'{path}: not a readable mask image ({e})') from None


class MaskFolder(torch.utils.data.Dataset):
    """Images and their class-index masks. Item i is (image (3, H, W) float in [0, 1], mask (H, W)
    int64 in 0..K-1 or ignore_index), after `transform(image, mask)` when given (v2, the mask a
    tv_tensors.Mask).

    Args:
        image_dir: the images (.png / .jpg / .jpeg, any mode; converted to RGB).
        mask_dir: one NAME.png per image NAME.*.
        class_names: the K classes in index order.
        ignore_index: the value of unlabelled pixels (not in 0..K-1).
        transform: v2 transform of (image, mask), or None.
    """

    def __init__(self, image_dir: str, mask_dir: str, class_names: Sequence[str], ignore_index: int = 255,
                 transform: Optional[Callable] = None):
        for what, d in (('image folder', image_dir), ('mask folder', mask_dir)):
            if not os.path.isdir(d):
                raise DataError(f'{what} not found: {d}')
        if 0 <= ignore_index < len(class_names):
            raise DataError(f'the ignore index {ignore_index} is one of the {len(class_names)} classes '
                            f'(0..{len(class_names) - 1}); choose a value outside them, e.g. 255')
        self.image_dir, self.mask_dir = os.path.abspath(image_dir), os.path.abspath(mask_dir)
        self.class_names = list(class_names)
        self.ignore_index = ignore_index
        self.transform = transform
        names = sorted(f for f in os.listdir(image_dir) if f.lower().endswith(IMAGE_EXTENSIONS))
        if not names:
            raise DataError(f'{image_dir}: no images (.png, .jpg, .jpeg) in it')
        self.samples: List[Tuple[str, str]] = []
        no_mask = []
        for n in names:
            mask = os.path.join(self.mask_dir, os.path.splitext(n)[0] + '.png')
            if not os.path.isfile(mask):
                no_mask.append(n)
            self.samples.append((os.path.join(self.image_dir, n), mask))
        if no_mask:
            raise DataError(f'{len(no_mask)} of the {len(names)} images in {image_dir} have no mask NAME.png in '
                            f'{mask_dir}, e.g. {", ".join(no_mask[:3])}')
        self.pixels = np.zeros(len(class_names), dtype=np.int64)   # per-class pixel counts
        k = len(class_names)
        for image, mask in self.samples:
            m = load_mask(mask)
            try:
                with Image.open(image) as im:
                    size = im.size
            except (OSError, ValueError, SyntaxError) as e:
                raise DataError(f'{image}: not a readable image ({e})') from None
            if (m.shape[1], m.shape[0]) != size:
                raise DataError(f'{mask} is {m.shape[1]}x{m.shape[0]} but its image {image} is {size[0]}x{size[1]}: '
                                'a mask must have its image\'s size')
            values = np.unique(m)
            bad = values[((values < 0) | (values >= k)) & (values != ignore_index)]
            if bad.size:
                raise DataError(f'{mask} has pixel values {bad[:10].tolist()} outside the {k} classes (0..{k - 1}) '
                                f'and not the ignore index {ignore_index}: check the class-names file (--classes) '
                                'or --ignore-index')
            self.pixels += np.bincount(m[(m >= 0) & (m < k)].ravel(), minlength=k)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.samples)

    def describe(self) -> str:
        return (f'{self.image_dir} + {self.mask_dir}: {len(self)} images, {self.num_classes} classes, '
                f'ignore index {self.ignore_index}')

    def load(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Item i without the transform: image (3, H, W) float in [0, 1], mask (H, W) int64."""
        image, mask = self.samples[i]
        img = torch.from_numpy(np.asarray(load_image(image), dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)
        return img, torch.from_numpy(load_mask(mask))

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.load(i)
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        return image, mask


def class_pixel_table(ds: MaskFolder) -> Dict[str, int]:
    """Pixels per class name over the data set (the counts the up-front check made)."""
    return dict(zip(ds.class_names, ds.pixels.tolist()))

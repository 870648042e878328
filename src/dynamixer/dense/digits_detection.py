"""Digits detection: scikit-learn's 8x8 digits, upscaled and pasted on a canvas, every box known.

Each canvas holds 0 to `max_digits` digits (bundled with scikit-learn, no download), each scaled
to a random size, coloured at random and pasted at a random place where it does not overlap the
others, on a faintly noisy background. For every digit the data set knows its class, its box (the
tight box of its mask), its instance mask (the upscaled digit's pixels above half intensity of its
stroke) and hence the per-pixel semantic labels (0 background, 1 + digit class).

The source digits are split into train and val halves with a fixed seeded permutation first, so
no val canvas reuses a digit image seen in training; every canvas is generated from its split's
seed alone.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..data.digits import left_digit_split, load_sklearn_digits
from .backbone import DenseError

__all__ = ['DigitsDetection', 'digits_detection_splits', 'collate_detection', 'validate_targets',
           'NUM_CLASSES', 'CLASS_NAMES']

CLASS_NAMES = ('background',) + tuple(str(d) for d in range(10))
NUM_CLASSES = len(CLASS_NAMES)  # torchvision counts the background as class 0


def _source_digits(split: str, seed: int, val_fraction: float = 0.3) -> Tuple[np.ndarray, np.ndarray]:
    """The split's part of sklearn's digits: images (n, 8, 8) in [0, 1] and labels (n,); the same
    fixed seeded split of the source digits as the left-digit task's."""
    images, labels = load_sklearn_digits()
    train_idx, val_idx = left_digit_split(len(labels), seed, val_fraction)
    idx = train_idx if split == 'train' else val_idx
    return (images[idx] / 16.0).astype(np.float32), labels[idx].astype(np.int64)


class DigitsDetection(torch.utils.data.Dataset):
    """`num` canvases; item i is (image (3, H, W) float in [0, 1], target dict) with target keys
    'boxes' (n, 4) float x1 y1 x2 y2 in pixels, 'labels' (n,) int64 in 1..10 (digit + 1),
    'masks' (n, H, W) uint8. ``semantic`` holds the (num, H, W) int64 per-pixel labels (0..10).

    Args:
        num: number of canvases.
        split: 'train' or 'val' (disjoint source digits).
        canvas: (H, W) or an int.
        max_digits: at most this many digits per canvas (at least 1 unless the canvas is empty).
        digit_size: (smallest, largest) side of a pasted digit in pixels.
        empty_fraction: share of canvases with no digit at all (targets with zero boxes).
        seed: everything (split, placements, colours, noise) follows from it and `split`.
    """

    def __init__(self, num: int, split: str = 'train', canvas: Tuple[int, int] | int = 48, max_digits: int = 3,
                 digit_size: Tuple[int, int] = (10, 20), empty_fraction: float = 0.05, noise: float = 0.05,
                 seed: int = 0):
        if split not in ('train', 'val'):
            raise DenseError(f"split must be 'train' or 'val'; got {split!r}")
        h, w = (canvas, canvas) if isinstance(canvas, int) else tuple(canvas)
        lo, hi = digit_size
        if not 8 <= lo <= hi or hi > min(h, w):
            raise DenseError(f'digit_size {digit_size} must satisfy 8 <= smallest <= largest <= '
                             f'canvas side {min(h, w)}')
        images, labels = _source_digits(split, seed)
        rng = np.random.default_rng([seed, 1 if split == 'train' else 2])
        self.img_size = (h, w)
        self.images = torch.empty(num, 3, h, w)
        self.semantic = torch.zeros(num, h, w, dtype=torch.long)
        self.targets: List[Dict[str, torch.Tensor]] = []
        for k in range(num):
            canvas_img = torch.from_numpy(rng.normal(0.0, noise, (3, h, w)).astype(np.float32))
            count = 0 if rng.random() < empty_fraction else int(rng.integers(1, max_digits + 1))
            taken = np.zeros((h, w), dtype=bool)
            boxes, classes, masks = [], [], []
            for _ in range(count):
                i = int(rng.integers(len(images)))
                side = int(rng.integers(lo, hi + 1))
                # a free spot for the whole pasted square, so instances never overlap
                for _attempt in range(20):
                    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
                    if not taken[y:y + side, x:x + side].any():
                        break
                else:
                    continue
                taken[y:y + side, x:x + side] = True
                digit = F.interpolate(torch.from_numpy(images[i])[None, None], size=(side, side),
                                      mode='bilinear', align_corners=False)[0, 0].clamp(0, 1)
                colour = torch.from_numpy(rng.uniform(0.4, 1.0, 3).astype(np.float32))
                region = canvas_img[:, y:y + side, x:x + side]
                canvas_img[:, y:y + side, x:x + side] = torch.maximum(region, digit[None] * colour[:, None, None])
                mask = torch.zeros(h, w, dtype=torch.uint8)
                mask[y:y + side, x:x + side] = (digit > 0.5 * float(digit.max())).to(torch.uint8)
                ys, xs = torch.nonzero(mask, as_tuple=True)
                boxes.append([float(xs.min()), float(ys.min()), float(xs.max()) + 1, float(ys.max()) + 1])
                classes.append(int(labels[i]) + 1)
                masks.append(mask)
                self.semantic[k][mask.bool()] = classes[-1]
            self.images[k] = canvas_img.clamp(0, 1)
            self.targets.append(dict(
                boxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                labels=torch.tensor(classes, dtype=torch.int64),
                masks=torch.stack(masks) if masks else torch.zeros(0, h, w, dtype=torch.uint8)))

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        return self.images[i], self.targets[i]


def digits_detection_splits(num_train: int = 1000, num_val: int = 300, canvas: Tuple[int, int] | int = 48,
                            seed: int = 0, **kwargs) -> Tuple[DigitsDetection, DigitsDetection]:
    """The fixed train and val sets (disjoint source digits); kwargs as DigitsDetection."""
    return (DigitsDetection(num_train, 'train', canvas, seed=seed, **kwargs),
            DigitsDetection(num_val, 'val', canvas, seed=seed, **kwargs))


def collate_detection(batch: Sequence[Tuple[torch.Tensor, Dict[str, torch.Tensor]]]
                      ) -> Tuple[List[torch.Tensor], List[Dict[str, torch.Tensor]]]:
    """DataLoader collate for torchvision's detectors: (list of images, list of target dicts)."""
    return [b[0] for b in batch], [b[1] for b in batch]


def validate_targets(images: Sequence[torch.Tensor], targets: Sequence[Dict[str, torch.Tensor]],
                     need_masks: bool = False) -> None:
    """Raise DenseError for targets torchvision would train on silently wrong or reject obscurely.

    Checks: one target per image; 'boxes' (n, 4) float x1 y1 x2 y2 inside the image with positive
    width and height; 'labels' (n,) int64 >= 1 (0 is the background); 'masks' (n, H, W) when
    `need_masks`. Empty targets (n = 0) are fine: torchvision trains on them as all-background.
    """
    if len(images) != len(targets):
        raise DenseError(f'{len(images)} images but {len(targets)} targets: give one target dict per image')
    for i, (img, t) in enumerate(zip(images, targets)):
        if 'boxes' not in t or 'labels' not in t:
            raise DenseError(f"target {i} needs 'boxes' and 'labels' (has {sorted(t)})")
        boxes, labels = t['boxes'], t['labels']
        h, w = img.shape[-2:]
        if boxes.dim() != 2 or boxes.shape[-1] != 4 or not boxes.is_floating_point():
            raise DenseError(f'target {i}: boxes must be a float tensor (n, 4) of x1, y1, x2, y2; got '
                             f'{boxes.dtype} {list(boxes.shape)} (an empty target is torch.zeros(0, 4))')
        if labels.shape != boxes.shape[:1] or labels.dtype != torch.int64:
            raise DenseError(f'target {i}: labels must be int64 (n,) matching {boxes.shape[0]} boxes; got '
                             f'{labels.dtype} {list(labels.shape)}')
        if labels.numel() and int(labels.min()) < 1:
            raise DenseError(f'target {i}: label 0 is the background class; number object classes from 1')
        outside = (boxes[:, 0] < 0) | (boxes[:, 1] < 0) | (boxes[:, 2] > w) | (boxes[:, 3] > h)
        if outside.any():
            j = int(outside.nonzero()[0])
            raise DenseError(f'target {i}: box {j} {boxes[j].tolist()} lies outside the {h}x{w} image; clip boxes '
                             f'with torchvision.ops.clip_boxes_to_image(boxes, ({h}, {w})) (and drop the ones '
                             f'that become empty) or fix the annotation')
        flat = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
        if flat.any():
            j = int(flat.nonzero()[0])
            raise DenseError(f'target {i}: box {j} {boxes[j].tolist()} has no area (need x2 > x1 and y2 > y1)')
        if need_masks:
            masks = t.get('masks')
            if masks is None or masks.shape != (boxes.shape[0], h, w):
                raise DenseError(f"target {i}: MaskRCNN needs 'masks' (n, H, W) = ({boxes.shape[0]}, {h}, {w}); "
                                 f'got {None if masks is None else list(masks.shape)}')

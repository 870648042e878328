"""scikit-learn's bundled 8x8 digits (no download), in one place: the embedded classification
set (`DigitsDataset`, `dynamixer train`'s default), the left-digit task (`dynamixer ablate`,
``dynamixer train --dataset left-digit``) and a few real sample images for export checks.

'Which digit is on the left?': a small offline task where token positions matter.

Two different scikit-learn digits (8x8, bundled with scikit-learn, no download) are pasted at
random, non-overlapping positions of a blank canvas; the label is the class of the digit that
stands further left. A model that only pools "which digits are present" tops out near 50%
top-1 (it knows the pair but not the order); to do better it has to relate the two digits'
positions, which is what token mixing along rows and columns is for.

The source digits are split into train / val halves first (a fixed, seeded split), so no val
canvas reuses a digit image seen in training. Everything is generated from the seed alone.
"""
from typing import Any, Callable, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image

from ..errors import require

__all__ = ['load_sklearn_digits', 'DigitsDataset', 'LeftDigitDataset', 'left_digit_datasets',
           'make_left_digit_task', 'left_digit_split', 'sample_images']

DIGIT_CLASSES = [str(i) for i in range(10)]


def load_sklearn_digits() -> Tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: images (1797, 8, 8) float64 in 0..16, labels (1797,) int."""
    datasets = require('sklearn.datasets', None, "scikit-learn's bundled digits")
    d = datasets.load_digits()
    return d.images, d.target


def _load_digits() -> Tuple[np.ndarray, np.ndarray]:
    images, target = load_sklearn_digits()
    return (images / 16.0).astype(np.float32), target.astype(np.int64)  # (1797, 8, 8) in [0, 1]


def sample_images(num_digits: int = 4) -> List[Image.Image]:
    """Real images that ship with scikit-learn (no download): its two photos and some 8x8 digits."""
    datasets = require('sklearn.datasets', None, "scikit-learn's sample images")
    images = [Image.fromarray(a).convert('RGB') for a in datasets.load_sample_images().images]
    digits = load_sklearn_digits()[0][:num_digits]
    images += [Image.fromarray((d * (255 / 16)).astype(np.uint8)).convert('RGB') for d in digits]
    return images


class DigitsDataset(torch.utils.data.Dataset):
    """scikit-learn's 8x8 digits (1797 images, bundled, no download) upsampled to `size` x `size`.

    A fixed stratified 80/20 split (random_state 0): 1437 training and 360 validation images.
    Items are (transform(PIL RGB image), int label), like timm's ImageDataset.
    """

    classes = DIGIT_CLASSES

    def __init__(self, split: str = 'train', size: int = 32, transform: Optional[Callable] = None):
        selection = require('sklearn.model_selection', None, "the digits' train/val split")
        images, target = load_sklearn_digits()
        idx_train, idx_val = selection.train_test_split(
            np.arange(len(target)), test_size=0.2, stratify=target, random_state=0)
        idx = idx_train if split in ('train', 'training') else idx_val
        pixels = np.rint(images[idx] * (255.0 / 16.0)).astype(np.uint8)  # values 0..16
        self.images = [Image.fromarray(p, 'L').resize((size, size), Image.Resampling.BILINEAR) for p in pixels]
        self.targets = [int(t) for t in target[idx]]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> Tuple[Any, int]:
        img = self.images[i]
        return (self.transform(img) if self.transform is not None else img), self.targets[i]


class LeftDigitDataset(torch.utils.data.Dataset):
    """Left-digit canvases (n, 1, H, W) in [0, 1], served normalised as (x - mean) / std with the
    training set's statistics; `transform` (default none) is applied after. No flips: left and
    right are the label."""

    classes = DIGIT_CLASSES

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, mean: float, std: float):
        self.images, self.targets, self.mean, self.std = images, targets, mean, std
        self.transform: Optional[Callable] = None

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        x = (self.images[i] - self.mean) / self.std
        return (self.transform(x) if self.transform is not None else x), int(self.targets[i])


def left_digit_datasets(num_train: int = 4000, num_val: int = 2000, canvas: int = 24, align: int = 4,
                        seed: int = 0) -> Tuple[LeftDigitDataset, LeftDigitDataset]:
    """(train, val) of the left-digit task, normalised by the training canvases' mean and std."""
    train, val = make_left_digit_task(num_train, num_val, canvas=canvas, align=align, seed=seed)
    x = train.tensors[0]
    mean, std = float(x.mean()), float(x.std())
    return (LeftDigitDataset(train.tensors[0], train.tensors[1], mean, std),
            LeftDigitDataset(val.tensors[0], val.tensors[1], mean, std))


def _compose(
        images: np.ndarray,
        labels: np.ndarray,
        num: int,
        canvas: int,
        scale: int,
        min_gap: int,
        rng: np.random.Generator,
        align: int = 1,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`num` canvases (num, canvas, canvas), labels (num,) and placements (num, 2, 3) =
    (source index, top, left) of the left digit, then the right one. Edges on multiples of `align`."""
    size = 8 * scale
    if canvas < 2 * size + min_gap or (canvas - size) // align * align < size + min_gap:
        raise ValueError(f'canvas {canvas} is too small for two {size}px digits {min_gap}px apart '
                         f'(positions on multiples of {align}px)')
    out = np.zeros((num, canvas, canvas), dtype=np.float32)
    target = np.empty(num, dtype=np.int64)
    where = np.empty((num, 2, 3), dtype=np.int64)
    slots = np.arange(0, canvas - size + 1, align)  # allowed top / left edges
    for k in range(num):
        a = rng.integers(len(images))
        b = rng.integers(len(images))
        while labels[b] == labels[a]:   # two different classes: order is the only way to 50%+
            b = rng.integers(len(images))
        # left edges at least size + min_gap apart, so "left" is never ambiguous; tops are free
        while True:
            xa, xb = rng.choice(slots, size=2)
            if abs(int(xa) - int(xb)) >= size + min_gap:
                break
        ya, yb = rng.choice(slots, size=2)
        if xb < xa:
            a, b, xa, xb, ya, yb = b, a, xb, xa, yb, ya
        for idx, y, x in ((a, ya, xa), (b, yb, xb)):
            digit = images[idx]
            if scale > 1:
                digit = np.kron(digit, np.ones((scale, scale), dtype=np.float32))
            out[k, y:y + size, x:x + size] = np.maximum(out[k, y:y + size, x:x + size], digit)
        target[k] = labels[a]
        where[k] = ((a, ya, xa), (b, yb, xb))
    return out, target, where


def make_left_digit_task(
        num_train: int = 4000,
        num_val: int = 2000,
        canvas: int = 24,
        align: int = 4,
        scale: int = 1,
        min_gap: int = 2,
        seed: int = 0,
) -> Tuple[torch.utils.data.TensorDataset, torch.utils.data.TensorDataset]:
    """Train and val sets of the left-digit task: images (n, 1, canvas, canvas) in [0, 1],
    labels (n,) in 0..9. Deterministic in `seed`; val canvases use held-out source digits.

    Digits' top-left corners lie on multiples of `align` pixels; the default 4 is the patch size
    of dynamixer_nano, so a digit always covers whole tokens. (With align=1 the same model learns
    far more slowly: most of a small budget goes into recognising digits cut across patches.)
    """
    images, labels = _load_digits()
    train_idx, val_idx = left_digit_split(len(images), seed)
    rng_train = np.random.default_rng([seed, 1])
    rng_val = np.random.default_rng([seed, 2])
    xt, yt, _ = _compose(images[train_idx], labels[train_idx], num_train, canvas, scale, min_gap, rng_train, align)
    xv, yv, _ = _compose(images[val_idx], labels[val_idx], num_val, canvas, scale, min_gap, rng_val, align)
    return (torch.utils.data.TensorDataset(torch.from_numpy(xt)[:, None], torch.from_numpy(yt)),
            torch.utils.data.TensorDataset(torch.from_numpy(xv)[:, None], torch.from_numpy(yv)))


def left_digit_split(num: int, seed: int, val_fraction: float = 0.3) -> Tuple[np.ndarray, np.ndarray]:
    """Fixed seeded split of the source digit indices: (train indices, val indices), disjoint."""
    perm = np.random.default_rng([seed, 0]).permutation(num)
    n_val = int(round(num * val_fraction))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])

"""Data for training and evaluation: image folders (checked), timm data sets, the embedded digits.

Image folders are laid out as ``DATA/train/<class>/*.jpg`` and ``DATA/val/<class>/*.jpg``.
Before training, every image is decoded once (``bad_images='skip'|'error'``) so that a corrupt,
truncated, zero-byte or mislabelled file is reported up front, not half-way through epoch 40.
All images reach the transforms as 8-bit RGB (``to_rgb``: grayscale, RGBA, palette, 16-bit).
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

__all__ = ['DataError', 'to_rgb', 'scan_images', 'check_image_folder', 'DigitsDataset', 'build_datasets',
           'build_transforms', 'eval_transform', 'load_image', 'IMAGE_EXTENSIONS']

_logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')  # what timm's folder reader picks up
_VAL_NAMES = ('val', 'valid', 'validation', 'eval', 'evaluation')
_TRAIN_NAMES = ('train', 'training')


class DataError(ValueError):
    """A data folder or image that cannot be used, with what to do about it."""


# ---- images -------------------------------------------------------------------------------------

def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB. 16-bit and float images are scaled, not clipped, to 0..255."""
    if img.mode == 'RGB':
        return img
    if img.mode in ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I', 'F'):
        a = np.asarray(img, dtype=np.float64)
        if img.mode.startswith('I;16') or a.max(initial=0) > 255:
            a = a / 257.0  # 0..65535 -> 0..255 (PIL's convert('RGB') would clip to white)
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), 'L')
    elif img.mode == 'P':
        img = img.convert('RGBA' if 'transparency' in img.info else 'RGB')
    return img.convert('RGB')


def load_image(path: str) -> Image.Image:
    """Open and decode an image file as RGB; DataError (saying which file and why) if it cannot."""
    if not os.path.isfile(path):
        raise DataError(f'image not found: {path}')
    if os.path.getsize(path) == 0:
        raise DataError(f'{path}: empty file (0 bytes)')
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f'{path}: not a readable image ({e})') from None


def _check_one(path: str) -> Optional[str]:
    """None if `path` decodes as an image, else the reason it does not."""
    try:
        if os.path.getsize(path) == 0:
            return 'empty file (0 bytes)'
        with Image.open(path) as img:
            img.draft('RGB', (64, 64))  # JPEG: decode at reduced size, still reads the whole stream
            img.load()
        return None
    except Exception as e:  # any decoder failure means the file is unusable
        return f'{type(e).__name__}: {e}'


def scan_images(paths: Sequence[str], workers: int = 8) -> List[Tuple[str, str]]:
    """Decode every file once; returns [(path, reason)] for the ones that fail."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        reasons = list(pool.map(_check_one, paths, chunksize=64))
    return [(p, r) for p, r in zip(paths, reasons) if r is not None]


def _scan_shared(paths: Sequence[str]) -> List[Tuple[str, str]]:
    """scan_images, split over the processes of a distributed run (each decodes 1/world of the files)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return scan_images(paths)
    rank, world = dist.get_rank(), dist.get_world_size()
    parts: List[Any] = [None] * world
    dist.all_gather_object(parts, scan_images(paths[rank::world]))
    bad = {p: r for part in parts for p, r in part}
    return [(p, bad[p]) for p in paths if p in bad]


# ---- image folders ------------------------------------------------------------------------------

def _find_split(root: str, split: str) -> Optional[str]:
    names = (split,) + (_TRAIN_NAMES if split in _TRAIN_NAMES else _VAL_NAMES if split in _VAL_NAMES else ())
    for name in names:
        path = os.path.join(root, name)
        if os.path.isdir(path):
            return path
    return None


def check_image_folder(root: str, split: str) -> Tuple[str, List[str]]:
    """The split's folder and its class names; DataError for a missing, empty or flat folder."""
    layout = (f'expected {os.path.join(root, "train", "<class>", "image.jpg")} and '
              f'{os.path.join(root, "val", "<class>", "image.jpg")}, one sub-folder per class')
    if not os.path.exists(root):
        raise DataError(f'data folder not found: {root}')
    if not os.path.isdir(root):
        raise DataError(f'{root} is a file, not a data folder; {layout}')
    if not os.listdir(root):
        raise DataError(f'data folder {root} is empty; {layout}')
    folder = _find_split(root, split)
    if folder is None:
        raise DataError(f'no "{split}" sub-folder in {root}; {layout}')
    entries = sorted(os.listdir(folder))
    classes = [e for e in entries if os.path.isdir(os.path.join(folder, e)) and not e.startswith('.')]
    loose = [e for e in entries if os.path.splitext(e)[1].lower() in IMAGE_EXTENSIONS]
    if not entries:
        raise DataError(f'{folder} is empty; {layout}')
    if not classes:
        what = f'{len(loose)} images' if loose else 'files'
        raise DataError(f'{folder} has {what} but no class sub-folders; put the images of each class in '
                        f'their own sub-folder, {os.path.join(folder, "<class>", "image.jpg")}')
    if loose:
        _logger.warning('%s: ignoring %d images that are not in a class sub-folder', folder, len(loose))
    return folder, classes


def _apply_bad_image_policy(samples: List[Tuple[str, int]], policy: str, where: str,
                            report: Dict[str, Any]) -> List[Tuple[str, int]]:
    if policy == 'off':
        return samples
    bad = _scan_shared([s[0] for s in samples])
    report.setdefault('bad_images', []).extend(bad)
    if not bad:
        return samples
    listing = '\n'.join(f'  {p}: {r}' for p, r in bad[:10]) + ('\n  ...' if len(bad) > 10 else '')
    if policy == 'error':
        raise DataError(f'{where}: {len(bad)} of {len(samples)} images cannot be read:\n{listing}\n'
                        'Remove or replace them, or pass --bad-images skip to train without them.')
    _logger.warning('%s: skipping %d of %d images that cannot be read:\n%s', where, len(bad), len(samples), listing)
    bad_set = {p for p, _ in bad}
    return [s for s in samples if s[0] not in bad_set]


# ---- the embedded digits data set ---------------------------------------------------------------

class DigitsDataset(torch.utils.data.Dataset):
    """scikit-learn's 8x8 digits (1797 images, bundled, no download) upsampled to `size` x `size`.

    A fixed stratified 80/20 split (random_state 0): 1437 training and 360 validation images.
    Items are (transform(PIL RGB image), int label), like timm's ImageDataset.
    """

    classes = [str(i) for i in range(10)]

    def __init__(self, split: str = 'train', size: int = 32, transform: Optional[Callable] = None):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
        digits = load_digits()
        idx_train, idx_val = train_test_split(
            np.arange(len(digits.target)), test_size=0.2, stratify=digits.target, random_state=0)
        idx = idx_train if split in _TRAIN_NAMES else idx_val
        pixels = np.rint(digits.images[idx] * (255.0 / 16.0)).astype(np.uint8)  # values 0..16
        self.images = [Image.fromarray(p, 'L').resize((size, size), Image.BILINEAR) for p in pixels]
        self.targets = [int(t) for t in digits.target[idx]]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> Tuple[Any, int]:
        img = self.images[i]
        return (self.transform(img) if self.transform is not None else img), self.targets[i]


# ---- putting it together ------------------------------------------------------------------------

def build_datasets(config: Dict[str, Any], data: Optional[str]) -> Tuple[Any, Any, List[str], Dict[str, Any]]:
    """(train set, val set, class names, report) for `data` (a folder or --data-dir) and the config.

    Transforms are attached later (``dataset.transform = ...``). The report holds 'bad_images'.
    """
    from timm.data import create_dataset
    report: Dict[str, Any] = {'bad_images': []}
    name = config['dataset']
    if name == 'digits':
        size = config['img_size'] or 32
        return DigitsDataset('train', size), DigitsDataset('val', size), list(DigitsDataset.classes), report
    if not name:
        if not data:
            raise DataError('no data: give a data folder (DATA/train/<class>/..., DATA/val/<class>/...), '
                            'or --dataset digits for the embedded example')
        train_dir, train_classes = check_image_folder(data, config['train_split'])
        val_dir, val_classes = check_image_folder(data, config['val_split'])
        unknown = sorted(set(val_classes) - set(train_classes))
        if unknown:
            raise DataError(f'{val_dir} has classes that {train_dir} lacks: {", ".join(unknown[:10])}')
        train = create_dataset('', root=train_dir, split='', search_split=False, is_training=True,
                               input_img_mode=None)
        class_to_idx = dict(train.reader.class_to_idx)
        if '' in class_to_idx:  # images at the top of the split folder got an empty class name
            raise DataError(f'{train_dir}: images outside class sub-folders; move them into a class folder')
        val = create_dataset('', root=val_dir, split='', search_split=False, class_map=class_to_idx,
                             input_img_mode=None)
        for ds, where in ((train, train_dir), (val, val_dir)):
            ds.reader.samples = _apply_bad_image_policy(ds.reader.samples, config['bad_images'], where, report)
            if len(ds) == 0:
                raise DataError(f'{where}: no readable images (.png, .jpg, .jpeg) in its class sub-folders')
        names = [c for c, _ in sorted(class_to_idx.items(), key=lambda kv: kv[1])]
        return train, val, names, report
    # any other timm data set (torch/..., hfds/..., tfds/..., wds/...)
    kw = dict(root=data, download=config['dataset_download'], input_img_mode=None)
    train = create_dataset(name, split=config['train_split'], is_training=True, **kw)
    val = create_dataset(name, split=config['val_split'], **kw)
    names = _class_names(train)
    return train, val, names, report


def _class_names(ds: Any) -> List[str]:
    for attr in ('classes',):
        if hasattr(ds, attr):
            return [str(c) for c in getattr(ds, attr)]
    reader = getattr(ds, 'reader', None)
    if reader is not None and hasattr(reader, 'class_to_idx'):
        return [c for c, _ in sorted(reader.class_to_idx.items(), key=lambda kv: kv[1])]
    if hasattr(ds, 'class_to_idx'):
        return [c for c, _ in sorted(ds.class_to_idx.items(), key=lambda kv: kv[1])]
    raise DataError('could not find the class names of this data set')


def eval_transform(model: torch.nn.Module, img_size: Optional[int] = None) -> Callable:
    """The model's evaluation transform (resize by crop_pct, centre crop, normalise) from its
    pretrained config, for RGB-converted images of any mode."""
    from timm.data import create_transform, resolve_data_config
    args = {'img_size': img_size} if img_size else {}
    cfg = resolve_data_config(args, model=model)
    cfg['input_size'] = (3, *_model_img_size(model, img_size))
    return _with_rgb(create_transform(**cfg, is_training=False))


def build_transforms(config: Dict[str, Any], model: torch.nn.Module) -> Tuple[Callable, Callable]:
    """(train transform, eval transform) from the config and the model's pretrained config."""
    from timm.data import create_transform, resolve_data_config
    cfg = resolve_data_config({}, model=model)
    size = _model_img_size(model, config['img_size'])
    train_tf = create_transform(
        input_size=(3, *size), is_training=True, scale=tuple(config['scale']), ratio=tuple(config['ratio']),
        hflip=config['hflip'], vflip=0.0, color_jitter=config['color_jitter'] or None,
        auto_augment=config['auto_augment'], interpolation=cfg['interpolation'],
        mean=cfg['mean'], std=cfg['std'], re_prob=config['reprob'], re_mode=config['remode'],
        re_count=config['recount'])
    return _with_rgb(train_tf), eval_transform(model, config['img_size'])


def _model_img_size(model: torch.nn.Module, img_size: Optional[int]) -> Tuple[int, int]:
    if img_size:
        return (img_size, img_size)
    size = getattr(model, 'img_size', None) or model.pretrained_cfg['input_size'][-2:]
    return tuple(size) if isinstance(size, (tuple, list)) else (size, size)


class _WithRGB:
    """Convert to 8-bit RGB first (picklable, for data-loader workers)."""

    def __init__(self, transform: Callable):
        self.transform = transform

    def __call__(self, img: Any) -> Any:
        return self.transform(to_rgb(img) if isinstance(img, Image.Image) else img)

    def __repr__(self) -> str:
        return f'ToRGB + {self.transform!r}'


def _with_rgb(transform: Callable) -> Callable:
    return _WithRGB(transform)

"""Image folders, ``ROOT/<split>/<class>/*.jpg``: the checks with clear messages and the one
builder (a timm ImageDataset with unreadable images skipped or refused) every command uses."""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Mapping, Optional, Tuple

from timm.data import create_dataset

from .images import IMAGE_EXTENSIONS, DataError, scan_shared

__all__ = ['TRAIN_NAMES', 'VAL_NAMES', 'find_split', 'check_image_folder', 'apply_bad_image_policy',
           'image_folder_dataset']

_logger = logging.getLogger('dynamixer.data')

VAL_NAMES = ('val', 'valid', 'validation', 'eval', 'evaluation')
TRAIN_NAMES = ('train', 'training')


def find_split(root: str, split: str) -> Optional[str]:
    """ROOT/split, or the first existing folder of the split's usual names (val, valid, ...)."""
    names = (split,) + (TRAIN_NAMES if split in TRAIN_NAMES else VAL_NAMES if split in VAL_NAMES else ())
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
    folder = find_split(root, split)
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
    empty = [c for c in classes if not _has_image(os.path.join(folder, c))]
    if empty:
        shown = ', '.join(os.path.join(folder, c) for c in empty[:5]) + (' ...' if len(empty) > 5 else '')
        raise DataError(f'{len(empty)} of {len(classes)} class folders have no images ({", ".join(IMAGE_EXTENSIONS)}): '
                        f'{shown}. Every class folder needs images; add some, or remove the folder to '
                        'train without that class.')
    return folder, classes


def _has_image(folder: str) -> bool:
    """Is there an image file anywhere under `folder`? (stops at the first; timm's reader recurses)"""
    for _, _, names in os.walk(folder):
        if any(os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS for n in names):
            return True
    return False


def apply_bad_image_policy(samples: List[Tuple[str, int]], policy: str, where: str,
                           report: Dict[str, Any]) -> List[Tuple[str, int]]:
    """'off': keep all; 'skip': drop unreadable files with a warning; 'error': DataError listing them.
    The unreadable files are appended to report['bad_images']."""
    if policy == 'off':
        return samples
    bad = scan_shared([s[0] for s in samples])
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


def image_folder_dataset(folder: str, class_map: Optional[Mapping[str, int]] = None, bad_images: str = 'skip',
                         report: Optional[Dict[str, Any]] = None, is_training: bool = False) -> Any:
    """A timm ImageDataset of FOLDER/<class>/* (labels from `class_map`, default sorted folder
    order), unreadable images handled by `bad_images`; DataError when no readable image is left."""
    ds = create_dataset('', root=folder, split='', search_split=False, is_training=is_training,
                        class_map=dict(class_map) if class_map is not None else None,  # type: ignore[arg-type]
                        input_img_mode=None)  # type: ignore[arg-type]  # timm's defaults are None
    if '' in ds.reader.class_to_idx:  # images at the top of the split folder got an empty class name
        raise DataError(f'{folder}: images outside class sub-folders; move them into a class folder')
    ds.reader.samples = apply_bad_image_policy(ds.reader.samples, bad_images, folder,
                                               report if report is not None else {})
    if len(ds) == 0:
        raise DataError(f'{folder}: no readable images (.png, .jpg, .jpeg) in its class sub-folders')
    return ds

"""Image files: the one loader every command uses (any mode -> 8-bit RGB) and the up-front scan
that finds unreadable files before training starts."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch.distributed as dist
from PIL import Image

from ..errors import DynaMixerError

__all__ = ['DataError', 'IMAGE_EXTENSIONS', 'to_rgb', 'load_image', 'scan_images']

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')  # what timm's folder reader picks up


class DataError(DynaMixerError, ValueError):
    """A data folder or image that cannot be used, with what to do about it."""


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


def scan_shared(paths: Sequence[str]) -> List[Tuple[str, str]]:
    """scan_images, split over the processes of a distributed run (each decodes 1/world of the files)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return scan_images(paths)
    rank, world = dist.get_rank(), dist.get_world_size()
    parts: List[Any] = [None] * world
    dist.all_gather_object(parts, scan_images(paths[rank::world]))
    bad = {p: r for part in parts for p, r in part}
    return [(p, bad[p]) for p in paths if p in bad]

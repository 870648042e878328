"""Predictions on image files: detections as a COCO results JSON, class-index mask PNGs, and the
pictures with them drawn (torchvision.utils' drawing functions).

A file that cannot be read as an image is named on stderr and skipped; the others go on
(`PredictionReport.skipped` lists them). Outputs are written atomically.
"""
from __future__ import annotations

import io
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from ..data.images import IMAGE_EXTENSIONS, DataError, load_image
from ..files import atomic_write, atomic_write_text
from .evaluation import detections_to_coco

CPU = torch.device('cpu')  # the default device of the functions below

__all__ = ['list_images', 'PredictionReport', 'predict_detection', 'predict_segmentation']

DRAW_MIN_SIDE = 256   # drawn pictures are enlarged to at least this many pixels a side


def list_images(inputs: Sequence[str]) -> List[str]:
    """Image files named directly, and the images (.png .jpg .jpeg) in named folders (sorted);
    DataError for a path that does not exist or a folder without images."""
    paths: List[str] = []
    for p in inputs:
        if os.path.isdir(p):
            found = sorted(os.path.join(p, f) for f in os.listdir(p) if f.lower().endswith(IMAGE_EXTENSIONS))
            if not found:
                raise DataError(f'{p}: no images (.png, .jpg, .jpeg) in this folder')
            paths += found
        elif os.path.exists(p):
            paths.append(p)
        else:
            raise DataError(f'{p}: no such file or folder')
    return paths


@dataclass
class PredictionReport:
    written: List[str] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    count: int = 0


def _read(path: str, report: PredictionReport) -> Optional[torch.Tensor]:
    try:
        img = load_image(path)
    except DataError as e:
        report.skipped.append((path, str(e)))
        print(f'skipped: {e}', file=sys.stderr)
        return None
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def _out_name(path: str, out: str, used: set, suffix: str = '.png') -> str:
    stem = os.path.splitext(os.path.basename(path))[0]
    name, n = stem, 1
    while name in used:   # two inputs of the same name from different folders
        n += 1
        name = f'{stem}_{n}'
    used.add(name)
    return os.path.join(out, name + suffix)


def _save_png(array_or_image: Any, path: str) -> None:
    buf = io.BytesIO()
    img = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
    img.save(buf, format='PNG')
    atomic_write(path, lambda f: f.write(buf.getvalue()))


@torch.no_grad()
def predict_detection(model: nn.Module, paths: Sequence[str], out: str, class_names: Sequence[str],
                      category_ids: Sequence[int], score: float = 0.5, device: torch.device = CPU,
                      draw: bool = True) -> PredictionReport:
    """Detections with score >= `score` on each image: OUT/predictions.json (a COCO results list;
    image_id numbers the images from 1 in order, 'file_name' names them) and, with `draw`,
    OUT/NAME.png with the boxes (and masks) drawn and labelled (images smaller than DRAW_MIN_SIDE
    enlarged by an integer factor first)."""
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks  # torchvision: 'dense' extra
    os.makedirs(out, exist_ok=True)
    report = PredictionReport()
    used: Set[str] = set()
    results: List[Dict[str, Any]] = []
    model.eval()
    for i, path in enumerate(paths):
        img = _read(path, report)
        if img is None:
            continue
        pred = model([img.float().div(255).to(device)])[0]
        keep = pred['scores'] >= score
        pred = {k: v[keep].cpu() for k, v in pred.items()}
        for r in detections_to_coco(pred, i + 1, category_ids):
            results.append(dict(r, file_name=os.path.abspath(path)))
        report.count += 1
        if draw:
            # small images are drawn enlarged (nearest neighbour) so that the labels can be read
            k = max(1, -(-DRAW_MIN_SIDE // min(img.shape[-2:])))
            canvas = img.repeat_interleave(k, -2).repeat_interleave(k, -1)
            if 'masks' in pred and len(pred['masks']):
                masks = pred['masks'][:, 0] > 0.5
                canvas = draw_segmentation_masks(canvas, masks.repeat_interleave(k, -2).repeat_interleave(k, -1),
                                                 alpha=0.45)
            labels = [f'{class_names[int(lab) - 1]} {float(s):.2f}' for lab, s in zip(pred['labels'], pred['scores'])]
            if labels:   # (torchvision warns on an empty set of boxes)
                canvas = draw_bounding_boxes(canvas, pred['boxes'] * k, labels=labels, colors='yellow', width=1)
            target = _out_name(path, out, used)
            _save_png(canvas.permute(1, 2, 0).numpy(), target)
            report.written.append(target)
    atomic_write_text(json.dumps(results), os.path.join(out, 'predictions.json'))
    report.written.insert(0, os.path.join(out, 'predictions.json'))
    return report


def _palette(k: int) -> np.ndarray:
    """(k, 3) uint8 colours, class 0 black (background in most data sets)."""
    rng = np.random.default_rng(0)
    colours = rng.integers(40, 256, (max(k, 1), 3)).astype(np.uint8)
    colours[0] = 0
    return colours


@torch.no_grad()
def predict_segmentation(model: nn.Module, paths: Sequence[str], out: str, class_names: Sequence[str],
                         size: Tuple[int, int], device: torch.device = CPU,
                         draw: bool = True) -> PredictionReport:
    """Per image: OUT/NAME.png, the class-index mask at the image's own size (mode L, or I;16 for
    more than 256 classes), and with `draw` OUT/NAME_overlay.png, the classes coloured over the image."""
    os.makedirs(out, exist_ok=True)
    report = PredictionReport()
    used: Set[str] = set()
    palette = _palette(len(class_names))
    model.eval()
    for path in paths:
        img = _read(path, report)
        if img is None:
            continue
        x = F.interpolate(img.float().div(255)[None], size=size, mode='bilinear', align_corners=False,
                          antialias=True).to(device)
        logits = F.interpolate(model(x).float(), size=img.shape[-2:], mode='bilinear', align_corners=False)
        labels = logits[0].argmax(0).cpu().numpy()
        target = _out_name(path, out, used)
        _save_png(labels.astype(np.uint8 if len(class_names) <= 256 else np.uint16), target)
        report.written.append(target)
        report.count += 1
        if draw:
            rgb = img.permute(1, 2, 0).numpy().astype(np.float32)
            blend = np.where(labels[..., None] > 0, 0.5 * rgb + 0.5 * palette[labels], rgb)
            overlay = target[:-len('.png')] + '_overlay.png'
            _save_png(blend.round().astype(np.uint8), overlay)
            report.written.append(overlay)
    return report

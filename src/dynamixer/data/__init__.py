"""Data for training and evaluation: image folders (checked), timm data sets, the embedded digits
and the left-digit task.

Image folders are laid out as ``DATA/train/<class>/*.jpg`` and ``DATA/val/<class>/*.jpg``.
Before training, every image is decoded once (``bad_images='skip'|'error'``) so that a corrupt,
truncated, zero-byte or mislabelled file is reported up front, not half-way through epoch 40.
All images reach the transforms as 8-bit RGB (``to_rgb``: grayscale, RGBA, palette, 16-bit).

- ``images``: the one image loader (`load_image`, `to_rgb`) and the unreadable-image scan
- ``folders``: image-folder checks and the one image-folder builder (`image_folder_dataset`)
- ``labels``: the one class-names policy (`class_names_for`)
- ``digits``: every use of scikit-learn's digits (embedded set, left-digit task, sample images)
- ``transforms``: the one eval transform and the recipe's train transform
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from timm.data import create_dataset

from .digits import DigitsDataset, LeftDigitDataset, left_digit_datasets, sample_images
from .folders import check_image_folder, find_split, image_folder_dataset
from .images import IMAGE_EXTENSIONS, DataError, load_image, scan_images, to_rgb
from .labels import class_names_for, dataset_class_names
from .transforms import build_transforms, eval_transform, preprocessing_transform

__all__ = ['DataError', 'to_rgb', 'scan_images', 'check_image_folder', 'image_folder_dataset', 'find_split',
           'DigitsDataset', 'LeftDigitDataset', 'left_digit_datasets', 'sample_images', 'build_datasets',
           'build_transforms', 'eval_transform', 'preprocessing_transform', 'load_image', 'class_names_for',
           'dataset_class_names', 'IMAGE_EXTENSIONS']


def build_datasets(config: Dict[str, Any], data: Optional[str]) -> Tuple[Any, Any, List[str], Dict[str, Any]]:
    """(train set, val set, class names, report) for `data` (a folder or --data-dir) and the config.

    Transforms are attached later (``dataset.transform = ...``). The report holds 'bad_images' and,
    for data sets that need them, 'model_kwargs' (e.g. in_chans=1 for the left-digit canvases).
    """
    report: Dict[str, Any] = {'bad_images': []}
    name = config['dataset']
    if name == 'digits':
        size = config['img_size'] or 32
        return DigitsDataset('train', size), DigitsDataset('val', size), list(DigitsDataset.classes), report
    if name == 'left-digit':
        canvas = config['canvas']
        if config['img_size'] and config['img_size'] != canvas:
            raise DataError(f"--img-size {config['img_size']} differs from --canvas {canvas}; "
                            'for the left-digit task set only --canvas')
        try:
            train, val = left_digit_datasets(config['num_train'], config['num_val'], canvas=canvas,
                                             align=config['align'], seed=config['data_seed'])
        except ValueError as e:
            raise DataError(str(e)) from None
        report['model_kwargs'] = dict(in_chans=1, img_size=canvas)
        return train, val, list(LeftDigitDataset.classes), report
    if not name:
        if not data:
            raise DataError('no data: give a data folder (DATA/train/<class>/..., DATA/val/<class>/...), '
                            'or --dataset digits for the embedded example')
        train_dir, train_classes = check_image_folder(data, config['train_split'])
        val_dir, val_classes = check_image_folder(data, config['val_split'])
        unknown = sorted(set(val_classes) - set(train_classes))
        if unknown:
            raise DataError(f'{val_dir} has classes that {train_dir} lacks: {", ".join(unknown[:10])}')
        train = image_folder_dataset(train_dir, None, config['bad_images'], report, is_training=True)
        class_to_idx = dict(train.reader.class_to_idx)
        val = image_folder_dataset(val_dir, class_to_idx, config['bad_images'], report)
        return train, val, dataset_class_names(train), report
    # any other timm data set (torch/..., hfds/..., tfds/..., wds/...)
    kw = dict(root=data, download=config['dataset_download'], input_img_mode=None)
    train = create_dataset(name, split=config['train_split'], is_training=True, **kw)
    val = create_dataset(name, split=config['val_split'], **kw)
    return train, val, dataset_class_names(train), report

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

from ..errors import require
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
    Data of a single class is refused (DataError) unless config['allow_single_class'].
    """
    train, val, names, report = _build(config, data)
    if len(names) < 2 and not config.get('allow_single_class'):
        raise DataError(
            f'the training data has a single class ({", ".join(map(repr, names)) or "none"}): a classifier '
            'of one class learns nothing (its loss is 0 and its accuracy 100% whatever it does). Add the '
            'other classes\' folders, or pass --allow-single-class to train on it deliberately.')
    return train, val, names, report


def _build(config: Dict[str, Any], data: Optional[str]) -> Tuple[Any, Any, List[str], Dict[str, Any]]:
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
    prefix = name.split('/')[0] + '/' if '/' in name else ''
    if prefix not in _TIMM_PREFIXES:
        raise DataError(f"unknown data set '{name}': use a data folder (no --dataset), 'digits', 'left-digit', "
                        f"or a timm data set named {', '.join(p + 'NAME' for p in _TIMM_PREFIXES)}")
    package = _TIMM_PREFIXES[prefix]
    if package:
        require(package, None, f"timm's {prefix} data sets")
    if not data:
        raise DataError(f"the data set '{name}' needs a folder to read it from (or download it into): "
                        f'dynamixer train DIR --dataset {name} [--dataset-download]')
    kw = dict(root=data, download=config['dataset_download'], input_img_mode=None)
    try:
        train = create_dataset(name, split=config['train_split'], is_training=True, **kw)
        val = create_dataset(name, split=config['val_split'], **kw)
    except (AssertionError, RuntimeError, ValueError, OSError) as e:  # timm / torchvision on bad names, missing files
        hint = '' if config['dataset_download'] else ' (--dataset-download lets it download the data)'
        raise DataError(f"cannot load the data set '{name}' from {data or 'the default folder'}: "
                        f'{e or type(e).__name__}{hint}') from None
    return train, val, dataset_class_names(train), report


# timm's data set prefixes -> the package each needs beyond timm
_TIMM_PREFIXES = {'torch/': None, 'hfds/': 'datasets', 'hfids/': 'datasets', 'tfds/': 'tensorflow_datasets',
                  'wds/': 'webdataset'}

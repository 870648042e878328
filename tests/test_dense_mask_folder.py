"""Semantic segmentation folders (dynamixer.dense.mask_folder): the digits masks on disk, and each
bad input named."""
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from dynamixer.data.images import DataError
from dynamixer.dense import DigitsDetection
from dynamixer.dense.mask_folder import MaskFolder, read_class_names


def _folder(digits_coco, tmp_path):
    shutil.copytree(digits_coco, tmp_path / 'd')
    d = tmp_path / 'd'
    return d, d / 'train' / 'images', d / 'train' / 'masks', read_class_names(str(d / 'classes.txt'))


def test_masks_are_the_canvases_labels(digits_coco):
    names = read_class_names(str(digits_coco / 'classes.txt'))
    assert names == ['background'] + [str(d) for d in range(10)]
    ds = MaskFolder(str(digits_coco / 'train' / 'images'), str(digits_coco / 'train' / 'masks'), names)
    src = DigitsDetection(16, 'train', 32, digit_size=(10, 14), max_digits=2, seed=0)
    assert len(ds) == 16 and ds.num_classes == 11
    for i in range(len(ds)):
        image, mask = ds[i]
        assert image.shape == (3, 32, 32) and mask.dtype == torch.int64
        assert torch.equal(mask, src.semantic[i])
    assert ds.pixels.sum() == 16 * 32 * 32


def test_ignore_index_is_allowed(digits_coco, tmp_path):
    d, images, masks, names = _folder(digits_coco, tmp_path)
    m = np.asarray(Image.open(masks / '000000.png')).copy()
    m[:3] = 255
    Image.fromarray(m, 'L').save(masks / '000000.png')
    assert int(MaskFolder(str(images), str(masks), names)[0][1].eq(255).sum()) == 3 * 32


@pytest.mark.parametrize('damage, message', [
    (lambda images, masks: (masks / '000003.png').unlink(), 'have no mask NAME.png'),
    (lambda images, masks: Image.fromarray(np.zeros((16, 32), np.uint8), 'L').save(masks / '000003.png'),
     'is 32x16 but its image'),
    (lambda images, masks: Image.fromarray(np.full((32, 32), 11, np.uint8), 'L').save(masks / '000003.png'),
     r'pixel values \[11\] outside the 11 classes'),
    (lambda images, masks: Image.fromarray(np.zeros((32, 32, 3), np.uint8), 'RGB').save(masks / '000003.png'),
     'one-channel class-index PNG'),
    (lambda images, masks: (masks / '000003.png').write_bytes(b'not a png'), 'not a readable mask'),
])
def test_bad_masks_are_named(digits_coco, tmp_path, damage, message):
    d, images, masks, names = _folder(digits_coco, tmp_path)
    damage(images, masks)
    with pytest.raises(DataError, match=message) as e:
        MaskFolder(str(images), str(masks), names)
    assert '000003' in str(e.value)


def test_class_names_file_and_ignore_index_checked(digits_coco, tmp_path):
    d, images, masks, names = _folder(digits_coco, tmp_path)
    (d / 'dup.txt').write_text('a\nb\na\n')
    with pytest.raises(DataError, match="'a' appears twice"):
        read_class_names(str(d / 'dup.txt'))
    (d / 'empty.txt').write_text('\n\n')
    with pytest.raises(DataError, match='no class names'):
        read_class_names(str(d / 'empty.txt'))
    with pytest.raises(DataError, match='ignore index 3 is one of the 11 classes'):
        MaskFolder(str(images), str(masks), names, ignore_index=3)

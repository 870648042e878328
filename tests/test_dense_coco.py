"""The COCO-format reader (dynamixer.dense.coco) on the digits set written to disk
(dynamixer.dense.digits_coco), and every kind of bad input it names or counts."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip('pycocotools')
from pycocotools import mask as mask_utils  # noqa: E402

from dynamixer.data.images import DataError  # noqa: E402
from dynamixer.dense import DigitsDetection  # noqa: E402
from dynamixer.dense.coco import CocoDetection, decode_mask  # noqa: E402


def _copy(digits_coco, tmp_path):
    shutil.copytree(digits_coco, tmp_path / 'd')
    return tmp_path / 'd'


def _edit(path, fn):
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def test_written_set_round_trips_the_canvases(digits_coco):
    """Boxes, labels and RLE masks read back equal the in-memory DigitsDetection canvases, and
    the PNGs equal its images to 8-bit rounding."""
    src = DigitsDetection(16, 'train', 32, digit_size=(10, 14), max_digits=2, seed=0)
    ds = CocoDetection(str(digits_coco / 'train' / 'annotations.json'), masks=True)
    assert len(ds) == 16 and ds.class_names == [str(d) for d in range(10)] and ds.category_ids == list(range(1, 11))
    assert ds.image_dir == str(digits_coco / 'train' / 'images')
    for i in range(len(ds)):
        image, t = ds[i]
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32
        assert torch.allclose(image, src.images[i], atol=0.5 / 255 + 1e-6)
        torch.testing.assert_close(t['boxes'], src.targets[i]['boxes'])
        assert torch.equal(t['labels'], src.targets[i]['labels'])
        assert torch.equal(t['masks'], src.targets[i]['masks'])
        assert int(t['image_id']) == i + 1
    assert ds.report['negatives'] == sum(1 for t in src.targets if len(t['labels']) == 0)


def test_polygons_and_uncompressed_rle_decode():
    poly = [[2, 2, 10, 2, 10, 8, 2, 8]]   # a 8x6 rectangle
    m = decode_mask(poly, 12, 16, 'x')
    assert m.shape == (12, 16) and m[3:8, 3:10].all() and not m[9:, :].any()
    mask = np.zeros((12, 16), np.uint8)
    mask[4:7, 5:9] = 1
    counts, flat, prev, run = [], mask.ravel(order='F'), 0, 0
    for v in flat:   # uncompressed RLE: run lengths from 0s, column-major
        if v != prev:
            counts.append(run)
            run, prev = 0, v
        run += 1
    counts.append(run)
    assert np.array_equal(decode_mask(dict(size=[12, 16], counts=counts), 12, 16, 'x'), mask)
    rle = mask_utils.encode(np.asfortranarray(mask))
    assert np.array_equal(decode_mask(dict(size=[12, 16], counts=rle['counts'].decode()), 12, 16, 'x'), mask)


def test_non_contiguous_categories_are_mapped_and_named(digits_coco, tmp_path):
    d = _copy(digits_coco, tmp_path)
    ann = d / 'train' / 'annotations.json'

    def remap(data):   # ids 1..10 -> 10, 20, ..., 100, listed out of order
        for c in data['categories']:
            c['id'] *= 10
        data['categories'].reverse()
        for a in data['annotations']:
            a['category_id'] *= 10
    _edit(ann, remap)
    ds = CocoDetection(str(ann))
    ref = CocoDetection(str(digits_coco / 'train' / 'annotations.json'))
    assert ds.category_ids == [10 * k for k in range(1, 11)] and ds.class_names == ref.class_names
    for i in range(len(ds)):
        assert torch.equal(ds.target(i)['labels'], ref.target(i)['labels'])
    gt = ds.coco_ground_truth()
    assert {a['category_id'] for a in gt['annotations']} <= set(ds.category_ids)


def test_crowd_clipped_empty_and_negative_are_counted(digits_coco, tmp_path):
    d = _copy(digits_coco, tmp_path)
    ann = d / 'train' / 'annotations.json'
    data = json.loads(ann.read_text())
    n = len(data['annotations'])
    img = next(a['image_id'] for a in data['annotations'])
    extra = [dict(id=n + 1, image_id=img, category_id=3, bbox=[20, 20, 30, 30], iscrowd=0),   # reaches outside
             dict(id=n + 2, image_id=img, category_id=3, bbox=[5, 5, 0, 4], iscrowd=0),       # zero width
             dict(id=n + 3, image_id=img, category_id=3, bbox=[40, 40, 5, 5], iscrowd=0),     # wholly outside
             dict(id=n + 4, image_id=img, category_id=4, bbox=[1, 1, 6, 6], iscrowd=1)]       # crowd
    data['annotations'] += extra
    ann.write_text(json.dumps(data))
    ds = CocoDetection(str(ann))
    assert ds.report['crowd'] == 1 and ds.report['clipped'] == 2 and ds.report['empty_boxes'] == 2
    i = [im.id for im in ds.images].index(img)
    t = ds.target(i)
    assert t['boxes'][-1].tolist() == [20, 20, 32, 32]        # clipped to the 32x32 image
    assert (t['boxes'][:, 2:] > t['boxes'][:, :2]).all()
    assert 'crowd' in ds.describe() and 'clipped' in ds.describe()
    gt = ds.coco_ground_truth()
    assert sum(a['iscrowd'] for a in gt['annotations']) == 1   # pycocotools sees the crowd region


@pytest.mark.parametrize('damage, message', [
    (lambda p: p.write_text(p.read_text()[:len(p.read_text()) // 2]), 'not valid JSON'),
    (lambda p: p.write_text('{"images": [], "annotations": [}'), 'not valid JSON'),
    (lambda p: p.write_text('[1, 2]'), 'JSON list'),
    (lambda p: _edit(p, lambda d: d.pop('categories')), "no 'categories'"),
    (lambda p: _edit(p, lambda d: d.pop('images')), "no 'images'"),
    (lambda p: _edit(p, lambda d: d.pop('annotations')), "no 'annotations'"),
    (lambda p: _edit(p, lambda d: d['annotations'].append(dict(id=999, image_id=12345, category_id=1,
                                                                bbox=[1, 1, 2, 2]))), 'image id 12345'),
    (lambda p: _edit(p, lambda d: d['annotations'].append(dict(id=999, image_id=1, category_id=77,
                                                                bbox=[1, 1, 2, 2]))), 'category_id 77'),
    (lambda p: _edit(p, lambda d: d['annotations'].append(dict(id=999, image_id=1, category_id=1,
                                                                bbox=[1, 1, 'x', 2]))), 'four numbers'),
    (lambda p: _edit(p, lambda d: d['images'][0].update(file_name='gone.png')), 'gone.png'),
    (lambda p: _edit(p, lambda d: d['images'][0].update(width=99)), 'do not have the size'),
])
def test_bad_annotation_files_are_named(digits_coco, tmp_path, damage, message):
    d = _copy(digits_coco, tmp_path)
    ann = d / 'train' / 'annotations.json'
    damage(ann)
    with pytest.raises(DataError, match=message) as e:
        CocoDetection(str(ann))
    assert str(ann) in str(e.value) or 'gone.png' in str(e.value)


def test_mask_of_another_size_is_named(digits_coco, tmp_path):
    d = _copy(digits_coco, tmp_path)
    ann = d / 'train' / 'annotations.json'

    def shrink(data):
        a = data['annotations'][0]
        a['segmentation'] = dict(size=[16, 16], counts=mask_utils.encode(
            np.asfortranarray(np.ones((16, 16), np.uint8)))['counts'].decode())
    _edit(ann, shrink)
    ds = CocoDetection(str(ann), masks=True)
    first = json.loads(ann.read_text())['annotations'][0]
    i = [im.id for im in ds.images].index(first['image_id'])
    with pytest.raises(DataError, match=r'annotation 1: the mask \(RLE\) is 16x16 but its image is 32x32'):
        ds[i]


def test_masks_needed_for_maskrcnn(digits_coco, tmp_path):
    d = _copy(digits_coco, tmp_path)
    ann = d / 'train' / 'annotations.json'
    _edit(ann, lambda data: data['annotations'][0].pop('segmentation'))
    CocoDetection(str(ann))   # boxes alone are fine
    with pytest.raises(DataError, match='no "segmentation"'):
        CocoDetection(str(ann), masks=True)


@pytest.mark.parametrize('mode', ['L', 'RGBA', 'CMYK', 'I;16', 'P'])
def test_image_modes_load_as_rgb(digits_coco, tmp_path, mode):
    d = _copy(digits_coco, tmp_path)
    path = d / 'train' / 'images' / '000000.png'
    rgb = Image.open(path).convert('RGB')
    if mode == 'I;16':
        img = Image.fromarray(np.asarray(rgb.convert('L')).astype(np.uint16) * 257)   # mode I;16
    else:
        img = rgb.convert(mode)
    if mode == 'CMYK':
        path = path.with_suffix('.jpg')
        img.save(path, quality=95)
        _edit(d / 'train' / 'annotations.json', lambda data: data['images'][0].update(file_name='000000.jpg'))
    else:
        img.save(path)
    ds = CocoDetection(str(d / 'train' / 'annotations.json'))
    image, _ = ds[0]
    assert image.shape == (3, 32, 32)
    if mode in ('L', 'I;16'):
        assert torch.equal(image[0], image[1])


def test_imposed_classes_must_match(digits_coco):
    ann = str(digits_coco / 'val' / 'annotations.json')
    CocoDetection(ann, category_ids=list(range(1, 11)), class_names=[str(d) for d in range(10)])
    with pytest.raises(DataError, match='not the ones the model was trained on'):
        CocoDetection(ann, category_ids=list(range(1, 4)), class_names=['a', 'b', 'c'])

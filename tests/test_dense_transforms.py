"""v2 augmentation for dense tasks (dynamixer.dense.transforms): boxes and masks follow the image."""
import pickle

import pytest
import torch

pytest.importorskip('torchvision')
from dynamixer.dense.transforms import (  # noqa: E402
    detection_train_transform,
    segmentation_eval_transform,
    segmentation_train_transform,
)


def _item():
    img = torch.zeros(3, 40, 50)
    img[:, 2:30, 1:20] = 1.0
    mask = torch.zeros(1, 40, 50, dtype=torch.uint8)
    mask[0, 2:30, 1:20] = 1
    return img, dict(boxes=torch.tensor([[1., 2, 20, 30]]), labels=torch.tensor([4]), masks=mask)


def test_flip_moves_boxes_and_masks_with_the_image():
    img, t = _item()
    out, tt = detection_train_transform((40, 50), hflip=1.0, crop_scale=(1.0, 1.0))(img, t)
    assert tt['boxes'].tolist() == [[30., 2., 49., 30.]] and tt['labels'].tolist() == [4]
    assert torch.equal(out[0] > 0.5, tt['masks'][0].bool())   # the mask still covers the object's pixels
    assert type(out) is torch.Tensor and type(tt['boxes']) is torch.Tensor


def test_crops_keep_boxes_tight_and_drop_emptied_ones():
    torch.manual_seed(0)
    img, t = _item()
    t = dict(t, boxes=torch.tensor([[1., 2, 20, 30], [45., 35, 50, 40]]), labels=torch.tensor([4, 7]),
             masks=torch.cat([t['masks'], torch.zeros(1, 40, 50, dtype=torch.uint8)]))
    t['masks'][1, 35:40, 45:50] = 1
    transform = pickle.loads(pickle.dumps(detection_train_transform((32, 32), hflip=0.0, crop_scale=(0.3, 0.6))))
    seen_drop = False
    for _ in range(30):
        out, tt = transform(img, t)
        assert out.shape == (3, 32, 32) and len(tt['boxes']) == len(tt['labels']) == len(tt['masks'])
        seen_drop |= len(tt['labels']) < 2
        for box, m in zip(tt['boxes'], tt['masks']):
            ys, xs = torch.nonzero(m, as_tuple=True)
            if len(ys):   # the box still bounds its mask (to the resize's rounding)
                assert xs.min() >= box[0] - 1.5 and xs.max() + 1 <= box[2] + 1.5
                assert ys.min() >= box[1] - 1.5 and ys.max() + 1 <= box[3] + 1.5
    assert seen_drop


def test_segmentation_masks_resize_by_nearest_neighbour():
    img = torch.rand(3, 40, 50)
    mask = torch.randint(0, 5, (40, 50))
    mask[:4] = 255
    out, m = segmentation_train_transform((32, 32), hflip=0.5, crop_scale=(0.5, 1.0))(img, mask)
    assert out.shape == (3, 32, 32) and m.shape == (32, 32) and m.dtype == torch.int64
    assert set(m.unique().tolist()) <= set(range(5)) | {255}
    out, m = segmentation_eval_transform((32, 32))(img, mask)
    assert out.shape == (3, 32, 32) and m is mask

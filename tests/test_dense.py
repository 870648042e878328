"""Dense prediction: the pyramid backbone with torchvision's detectors, pretrained weights, size
checks, the segmentation model, the digits detection data set and the `dynamixer dense` command."""
import csv
import os
import sys
from collections import OrderedDict

import pytest
import timm
import torch

torchvision = pytest.importorskip('torchvision')
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet  # noqa: E402

from dynamixer import pyramid_backbone  # noqa: E402
from dynamixer.cli import main  # noqa: E402
from dynamixer.dense import (  # noqa: E402
    DenseError,
    DigitsDetection,
    build_detector,  # noqa: E402
    detector_kwargs,
    segmentation_model,
    validate_targets,
)
from dynamixer.dense.trainer import evaluate_detection  # noqa: E402
from dynamixer.errors import DynaMixerError, MissingDependencyError  # noqa: E402
from reference import NANO, make_authors_state_dict  # noqa: E402

pytestmark = pytest.mark.usefixtures('one_thread')


def _targets(n, size, empty_first=True):
    h, w = size
    out = []
    for i in range(n):
        if i == 0 and empty_first:  # torchvision trains on an empty target as all background
            out.append(dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.int64),
                            masks=torch.zeros(0, h, w, dtype=torch.uint8)))
            continue
        masks = torch.zeros(2, h, w, dtype=torch.uint8)
        masks[0, 2:12, 3:10] = 1
        masks[1, 15:28, 14:30] = 1
        out.append(dict(boxes=torch.tensor([[3., 2, 10, 12], [14, 15, 30, 28]]), labels=torch.tensor([1, 4]),
                        masks=masks))
    return out


@pytest.mark.parametrize('pyramid', ['fpn', 'simple'])
def test_backbone_output_format(pyramid):
    b = pyramid_backbone('dynamixer_nano', img_size=(32, 64), out_channels=16, pyramid=pyramid)
    out = b(torch.randn(2, 3, 32, 64))
    assert isinstance(out, OrderedDict)
    assert list(out) == ['0', '1', '2', '3', 'pool'] == b.names
    assert b.out_channels == 16 and b.strides == [4, 8, 16, 32, 64]
    for name, stride in zip(b.names, b.strides):
        assert out[name].shape == (2, 16, -(-32 // stride), -(-64 // stride))


def test_fpn_reads_the_finest_map_of_each_stride():
    b = pyramid_backbone('dynamixer_nano', img_size=32, out_channels=8)
    assert b.take == [0, 3]   # nano: stage 0 at stride 4, stages 1-3 at stride 8 (the last is used)
    r = pyramid_backbone('lcnet_050', img_size=32, out_channels=8)   # timm trunk: stride-2 map left out
    assert r.body.feature_info.reduction() == [4, 8, 16, 32] and r.strides == [4, 8, 16, 32, 64]
    assert not r.fixed_size


@pytest.mark.parametrize('kind', ['fasterrcnn', 'retinanet', 'maskrcnn'])
def test_torchvision_detectors_take_the_backbone_unchanged(kind):
    b = pyramid_backbone('dynamixer_nano', img_size=32, out_channels=16)
    cls = dict(fasterrcnn=FasterRCNN, retinanet=RetinaNet, maskrcnn=MaskRCNN)[kind]
    model = cls(b, num_classes=5, **detector_kwargs(b))   # default anchors, heads, everything else
    model.train()
    losses = model([torch.rand(3, 32, 32) for _ in range(2)], _targets(2, (32, 32)))
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is not None for n, p in b.body.named_parameters() if 'generate' in n)
    model.eval()
    with torch.no_grad():   # any input size: the transform resizes to 32x32, boxes come back scaled
        preds = model([torch.rand(3, 40, 50)])
    assert set(preds[0]) >= {'boxes', 'labels', 'scores'}
    if len(preds[0]['boxes']):
        assert float(preds[0]['boxes'][:, 2].max()) <= 50 and float(preds[0]['boxes'][:, 3].max()) <= 40


def test_build_detector_tiny_anchors():
    b = pyramid_backbone('dynamixer_nano', img_size=32, out_channels=16)
    m = build_detector('retinanet', b, 5)
    assert m.anchor_generator.sizes[0] == (8, 10, 13) and len(m.anchor_generator.sizes) == 5
    assert m.transform.fixed_size == (32, 32) and m.transform.size_divisible == 1
    assert m.detections_per_img == 100
    mask = build_detector('maskrcnn', b, 5)        # heads as wide as the pyramid, fewer proposals
    assert mask.roi_heads.box_head.fc7.out_features == 64 and mask.roi_heads.box_predictor.cls_score.out_features == 5
    assert mask.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 5
    assert mask.rpn._post_nms_top_n == dict(training=300, testing=100)
    faster = build_detector('fasterrcnn', b, 5, rpn_post_nms_top_n_test=50)   # kwargs override
    assert faster.rpn._post_nms_top_n['testing'] == 50 and faster.roi_heads.mask_head is None
    with pytest.raises(DenseError, match='detector must be one of'):
        build_detector('yolo', b, 5)


# ------------------------------------------------------------------ sizes

def test_wrong_image_size_says_how_to_build_for_it():
    b = pyramid_backbone('dynamixer_nano', img_size=32, out_channels=8)
    assert issubclass(DenseError, DynaMixerError) and issubclass(DenseError, ValueError)
    with pytest.raises(DenseError, match=r"img_size=\(48, 64\).*fixed_size=\(32, 32\)"):
        b(torch.randn(1, 3, 48, 64))
    # the detector with torchvision's default transform resizes to 800: the same error explains it
    with pytest.raises(DenseError, match='min_size=32, max_size=32'):
        FasterRCNN(b, num_classes=3).eval()([torch.rand(3, 32, 32)])


def test_size_the_architecture_cannot_take():
    with pytest.raises(DenseError, match='Nearest sizes that work'):
        pyramid_backbone('dynamixer_nano', img_size=36)
    with pytest.raises(DenseError, match='pyramid must be one of'):
        pyramid_backbone('dynamixer_nano', img_size=32, pyramid='bifpn')


# ------------------------------------------------------------------ pretrained weights

def _stage_maps(model, x):
    return model.forward_intermediates(x, intermediates_only=True)


@pytest.mark.parametrize('layout', ['project', 'authors'])
def test_pretrained_file_loads_and_resamples(tmp_path, layout):
    if layout == 'project':
        src = timm.create_model('dynamixer_nano', num_classes=10)
        state = {k: v + 0.01 * torch.randn_like(v) for k, v in src.state_dict().items()}
        path = tmp_path / 'nano.pth'
        torch.save({'state_dict': state, 'epoch': 3}, path)   # a training checkpoint
    else:   # the authors' key names (spec section 4), as their training script saves them
        state = {'module.' + k: v.float() for k, v in make_authors_state_dict(**NANO, num_classes=10).items()}
        path = tmp_path / 'authors.pth.tar'
        torch.save({'state_dict_ema': state}, path)
    for size in (32, 64):   # 64: the generators are resampled to the 16x16 / 8x8 token grids
        ref = timm.create_model('dynamixer_nano', img_size=size, num_classes=10, pretrained=True,
                                pretrained_cfg_overlay=dict(file=str(path), num_classes=10)).eval()
        b = pyramid_backbone('dynamixer_nano', img_size=size, out_channels=8, pretrained_file=path).eval()
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            want = _stage_maps(ref, x)
            got = b.body(x)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)
    fresh = pyramid_backbone('dynamixer_nano', img_size=32, out_channels=8)
    assert not torch.equal(fresh.body.model.stem.proj.weight, b.body.model.stem.proj.weight)


def test_checkpoint_of_another_architecture(tmp_path):
    path = tmp_path / 'shallow.pth'   # a nano with one layer per stage
    torch.save(timm.create_model('dynamixer_nano', depths=(1, 1, 1, 1)).state_dict(), path)
    with pytest.raises(DenseError, match=r'shallow.pth.*does not fit this model.*layers per stage \(1, 1, 1, 1\)'):
        pyramid_backbone('dynamixer_nano', img_size=32, pretrained_file=path)
    with pytest.raises(DynaMixerError, match='not found'):
        pyramid_backbone('dynamixer_nano', pretrained_file=tmp_path / 'missing.pth')


def test_timm_trunk_pretrained_file(tmp_path):
    src = timm.create_model('lcnet_050', num_classes=7)    # a classifier with its own head
    path = tmp_path / 'lcnet.pth'
    torch.save({'state_dict': src.state_dict()}, path)
    b = pyramid_backbone('lcnet_050', img_size=32, out_channels=8, pretrained_file=path)
    ours = b.body.state_dict()
    loaded = [k for k in ours if k in src.state_dict()]
    assert len(loaded) > 20 and all(torch.equal(ours[k], src.state_dict()[k]) for k in loaded)
    torch.save(timm.create_model('lcnet_075').state_dict(), tmp_path / 'wider.pth')
    with pytest.raises(DenseError, match=r'wider.pth: the weights do not fit lcnet_050'):
        pyramid_backbone('lcnet_050', img_size=32, pretrained_file=tmp_path / 'wider.pth')


@pytest.mark.parametrize('module', ['torchvision.ops', 'torchvision.models.detection', 'pycocotools.coco'])
def test_missing_optional_packages_name_the_dense_extra(monkeypatch, module, digits_coco):
    from dynamixer.dense import CocoDetection
    b = pyramid_backbone('dynamixer_nano', img_size=32, out_channels=8, pyramid='simple')
    det = build_detector('retinanet', b, 11)
    val = CocoDetection(str(digits_coco / 'val' / 'annotations.json'))
    monkeypatch.setitem(sys.modules, module, None)    # as if the package were not installed
    with pytest.raises(MissingDependencyError, match=r'pip install "dynamixer\[dense\]"') as e:
        if module == 'torchvision.ops':
            pyramid_backbone('dynamixer_nano', img_size=32, out_channels=8, pyramid='fpn')
        elif module == 'torchvision.models.detection':
            build_detector('retinanet', b, 3)
        else:
            evaluate_detection(det, val, torch.device('cpu'))
    assert isinstance(e.value, DynaMixerError)


# ------------------------------------------------------------------ segmentation

def test_segmentation_logits_at_input_resolution():
    m = segmentation_model('dynamixer_nano', num_classes=7, img_size=(32, 48), out_channels=16)
    x = torch.randn(2, 3, 32, 48)
    logits = m(x)
    assert logits.shape == (2, 7, 32, 48)
    torch.nn.functional.cross_entropy(logits, torch.randint(0, 7, (2, 32, 48))).backward()
    assert m.backbone.body.model.stem.proj.weight.grad is not None


# ------------------------------------------------------------------ data set

def test_digits_detection_boxes_masks_labels_agree():
    d = DigitsDetection(24, 'train', 48, seed=3, empty_fraction=0.2)
    assert d.images.shape == (24, 3, 48, 48) and 0 <= float(d.images.min()) and float(d.images.max()) <= 1
    n_empty = 0
    for i in range(len(d)):
        img, t = d[i]
        n = len(t['boxes'])
        n_empty += n == 0
        assert t['labels'].shape == (n,) and t['masks'].shape == (n, 48, 48)
        assert ((t['labels'] >= 1) & (t['labels'] <= 10)).all()
        for box, mask, label in zip(t['boxes'], t['masks'], t['labels']):
            ys, xs = torch.nonzero(mask, as_tuple=True)   # the box is the mask's tight box
            assert box.tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
            assert (d.semantic[i][mask.bool()] == label).all()
        covered = t['masks'].sum(0) if n else torch.zeros(48, 48)
        assert covered.max() <= 1                             # instances never overlap
        assert ((d.semantic[i] > 0) == (covered > 0)).all()
        validate_targets([img], [t], need_masks=True)
    assert n_empty > 0
    again = DigitsDetection(24, 'train', 48, seed=3, empty_fraction=0.2)
    assert torch.equal(again.images, d.images)                # fixed, seeded


def test_validate_targets_rejects_bad_boxes():
    img = [torch.rand(3, 32, 32)]
    def t(boxes, labels=None):
        boxes = torch.tensor(boxes, dtype=torch.float32)
        return [dict(boxes=boxes, labels=torch.ones(len(boxes), dtype=torch.int64) if labels is None else labels)]
    with pytest.raises(DenseError, match='outside the 32x32 image.*clip_boxes_to_image'):
        validate_targets(img, t([[1, 1, 40, 10]]))
    with pytest.raises(DenseError, match='no area'):
        validate_targets(img, t([[5, 5, 5, 10]]))
    with pytest.raises(DenseError, match='background'):
        validate_targets(img, t([[1, 1, 5, 5]], torch.tensor([0])))
    validate_targets(img, [dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.int64))])


# ------------------------------------------------------------------ the command

def test_dense_command_tiny_end_to_end(tmp_path, capsys):
    """The grid over `train_dense` (the detect / segment training loop): data written once, one run
    folder per job, the tables; run again, every finished record is reused."""
    pytest.importorskip('pycocotools')
    flags = ['dense', '--tasks', 'retinanet', 'maskrcnn', 'segmentation', '--backbones', 'dynamixer_nano',
             '--canvas', '32', '--digit-size', '8', '14', '--train-size', '8', '--val-size', '4',
             '--batch-size', '4', '--epochs', '1', '--warmup-epochs', '0', '--seeds', '0', '--out-channels', '16',
             '--out', str(tmp_path)]
    assert main(flags) == 0
    rows = list(csv.DictReader(open(tmp_path / 'dense_runs.csv')))
    assert [r['task'] for r in rows] == ['retinanet', 'maskrcnn', 'segmentation']
    assert all(0 <= float(r['AP']) <= 100 for r in rows[:2]) and float(rows[1]['mask_AP']) >= 0
    assert 0 <= float(rows[2]['mIoU']) <= 100 and float(rows[2]['pixel_acc']) > 0
    table = (tmp_path / 'dense_table.md').read_text()
    assert '| maskrcnn | dynamixer_nano | fpn |' in table and '±' in table
    assert (tmp_path / 'data' / 'train' / 'annotations.json').is_file()
    for r in rows:   # each run is an ordinary run folder of `detect train` / `segment train`
        assert all(os.path.isfile(os.path.join(r['run'], f)) for f in ('last.pth', 'curves.png'))
    capsys.readouterr()
    assert main(flags) == 0
    assert capsys.readouterr().out.count('reusing') == 3


def test_dense_command_bad_flags_are_refused_before_training(tmp_path, capsys):
    out = tmp_path / 'out'
    for flags in (['--epochs', '0'], ['--jobs', '0'], ['--lr', '0'], ['--canvas', '4'], ['--seeds', '-1']):
        with pytest.raises(SystemExit) as e:     # argparse refuses the value (argtypes.Bounded)
            main(['dense', '--out', str(out)] + flags)
        assert e.value.code == 2 and flags[0] in capsys.readouterr().err
    file = tmp_path / 'a_file'
    file.write_text('x')
    for flags, message in ((['--epochs', '2', '--warmup-epochs', '3'], '--warmup-epochs must be at most --epochs (2)'),
                           (['--digit-size', '20', '10'], 'MIN <= MAX'),
                           (['--canvas', '16', '--digit-size', '10', '20'], '<= --canvas (16)'),
                           (['--train-size', '4', '--batch-size', '8'], 'at least --batch-size'),
                           (['--pretrained-file', str(tmp_path / 'missing.pth')], 'not found'),
                           (['--data', str(tmp_path)], 'no train/annotations.json'),
                           (['--out', str(file)], 'is a file')):
        args = ['dense', '--out', str(out)] + flags
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith('error: ') and message in err and 'Traceback' not in err, err
    assert not out.exists()


# ------------------------------------------------------------------ learning (slow)

def _digits_settings(task, data, out, **kw):
    from dynamixer.dense.trainer import resolve_settings
    overrides = dict(img_size=[48], batch_size=8, threads=1, workers=0, progress=False, hflip=0.0,
                     crop_scale=[1.0, 1.0], output=str(out), **kw)
    if task == 'segment':
        s = resolve_settings('segment', overrides=overrides)
        s['data'] = dict(train_images=str(data / 'train' / 'images'), train_masks=str(data / 'train' / 'masks'),
                         classes=str(data / 'classes.txt'), val_images=str(data / 'val' / 'images'),
                         val_masks=str(data / 'val' / 'masks'))
    else:
        s = resolve_settings('detect', overrides=dict(overrides, detector=task))
        s['data'] = dict(train=str(data / 'train' / 'annotations.json'), val=str(data / 'val' / 'annotations.json'))
    return s


@pytest.fixture(scope='module')
def digits48(tmp_path_factory):
    from dynamixer.dense import write_digits_coco
    out = tmp_path_factory.mktemp('digits48')
    write_digits_coco(str(out), num_train=1000, num_val=100, canvas=48, digit_size=(10, 20), max_digits=3)
    return out


@pytest.mark.slow
def test_retinanet_and_segmenter_learn_on_digits(digits48, tmp_path):
    """The documented recipe, shortened (RetinaNet 2 epochs, the segmenter 4): both learn well beyond
    what an untrained model or a background-only segmenter scores (mIoU of all-background is at
    most 100/11 = 9.1%; after 2 epochs the segmenter is at 11-12)."""
    from dynamixer.dense.trainer import train_dense
    det = train_dense(_digits_settings('retinanet', digits48, tmp_path / 'r', epochs=2))['history'][-1]
    assert det['AP50'] > 8 and det['AP'] > 3, det
    seg = train_dense(_digits_settings('segment', digits48, tmp_path / 's', epochs=4))['history'][-1]
    assert seg['mIoU'] > 12, seg


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['fasterrcnn', 'maskrcnn'])
def test_two_stage_detectors_train_on_digits(kind, digits48, tmp_path):
    """FasterRCNN and MaskRCNN: the loss falls over one epoch (125 steps) and evaluation scores
    boxes (and masks)."""
    from dynamixer.dense.trainer import train_dense
    losses = []

    def record(loss, step):
        losses.append(float(loss))
        return loss
    r = train_dense(_digits_settings(kind, digits48, tmp_path / kind, epochs=1), hooks=dict(loss=record))
    assert len(losses) == 125
    assert sum(losses[-10:]) < 0.7 * sum(losses[:10]), losses
    row = r['history'][-1]
    assert 0 <= row['AP'] <= 100 and (kind == 'fasterrcnn' or 0 <= row['mask_AP'] <= 100)

"""dynamixer.data: image folders, unreadable images, image modes, transforms, the digits sources and the
left-digit task."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from dynamixer.cli import main as cli_main
from dynamixer.commands.train import train
from dynamixer.data import DataError, build_datasets, to_rgb
from dynamixer.data.digits import _load_digits, left_digit_split, make_left_digit_task
from dynamixer.recipes import resolve_config
from helpers import _add_bad_files, _image, config, make_folder

pytestmark = pytest.mark.usefixtures('one_thread')



def test_data_folder_missing_empty_or_flat(tmp_path):
    c = config(tmp_path)
    with pytest.raises(DataError, match='data folder not found'):
        build_datasets(c, str(tmp_path / 'nope'))
    (tmp_path / 'empty').mkdir()
    with pytest.raises(DataError, match='is empty'):
        build_datasets(c, str(tmp_path / 'empty'))
    flat = tmp_path / 'flat' / 'train'
    flat.mkdir(parents=True)
    for i in range(3):
        _image(0, i).save(flat / f'{i}.png')
    with pytest.raises(DataError, match='3 images but no class sub-folders'):
        build_datasets(c, str(tmp_path / 'flat'))
    nosplit = tmp_path / 'nosplit' / 'cats'
    nosplit.mkdir(parents=True)
    _image(0, 0).save(nosplit / '0.png')
    with pytest.raises(DataError, match='no "train" sub-folder'):
        build_datasets(c, str(tmp_path / 'nosplit'))
    folder = make_folder(tmp_path / 'extra')
    (folder / 'val' / 'zebra').mkdir()
    _image(0, 0).save(folder / 'val' / 'zebra' / '0.png')
    with pytest.raises(DataError, match='classes that .* lacks: zebra'):
        build_datasets(c, str(folder))
    # through the command line: a clear message, exit code 2, no traceback
    assert cli_main(['train', str(tmp_path / 'nope')]) == 2


def test_bad_images_skipped_and_counted_or_error(tmp_path, capsys):
    folder = make_folder(tmp_path / 'data')
    _add_bad_files(folder / 'train' / 'a')
    c = config(tmp_path)
    train_set, _, _, report = build_datasets(c, str(folder))
    assert len(train_set) == 16 and len(report['bad_images']) == 4
    assert {os.path.basename(p) for p, _ in report['bad_images']} == \
        {'zero.png', 'text.jpg', 'noise.png', 'truncated.png'}
    # a whole run skips them and lists them in the run folder
    train(c, data=str(folder))
    assert len(open(tmp_path / 'run' / 'bad_images.txt').read().splitlines()) == 4
    with pytest.raises(DataError, match='(?s)4 of 20 images cannot be read.*--bad-images skip'):
        build_datasets(config(tmp_path, bad_images='error'), str(folder))
    assert cli_main(['train', str(folder), '--bad-images', 'error', '--output', str(tmp_path / 'r2')]) == 2
    assert 'truncated.png' in capsys.readouterr().err


def test_image_modes_become_rgb(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (12, 10, 3)).astype(np.uint8)
    gray = rgb[..., 0]
    cases = {
        'L': Image.fromarray(gray, 'L'),
        'RGBA': Image.fromarray(np.dstack([rgb, np.full(gray.shape, 128, np.uint8)]), 'RGBA'),
        'P': Image.fromarray(rgb, 'RGB').quantize(16),
        'LA': Image.fromarray(np.dstack([gray, gray]), 'LA'),
        'CMYK': Image.fromarray(rgb, 'RGB').convert('CMYK'),
    }
    for mode, img in cases.items():
        out = to_rgb(img)
        assert out.mode == 'RGB' and out.size == (10, 12), mode
    assert np.array_equal(np.asarray(to_rgb(cases['L']))[..., 1], gray)
    assert np.array_equal(np.asarray(to_rgb(cases['RGBA'])), rgb)
    # 16-bit grayscale through a PNG file: scaled to 8 bits, not clipped to white
    v16 = (gray.astype(np.uint16) * 257)
    path = tmp_path / 'g16.png'
    Image.fromarray(v16).save(path)
    with Image.open(path) as im:
        assert im.mode.startswith('I')
        out = np.asarray(to_rgb(im))
    assert np.array_equal(out[..., 0], gray) and np.array_equal(out[..., 2], gray)


def test_eval_transform_uses_the_models_crop_pct_and_interpolation():
    import timm

    from dynamixer.data import eval_transform
    for name, crop in (('dynamixer_s', 0.9), ('dynamixer_l', 0.875)):
        with torch.device('meta'):
            model = timm.create_model(name)
        tf = eval_transform(model).transform
        resize = tf.transforms[0]
        assert resize.size == int(224 / crop) and resize.interpolation.value == 'bicubic'
        assert tf.transforms[1].size == (224, 224)



def test_digits_task_is_deterministic_and_seeded():
    a_train, a_val = make_left_digit_task(50, 20, seed=3)
    b_train, b_val = make_left_digit_task(50, 20, seed=3)
    c_train, _ = make_left_digit_task(50, 20, seed=4)
    for a, b in ((a_train, b_train), (a_val, b_val)):
        assert torch.equal(a.tensors[0], b.tensors[0]) and torch.equal(a.tensors[1], b.tensors[1])
    assert not torch.equal(a_train.tensors[0], c_train.tensors[0])
    x, y = a_train.tensors
    assert x.shape == (50, 1, 24, 24) and x.dtype == torch.float32 and y.shape == (50,)
    assert 0 <= float(x.min()) and float(x.max()) <= 1 and set(y.tolist()) <= set(range(10))


def test_digits_split_is_disjoint():
    tr, va = left_digit_split(1797, seed=0)
    assert len(set(tr) & set(va)) == 0 and len(tr) + len(va) == 1797
    tr2, _ = left_digit_split(1797, seed=0)
    assert np.array_equal(tr, tr2)


def test_digits_label_is_the_left_digit():
    """Rebuild the canvases from the recorded placements and check the label independently:
    the class of the digit whose left edge is smaller, and the two classes differ."""
    from dynamixer.data.digits import _compose
    images, labels = _load_digits()
    rng = np.random.default_rng(0)
    canvas, target, where = _compose(images, labels, 200, 32, 1, 2, rng, align=4)
    for k in range(200):
        (a, ya, xa), (b, yb, xb) = where[k]
        assert xa + 8 + 2 <= xb                      # left digit clearly left of the right one
        assert xa % 4 == ya % 4 == xb % 4 == yb % 4 == 0
        assert labels[a] != labels[b]
        assert target[k] == labels[a]
        rebuilt = np.zeros((32, 32), np.float32)
        rebuilt[ya:ya + 8, xa:xa + 8] = images[a]
        rebuilt[yb:yb + 8, xb:xb + 8] = np.maximum(rebuilt[yb:yb + 8, xb:xb + 8], images[b])
        assert np.array_equal(rebuilt, canvas[k])
    # both orders and all classes occur: a model cannot win by a constant answer
    assert len(set(target.tolist())) == 10


def test_digits_canvas_too_small_is_explained():
    with pytest.raises(ValueError, match='too small'):
        make_left_digit_task(4, 4, canvas=16)



def test_left_digit_is_a_dataset_train_knows():
    """`--dataset left-digit`: normalised 1-channel canvases, the model built with in_chans=1 at the
    canvas size, the same canvases as make_left_digit_task."""
    c = resolve_config('scratch', overrides=dict(dataset='left-digit', num_train=40, num_val=20, canvas=24))
    train_set, val_set, names, report = build_datasets(c, None)
    assert names == [str(k) for k in range(10)] and len(train_set) == 40 and len(val_set) == 20
    assert report['model_kwargs'] == dict(in_chans=1, img_size=24)
    raw_train, raw_val = make_left_digit_task(40, 20, canvas=24)
    mean, std = float(raw_train.tensors[0].mean()), float(raw_train.tensors[0].std())
    x, y = val_set[3]
    assert x.shape == (1, 24, 24) and y == int(raw_val.tensors[1][3])
    assert torch.allclose(x, (raw_val.tensors[0][3] - mean) / std)
    with pytest.raises(DataError, match='differs from --canvas'):
        build_datasets(dict(c, img_size=32), None)
    with pytest.raises(DataError, match='too small'):
        build_datasets(dict(c, canvas=16), None)

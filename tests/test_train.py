"""Training, resuming, validating and predicting with the `dynamixer` command line.

Tiny image folders made in tmp_path, dynamixer_nano at 32x32, 1-2 epochs, one CPU thread.
"""
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import dynamixer  # noqa: F401  (registers the models)
from dynamixer.checkpoint import CheckpointError, read_checkpoint
from dynamixer.cli import main as cli_main
from dynamixer.data import DataError, build_datasets, to_rgb
from dynamixer.recipes import ConfigError, RECIPES, resolve_config
from dynamixer.train import TrainingError, train

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'src')


def _image(cls: int, i: int, size: int = 36) -> Image.Image:
    """A class-dependent pattern: class 0 vertical stripes, 1 horizontal, 2 a square; some noise."""
    rng = np.random.default_rng(cls * 1000 + i)
    a = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
    if cls == 0:
        a[:, ::6] = 255
    elif cls == 1:
        a[::6, :] = 255
    else:
        a[8:28, 8:28] = 200
    return Image.fromarray(a, 'RGB')


def make_folder(root, classes=('a', 'b'), n_train=8, n_val=4):
    for split, n in (('train', n_train), ('val', n_val)):
        for c, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                _image(c, i + (100 if split == 'val' else 0)).save(d / f'{i}.png')
    return root


def config(tmp_path, **kw):
    overrides = dict(model='dynamixer_nano', epochs=1, batch_size=4, workers=0, threads=1, progress=False,
                     auto_augment='none', warmup_epochs=0, lr=1e-3, output=str(tmp_path / 'run'),
                     save_safetensors=True)
    overrides.update(kw)
    return resolve_config('scratch', overrides=overrides)


def weights(path):
    return read_checkpoint(path)['state_dict']


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp('data'))


@pytest.fixture(scope='module')
def trained(folder, tmp_path_factory):
    """One epoch on the tiny folder; shared by the validate / predict / checkpoint tests."""
    tmp = tmp_path_factory.mktemp('trained')
    result = train(config(tmp, epochs=1), data=str(folder))
    return result


# ---- recipes and settings -----------------------------------------------------------------------

def test_imagenet_recipes_follow_the_paper():
    for size, batch, dp in (('s', 2048, 0.1), ('m', 1024, 0.1), ('l', 512, 0.3)):
        c = resolve_config(f'imagenet-{size}')
        assert c['model'] == f'dynamixer_{size}' and c['batch_size'] == batch and c['drop_path'] == dp
        assert (c['opt'], c['lr'], c['weight_decay'], c['sched']) == ('adamw', 2e-3, 0.05, 'cosine')
        assert (c['epochs'], c['warmup_epochs'], c['warmup_lr'], c['cooldown_epochs'], c['min_lr']) == \
            (300, 20, 1e-6, 10, 1e-5)
        assert c['auto_augment'] == 'rand-m9-mstd0.5-inc1' and (c['mixup'], c['cutmix']) == (0.8, 1.0)
        assert (c['reprob'], c['remode'], c['smoothing'], c['ema_decay']) == (0.25, 'pixel', 0.1, 0.99996)
        assert c['clip_grad'] is None
    t = resolve_config('transfer')
    assert (t['opt'], t['lr'], t['momentum'], t['weight_decay'], t['batch_size'], t['epochs']) == \
        ('sgd', 0.01, 0.9, 5e-4, 128, 60)
    assert t['body_lr_scale'] == 0.01 and t['new_head'] and t['img_size'] == 224


def test_settings_merge_recipe_yaml_command_line(tmp_path):
    y = tmp_path / 'c.yaml'
    y.write_text('lr: 0.005\nepochs: 7\nscale: [0.5, 1.0]\nauto_augment: null\n')
    c = resolve_config('imagenet-s', str(y), {'epochs': 3, 'clip_grad': '1.5'})
    assert c['lr'] == 0.005 and c['epochs'] == 3 and c['scale'] == [0.5, 1.0] and c['clip_grad'] == 1.5
    assert c['auto_augment'] is None and c['batch_size'] == 2048
    assert resolve_config('imagenet-s', overrides={'auto_augment': 'none'})['auto_augment'] is None
    with pytest.raises(ConfigError, match="unknown setting 'learning_rate'"):
        resolve_config('digits', overrides={'learning_rate': 1})
    y.write_text('epoch: 3\n')
    with pytest.raises(ConfigError, match="Did you mean 'epochs'"):
        resolve_config('digits', str(y))
    with pytest.raises(ConfigError, match='bad value'):
        resolve_config('digits', overrides={'epochs': 'many'})
    with pytest.raises(ConfigError, match='unknown recipe'):
        resolve_config('imagenet-xl')


def test_cli_print_config_and_overrides(capsys):
    assert cli_main(['train', '--recipe', 'imagenet-m', '--lr', '1e-3', '--no-compile', '--mixup', '0',
                     '--print-config']) == 0
    out = capsys.readouterr().out
    assert 'lr: 0.001\n' in out and 'mixup: 0.0\n' in out and 'model: dynamixer_m\n' in out


# ---- a run and what it leaves behind ------------------------------------------------------------

def test_run_folder_contents(trained):
    out = trained['output']
    for f in ('last.pth', 'model.safetensors', 'metrics.csv', 'metrics.json', 'curves.png', 'config.yaml'):
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    ck = torch.load(os.path.join(out, 'last.pth'), weights_only=True)  # no pickled code needed
    assert set(ck) >= {'state_dict', 'optimizer', 'scheduler', 'scaler', 'rng', 'epoch', 'step', 'config',
                       'class_names', 'metrics', 'version'}
    assert ck['epoch'] == 1 and ck['step'] == 4 and ck['class_names'] == ['a', 'b']
    assert ck['config']['model'] == 'dynamixer_nano' and ck['config']['model_kwargs']['num_classes'] == 2
    assert set(ck['rng']) >= {'torch', 'numpy', 'python', 'loader_generator'}
    assert not any(k.startswith('module.') for k in ck['state_dict'])
    lines = open(os.path.join(out, 'metrics.csv')).read().splitlines()
    assert lines[0].startswith('epoch,step,lr,train_loss,val_loss,val_top1,val_top5') and len(lines) == 2
    hist = json.load(open(os.path.join(out, 'metrics.json')))
    assert hist[0]['epoch'] == 1 and 0 <= hist[0]['val_top1'] <= 100
    with Image.open(os.path.join(out, 'curves.png')) as im:
        assert im.size[0] > 800 and im.size[1] > 300
    from safetensors.torch import load_file
    st = load_file(os.path.join(out, 'model.safetensors'))
    for k, v in ck['state_dict'].items():
        assert torch.equal(st[k], v), k


def test_tensorboard_and_progress_bar(folder, tmp_path, capsys):
    train(config(tmp_path, tensorboard=True, progress=True), data=str(folder))
    assert any(f.startswith('events.out.tfevents') for f in os.listdir(tmp_path / 'run' / 'tensorboard'))
    err = capsys.readouterr().err
    assert 'epoch 1/1' in err and 'img/s' in err and 'lr ' in err


# ---- resuming -----------------------------------------------------------------------------------

AUGMENTED = dict(auto_augment='rand-m9-mstd0.5-inc1', reprob=0.25, mixup=0.8, cutmix=1.0, smoothing=0.1,
                 drop_path=0.1, hflip=0.5, ema_decay=0.9, epochs=2)


def test_resume_continues_exactly(folder, tmp_path):
    """2 epochs in one go == 1 epoch, stop, resume, 1 more epoch; all augmentations on."""
    whole = train(config(tmp_path / 'a', **AUGMENTED), data=str(folder))

    def stop_after_first(epoch):
        if epoch == 1:
            raise KeyboardInterrupt  # an interrupted run
    with pytest.raises(KeyboardInterrupt):
        train(config(tmp_path / 'b', **AUGMENTED), data=str(folder), hooks={'epoch_end': stop_after_first})
    assert read_checkpoint(tmp_path / 'b' / 'run' / 'last.pth')['epoch'] == 1
    # resume through the command line, as a user would
    assert cli_main(['train', '--resume', str(tmp_path / 'b' / 'run' / 'last.pth')]) == 0
    a = read_checkpoint(tmp_path / 'a' / 'run' / 'last.pth')
    b = read_checkpoint(tmp_path / 'b' / 'run' / 'last.pth')
    assert b['epoch'] == 2 and b['step'] == a['step']
    for key in ('state_dict', 'state_dict_ema'):
        for k, v in a[key].items():
            assert torch.equal(v, b[key][k]), (key, k)
    assert [h['train_loss'] for h in b['metrics']['history']] == [h['train_loss'] for h in whole['history']]


def test_resume_auto_and_finished_run(folder, tmp_path, capsys):
    c = config(tmp_path)
    train(c, data=str(folder))
    # a finished run: --resume auto finds last.pth and says there is nothing left
    assert cli_main(['train', str(folder), '--resume', 'auto', '--output', c['output']]) == 2
    assert 'already finished' in capsys.readouterr().err
    assert cli_main(['train', '--resume', os.path.join(c['output'], 'last.pth'), '--epochs', '2',
                     '--no-progress']) == 0
    assert read_checkpoint(os.path.join(c['output'], 'last.pth'))['epoch'] == 2


def test_checkpoint_write_is_atomic(trained, monkeypatch, tmp_path):
    from dynamixer import runlog
    path = tmp_path / 'last.pth'
    shutil.copy(os.path.join(trained['output'], 'last.pth'), path)
    before = path.read_bytes()

    def crash(obj, f):
        f.write(b'PK partial')
        raise OSError('disk full')
    monkeypatch.setattr(runlog.torch, 'save', crash)
    with pytest.raises(OSError, match='disk full'):
        runlog.atomic_torch_save({'x': torch.ones(3)}, str(path))
    assert path.read_bytes() == before and os.listdir(tmp_path) == ['last.pth']


# ---- divergence ---------------------------------------------------------------------------------

def test_nan_loss_stops_and_keeps_last_good_checkpoint(folder, tmp_path, capsys):
    c = config(tmp_path)
    train(c, data=str(folder))
    last = os.path.join(c['output'], 'last.pth')
    before = open(last, 'rb').read()
    # an absurd learning rate makes the weights blow up and the next loss non-finite
    code = cli_main(['train', '--resume', last, '--epochs', '2', '--lr', '1e30', '--no-progress'])
    err = capsys.readouterr().err
    assert code == 2 and 'diverged' in err and 'last.pth' in err and 'nan' in err.lower()
    assert open(last, 'rb').read() == before
    assert read_checkpoint(last)['epoch'] == 1


def test_injected_inf_loss_in_first_epoch(folder, tmp_path):
    def inject(loss, step):
        return loss * float('inf') if step == 2 else loss
    with pytest.raises(TrainingError, match=r'loss became inf at epoch 1, update 3.*No checkpoint was written'):
        train(config(tmp_path), data=str(folder), hooks={'loss': inject})
    assert not os.path.exists(tmp_path / 'run' / 'last.pth')

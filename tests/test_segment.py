"""`dynamixer segment`: train -> validate -> predict on the digits masks, gradient accumulation,
and bad masks / class lists / checkpoints as clear errors with exit code 2."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip('torchvision')

from dynamixer.cli import main  # noqa: E402
from dynamixer.dense.trainer import resolve_settings, train_dense  # noqa: E402
from dynamixer.files import read_checkpoint  # noqa: E402
from helpers import cli_result

pytestmark = pytest.mark.usefixtures('one_thread')

cli = cli_result  # (exit code, stdout, stderr) of `dynamixer ARGV`
FLAGS = ['--img-size', '32', '--batch-size', '8', '--threads', '1', '--workers', '0', '--no-progress',
         '--hflip', '0', '--warmup-epochs', '0', '--out-channels', '32', '--lr', '3e-3']


def data_args(d):
    return [d / 'train' / 'images', d / 'train' / 'masks', '--classes', d / 'classes.txt',
            '--val-images', d / 'val' / 'images', '--val-masks', d / 'val' / 'masks']


@pytest.fixture(scope='module')
def run(digits_coco, tmp_path_factory):
    out = tmp_path_factory.mktemp('segment') / 'run'
    rc, stdout, err = cli('segment', 'train', *data_args(digits_coco), '--epochs', '3', '--output', out, *FLAGS)
    assert rc == 0, err
    return out


def test_train_validate_predict(run, digits_coco, tmp_path):
    history = json.loads((run / 'metrics.json').read_text())
    assert [h['epoch'] for h in history] == [1, 2, 3]
    assert history[-1]['pixel_acc'] > 80 and history[-1]['train_loss'] < history[0]['train_loss']
    assert (run / 'curves.png').is_file()
    rc, out, err = cli('segment', 'validate', run / 'last.pth', digits_coco / 'val' / 'images',
                       digits_coco / 'val' / 'masks', '--batch-size', '4', '--threads', '1')
    assert rc == 0, err
    assert f"mIoU {history[-1]['mIoU']:.2f}  pixel accuracy {history[-1]['pixel_acc']:.2f}" in out
    assert 'IoU per class: background' in out
    imgs = tmp_path / 'in'
    imgs.mkdir()
    shutil.copy(digits_coco / 'val' / 'images' / '000001.png', imgs / 'a.png')
    Image.open(imgs / 'a.png').convert('L').resize((40, 24)).save(imgs / 'gray.png')   # another size and mode
    (imgs / 'bad.jpg').write_bytes(b'no jpeg')
    rc, out, err = cli('segment', 'predict', run / 'last.pth', imgs, '--out', tmp_path / 'p')
    assert rc == 0 and 'bad.jpg' in err and '1 unreadable' in out, err
    mask = np.asarray(Image.open(tmp_path / 'p' / 'gray.png'))
    assert mask.shape == (24, 40) and mask.max() < 11
    assert (tmp_path / 'p' / 'a_overlay.png').is_file()


def test_gradient_accumulation_matches_the_full_batch(digits_coco, tmp_path):
    """batch 8 as 2 accumulation steps of 4 = one step of 8 (no batch norm: float rounding only)."""
    def settings(out, accum):
        s = resolve_settings('segment', overrides=dict(img_size=[32], batch_size=8, grad_accum=accum, threads=1,
                                                        workers=0, progress=False, epochs=1, out_channels=16,
                                                        output=str(out), opt='sgd', lr=0.05, warmup_epochs=0))
        s['data'] = dict(train_images=str(digits_coco / 'train' / 'images'),
                         train_masks=str(digits_coco / 'train' / 'masks'), classes=str(digits_coco / 'classes.txt'),
                         val_images=str(digits_coco / 'val' / 'images'), val_masks=str(digits_coco / 'val' / 'masks'))
        return s
    train_dense(settings(tmp_path / 'one', 1))
    train_dense(settings(tmp_path / 'two', 2))
    a = read_checkpoint(tmp_path / 'one' / 'last.pth')['state_dict']
    b = read_checkpoint(tmp_path / 'two' / 'last.pth')['state_dict']
    start = read_checkpoint(tmp_path / 'one' / 'last.pth')
    assert start['step'] == 2
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def _damage(digits_coco, tmp_path, fn):
    d = tmp_path / 'd'
    shutil.copytree(digits_coco, d)
    fn(d)
    return d


@pytest.mark.parametrize('damage, message', [
    (lambda d: Image.fromarray(np.zeros((20, 32), np.uint8)).save(d / 'train' / 'masks' / '000004.png'),
     'is 32x20 but its image'),
    (lambda d: Image.fromarray(np.full((32, 32), 12, np.uint8)).save(d / 'train' / 'masks' / '000004.png'),
     'outside the 11 classes'),
    (lambda d: (d / 'train' / 'masks' / '000004.png').unlink(), 'have no mask'),
    (lambda d: (d / 'classes.txt').write_text(''), 'no class names'),
])
def test_bad_masks_exit_2(digits_coco, tmp_path, damage, message):
    d = _damage(digits_coco, tmp_path, damage)
    rc, _, err = cli('segment', 'train', *data_args(d), '--epochs', '1', '--output', tmp_path / 'r', *FLAGS)
    assert rc == 2 and message in err and 'Traceback' not in err, err
    assert not (tmp_path / 'r' / 'last.pth').exists()


def test_wrong_classes_and_checkpoints_exit_2(run, digits_coco, tmp_path):
    (tmp_path / 'three.txt').write_text('a\nb\nc\n')
    rc, _, err = cli('segment', 'validate', run / 'last.pth', digits_coco / 'val' / 'images',
                     digits_coco / 'val' / 'masks', '--classes', tmp_path / 'three.txt')
    assert rc == 2 and 'trained on 11' in err
    ck = read_checkpoint(run / 'last.pth')
    ck['config'] = dict(ck['config'], task='detect')
    torch.save(ck, tmp_path / 'det.pth')
    rc, _, err = cli('segment', 'predict', tmp_path / 'det.pth', digits_coco / 'val' / 'images',
                     '--out', tmp_path / 'o')
    assert rc == 2 and 'is a detect checkpoint' in err
    rc, _, err = cli('segment', 'train', '--resume', tmp_path / 'det.pth', *FLAGS)
    assert rc == 2 and 'not a `dynamixer segment train` checkpoint' in err
    rc, _, err = cli('segment', 'train', digits_coco / 'train' / 'images', *FLAGS)
    assert rc == 2 and '--val-masks' in err


@pytest.mark.slow
def test_kill_9_then_resume_auto_is_bit_exact(digits_coco, tmp_path):
    """A training process killed (SIGKILL) once its first checkpoint is written, then continued
    with --resume auto: the same weights as a run that was never stopped."""
    import os
    import signal
    import subprocess
    import sys
    import time
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'src')
    env = dict(os.environ, PYTHONPATH=src, OMP_NUM_THREADS='1')
    argv = [sys.executable, '-m', 'dynamixer', 'segment', 'train', *map(str, data_args(digits_coco)),
            '--epochs', '3', *FLAGS, '--crop-scale', '0.6', '1']
    assert main(['segment', 'train', *map(str, data_args(digits_coco)), '--epochs', '3', *FLAGS,
                 '--crop-scale', '0.6', '1', '--output', str(tmp_path / 'straight')]) == 0
    run = tmp_path / 'killed'
    p = subprocess.Popen(argv + ['--output', str(run)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (run / 'last.pth').exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    epoch = read_checkpoint(run / 'last.pth')['epoch']
    assert 1 <= epoch <= 3
    r = subprocess.run(argv + ['--output', str(run), '--resume', 'auto'], env=env, capture_output=True, text=True,
                       timeout=600)
    if epoch < 3:
        assert r.returncode == 0, r.stderr[-2000:]
    a = read_checkpoint(tmp_path / 'straight' / 'last.pth')['state_dict']
    b = read_checkpoint(run / 'last.pth')['state_dict']
    assert all(torch.equal(a[k], b[k]) for k in a)

"""`dynamixer train` and dynamixer.train.train: recipes, run folder, resume, divergence, precision, processes.

Tiny image folders made in tmp_path, dynamixer_nano at 32x32, 1-2 epochs, one CPU thread."""
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from dynamixer.cli import main as cli_main
from dynamixer.commands.train import TrainingError, train
from dynamixer.data import build_datasets
from dynamixer.files import CheckpointError, read_checkpoint
from dynamixer.recipes import ConfigError, resolve_config
from helpers import SRC, _add_bad_files, _image, config, make_folder, weights

pytestmark = pytest.mark.usefixtures('one_thread')



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
        ('momentum', 0.01, 0.9, 5e-4, 128, 60)
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


def test_progress_bar(folder, tmp_path, capsys):
    train(config(tmp_path, progress=True), data=str(folder))
    err = capsys.readouterr().err
    assert 'epoch 1/1' in err and 'img/s' in err and 'lr ' in err and '4/4' in err


def test_tensorboard(folder, tmp_path):
    pytest.importorskip('tensorboard')
    train(config(tmp_path, tensorboard=True), data=str(folder))
    assert any(f.startswith('events.out.tfevents') for f in os.listdir(tmp_path / 'run' / 'tensorboard'))


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


def test_training_on_mixed_image_modes(tmp_path):
    folder = make_folder(tmp_path / 'data')
    d = folder / 'train' / 'b'
    _image(1, 50).convert('L').save(d / 'gray.png')
    _image(1, 51).convert('RGBA').save(d / 'rgba.png')
    _image(1, 52).quantize(8).save(d / 'palette.png')
    Image.fromarray((np.asarray(_image(1, 53).convert('L')).astype(np.uint16) * 257)).save(d / 'g16.png')
    _image(1, 54).save(d / 'photo.jpg')
    train_set, _, _, report = build_datasets(config(tmp_path), str(folder))
    assert len(train_set) == 21 and not report['bad_images']
    train_set.transform = lambda im: im  # the raw loaded image, before the RGB conversion in the transform
    import timm

    from dynamixer.data import build_transforms
    tf, _ = build_transforms(config(tmp_path), timm.create_model('dynamixer_nano', num_classes=2))
    for i in range(len(train_set)):
        x, _ = train_set[i]
        assert tf(x).shape == (3, 32, 32)


NO_RANDOM_AUG = dict(auto_augment='none', hflip=0.0, scale=[1.0, 1.0], ratio=[1.0, 1.0], color_jitter=0.0,
                     reprob=0.0, mixup=0.0, cutmix=0.0, drop_path=0.0)


def test_gradient_accumulation_matches_one_big_batch(folder, tmp_path):
    a = train(config(tmp_path / 'a', batch_size=8, grad_accum=1, **NO_RANDOM_AUG), data=str(folder))
    b = train(config(tmp_path / 'b', batch_size=8, grad_accum=2, **NO_RANDOM_AUG), data=str(folder))
    wa, wb = weights(os.path.join(a['output'], 'last.pth')), weights(os.path.join(b['output'], 'last.pth'))
    diff = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    # and the runs did train: their weights moved from the seed-0 initialisation (as in the next test)
    torch.manual_seed(0)
    w0 = timm.create_model('dynamixer_nano', num_classes=2).state_dict()
    moved = max((wa[k] - w0[k]).abs().max().item() for k in w0 if w0[k].is_floating_point())
    assert diff < 1e-5 and moved > 1e-3


def test_gradient_clipping_bounds_the_update(folder, tmp_path):
    import timm
    torch.manual_seed(0)
    w0 = timm.create_model('dynamixer_nano', num_classes=2).state_dict()
    c = config(tmp_path, opt='momentum', momentum=0.0, weight_decay=0.0, lr=1.0, batch_size=16, clip_grad=1e-3,
               **NO_RANDOM_AUG)
    train(c, data=str(folder))  # one update
    w1 = weights(os.path.join(c['output'], 'last.pth'))
    step = torch.sqrt(sum(((w1[k] - w0[k]).double() ** 2).sum() for k in w0 if w0[k].is_floating_point()))
    assert step.item() == pytest.approx(1e-3, rel=1e-3)  # lr x clipped gradient norm


@pytest.mark.parametrize('amp', ['bf16', 'fp16'])
def test_mixed_precision_on_cpu(folder, tmp_path, amp):
    r = train(config(tmp_path, amp=amp), data=str(folder))
    ck = read_checkpoint(os.path.join(r['output'], 'last.pth'))
    assert np.isfinite(r['history'][-1]['train_loss'])
    assert (ck['scaler'] is not None) == (amp == 'fp16')
    assert all(v.dtype == torch.float32 for v in ck['state_dict'].values() if v.is_floating_point())


def test_transfer_recipe_new_head_and_body_lr(trained, tmp_path):
    import timm

    from dynamixer.commands.train import _load_pretrained
    ckpt = os.path.join(trained['output'], 'last.pth')
    three = make_folder(tmp_path / 'three', classes=('a', 'b', 'c'), n_train=4, n_val=2)
    model = timm.create_model('dynamixer_nano', num_classes=3)
    _load_pretrained(model, ckpt, new_head=True)
    src = read_checkpoint(ckpt)['state_dict']
    body = [k for k in src if not k.startswith('head.')]
    assert all(torch.equal(model.state_dict()[k], src[k]) for k in body) and model.head.out_features == 3
    c = resolve_config('transfer', overrides=dict(
        model='dynamixer_nano', img_size=32, pretrained=ckpt, epochs=1, batch_size=4, workers=0, threads=1,
        progress=False, output=str(tmp_path / 'run')))
    r = train(c, data=str(three))
    groups = read_checkpoint(os.path.join(r['output'], 'last.pth'))['optimizer']['param_groups']
    head_lr = {g['lr'] for g in groups if g['lr_scale'] == 1.0}
    body_lr = {g['lr'] for g in groups if g['lr_scale'] == 0.01}
    assert len(head_lr) == 1 and len(body_lr) == 1
    assert body_lr.pop() == pytest.approx(0.01 * head_lr.pop())
    assert {g['weight_decay'] for g in groups} == {0.0, 5e-4}
    with pytest.raises(CheckpointError, match='cannot start from these weights'):
        _load_pretrained(timm.create_model('dynamixer_nano', num_classes=3), ckpt, new_head=False)


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_two_processes_match_one(folder, tmp_path):
    """torchrun, 2 CPU processes (gloo), global batch 8 = 2 x 4: both ranks end with the same weights,
    equal to one process with batch 8 (random augmentation off)."""
    from safetensors.torch import load_file
    data = tmp_path / 'data'
    shutil.copytree(folder, data)
    _add_bad_files(data / 'train' / 'b')  # found by the two processes' shared scan, skipped by both
    flags = ['--model', 'dynamixer_nano', '--recipe', 'scratch', '--epochs', '2', '--batch-size', '8',
             '--opt', 'momentum', '--lr', '0.05',
             '--workers', '0', '--threads', '1', '--no-progress', '--warmup-epochs', '0',
             '--auto-augment', 'none', '--hflip', '0', '--scale', '1', '1', '--ratio', '1', '1',
             '--color-jitter', '0', '--drop-path', '0', '--save-rank-weights']
    env = dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS='1')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_addr', '127.0.0.1',
           '--master_port', str(_free_port()), '-m', 'dynamixer', 'train', str(data),
           '--output', str(tmp_path / 'ddp'), *flags]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert '2 process(es) on cpu, batch 8 = 2 x 1 x 4' in p.stderr and 'skipping 4 of 20 images' in p.stderr
    r0 = load_file(str(tmp_path / 'ddp' / 'rank0.safetensors'))
    r1 = load_file(str(tmp_path / 'ddp' / 'rank1.safetensors'))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    assert cli_main(['train', str(data), '--output', str(tmp_path / 'one'), *flags]) == 0
    one = load_file(str(tmp_path / 'one' / 'rank0.safetensors'))
    diff = max((one[k] - r0[k]).abs().max().item() for k in one)
    change = max((one[k] - weights(str(tmp_path / 'one' / 'last.pth'))[k]).abs().max().item() for k in one)
    scale = max(one[k].abs().max().item() for k in one)
    print(f'2 processes vs 1: max abs weight difference {diff:.3g} (largest weight {scale:.3g})')
    assert change == 0.0
    assert diff < 1e-6  # SGD: float rounding only (AdamW amplifies it where gradients are ~0)


@pytest.mark.slow
def test_embedded_digits_default_reaches_95_percent(tmp_path):
    """`dynamixer train` with no arguments: dynamixer_nano on the bundled digits, >= 95% top-1."""
    import re
    import time
    start = time.perf_counter()
    p = subprocess.run([sys.executable, '-m', 'dynamixer', 'train', '--no-progress'], cwd=tmp_path,
                       env=dict(os.environ, PYTHONPATH=SRC), capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - start
    assert p.returncode == 0, p.stderr[-3000:]
    m = re.search(r'validation accuracy: ([\d.]+)% top-1', p.stdout)
    assert m, p.stdout
    print(f'digits default: {float(m.group(1)):.2f}% top-1 in {seconds:.0f} s, load {os.getloadavg()}')
    assert float(m.group(1)) >= 95.0
    run = tmp_path / 'runs' / 'digits-dynamixer_nano'
    assert os.path.exists(run / 'curves.png')
    # validate re-creates the same validation images and transform: the same accuracy and loss
    from dynamixer.commands.validate import validate
    r = validate(str(run / 'last.pth'), None, dataset='digits', workers=0)
    last = json.load(open(run / 'metrics.json'))[-1]
    assert r['top1'] == pytest.approx(last['val_top1']) and r['loss'] == pytest.approx(last['val_loss'], rel=1e-5)


@pytest.mark.slow
def test_compile(folder, tmp_path):
    # aot_eager traces forward and backward like inductor but skips C++ code generation (minutes on CPU)
    r = train(config(tmp_path, compile=True, compile_backend='aot_eager'), data=str(folder))
    assert np.isfinite(r['history'][-1]['train_loss'])
    ck = read_checkpoint(os.path.join(r['output'], 'last.pth'))
    assert not any(k.startswith('_orig_mod') for k in ck['state_dict'])


def test_other_timm_datasets(folder, tmp_path):
    """Anything timm's create_dataset reads, here torchvision's ImageFolder through 'torch/image_folder'."""
    r = train(config(tmp_path, dataset='torch/image_folder'), data=str(folder))
    assert r['class_names'] == ['a', 'b'] and np.isfinite(r['history'][-1]['val_loss'])


def test_imagenet_recipe_runs_end_to_end_small(folder, tmp_path):
    """The ImageNet recipe's pipeline (RandAugment, Mixup/CutMix, erasing, smoothing, drop-path, EMA,
    warm-up + cosine + cool-down) on the nano model and a tiny folder."""
    c = resolve_config('imagenet-s', overrides=dict(
        model='dynamixer_nano', img_size=32, batch_size=4, epochs=1, warmup_epochs=1, cooldown_epochs=1,
        workers=0, threads=1, progress=False, output=str(tmp_path / 'run')))
    r = train(c, data=str(folder))
    h = r['history']
    assert len(h) == 2 and 'ema_top1' in h[-1] and h[-1]['lr'] == pytest.approx(1e-5)  # cool-down at min_lr
    assert 'state_dict_ema' in read_checkpoint(os.path.join(r['output'], 'last.pth'))


"""dynamixer.distill and `dynamixer train --kd-*`: the losses against hand-written formulas, the
teacher's input (normalisation, size), a frozen teacher, resume, accumulation, processes, bad teachers.

Tiny image folders (2 classes, 36x36 images), dynamixer_nano at 32x32, 1-2 epochs, one CPU thread."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from test_train import NO_RANDOM_AUG, _free_port
from test_user_errors import assert_user_error, run_cli

from dynamixer.checkpoint import read_checkpoint
from dynamixer.cli import main as cli_main
from dynamixer.commands import train as train_module
from dynamixer.commands.train import train
from dynamixer.distill import HardDistillationTask, Teacher, distillation_task, teacher_digest
from helpers import SRC, config, weights

pytestmark = pytest.mark.usefixtures('one_thread')


# ---- the losses, on random tensors, in float64 --------------------------------------------------

class _Flat(nn.Module):
    """[B, C, H, W] -> logits; a pretrained_cfg as timm models have (timm's tasks read it)."""

    def __init__(self, c, hw, classes):
        super().__init__()
        self.fc = nn.Linear(c * hw * hw, classes).double()
        self.pretrained_cfg = dict(mean=(0.5,) * c, std=(0.25,) * c)
        self.num_classes, self.in_chans = classes, c

    def forward(self, x):
        return self.fc(x.flatten(1))


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _ce(z, y):
    return float(np.mean(-np.log(_softmax(z)[np.arange(len(y)), y])))


def _task(kd_type, temperature=3.0, weight=0.3):
    torch.manual_seed(0)
    student, teacher_model = _Flat(1, 4, 5), _Flat(1, 4, 5)
    teacher = Teacher(teacher_model, (0.5,), (0.25,), (4, 4))
    task = distillation_task(student, teacher, nn.CrossEntropyLoss(), kd_type, temperature, weight,
                             ((0.5,), (0.25,)), torch.device('cpu'))
    x, y = torch.randn(7, 1, 4, 4, dtype=torch.float64), torch.randint(0, 5, (7,))
    s = student(x).detach().numpy()
    t = teacher_model(x).detach().numpy()
    return task, x, y, s, t


def test_logit_distillation_loss_is_the_tempered_kl_divergence():
    T, w = 3.0, 0.3
    task, x, y, s, t = _task('logit', T, w)
    out = task(x, y)
    p_t, p_s = _softmax(t / T), _softmax(s / T)
    kl = float(np.sum(p_t * (np.log(p_t) - np.log(p_s))) / len(y)) * T * T
    assert out['kd_loss'].item() == pytest.approx(kl, rel=1e-10)
    assert out['task_loss'].item() == pytest.approx(_ce(s, y.numpy()), rel=1e-10)
    assert out['loss'].item() == pytest.approx((1 - w) * _ce(s, y.numpy()) + w * kl, rel=1e-10)


def test_hard_distillation_loss_is_cross_entropy_against_the_teachers_argmax():
    w = 0.3
    task, x, y, s, t = _task('hard', weight=w)
    assert isinstance(task, HardDistillationTask)
    out = task(x, y)
    hard = t.argmax(1)
    assert (hard != y.numpy()).any()  # the teacher's labels are not the data's: the two terms differ
    assert out['kd_loss'].item() == pytest.approx(_ce(s, hard), rel=1e-10)
    assert out['loss'].item() == pytest.approx((1 - w) * _ce(s, y.numpy()) + w * _ce(s, hard), rel=1e-10)


def test_teacher_input_has_its_own_normalisation_and_size():
    """A batch normalised for the student at 6x6 reaches the teacher as the raw images resized to
    9x9, normalised with the teacher's own per-channel mean and std."""
    torch.manual_seed(0)
    raw = torch.rand(2, 3, 6, 6, dtype=torch.float64)
    m_s, s_s = torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.25, 0.3])
    m_t, s_t = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    student_batch = (raw - m_s.view(1, 3, 1, 1).double()) / s_s.view(1, 3, 1, 1).double()
    teacher = Teacher(nn.Identity(), m_t, s_t, (9, 9))
    got = teacher.normalize_input(student_batch, m_s.view(1, 3, 1, 1), s_s.view(1, 3, 1, 1))
    resized = F.interpolate(raw, size=(9, 9), mode='bilinear', align_corners=False, antialias=True)
    expected = (resized - torch.tensor(m_t).view(1, 3, 1, 1).double()) / torch.tensor(s_t).view(1, 3, 1, 1).double()
    assert got.shape == (2, 3, 9, 9)
    assert torch.allclose(got, expected, atol=1e-6)
    # same normalisation and size: the batch is passed on as it is
    same = Teacher(nn.Identity(), (0.4, 0.5, 0.6), (0.2, 0.25, 0.3), (6, 6))
    assert same.normalize_input(student_batch, m_s.view(1, 3, 1, 1), s_s.view(1, 3, 1, 1)) is student_batch


def test_teacher_is_frozen_and_stays_in_eval_mode():
    teacher = Teacher(nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5)), (0.0,), (1.0,), (1, 1))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training and not teacher.model[1].training


# ---- training with a teacher --------------------------------------------------------------------

@pytest.fixture
def seen_teacher(monkeypatch):
    """The teacher the training builds, and the teacher's mode at every loss (the 'loss' hook)."""
    seen = {}
    real = train_module.build_teacher

    def spy(*a, **k):
        seen['teacher'] = real(*a, **k)
        seen['before'] = {k: v.clone() for k, v in seen['teacher'].state_dict().items()}
        return seen['teacher']
    monkeypatch.setattr(train_module, 'build_teacher', spy)
    return seen


def test_distilled_training_keeps_the_teacher_frozen(folder, trained, tmp_path, seen_teacher):
    modes = []

    def loss_hook(loss, step):
        t = seen_teacher['teacher']
        modes.append((t.training, t.model.training, any(p.grad is not None for p in t.parameters())))
        return loss
    teacher_ckpt = os.path.join(trained['output'], 'last.pth')
    r = train(config(tmp_path, kd_checkpoint=teacher_ckpt, kd_type='logit', epochs=1), data=str(folder),
              hooks={'loss': loss_hook})
    t = seen_teacher['teacher']
    assert modes and all(m == (False, False, False) for m in modes)
    assert not any(p.requires_grad or p.grad is not None for p in t.parameters())
    after = t.state_dict()
    assert all(torch.equal(after[k], v) for k, v in seen_teacher['before'].items())
    assert all(torch.equal(after[f'model.{k}'], v) for k, v in weights(teacher_ckpt).items())
    ckpt = read_checkpoint(os.path.join(r['output'], 'last.pth'))
    assert ckpt['config']['kd_checkpoint'] == teacher_ckpt and ckpt['config']['kd_type'] == 'logit'
    assert ckpt['kd_teacher_sha256'] == teacher_digest(t)
    assert 'kd_checkpoint: ' + teacher_ckpt in (tmp_path / 'run' / 'config.yaml').read_text()


def test_teacher_from_a_timm_models_weights(folder, tmp_path, seen_teacher):
    """--kd-model resnet10t --kd-checkpoint FILE: the file's weights (classifier 'fc', 2 classes)."""
    torch.manual_seed(1)
    state = timm.create_model('resnet10t', num_classes=2).state_dict()
    torch.save(state, tmp_path / 'r2.pth')
    train(config(tmp_path, kd_model='resnet10t', kd_checkpoint=str(tmp_path / 'r2.pth')), data=str(folder))
    got = seen_teacher['teacher'].model.state_dict()
    assert got.keys() == state.keys() and all(torch.equal(got[k], v) for k, v in state.items())


def test_teacher_from_a_runs_safetensors(folder, trained, tmp_path, seen_teacher):
    """The model.safetensors a run writes: model and arguments from its metadata."""
    from safetensors.torch import load_file
    path = os.path.join(trained['output'], 'model.safetensors')
    train(config(tmp_path, kd_checkpoint=path), data=str(folder))
    got, want = seen_teacher['teacher'].model.state_dict(), load_file(path)
    assert got.keys() == want.keys() and all(torch.equal(got[k], v) for k, v in want.items())


def test_resume_with_a_teacher_continues_exactly(folder, trained, tmp_path):
    """2 epochs in one go == 1 epoch, stop, resume (from the command line), 1 more; mixup, cutmix,
    label smoothing, drop-path and EMA on; hard distillation."""
    kd = dict(kd_checkpoint=os.path.join(trained['output'], 'last.pth'), kd_type='hard', kd_weight=0.7,
              auto_augment='rand-m9-mstd0.5-inc1', mixup=0.8, cutmix=1.0, smoothing=0.1, drop_path=0.1,
              ema_decay=0.9, epochs=2)
    whole = train(config(tmp_path / 'a', **kd), data=str(folder))

    def stop_after_first(epoch):
        if epoch == 1:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train(config(tmp_path / 'b', **kd), data=str(folder), hooks={'epoch_end': stop_after_first})
    assert cli_main(['train', '--resume', str(tmp_path / 'b' / 'run' / 'last.pth')]) == 0
    a = read_checkpoint(tmp_path / 'a' / 'run' / 'last.pth')
    b = read_checkpoint(tmp_path / 'b' / 'run' / 'last.pth')
    assert b['epoch'] == 2 and b['config']['kd_type'] == 'hard' and b['config']['kd_weight'] == 0.7
    for key in ('state_dict', 'state_dict_ema'):
        assert all(torch.equal(v, b[key][k]) for k, v in a[key].items()), key
    assert [h['train_loss'] for h in b['metrics']['history']] == [h['train_loss'] for h in whole['history']]


def test_gradient_accumulation_with_a_teacher_matches_one_big_batch(folder, tmp_path):
    """A teacher at another input size (resnet10t, random weights: 176x176); the teacher changes the
    weights, and 2 x 4 accumulated equals one batch of 8."""
    kd = dict(kd_model='resnet10t', kd_type='logit', kd_weight=0.9, opt='momentum', lr=0.05, **NO_RANDOM_AUG)
    runs = {name: train(config(tmp_path / name, batch_size=8, **c), data=str(folder)) for name, c in
            (('kd1', dict(kd, grad_accum=1)), ('kd2', dict(kd, grad_accum=2)),
             ('plain', dict(NO_RANDOM_AUG, opt='momentum', lr=0.05)))}
    w = {name: weights(os.path.join(r['output'], 'last.pth')) for name, r in runs.items()}
    assert max((w['kd1'][k] - w['kd2'][k]).abs().max().item() for k in w['kd1']) < 1e-6
    assert max((w['kd1'][k] - w['plain'][k]).abs().max().item() for k in w['kd1']) > 1e-4


@pytest.mark.slow
def test_two_processes_with_a_teacher_match_one(folder, trained, tmp_path):
    """torchrun, 2 CPU processes (gloo), global batch 8 = 2 x 4, distilling: the same weights on
    both ranks and as one process."""
    from safetensors.torch import load_file
    flags = ['--model', 'dynamixer_nano', '--recipe', 'scratch', '--epochs', '1', '--batch-size', '8',
             '--opt', 'momentum', '--lr', '0.05', '--workers', '0', '--threads', '1', '--no-progress',
             '--warmup-epochs', '0', '--auto-augment', 'none', '--hflip', '0', '--scale', '1', '1',
             '--ratio', '1', '1', '--color-jitter', '0', '--drop-path', '0', '--save-rank-weights',
             '--kd-checkpoint', os.path.join(trained['output'], 'last.pth'), '--kd-weight', '0.9']
    env = dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS='1')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_addr', '127.0.0.1',
           '--master_port', str(_free_port()), '-m', 'dynamixer', 'train', str(folder),
           '--output', str(tmp_path / 'ddp'), *flags]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert 'distilling (logit' in p.stderr
    r0 = load_file(str(tmp_path / 'ddp' / 'rank0.safetensors'))
    r1 = load_file(str(tmp_path / 'ddp' / 'rank1.safetensors'))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    assert cli_main(['train', str(folder), '--output', str(tmp_path / 'one'), *flags]) == 0
    one = load_file(str(tmp_path / 'one' / 'rank0.safetensors'))
    assert max((one[k] - r0[k]).abs().max().item() for k in one) < 1e-6


# ---- bad teachers: one error line, exit 2, nothing trained --------------------------------------

TINY = ['--epochs', '1', '--batch-size', '4', '--threads', '1', '--no-progress', '--workers', '0',
        '--recipe', 'scratch', '--auto-augment', 'none']


def _refused(folder, tmp_path, *flags_and_fragments):
    flags, fragments = flags_and_fragments
    out = tmp_path / 'refused'
    assert_user_error(run_cli('train', folder, *TINY, '--output', out, *flags), *fragments)
    assert not (out / 'last.pth').exists()


def test_unknown_teacher_name(folder, tmp_path):
    _refused(folder, tmp_path, ['--kd-model', 'resnet_18'], ['unknown teacher model', 'resnet18'])


def test_teacher_with_other_classes(folder, trained, tmp_path):
    """A teacher of 10 classes for 2-class data; a teacher of the right count but other class names."""
    ten = tmp_path / 'ten.pth'
    m = timm.create_model('dynamixer_nano', num_classes=10)
    torch.save(dict(state_dict=m.state_dict(), config=dict(model='dynamixer_nano'),
                    class_names=[str(i) for i in range(10)]), ten)
    _refused(folder, tmp_path, ['--kd-checkpoint', ten], ['predicts 10 classes', 'the data has 2'])
    # a timm model's weights (its classifier is 'fc') of 10 classes
    torch.manual_seed(0)
    torch.save(timm.create_model('resnet10t', num_classes=10).state_dict(), tmp_path / 'r10.pth')
    _refused(folder, tmp_path, ['--kd-model', 'resnet10t', '--kd-checkpoint', tmp_path / 'r10.pth'],
             ['predicts 10 classes'])
    # the right classes, but RGB images for the one-channel left-digit canvases
    assert_user_error(run_cli('train', '--dataset', 'left-digit', '--num-train', '40', '--num-val', '20', *TINY,
                              '--output', tmp_path / 'ld', '--kd-checkpoint', ten), '3-channel', '1 channels')
    renamed = tmp_path / 'renamed.pth'
    ckpt = read_checkpoint(os.path.join(trained['output'], 'last.pth'))
    torch.save(dict(ckpt, class_names=['b', 'a']), renamed)
    _refused(folder, tmp_path, ['--kd-checkpoint', renamed], ['same classes'])


def test_kd_settings_from_flags_yaml_and_print_config(tmp_path, capsys):
    y = tmp_path / 'kd.yaml'
    y.write_text('kd_model: resnet10t\nkd_type: hard\nkd_weight: 0.25\n')
    assert cli_main(['train', '--config', str(y), '--kd-temperature', '2', '--print-config']) == 0
    c = yaml.safe_load(capsys.readouterr().out)
    assert (c['kd_model'], c['kd_checkpoint'], c['kd_type'], c['kd_weight'], c['kd_temperature']) == \
        ('resnet10t', None, 'hard', 0.25, 2.0)


def test_bad_kd_settings(folder, tmp_path):
    _refused(folder, tmp_path, ['--kd-model', 'resnet10t', '--kd-type', 'soft'], ['kd_type'])
    _refused(folder, tmp_path, ['--kd-model', 'resnet10t', '--kd-weight', '1.5'], ['--kd-weight'])


def test_resume_refuses_another_teacher(folder, trained, tmp_path):
    teacher = tmp_path / 'teacher.pth'
    shutil.copy(os.path.join(trained['output'], 'last.pth'), teacher)
    run = tmp_path / 'run'
    rc, out, err = run_cli('train', folder, *TINY, '--output', run, '--kd-checkpoint', teacher)
    assert rc == 0, err
    before = (run / 'last.pth').read_bytes()
    # the teacher file replaced by other weights
    ckpt = read_checkpoint(teacher)
    torch.save(dict(ckpt, state_dict={k: v + 1 if v.is_floating_point() else v
                                      for k, v in ckpt['state_dict'].items()}), teacher)
    assert_user_error(run_cli('train', '--resume', run / 'last.pth', '--epochs', '2'), 'weights differ',
                      '--pretrained')
    # the teacher switched off
    assert_user_error(run_cli('train', '--resume', run / 'last.pth', '--epochs', '2', '--kd-checkpoint', 'none'),
                      'keeps distilling')
    assert (run / 'last.pth').read_bytes() == before


def test_left_digit_teacher_from_other_canvases(tmp_path):
    """The left-digit canvases are normalised by their own statistics: a teacher trained on
    other canvases (another --num-train) is refused; on the same ones it is used."""
    data = ['--dataset', 'left-digit', '--num-val', '20', *TINY]
    rc, out, err = run_cli('train', *data, '--num-train', '40', '--output', tmp_path / 'teacher')
    assert rc == 0, err
    teacher = tmp_path / 'teacher' / 'last.pth'
    assert_user_error(run_cli('train', *data, '--num-train', '60', '--output', tmp_path / 's',
                              '--kd-checkpoint', teacher), 'num_train 40 vs 60', '--num-train 60')
    rc, out, err = run_cli('train', *data, '--num-train', '40', '--output', tmp_path / 's', '--kd-checkpoint', teacher)
    assert rc == 0, err
    assert read_checkpoint(tmp_path / 's' / 'last.pth')['config']['kd_checkpoint'] == str(teacher)

"""`dynamixer detect`: make-digits, train -> validate -> predict on the digits COCO set, bit-exact
resume, run-folder rules, and every bad input a clear error with exit code 2."""
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import yaml

pytest.importorskip('pycocotools')
pytest.importorskip('torchvision')

from dynamixer.dense.trainer import resolve_settings, train_dense  # noqa: E402
from dynamixer.files import read_checkpoint  # noqa: E402
from helpers import cli_result

pytestmark = pytest.mark.usefixtures('one_thread')

cli = cli_result  # (exit code, stdout, stderr) of `dynamixer ARGV`
SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'src')
# tiny: nano at 32x32, 16 training canvases, 4 updates of batch 4 per epoch
FLAGS = ['--img-size', '32', '--batch-size', '4', '--lr', '3e-3', '--threads', '1', '--workers', '0', '--no-progress',
         '--hflip', '0', '--warmup-epochs', '0', '--out-channels', '32']


def data_args(d):
    return [d / 'train' / 'annotations.json', '--val', d / 'val' / 'annotations.json']


@pytest.fixture(scope='module')
def run(digits_coco, tmp_path_factory):
    """A 2-epoch RetinaNet run on the digits COCO set."""
    out = tmp_path_factory.mktemp('detect') / 'run'
    rc, stdout, err = cli('detect', 'train', *data_args(digits_coco), '--epochs', '2', '--output', out, *FLAGS)
    assert rc == 0, err
    assert 'box AP' in stdout and f'run folder: {out}' in stdout
    return out


def test_make_digits_writes_a_coco_set(tmp_path):
    rc, out, err = cli('detect', 'make-digits', tmp_path / 'd', '--train-size', '4', '--val-size', '2',
                       '--canvas', '32', '--digit-size', '10', '12')
    assert rc == 0, err
    data = json.loads((tmp_path / 'd' / 'train' / 'annotations.json').read_text())
    assert len(data['images']) == 4 and [c['name'] for c in data['categories']] == [str(d) for d in range(10)]
    assert all(isinstance(a['segmentation']['counts'], str) for a in data['annotations'])
    assert len(os.listdir(tmp_path / 'd' / 'val' / 'masks')) == 2
    assert (tmp_path / 'd' / 'classes.txt').read_text().split('\n')[0] == 'background'
    rc, _, err = cli('detect', 'make-digits', tmp_path / 'e', '--canvas', '32', '--digit-size', '10', '40')
    assert rc == 2 and '--digit-size' in err


def test_train_writes_the_run_folder(run):
    for f in ('last.pth', 'metrics.csv', 'metrics.json', 'config.yaml', 'curves.png'):
        assert (run / f).is_file(), f
    history = json.loads((run / 'metrics.json').read_text())
    assert [h['epoch'] for h in history] == [1, 2] and all('AP50' in h and 'AP_small' in h for h in history)
    ckpt = read_checkpoint(run / 'last.pth')
    assert ckpt['kind'] == 'dynamixer-dense' and ckpt['config']['task'] == 'detect'
    assert ckpt['class_names'] == [str(d) for d in range(10)] and ckpt['category_ids'] == list(range(1, 11))
    assert yaml.safe_load((run / 'config.yaml').read_text())['detector'] == 'retinanet'


def test_validate_gives_the_training_score_and_a_results_json(run, digits_coco, tmp_path):
    results = tmp_path / 'results.json'
    rc, out, err = cli('detect', 'validate', run / 'last.pth', digits_coco / 'val' / 'annotations.json',
                       '--results', results, '--batch-size', '4', '--threads', '1')
    assert rc == 0, err
    last = json.loads((run / 'metrics.json').read_text())[-1]
    assert f"AP {last['AP']:.2f}  AP50 {last['AP50']:.2f}" in out
    dets = json.loads(results.read_text())
    assert dets and set(dets[0]) == {'image_id', 'category_id', 'bbox', 'score'}
    assert {d['category_id'] for d in dets} <= set(range(1, 11))


def test_predict_draws_and_skips_a_bad_image(run, digits_coco, tmp_path):
    imgs = tmp_path / 'imgs'
    imgs.mkdir()
    for n in ('000000.png', '000001.png'):
        shutil.copy(digits_coco / 'val' / 'images' / n, imgs / n)
    (imgs / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n truncated')
    rc, out, err = cli('detect', 'predict', run / 'last.pth', imgs, '--out', tmp_path / 'p', '--score', '0',
                       '--threads', '1')
    assert rc == 0, err
    assert 'broken.png' in err and '1 unreadable files skipped' in out
    preds = json.loads((tmp_path / 'p' / 'predictions.json').read_text())
    assert {p['image_id'] for p in preds} <= {1, 2} and preds[0]['file_name'].endswith('.png')
    assert sorted(os.listdir(tmp_path / 'p')) == ['000000.png', '000001.png', 'predictions.json']
    rc, _, err = cli('detect', 'predict', run / 'last.pth', imgs / 'broken.png', '--out', tmp_path / 'q')
    assert rc == 2 and 'none of the 1 images' in err


def test_resume_after_interruption_is_bit_exact(digits_coco, tmp_path):
    """Stopped after epoch 1 (Ctrl-C), resumed from last.pth: the same weights as 2 epochs straight,
    with random crops on (the RNG states are restored)."""
    def settings(out):
        s = resolve_settings('detect', overrides=dict(img_size=[32], batch_size=8, threads=1, workers=0,
                                                       progress=False, epochs=2, out_channels=32, output=str(out),
                                                       crop_scale=[0.6, 1.0]))
        s['data'] = dict(train=str(digits_coco / 'train' / 'annotations.json'),
                         val=str(digits_coco / 'val' / 'annotations.json'))
        return s
    straight = train_dense(settings(tmp_path / 'a'))

    def stop(epoch):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train_dense(settings(tmp_path / 'b'), hooks=dict(epoch_end=stop))
    resumed = train_dense(settings(tmp_path / 'b'), resume=str(tmp_path / 'b' / 'last.pth'))
    a = read_checkpoint(tmp_path / 'a' / 'last.pth')['state_dict']
    b = read_checkpoint(tmp_path / 'b' / 'last.pth')['state_dict']
    assert all(torch.equal(a[k], b[k]) for k in a)
    def scores(history):
        return [{k: v for k, v in h.items() if k not in ('epoch_s', 'images_per_s')} for h in history]
    assert len(resumed['history']) == 2 and scores(straight['history']) == scores(resumed['history'])


def test_run_folder_rules(run, digits_coco, tmp_path):
    # a folder holding a run is not overwritten unasked
    rc, _, err = cli('detect', 'train', *data_args(digits_coco), '--epochs', '1', '--output', run, *FLAGS)
    assert rc == 2 and 'holds another run' in err and '--overwrite' in err
    # a finished run resumed says so
    rc, _, err = cli('detect', 'train', '--resume', run / 'last.pth', *FLAGS)
    assert rc == 2 and 'already finished all 2 epochs' in err
    # --resume auto with no checkpoint starts afresh; --print-config shows the settings and writes nothing
    rc, out, err = cli('detect', 'train', *data_args(digits_coco), '--resume', 'auto', '--output', tmp_path / 'n',
                       '--print-config', '--detector', 'maskrcnn', *FLAGS)
    settings = yaml.safe_load(out)
    assert rc == 0 and settings['detector'] == 'maskrcnn' and settings['img_size'] == [32]
    assert settings['data']['train'] == str(digits_coco / 'train' / 'annotations.json')
    assert not (tmp_path / 'n').exists()
    # a resumed run keeps its data
    rc, _, err = cli('detect', 'train', digits_coco / 'val' / 'annotations.json', '--val',
                     digits_coco / 'val' / 'annotations.json', '--resume', run / 'last.pth', '--epochs', '3', *FLAGS)
    assert rc == 2 and 'continues on its own data' in err


def test_maskrcnn_trains_and_scores_masks(digits_coco, tmp_path):
    rc, out, err = cli('detect', 'train', *data_args(digits_coco), '--detector', 'maskrcnn', '--epochs', '1',
                       '--output', tmp_path / 'm', *FLAGS)
    assert rc == 0, err
    last = json.loads((tmp_path / 'm' / 'metrics.json').read_text())[-1]
    assert 'mask_AP' in last and 'mask AP' in out
    rc, out, err = cli('detect', 'validate', tmp_path / 'm' / 'last.pth', digits_coco / 'val' / 'annotations.json',
                       '--threads', '1')
    assert rc == 0 and 'masks: AP' in out, err


def _damaged(digits_coco, tmp_path, fn):
    d = tmp_path / 'd'
    shutil.copytree(digits_coco, d)
    fn(d / 'train' / 'annotations.json')
    return d


@pytest.mark.parametrize('damage, message', [
    (lambda p: p.write_text(p.read_text()[:200]), 'not valid JSON'),
    (lambda p: p.write_text(json.dumps({k: v for k, v in json.loads(p.read_text()).items() if k != 'images'})),
     "no 'images'"),
    (lambda p: (p.parent / 'images' / '000002.png').unlink(), 'not on disk'),
])
def test_bad_training_data_exit_2(digits_coco, tmp_path, damage, message):
    d = _damaged(digits_coco, tmp_path, damage)
    rc, _, err = cli('detect', 'train', *data_args(d), '--epochs', '1', '--output', tmp_path / 'r', *FLAGS)
    assert rc == 2 and message in err and 'Traceback' not in err, err
    assert str(d / 'train') in err
    assert not (tmp_path / 'r' / 'last.pth').exists()


def test_wrong_checkpoints_exit_2(run, digits_coco, tmp_path):
    ann = digits_coco / 'val' / 'annotations.json'
    # a classification checkpoint
    torch.save(dict(state_dict={}, config=dict(model='dynamixer_nano'), class_names=['a']), tmp_path / 'cls.pth')
    rc, _, err = cli('detect', 'validate', tmp_path / 'cls.pth', ann)
    assert rc == 2 and 'not a detection / segmentation checkpoint' in err
    # a segmentation checkpoint
    ck = read_checkpoint(run / 'last.pth')
    ck['config'] = dict(ck['config'], task='segment')
    torch.save(ck, tmp_path / 'seg.pth')
    rc, _, err = cli('detect', 'predict', tmp_path / 'seg.pth', digits_coco / 'val' / 'images', '--out', tmp_path / 'o')
    assert rc == 2 and 'is a segment checkpoint' in err
    # annotations with other classes than the checkpoint's
    data = json.loads(ann.read_text())
    data['categories'] = data['categories'][:3]
    data['annotations'] = [a for a in data['annotations'] if a['category_id'] <= 3]
    (tmp_path / 'three.json').write_text(json.dumps(data))
    rc, _, err = cli('detect', 'validate', run / 'last.pth', tmp_path / 'three.json', '--images',
                     digits_coco / 'val' / 'images')
    assert rc == 2 and 'not the ones the model was trained on' in err
    rc, _, err = cli('detect', 'predict', run / 'last.pth', tmp_path / 'nothing-here', '--out', tmp_path / 'o')
    assert rc == 2 and 'no such file or folder' in err


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_processes(digits_coco, tmp_path):
    """torchrun, 2 CPU processes (gloo): global batch 4 = 2 x 2, validation sharded and gathered."""
    env = dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS='1')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_addr', '127.0.0.1',
           '--master_port', str(_free_port()), '-m', 'dynamixer', 'detect', 'train', *map(str, data_args(digits_coco)),
           '--epochs', '1', '--output', str(tmp_path / 'ddp'), *FLAGS]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert '2 process(es) on cpu, batch 4 = 2 x 1 x 2' in p.stderr
    assert json.loads((tmp_path / 'ddp' / 'metrics.json').read_text())[0]['AP'] >= 0


def test_pretrained_classification_checkpoint_starts_the_trunk(digits_coco, tmp_path):
    """--pretrained-file: a classification checkpoint trained at 64x64 starts a 32x32 detector's
    trunk (resampled); its classifier is dropped."""
    import timm

    from dynamixer.dense.tasks import build_dense_model
    torch.manual_seed(1)
    clf = timm.create_model('dynamixer_nano', img_size=64, num_classes=7)
    torch.save(dict(state_dict=clf.state_dict(), config=dict(model='dynamixer_nano')), tmp_path / 'clf.pth')
    rc, out, err = cli('detect', 'train', *data_args(digits_coco), '--epochs', '1', '--pretrained-file',
                       tmp_path / 'clf.pth', '--output', tmp_path / 'r', '--print-config', *FLAGS)
    settings = yaml.safe_load(out)
    assert rc == 0 and settings['pretrained_file'] == str(tmp_path / 'clf.pth')
    det = build_dense_model(settings, 11)
    trunk = det.backbone.body.state_dict()
    stem = [k for k in trunk if 'stem' in k and k.endswith('weight')][0]
    assert torch.equal(trunk[stem], clf.state_dict()[stem.replace('model.', '', 1)])
    rc, _, err = cli('detect', 'train', *data_args(digits_coco), '--epochs', '1', '--pretrained-file',
                     tmp_path / 'missing.pth', '--output', tmp_path / 'r2', *FLAGS)
    assert rc == 2 and 'missing.pth' in err


def test_ctrl_c_names_the_checkpoint_to_resume(digits_coco, tmp_path, monkeypatch):
    from dynamixer.dense import trainer

    def interrupted(settings, resume=None, overwrite=False):
        os.makedirs(settings['output'])
        open(os.path.join(settings['output'], 'last.pth'), 'wb').close()
        raise KeyboardInterrupt
    monkeypatch.setattr(trainer, 'train_dense', interrupted)
    monkeypatch.chdir(tmp_path)
    rc, _, err = cli('detect', 'train', *data_args(digits_coco), *FLAGS)   # default run folder
    last = tmp_path / 'runs' / 'detect-retinanet-dynamixer_nano' / 'last.pth'
    assert rc == 130 and f'dynamixer detect train --resume {last}' in err and 'Traceback' not in err


@pytest.mark.parametrize('text, message', [('lrr: 0.1\n', "unknown setting 'lrr'. Did you mean 'lr'?"),
                                           ('lr: -1\n', 'lr must be a number > 0'),
                                           ('detector: yolo\n', 'detector must be one of'),
                                           ('crop_scale: [0.9, 0.5]\n', 'crop_scale is a range'),
                                           ('epochs: [1]\n', 'epochs must be an integer')])
def test_settings_files_are_checked(digits_coco, tmp_path, text, message):
    (tmp_path / 's.yaml').write_text(text)
    rc, _, err = cli('detect', 'train', *data_args(digits_coco), '--config', tmp_path / 's.yaml', '--print-config')
    assert rc == 2 and message in err, err
    assert 'crop_scale' in message or str(tmp_path / 's.yaml') in err   # a range is checked after merging
    (tmp_path / 'ok.yaml').write_text('epochs: 3\ndetector: maskrcnn\n')
    rc, out, _ = cli('detect', 'train', *data_args(digits_coco), '--config', tmp_path / 'ok.yaml', '--epochs', '5',
                     '--print-config')
    assert rc == 0 and yaml.safe_load(out)['epochs'] == 5 and yaml.safe_load(out)['detector'] == 'maskrcnn'

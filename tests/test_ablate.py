"""`dynamixer ablate`: the grid, reuse of finished runs, tables and plot (tiny configurations).

Each run is an ordinary `dynamixer train` run; the left-digit data set is tested in test_data.py,
`dynamixer show-mixing` in test_show_mixing.py."""
import csv
import json
import os

import numpy as np
import pytest
import timm
import torch

from dynamixer import cli
from dynamixer.commands.ablate import VARIANTS, model_kwargs_for, summarize


def test_every_variant_builds_and_differs_only_in_its_option():
    base = timm.create_model('dynamixer_nano', **model_kwargs_for({}, 10, 1, 24, 0.0, 'dynamixer_nano'))
    for name, options in VARIANTS.items():
        kw = model_kwargs_for(options, 10, 1, 24, 0.0, 'dynamixer_nano')
        m = timm.create_model('dynamixer_nano', **kw)
        assert m(torch.zeros(2, 1, 24, 24)).shape == (2, 10)
        op = m.stages[1].blocks[0].token_mixer.mix_w
        if 'num_segments' in options:
            assert all(s.blocks[0].token_mixer.mix_h.num_segments == options['num_segments'] for s in m.stages)
        if 'reduced_dim' in options:
            assert op.reduced_dim == options['reduced_dim']
        if options.get('mixing') == 'static':
            assert op.static_logits is not None and op.generate is None
        if options.get('reweight') is False:
            assert m.stages[0].blocks[0].token_mixer.reweight is None
        if name == 'dynamic':
            assert sum(p.numel() for p in m.parameters()) == sum(p.numel() for p in base.parameters())


def test_summarize_pairs_seeds():
    runs = [dict(variant='dynamic', seed=s, top1=a, train_images_per_s=1.0) for s, a in ((0, 50.), (1, 60.))]
    runs += [dict(variant='static', seed=s, top1=a, train_images_per_s=1.0) for s, a in ((0, 40.), (1, 56.))]
    costs = {v: dict(params=1, macs=2, images_per_s=10.0 if v == 'dynamic' else 20.0) for v in ('dynamic', 'static')}
    rows = {r['variant']: r for r in summarize(runs, ['dynamic', 'static'], costs)}
    assert rows['static']['top1_mean'] == 48.0
    assert rows['static']['top1_std'] == pytest.approx(np.std([40, 56], ddof=1))
    assert rows['static']['delta_mean'] == -7.0                       # (-10 + -4) / 2
    assert rows['static']['delta_std'] == pytest.approx(np.std([-10, -4], ddof=1))
    assert rows['static']['speed_vs_baseline'] == 2.0


@pytest.fixture(scope='module')
def tiny_ablation(tmp_path_factory):
    out = tmp_path_factory.mktemp('ablation')
    # one thread: on a busy 2-core machine two threads per process mostly wait for each other
    argv = ['ablate', '--out', str(out), '--variants', 'dynamic', 'static', 'S=2', '--seeds', '0', '1',
            '--epochs', '1', '--num-train', '128', '--num-val', '64', '--batch-size', '32',
            '--speed-rounds', '1', '--speed-batch', '8', '--threads', '1']
    threads = torch.get_num_threads()
    assert cli.main(argv) == 0
    torch.set_num_threads(threads)
    return out, argv


@pytest.fixture(autouse=True)
def _keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_ablate_writes_tables_and_plot(tiny_ablation):
    out, _ = tiny_ablation
    with open(out / 'results.csv') as f:
        rows = list(csv.DictReader(f))
    assert [r['variant'] for r in rows] == ['dynamic', 'static', 'S=2']
    for r in rows:
        assert r['seeds'] == '2'
        assert 0 <= float(r['top1_min']) <= float(r['top1_mean']) <= float(r['top1_max']) <= 100
        assert float(r['params']) > 1e5 and float(r['macs']) > 1e6 and float(r['images_per_s']) > 0
    # static mixing has no generators: fewer parameters and multiply-adds than the dynamic block
    by = {r['variant']: r for r in rows}
    assert float(by['static']['params']) < float(by['dynamic']['params'])
    assert float(by['static']['macs']) < float(by['dynamic']['macs'])
    with open(out / 'runs.csv') as f:
        runs = list(csv.DictReader(f))
    assert len(runs) == 6 and all(np.isfinite(float(r['train_loss'])) for r in runs)
    md = (out / 'results.md').read_text()
    assert md.count('\n| ') == 2 + 3 - 1 and '| static |' in md     # header, rule, 3 rows
    png = (out / 'ablation.png').read_bytes()
    assert png[:8] == b'\x89PNG\r\n\x1a\n' and len(png) > 10_000
    # every run is an ordinary `dynamixer train` run folder with its (atomic) training checkpoint
    ckpt = torch.load(out / 'runs' / 'static__seed1' / 'last.pth', weights_only=True)
    assert ckpt['config']['model_kwargs']['mixing'] == 'static' and ckpt['class_names'][3] == '3'
    assert ckpt['config']['dataset'] == 'left-digit' and ckpt['config']['smoothing'] == 0.1
    assert ckpt['epoch'] == 1 and 'optimizer' in ckpt and 'rng' in ckpt


def test_ablate_resumes_finished_runs(tiny_ablation, capsys):
    out, argv = tiny_ablation
    before = json.loads((out / 'runs' / 'dynamic__seed0.json').read_text())
    assert cli.main(argv) == 0
    assert 'reusing' in capsys.readouterr().out
    assert json.loads((out / 'runs' / 'dynamic__seed0.json').read_text()) == before


def test_ablate_rejects_unknown_variant(tmp_path, capsys):
    assert cli.main(['ablate', '--out', str(tmp_path), '--variants', 'nope']) == 2
    assert 'error: unknown variant' in capsys.readouterr().err


def test_ablate_explains_a_bad_folder(tmp_path, capsys):
    (tmp_path / 'x.txt').write_text('not a data folder')
    assert cli.main(['ablate', '--out', str(tmp_path / 'o'), '--data', str(tmp_path), '--variants', 'dynamic']) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and 'train' in err and 'val' in err and '<class>' in err


def test_ablate_flags_match_train(tmp_path):
    """--smoothing and --amp as `dynamixer train` spells them; the task is named as train names it."""
    from dynamixer.commands.ablate import DEFAULTS, train_config
    parser = cli.build_parser()
    args = parser.parse_args(['ablate', '--smoothing', '0.3', '--amp', 'bf16'])
    assert args.smoothing == 0.3 and args.amp == 'bf16'
    args = parser.parse_args(['ablate'])
    assert args.amp == 'none' and args.smoothing == DEFAULTS['smoothing'] == 0.1 and args.data == 'left-digit'
    cfg = vars(args)
    c = train_config(cfg, {}, 3, None, str(tmp_path))
    # the ablation recipe, unchanged: AdamW, cosine, warm-up from lr / 1000, label smoothing 0.1
    assert (c['opt'], c['sched'], c['lr'], c['warmup_lr'], c['min_lr'], c['weight_decay']) == \
        ('adamw', 'cosine', 1e-3, 1e-6, 1e-5, 0.05)
    assert (c['smoothing'], c['epochs'], c['batch_size'], c['warmup_epochs'], c['seed']) == (0.1, 7, 64, 1, 3)
    assert c['dataset'] == 'left-digit' and c['mixup'] == 0 and c['ema_decay'] is None and c['auto_augment'] is None


def test_ablate_on_an_image_folder(tmp_path):
    """--data DIR with train/ and val/ class folders: RGB at the model's input size."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in ('train', 'val'):
        for c in ('cat', 'dog'):
            (tmp_path / 'data' / split / c).mkdir(parents=True)
            for k in range(4):
                a = (rng.random((40, 40, 3)) * 255).astype(np.uint8)
                Image.fromarray(a).save(tmp_path / 'data' / split / c / f'{k}.png')
    out = tmp_path / 'out'
    assert cli.main(['ablate', '--data', str(tmp_path / 'data'), '--out', str(out), '--variants', 'dynamic',
                     '--seeds', '0', '--epochs', '1', '--batch-size', '4', '--workers', '0',
                     '--speed-rounds', '1', '--speed-batch', '2', '--threads', '1']) == 0
    with open(out / 'results.csv') as f:
        (row,) = list(csv.DictReader(f))
    assert row['variant'] == 'dynamic' and 0 <= float(row['top1_mean']) <= 100
    ckpt = torch.load(out / 'runs' / 'dynamic__seed0' / 'last.pth', weights_only=True)
    assert ckpt['class_names'] == ['cat', 'dog'] and ckpt['config']['model_kwargs']['in_chans'] == 3
    assert ckpt['config']['model_kwargs']['img_size'] == 32


@pytest.mark.slow
def test_torchrun_shares_the_runs_and_matches_one_process(tmp_path):
    """Two torchrun ranks (gloo, CPU) train half of the runs each; the gathered results are the
    same numbers as a single process's (same thread count)."""
    import subprocess
    import sys
    args = ['--variants', 'dynamic', 'static', '--seeds', '0', '1', '--epochs', '1', '--num-train', '128',
            '--num-val', '64', '--batch-size', '32', '--threads', '1', '--speed-rounds', '0', '--no-checkpoints']
    env = dict(os.environ, OMP_NUM_THREADS='1',
               PYTHONPATH=os.pathsep.join([os.path.join(os.path.dirname(__file__), '..', 'src'),
                                           os.environ.get('PYTHONPATH', '')]))
    subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                    '-m', 'dynamixer', 'ablate', '--out', str(tmp_path / 'ddp'), *args],
                   check=True, env=env, timeout=300)
    assert cli.main(['ablate', '--out', str(tmp_path / 'one'), *args]) == 0
    keys = ('variant', 'seed', 'top1', 'val_loss', 'train_loss')
    read = lambda p: [tuple(r[k] for k in keys) for r in csv.DictReader(open(p))]   # noqa: E731
    assert read(tmp_path / 'ddp' / 'runs.csv') == read(tmp_path / 'one' / 'runs.csv')
    assert len(read(tmp_path / 'one' / 'runs.csv')) == 4



def test_variant_options_named_like_training_settings_are_settings(tmp_path):
    """A distillation variant: kd_* go to the run's settings, reduced_dim to the model."""
    from dynamixer.commands.ablate import DataShape, train_config
    args = cli.build_parser().parse_args(['ablate'])
    shape = DataShape(4000, 2000, [str(i) for i in range(10)], 1, 24)
    options = dict(kd_checkpoint='teacher.pth', kd_type='hard', reduced_dim=4)
    c = train_config(vars(args), options, 0, shape, str(tmp_path))
    assert (c['kd_checkpoint'], c['kd_type']) == ('teacher.pth', 'hard')
    assert c['model_options']['reduced_dim'] == 4 and not any(k.startswith('kd_') for k in c['model_options'])
    assert model_kwargs_for(options, 10, 1, 24, 0.0, 'dynamixer_nano') == \
        model_kwargs_for(dict(reduced_dim=4), 10, 1, 24, 0.0, 'dynamixer_nano')

"""`dynamixer ablate`, the left-digit task and `dynamixer show-mixing` (tiny configurations)."""
import csv
import json
import os

import numpy as np
import pytest
import timm
import torch

from dynamixer import cli
from dynamixer.ablate import VARIANTS, model_kwargs_for, summarize
from dynamixer.digits import _load_digits, left_digit_split, make_left_digit_task
from dynamixer.show_mixing import capture_mixing


# ---------------------------------------------------------------------------- the data set

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
    from dynamixer.digits import _compose
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


# ---------------------------------------------------------------------------- the grid

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
    ckpt = torch.load(out / 'checkpoints' / 'static__seed1.pth', weights_only=True)
    assert ckpt['config']['model_kwargs']['mixing'] == 'static' and ckpt['class_names'][3] == '3'


def test_ablate_resumes_finished_runs(tiny_ablation, capsys):
    out, argv = tiny_ablation
    before = json.loads((out / 'runs' / 'dynamic__seed0.json').read_text())
    assert cli.main(argv) == 0
    assert 'reusing' in capsys.readouterr().out
    assert json.loads((out / 'runs' / 'dynamic__seed0.json').read_text()) == before


def test_ablate_rejects_unknown_variant(tmp_path):
    with pytest.raises(SystemExit, match='unknown variant'):
        cli.main(['ablate', '--out', str(tmp_path), '--variants', 'nope'])


def test_ablate_explains_a_bad_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match='train/ and val/'):
        cli.main(['ablate', '--out', str(tmp_path / 'o'), '--data', str(tmp_path), '--variants', 'dynamic'])


# ---------------------------------------------------------------------------- show-mixing

def test_capture_mixing_matches_the_operation():
    """The captured matrices are the ones the op applies: mixing the captured inputs with them
    reproduces the op's output (before its projection)."""
    m = timm.create_model('dynamixer_nano', num_classes=10, in_chans=1).eval()
    x = torch.randn(2, 1, 32, 32)
    block = m.stages[0].blocks[0].token_mixer
    got = {}
    hook = block.mix_w.register_forward_hook(lambda mod, a, o: got.update(inp=a[0], out=o))
    ph, pw = capture_mixing(m, x)
    hook.remove()
    assert ph.shape == (2, 8, 4, 8, 8) and pw.shape == (2, 8, 4, 8, 8)
    assert torch.allclose(ph.sum(-2), torch.ones(()), atol=1e-5)
    xs = got['inp'].unflatten(-1, (4, 16))                               # (B, H, W, S, C/S)
    mixed = torch.einsum('bhsij,bhisc->bhjsc', pw, xs).flatten(-2)
    assert torch.allclose(block.mix_w.proj(mixed), got['out'], atol=1e-5)
    # different images give different matrices (dynamic mixing)
    assert not torch.allclose(pw[0], pw[1])


def test_show_mixing_writes_a_png(tiny_ablation, tmp_path):
    from PIL import Image
    out, _ = tiny_ablation
    train, _ = make_left_digit_task(2, 1, seed=0)
    paths = []
    for k in range(2):
        p = tmp_path / f'img{k}.png'
        Image.fromarray((train.tensors[0][k, 0].numpy() * 255).astype(np.uint8)).save(p)
        paths.append(str(p))
    fig = tmp_path / 'mix.png'
    for variant in ('dynamic', 'static'):
        assert cli.main(['show-mixing', str(out / 'checkpoints' / f'{variant}__seed0.pth'), *paths,
                         '--digits', '1', '--out', str(fig)]) == 0
        img = Image.open(fig)
        assert img.format == 'PNG' and img.size[0] > 1000 and img.size[1] > 500   # 3 figure rows
    with pytest.raises(SystemExit, match='not in the model'):
        cli.main(['show-mixing', str(out / 'checkpoints' / 'dynamic__seed0.pth'), *paths,
                  '--layer', 'stages.9', '--out', str(fig)])


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
    ckpt = torch.load(out / 'checkpoints' / 'dynamic__seed0.pth', weights_only=True)
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

"""Deployment: ONNX / TorchScript / safetensors export, running exports without dynamixer,
torch.compile, Hugging Face Hub folders (offline) and prediction from ONNX.

Everything runs on dynamixer_nano (32x32) on the CPU; nothing reaches the network.
"""
import contextlib
import copy
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import timm
import dynamixer
from dynamixer import cli
from dynamixer.checkpoint import load_model
from dynamixer.export import (
    class_names_for, eval_transform, load_preprocessing, preprocessing_config,
    preprocessing_path, sample_images,
)
from dynamixer.predict import predict_onnx

try:  # the `onnx` extra; without it only the ONNX tests skip (through the onnx_export fixture)
    import onnx
    import onnxruntime as ort
except ImportError:
    onnx = ort = None

SRC = str(Path(dynamixer.__file__).resolve().parents[1])
NUM_CLASSES = 10
CLASS_NAMES = [f'digit {i}' for i in range(NUM_CLASSES)]
ATOL = 1e-4


def _run_cli(*argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli.main([str(a) for a in argv])
    return rc, out.getvalue()


def _make_checkpoint(path, model_kwargs=None, seed=0, **extra):
    """A training checkpoint in this project's format, for a nano model with random weights."""
    torch.manual_seed(seed)
    model_kwargs = dict(num_classes=NUM_CLASSES, **(model_kwargs or {}))
    model = timm.create_model('dynamixer_nano', **model_kwargs)
    # non-trivial LayerNorm / bias values, so a dropped or permuted parameter changes the outputs
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ckpt = dict(
        state_dict=model.state_dict(), epoch=29, step=3000,
        config=dict(model='dynamixer_nano', model_kwargs=model_kwargs, dataset='digits', epochs=30,
                    opt='adamw', lr=2e-3, weight_decay=0.05, batch_size=64),
        class_names=CLASS_NAMES, version=dynamixer.__version__,
        metrics=dict(top1=93.25, top5=99.5, history=[dict(epoch=e, val_top1=90.0 + e) for e in range(3)]))
    ckpt.update(extra)
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp('deploy')


@pytest.fixture(scope='module')
def checkpoint(workdir):
    return _make_checkpoint(workdir / 'nano.pth', dict(drop_path_rate=0.1))


@pytest.fixture(scope='module')
def model(checkpoint):
    m, _ = load_model(checkpoint)
    return m.eval()


@pytest.fixture(scope='module')
def onnx_export(workdir, checkpoint):
    pytest.importorskip('onnx')
    pytest.importorskip('onnxruntime')
    path = workdir / 'export' / 'nano.onnx'
    rc, out = _run_cli('export', checkpoint, '--format', 'onnx', '--output', path)
    return path, rc, out


@pytest.fixture(scope='module')
def ts_export(workdir, checkpoint):
    path = workdir / 'export' / 'nano.pt'
    rc, out = _run_cli('export', checkpoint, '--format', 'torchscript', '--output', path)
    return path, rc, out


@pytest.fixture(scope='module')
def real_batch(model):
    cfg = timm.data.resolve_data_config({}, model=model)
    transform = timm.data.create_transform(**cfg)
    return torch.stack([transform(im) for im in sample_images(num_digits=6)])


def _logits(model, x):
    with torch.no_grad():
        return model(x).numpy()


# --------------------------------------------------------------------------------------------
# ONNX
# --------------------------------------------------------------------------------------------

def test_onnx_export_files_and_printed_check(onnx_export):
    path, rc, out = onnx_export
    assert rc == 0, out
    assert path.is_file() and preprocessing_path(path).is_file()
    assert not list(path.parent.glob('*.data')), 'weights must be inside the .onnx file'
    assert 'check onnx vs PyTorch on random inputs' in out and 'real images' in out
    errors = [float(line.split('max abs error ')[1].split()[0]) for line in out.splitlines()
              if line.startswith('check ')]
    assert len(errors) == 2 and all(0 <= e <= ATOL for e in errors)


def test_onnx_preprocessing_json(onnx_export, model):
    path = onnx_export[0]
    cfg = json.loads(preprocessing_path(path).read_text())
    timm_cfg = timm.data.resolve_data_config({}, model=model)
    assert cfg['input_size'] == [3, 32, 32]
    assert cfg['mean'] == pytest.approx(list(timm_cfg['mean']))
    assert cfg['std'] == pytest.approx(list(timm_cfg['std']))
    assert cfg['crop_pct'] == timm_cfg['crop_pct'] and cfg['interpolation'] == timm_cfg['interpolation']
    assert cfg['class_names'] == CLASS_NAMES and cfg['num_classes'] == NUM_CLASSES
    assert cfg['model'] == 'dynamixer_nano' and cfg['format'] == 'onnx'
    # the same config travels inside the ONNX file
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(meta['preprocessing'])['class_names'] == CLASS_NAMES


def test_onnx_checker_and_dynamic_batch_axis(onnx_export):
    path = onnx_export[0]
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    (inp,) = proto.graph.input
    dims = inp.type.tensor_type.shape.dim
    assert inp.name == 'input' and dims[0].dim_param and not dims[0].dim_value
    assert [d.dim_value for d in dims[1:]] == [3, 32, 32]
    assert [o.name for o in proto.graph.output] == ['logits']


@pytest.mark.parametrize('batch', [1, 2, 7])
def test_onnx_matches_pytorch_random(onnx_export, model, batch):
    session = ort.InferenceSession(str(onnx_export[0]), providers=['CPUExecutionProvider'])
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
    out = session.run(None, {'input': x.numpy()})[0]
    assert out.shape == (batch, NUM_CLASSES)
    assert np.abs(out - _logits(model, x)).max() <= ATOL


def test_onnx_matches_pytorch_real_images(onnx_export, model, real_batch):
    session = ort.InferenceSession(str(onnx_export[0]), providers=['CPUExecutionProvider'])
    out = session.run(None, {'input': real_batch.numpy()})[0]
    ref = _logits(model, real_batch)
    assert np.abs(out - ref).max() <= ATOL
    assert (out.argmax(1) == ref.argmax(1)).all()


def test_onnx_rejects_wrong_image_size(onnx_export):
    session = ort.InferenceSession(str(onnx_export[0]), providers=['CPUExecutionProvider'])
    with pytest.raises(Exception, match='(?i)dimension|shape'):
        session.run(None, {'input': np.zeros((1, 3, 16, 16), np.float32)})


# --------------------------------------------------------------------------------------------
# TorchScript and safetensors
# --------------------------------------------------------------------------------------------

def test_torchscript_export(ts_export, model, real_batch):
    path, rc, out = ts_export
    assert rc == 0, out
    assert 'check torchscript vs PyTorch' in out
    extra = {'preprocessing.json': ''}
    loaded = torch.jit.load(str(path), _extra_files=extra)
    assert json.loads(extra['preprocessing.json'])['class_names'] == CLASS_NAMES
    assert json.loads(preprocessing_path(path).read_text())['format'] == 'torchscript'
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=1e-6)
        torch.testing.assert_close(loaded(real_batch), model(real_batch), rtol=0, atol=1e-6)
    with pytest.raises(Exception, match='built for 32x32'):
        loaded(torch.randn(1, 3, 16, 16))


def test_safetensors_export_roundtrip(workdir, checkpoint, model):
    path = workdir / 'export' / 'nano.safetensors'
    rc, out = _run_cli('export', checkpoint, '--format', 'safetensors', '--output', path)
    assert rc == 0, out
    from safetensors import safe_open
    with safe_open(str(path), 'pt') as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert keys == set(model.state_dict()) and meta['model'] == 'dynamixer_nano'
    assert json.loads(meta['preprocessing'])['class_names'] == CLASS_NAMES
    # back through this package's loader (variant inferred from the weights) and through timm
    loaded, info = load_model(path)
    assert info['model'] == 'dynamixer_nano' and info['num_classes'] == NUM_CLASSES
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(_logits(loaded, x), _logits(model, x), rtol=0, atol=0)
    # `dynamixer predict -c nano.safetensors` reads the model and class names from the metadata
    from dynamixer.predict import load_inference_model
    _, pinfo = load_inference_model(str(path))
    assert pinfo['class_names'] == CLASS_NAMES and pinfo['has_class_names']
    via_timm = timm.create_model('dynamixer_nano', pretrained=True, num_classes=NUM_CLASSES,
                                 pretrained_cfg_overlay=dict(file=str(path), num_classes=NUM_CLASSES)).eval()
    torch.testing.assert_close(_logits(via_timm, x), _logits(model, x), rtol=0, atol=0)


def test_export_reports_failure_beyond_tolerance(onnx_export, checkpoint, monkeypatch):
    """The command exits 1 and says so when the check fails (errors injected, no re-export)."""
    from dynamixer import export
    path = onnx_export[0]
    fake = dict(path=path, preprocessing_path=preprocessing_path(path),
                config=load_preprocessing(path), errors=dict(random=1e-7, real=3e-3))
    monkeypatch.setattr(export, 'export_checkpoint', lambda *a, **k: fake)
    rc, out = _run_cli('export', checkpoint, '--output', path)
    assert rc == 1 and 'FAILED' in out and 'does not reproduce' in out


def test_class_names_fallbacks(workdir):
    """Same names as `dynamixer predict`: the checkpoint's, ImageNet's for 1000 classes, else indices."""
    assert class_names_for(3, ['a', 'b', 'c']) == ['a', 'b', 'c']
    assert class_names_for(3) == ['0', '1', '2']
    imagenet = class_names_for(1000)
    assert len(imagenet) == 1000 and imagenet[0] == 'tench' and imagenet[1] == 'goldfish'
    # a bare state dict has no class names
    torch.manual_seed(0)
    bare = timm.create_model('dynamixer_nano', num_classes=4)
    torch.save(bare.state_dict(), workdir / 'bare.pth')
    m, info = load_model(workdir / 'bare.pth')
    cfg = preprocessing_config(m, info['class_names'], info['model'])
    assert cfg['class_names'] == ['0', '1', '2', '3']


def test_preprocessing_follows_built_image_size(workdir):
    """A model built with img_size=16 exports 16x16 preprocessing, not its default config's 32x32."""
    ckpt = _make_checkpoint(workdir / 'nano16.pth', dict(img_size=16))
    rc, out = _run_cli('export', ckpt, '--format', 'safetensors', '--output', workdir / 'nano16.safetensors')
    assert rc == 0, out
    cfg = load_preprocessing(workdir / 'nano16.safetensors')
    assert cfg['input_size'] == [3, 16, 16]
    assert eval_transform(cfg)(sample_images(1)[0]).shape == (3, 16, 16)


def test_unknown_format_and_missing_sidecar(workdir, checkpoint):
    with pytest.raises(SystemExit):
        _run_cli('export', checkpoint, '--format', 'tflite')
    lone = workdir / 'lone.onnx'
    lone.write_bytes(b'')
    with pytest.raises(FileNotFoundError, match='lone.onnx.preprocessing.json not found'):
        load_preprocessing(lone)


# --------------------------------------------------------------------------------------------
# Exported files without the dynamixer package
# --------------------------------------------------------------------------------------------

STANDALONE = textwrap.dedent('''
    import sys
    # the editable install of dynamixer sits in site-packages: block it, and timm too
    sys.modules['dynamixer'] = None
    sys.modules['timm'] = None
    for name in ('dynamixer', 'timm'):
        try:
            __import__(name)
        except ImportError:
            pass
        else:
            raise SystemExit(name + ' is importable; the test would prove nothing')
    import json
    import numpy as np
    onnx_path, ts_path, x_path, out_path = sys.argv[1:5]
    x = np.load(x_path)
    import onnxruntime as ort
    session = ort.InferenceSession(onnx_path, providers=['CPUExecutionProvider'])
    onnx_out = session.run(None, {'input': x})[0]
    import torch
    ts = torch.jit.load(ts_path)
    with torch.no_grad():
        ts_out = ts(torch.from_numpy(x)).numpy()
    np.savez(out_path, onnx=onnx_out, ts=ts_out)
    print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('dynamixer', 'timm')
                            and sys.modules[m] is not None)))
''')


def test_exports_run_without_dynamixer(onnx_export, ts_export, model, real_batch, workdir):
    script = workdir / 'standalone.py'
    script.write_text(STANDALONE)
    x_path, out_path = workdir / 'x.npy', workdir / 'standalone_out.npz'
    x = torch.cat([real_batch, torch.randn(2, 3, 32, 32)])
    np.save(x_path, x.numpy())
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    # -I: isolated mode, neither PYTHONPATH nor the working directory is on sys.path
    proc = subprocess.run(
        [sys.executable, '-I', str(script), str(onnx_export[0]), str(ts_export[0]), str(x_path), str(out_path)],
        cwd=str(workdir), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
    out = np.load(out_path)
    ref = _logits(model, x)
    assert np.abs(out['onnx'] - ref).max() <= ATOL
    assert np.abs(out['ts'] - ref).max() <= 1e-6


# --------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------

def _compile_inference_and_training(backend, model_kwargs=None):
    torch.manual_seed(0)
    torch._dynamo.reset()
    eager = timm.create_model('dynamixer_nano', num_classes=NUM_CLASSES, **(model_kwargs or {}))
    x = torch.randn(4, 3, 32, 32)
    y = torch.tensor([0, 3, 5, 9])

    eager.eval()
    compiled = torch.compile(eager, fullgraph=True, backend=backend)  # fullgraph: a graph break raises
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)

    # one training step: same loss, gradients and updated weights as eager
    eager_t = copy.deepcopy(eager).train()
    comp_t = copy.deepcopy(eager).train()
    compiled_t = torch.compile(comp_t, fullgraph=True, backend=backend)
    # SGD: the update is linear in the gradient (Adam would blow float noise in tiny gradients up to lr)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (eager_t, comp_t)]
    losses = []
    for m, opt in zip((eager_t, compiled_t), opts):
        opt.zero_grad()
        loss = F.cross_entropy(m(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for (name, p0), p1 in zip(eager_t.named_parameters(), comp_t.parameters()):
        torch.testing.assert_close(p1.grad, p0.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f'{name}: {m}')
        torch.testing.assert_close(p1, p0, rtol=1e-5, atol=1e-6)


def test_compile_fullgraph_aot_eager():
    """No graph breaks in forward or backward (dynamo + AOTAutograd, no code generation)."""
    _compile_inference_and_training('aot_eager')


@pytest.mark.slow
def test_compile_fullgraph_inductor_nano():
    """Inductor's CPU code generation (the default backend); minutes of C++ compilation on 2 cores."""
    _compile_inference_and_training('inductor')


# --------------------------------------------------------------------------------------------
# Hugging Face Hub (timm's functions, offline)
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def hub_checkpoint(workdir):
    # an ablation architecture (plain-sum block): the Hub config must carry the argument
    return _make_checkpoint(workdir / 'nano_plain.pth', dict(reweight=False), seed=1)


@pytest.fixture(scope='module')
def hub_folder(workdir, hub_checkpoint):
    folder = workdir / 'hub'
    rc, out = _run_cli('push-to-hub', hub_checkpoint, 'someone/dynamixer-nano-digits', '--local-dir', folder)
    assert rc == 0, out
    return folder


def test_hub_folder_contents(hub_folder, hub_checkpoint):
    assert sorted(p.name for p in hub_folder.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    cfg = json.loads((hub_folder / 'config.json').read_text())
    assert cfg['architecture'] == 'dynamixer_nano' and cfg['num_classes'] == NUM_CLASSES
    assert cfg['label_names'] == CLASS_NAMES
    assert cfg['model_args']['reweight'] is False
    card = (hub_folder / 'README.md').read_text()
    model, _ = load_model(hub_checkpoint)
    params = sum(p.numel() for p in model.parameters())
    for text in ('library_name: timm', 'dynamixer_nano', f'{params:,}', 'GMACs', 'top1: 93.25',
                 'top5: 99.5', 'lr: 0.002', 'opt: adamw', 'epochs: 30', 'plain sum',
                 "hf-hub:someone/dynamixer-nano-digits", 'arxiv'):
        assert text.lower() in card.lower(), text
    assert 'history' not in card and 'val_top1' not in card  # per-epoch log stays out of the card


def test_hub_local_dir_roundtrip(hub_folder, hub_checkpoint):
    model, _ = load_model(hub_checkpoint)
    loaded = timm.create_model(f'local-dir:{hub_folder}', pretrained=True).eval()
    assert loaded.pretrained_cfg['label_names'] == CLASS_NAMES
    assert loaded.stages[0].blocks[0].token_mixer.reweight is None  # plain-sum block rebuilt
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(_logits(loaded, x), _logits(model, x), rtol=0, atol=0)


HF_HUB_LOAD = textwrap.dedent('''
    import sys
    import numpy as np
    import torch
    import timm
    import dynamixer
    from huggingface_hub import constants
    assert constants.HF_HUB_OFFLINE
    model = timm.create_model('hf-hub:someone/dynamixer-nano-digits', pretrained=True).eval()
    x = torch.from_numpy(np.load(sys.argv[1]))
    with torch.no_grad():
        np.save(sys.argv[2], model(x).numpy())
    print(model.pretrained_cfg['source'], model.pretrained_cfg['hf_hub_id'])
''')


def test_hf_hub_prefix_loads_offline(hub_folder, hub_checkpoint, workdir):
    """`hf-hub:` through timm and huggingface_hub, served from a local Hub cache (offline mode)."""
    cache = workdir / 'hf_cache'
    repo = cache / 'models--someone--dynamixer-nano-digits'
    commit = '0123456789abcdef0123456789abcdef01234567'
    shutil.copytree(hub_folder, repo / 'snapshots' / commit)
    (repo / 'refs').mkdir(parents=True)
    (repo / 'refs' / 'main').write_text(commit)
    script = workdir / 'hf_load.py'
    script.write_text(HF_HUB_LOAD)
    x = torch.randn(3, 3, 32, 32)
    np.save(workdir / 'hub_x.npy', x.numpy())
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_HUB_CACHE=str(cache), PYTHONPATH=SRC)
    proc = subprocess.run([sys.executable, str(script), str(workdir / 'hub_x.npy'), str(workdir / 'hub_y.npy')],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ['hf-hub', 'someone/dynamixer-nano-digits']
    model, _ = load_model(hub_checkpoint)
    np.testing.assert_array_equal(np.load(workdir / 'hub_y.npy'), _logits(model, x))


def test_push_to_hub_uses_timm_upload(hub_checkpoint, workdir, monkeypatch):
    """The online path: timm's push_to_hf_hub with a stand-in for the Hub API (no network)."""
    pytest.importorskip('huggingface_hub')
    import timm.models._hub as timm_hub
    uploaded = workdir / 'uploaded'
    calls = []

    class FakeHfApi:
        def __init__(self, *args, **kwargs):
            pass

        def create_repo(self, repo_id, private=False, exist_ok=False):
            calls.append(('create_repo', repo_id, private))
            return type('RepoUrl', (), {'repo_id': repo_id})()

        def file_exists(self, repo_id, filename, revision=None):
            return False

        def upload_folder(self, repo_id, folder_path, **kwargs):
            calls.append(('upload_folder', repo_id))
            shutil.copytree(folder_path, uploaded)
            return f'https://huggingface.co/{repo_id}/commit/abc'

    monkeypatch.setattr(timm_hub, 'HfApi', FakeHfApi)
    rc, out = _run_cli('push-to-hub', hub_checkpoint, 'someone/dynamixer-nano-digits', '--private')
    assert rc == 0, out
    assert calls == [('create_repo', 'someone/dynamixer-nano-digits', True),
                     ('upload_folder', 'someone/dynamixer-nano-digits')]
    # safetensors only (no pickle), and the same model card as the local folder
    assert sorted(p.name for p in uploaded.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    assert 'top1: 93.25' in (uploaded / 'README.md').read_text()
    loaded = timm.create_model(f'local-dir:{uploaded}', pretrained=True).eval()
    model, _ = load_model(hub_checkpoint)
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(_logits(loaded, x), _logits(model, x), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# Prediction from ONNX
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def image_files(workdir):
    folder = workdir / 'images'
    folder.mkdir()
    paths = []
    for i, im in enumerate(sample_images(num_digits=3)):
        p = folder / f'img{i}.png'
        im.save(p)
        paths.append(p)
    return paths


def test_predict_onnx_matches_pytorch(onnx_export, model, image_files):
    from PIL import Image
    results = predict_onnx(onnx_export[0], image_files, topk=3, batch_size=2)
    transform = eval_transform(load_preprocessing(onnx_export[0]))
    x = torch.stack([transform(Image.open(p)) for p in image_files])
    with torch.no_grad():
        probs = model(x).softmax(-1)
    top = probs.topk(3, dim=-1)
    assert len(results) == len(image_files)
    for res, p, idx in zip(results, top.values, top.indices):
        assert [i for i, _, _ in res] == idx.tolist()
        assert [name for _, name, _ in res] == [CLASS_NAMES[i] for i in idx]
        assert [prob for _, _, prob in res] == pytest.approx(p.tolist(), abs=1e-4)


def test_predict_cli_onnx_same_as_pytorch(onnx_export, checkpoint, image_files):
    """`dynamixer predict --onnx` prints the classes and probabilities of `dynamixer predict -c`."""
    images = [str(p) for p in image_files]
    rc_pt, out_pt = _run_cli('predict', *images, '-c', checkpoint, '-k', '4', '--json')
    rc_ox, out_ox = _run_cli('predict', *images, '--onnx', onnx_export[0], '-k', '4', '--json')
    assert rc_pt == 0 and rc_ox == 0
    pt, ox = json.loads(out_pt), json.loads(out_ox)
    assert [r['image'] for r in ox] == images
    for a, b in zip(pt, ox):
        assert [t['class'] for t in a['top']] == [t['class'] for t in b['top']]
        assert [t['index'] for t in a['top']] == [t['index'] for t in b['top']]
        assert [t['probability'] for t in b['top']] == pytest.approx([t['probability'] for t in a['top']], abs=1e-4)
    # and the text output, probabilities rounded to 0.01 %, is the same
    _, text_pt = _run_cli('predict', *images, '-c', checkpoint, '-k', '4')
    _, text_ox = _run_cli('predict', *images, '--onnx', onnx_export[0], '-k', '4')
    assert text_ox == text_pt


def test_predict_cli_onnx_errors(onnx_export, workdir, image_files, capsys):
    rc, _ = _run_cli('predict', str(image_files[0]), '--onnx', workdir / 'missing.onnx')
    assert rc == 2 and 'ONNX file not found' in capsys.readouterr().err
    lone = workdir / 'copy.onnx'
    shutil.copy(onnx_export[0], lone)
    rc, _ = _run_cli('predict', str(image_files[0]), '--onnx', lone)
    assert rc == 2 and 'copy.onnx.preprocessing.json not found' in capsys.readouterr().err
    with pytest.raises(SystemExit):  # exactly one of -c / --onnx
        _run_cli('predict', str(image_files[0]))

"""`dynamixer export`: ONNX, TorchScript and safetensors files with their preprocessing, checked against PyTorch."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import timm
import torch

from dynamixer.checkpoint import load_model
from dynamixer.data import class_names_for, sample_images
from dynamixer.data import preprocessing_transform as eval_transform
from dynamixer.inference import load_preprocessing, preprocessing_config, preprocessing_path
from helpers import ATOL, CLASS_NAMES, NUM_CLASSES, _logits, _make_checkpoint, _run_cli

try:  # the `onnx` extra; without it the ONNX tests skip (through the onnx_export fixture)
    import onnx
    import onnxruntime as ort
except ImportError:
    onnx = ort = None


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


def test_onnx_graph_form(onnx_export):
    """The default opset writes GELU as one operator, and `onnx_graph.softmax_on_last_axis` has
    moved every mixing softmax to the last axis (its own test: tests/test_onnx_graph.py)."""
    from dynamixer.commands.export import DEFAULT_OPSET
    proto = onnx.load(str(onnx_export[0]))
    assert {o.domain: o.version for o in proto.opset_import}[''] == DEFAULT_OPSET == 20
    ops = [n.op_type for n in proto.graph.node]
    assert 'Gelu' in ops and 'Erf' not in ops
    axes = [a.i for n in proto.graph.node if n.op_type == 'Softmax' for a in n.attribute if a.name == 'axis']
    assert axes and -2 not in axes


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
    from dynamixer.inference import load_inference_model
    _, pinfo = load_inference_model(str(path))
    assert pinfo['class_names'] == CLASS_NAMES and pinfo['has_class_names']
    via_timm = timm.create_model('dynamixer_nano', pretrained=True, num_classes=NUM_CLASSES,
                                 pretrained_cfg_overlay=dict(file=str(path), num_classes=NUM_CLASSES)).eval()
    torch.testing.assert_close(_logits(via_timm, x), _logits(model, x), rtol=0, atol=0)


def test_export_reports_failure_beyond_tolerance(onnx_export, checkpoint, monkeypatch):
    """The command exits 1 and says so when the check fails (errors injected, no re-export)."""
    from dynamixer.commands import export
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


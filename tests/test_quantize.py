"""int8: ONNX Runtime quantisation (dynamic and static), PyTorch int8, `dynamixer export
--quantize int8`, and ONNX files in `dynamixer validate` / `dynamixer predict`.
dynamixer_nano at 16x16 on the CPU; no timings."""
import json
import re
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from sklearn.datasets import load_digits

import dynamixer
from dynamixer.data import load_image
from dynamixer.errors import DynaMixerError, MissingDependencyError
from dynamixer.inference import OnnxClassifier
from dynamixer.quantize import DEFAULT_KEEP_FLOAT, node_parts, quantize_model, quantize_onnx
from helpers import block_import
from helpers import cli_result as _cli

onnx = pytest.importorskip('onnx')
ort = pytest.importorskip('onnxruntime')

pytestmark = pytest.mark.usefixtures('one_thread')
NAMES = [str(i) for i in range(10)]


@pytest.fixture(scope='module')
def work(tmp_path_factory):
    """A nano checkpoint (16x16, digits classes), its float ONNX file and a folder of digit PNGs."""
    d = tmp_path_factory.mktemp('int8')
    torch.manual_seed(0)
    model = timm.create_model('dynamixer_nano', num_classes=10, img_size=16)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ckpt = d / 'nano.pth'
    torch.save(dict(state_dict=model.state_dict(), class_names=NAMES, version=dynamixer.__version__,
                    config=dict(model='dynamixer_nano', model_kwargs=dict(num_classes=10, img_size=16))), ckpt)
    digits = load_digits()
    for i in range(40):
        folder = d / 'images' / str(digits.target[i])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).save(folder / f'{i}.png')
    rc, out, err = _cli('export', ckpt, '-o', d / 'nano.onnx')
    assert rc == 0, err
    return dict(dir=d, ckpt=ckpt, float=d / 'nano.onnx', images=d / 'images', model=model.eval())


@pytest.fixture(scope='module')
def dynamic_int8(work):
    # from the float export (the checkpoint route re-exports: test_int8_export_from_checkpoint, slow)
    rc, out, err = _cli('export', work['float'], '--quantize', 'int8', '-o', work['dir'] / 'nano.int8.onnx')
    assert rc == 0, err
    return work['dir'] / 'nano.int8.onnx', out


def _batch(work, n=16):
    clf = OnnxClassifier(work['float'])
    files = sorted(work['images'].rglob('*.png'))[:n]
    return torch.stack([clf.transform(load_image(str(f))) for f in files])


def _close_to_float(int8_path, work):
    x = _batch(work)
    ref = OnnxClassifier(work['float'])(x)
    out = OnnxClassifier(int8_path)(x)
    spread = float(ref.max() - ref.min())
    # int8 error well below the spread of the logits, and the ranking kept where float is not a tie
    assert float((out - ref).abs().max()) < 0.1 * spread
    clear = (ref.topk(2).values[:, 0] - ref.topk(2).values[:, 1]) > 0.05 * spread
    assert bool((out.argmax(1) == ref.argmax(1))[clear].all())


def test_node_parts_cover_the_model(work):
    parts = node_parts(onnx.load(str(work['float'])))
    counts = {p: list(parts.values()).count(p) for p in set(parts.values())}
    # nano: 8 blocks x (H and W op: generator, reduce, mix, proj) + mix_c, proj, reweight fc1/fc2, mlp fc1/fc2
    assert counts == dict(generator=16, reduce=16, mix=16, proj=32, reweight=16, mlp=16, head=1, conv=2)


def test_dynamic_int8_export(dynamic_int8, work):
    path, out = dynamic_int8
    assert 'onnx int8, dynamic' in out and 'vs float ONNX' in out and 'top-1 agreement' in out
    onnx.checker.check_model(str(path), full_check=True)
    types = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert 'MatMulInteger' in types and 'DynamicQuantizeLinear' in types
    cfg = json.loads((work['dir'] / 'nano.int8.onnx.preprocessing.json').read_text())
    assert cfg['quantization']['mode'] == 'dynamic' and cfg['quantization']['keep_float'] == list(DEFAULT_KEEP_FLOAT)
    assert cfg['class_names'] == NAMES and cfg['input_size'] == [3, 16, 16]
    assert path.stat().st_size < 0.5 * work['float'].stat().st_size
    _close_to_float(path, work)


def test_int8_runs_in_onnxruntime_alone(dynamic_int8, work):
    """Fresh interpreter, dynamixer, timm and torch blocked: numpy + onnxruntime only."""
    x = _batch(work, 4).numpy()
    np.save(work['dir'] / 'x.npy', x)
    code = textwrap.dedent(f'''
        import sys
        for name in ('dynamixer', 'timm', 'torch'):
            sys.modules[name] = None
        import numpy as np, onnxruntime as ort
        s = ort.InferenceSession({str(dynamic_int8[0])!r}, providers=['CPUExecutionProvider'])
        x = np.load({str(work['dir'] / 'x.npy')!r})
        np.save({str(work['dir'] / 'y.npy')!r}, s.run(['logits'], {{'input': x}})[0])
    ''')
    subprocess.run([sys.executable, '-I', '-c', code], check=True, timeout=120)
    y = np.load(work['dir'] / 'y.npy')
    np.testing.assert_allclose(y, OnnxClassifier(dynamic_int8[0])(torch.from_numpy(x)).numpy(), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_int8_export_from_checkpoint(work):
    rc, out, err = _cli('export', work['ckpt'], '--quantize', 'int8', '--calibration', work['images'],
                        '-o', work['dir'] / 'ck.int8.onnx')
    assert rc == 0, err
    assert 'calibrated on 40 images' in out and 'vs float PyTorch' in out and 'check float onnx' in out
    onnx.checker.check_model(str(work['dir'] / 'ck.int8.onnx'), full_check=True)
    _close_to_float(work['dir'] / 'ck.int8.onnx', work)


def test_static_int8_with_calibration_folder(work):
    dst = work['dir'] / 'nano.static.onnx'
    r = quantize_onnx(work['float'], dst, mode='static', calibration=work['images'], keep_float=('head',))
    onnx.checker.check_model(str(dst), full_check=True)
    assert r['config']['quantization']['calibration_images'] == 40
    assert r['kept_float'] == {'head': 1}
    assert r['quantized']['mix'] == 16 and r['quantized']['generator'] == 16
    assert 'QuantizeLinear' in {n.op_type for n in onnx.load(str(dst)).graph.node}
    _close_to_float(dst, work)


def test_bad_quantisation_input(work, tmp_path):
    with pytest.raises(DynaMixerError, match='calibration'):
        quantize_onnx(work['float'], tmp_path / 'a.onnx', mode='static')
    with pytest.raises(DynaMixerError, match='no images'):
        quantize_onnx(work['float'], tmp_path / 'a.onnx', mode='static', calibration=tmp_path)
    with pytest.raises(DynaMixerError, match='unknown model part'):
        quantize_onnx(work['float'], tmp_path / 'a.onnx', keep_float=('attention',))
    rc, _, err = _cli('export', work['ckpt'], '--format', 'safetensors', '--quantize', 'int8')
    assert rc == 2 and 'onnx or torchscript' in err


def test_missing_onnxruntime_names_the_extra(work, tmp_path, monkeypatch):
    block_import(monkeypatch, 'onnxruntime')
    with pytest.raises(MissingDependencyError, match=re.escape('pip install "dynamixer[onnx]"')):
        quantize_onnx(work['float'], tmp_path / 'a.onnx')
    rc, _, err = _cli('validate', work['float'], '--dataset', 'digits')
    assert rc == 2 and 'dynamixer[onnx]' in err and 'Traceback' not in err
    image = next(work['images'].rglob('*.png'))
    for source in ('-c', '--onnx'):
        rc, _, err = _cli('predict', image, source, work['float'])
        assert rc == 2 and 'pip install "dynamixer[onnx]"' in err, err


@pytest.mark.parametrize('package', ['onnx', 'onnxscript'])
def test_missing_onnx_exporter_names_the_extra(work, tmp_path, monkeypatch, package):
    block_import(monkeypatch, package)
    rc, _, err = _cli('export', work['ckpt'], '--quantize', 'int8', '-o', tmp_path / 'a.onnx')
    assert rc == 2 and f"optional package '{package}'" in err and 'pip install "dynamixer[onnx]"' in err
    assert not (tmp_path / 'a.onnx').exists()


def test_missing_torchao_names_the_int8_extra(work, monkeypatch):
    block_import(monkeypatch, 'torchao')
    with pytest.raises(MissingDependencyError, match=re.escape('pip install "dynamixer[int8]"')):
        quantize_model(work['model'], backend='torchao')


def test_int8_flags_without_quantize(work):
    rc, _, err = _cli('export', work['ckpt'], '--keep-float', 'head')
    assert rc == 2 and 'add --quantize int8' in err


def _strip_numbers(text):
    return re.sub(r'\d+\.\d+', 'N', text)


def test_validate_onnx_like_checkpoint(work, dynamic_int8):
    rc, ck, err = _cli('validate', work['ckpt'], '--dataset', 'digits', '--workers', '0')
    assert rc == 0, err
    rc, fl, err = _cli('validate', work['float'], '--dataset', 'digits', '--workers', '0')
    assert rc == 0, err
    rc, q, err = _cli('validate', dynamic_int8[0], '--dataset', 'digits', '--workers', '0')
    assert rc == 0, err
    assert fl == ck  # float ONNX: the same numbers to the printed digits
    assert _strip_numbers(q) == _strip_numbers(ck)
    rc, js, _ = _cli('validate', dynamic_int8[0], work['images'], '--json', '--workers', '0')
    r = json.loads(js)
    assert rc == 0 and r['images'] == 40 and set(r) >= {'top1', 'top5', 'loss', 'model'}


def test_predict_onnx_like_checkpoint(work, dynamic_int8):
    files = [str(f) for f in sorted(work['images'].rglob('*.png'))[:3]]
    rc, ck, _ = _cli('predict', *files, '-c', work['ckpt'], '-k', '3')
    rc2, q, _ = _cli('predict', *files, '-c', dynamic_int8[0], '-k', '3')
    rc3, q2, _ = _cli('predict', *files, '--onnx', dynamic_int8[0], '-k', '3')
    assert rc == rc2 == rc3 == 0
    assert q == q2 and _strip_numbers(q) == _strip_numbers(ck)


def test_torchscript_int8_export(work):
    rc, out, err = _cli('export', work['ckpt'], '--format', 'torchscript', '--quantize', 'int8',
                        '-o', work['dir'] / 'nano.int8.pt')
    assert rc == 0, err
    assert 'torchscript int8' in out
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        ts = torch.jit.load(str(work['dir'] / 'nano.int8.pt'))
    x = _batch(work)
    with torch.no_grad():
        ref, out = work['model'](x), ts(x)
    assert float((out - ref).abs().max()) < 0.1 * float(ref.max() - ref.min())
    assert any('quantized' in str(m.original_name).lower() or 'Linear' in m.original_name
               for m in ts.modules())


def test_quantize_model_keeps_parts_in_float(work):
    q = quantize_model(work['model'], backend='torch.ao')
    kinds = {name: type(m).__module__ for name, m in q.named_modules() if 'Linear' in type(m).__name__}
    assert 'torch.nn.modules.linear' in kinds['head']                      # DEFAULT_KEEP_FLOAT
    assert 'torch.nn.modules.linear' in kinds['stages.0.blocks.0.token_mixer.mix_h.generate']
    assert 'quantized' in kinds['stages.0.blocks.0.mlp.fc1']
    assert type(work['model'].stages[0].blocks[0].mlp.fc1) is torch.nn.Linear  # not in place


def test_quantize_model_forward_eager(work):
    """The swapped int8 Linear layers run in eager mode, on the plain path (the dispatch's rule
    for module swaps), close to float."""
    q = quantize_model(work['model'], backend='torch.ao')
    x = _batch(work)
    with torch.no_grad():
        ref, out = work['model'](x), q(x)
        paths = dynamixer.explain_paths(q, x)
    assert paths and set(paths.values()) == {'plain'}, paths
    assert not torch.equal(out, ref)  # int8 really ran
    assert float((out - ref).abs().max()) < 0.1 * float(ref.max() - ref.min())


def test_torchao_backend(work):
    pytest.importorskip('torchao')
    q = quantize_model(work['model'], backend='torchao')
    assert type(q.stages[0].blocks[0].mlp.fc1.weight).__name__ != 'Parameter'
    assert type(q.head.weight) is torch.nn.Parameter
    x = _batch(work)
    with torch.no_grad():
        ref, out = work['model'](x), q(x)
        paths = dynamixer.explain_paths(q, x)
    assert float((out - ref).abs().max()) < 0.1 * float(ref.max() - ref.min()) and not torch.equal(out, ref)
    assert set(paths.values()) == {'plain'}, paths  # the fast paths read .weight: int8 subclasses go plain

"""The scripts in benchmarks/: each runs on tiny settings (no timings asserted), and the baseline
they measure against computes the library's function. `dynamixer benchmark` is test_benchmark.py."""
import importlib
import json
import os
import re
import subprocess
import sys

import pytest
import timm
import torch

import dynamixer

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks')
pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module', autouse=True)
def _scripts_importable():
    """The scripts import their neighbours (baseline.py) as a script run from benchmarks/ does."""
    mp = pytest.MonkeyPatch()
    mp.syspath_prepend(BENCH)
    yield
    mp.undo()


def script(name: str):
    return importlib.import_module(name)


def test_baseline_equals_library_on_the_fast_path():
    from baseline import BaselineBlock, BaselineLayer, baseline_model
    # 64x64 input: a 16x16 stage-1 grid, so the library takes its fast mixing there
    torch.manual_seed(0)
    lib = timm.create_model('dynamixer_nano', img_size=64, num_classes=5).double()
    with torch.no_grad():
        for p in lib.parameters():
            p.normal_(0, 0.1)
    ref = baseline_model(lib)
    assert all(isinstance(b, BaselineLayer) and isinstance(b.token_mixer, BaselineBlock)
               for s in ref.stages for b in s.blocks)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    for mode in ('train', 'eval'):
        getattr(lib, mode)(), getattr(ref, mode)()
        with torch.no_grad():
            torch.testing.assert_close(lib(x), ref(x), rtol=1e-10, atol=1e-12)
    lib.zero_grad(), ref.zero_grad()
    lib(x).square().sum().backward()
    ref(x).square().sum().backward()
    for (name, a), b in zip(lib.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-8, atol=1e-12, msg=name)


def test_bench_speed_smoke(tmp_path):
    bench_speed = script('bench_speed')
    out = tmp_path / 'r.json'
    assert bench_speed.main(['--models', 'dynamixer_nano', '--rounds', '1', '--warmup', '0', '--no-compile',
                             '--matmul-size', '256', '--latency', '--img-size', '64', '--infer-batch', '2',
                             '--train-batch', '2', '--json', str(out)]) == 0
    res = json.loads(out.read_text())['results'][0]
    assert res['check']['library']['output'] <= 1e-5 and res['check']['library-eager']['output'] <= 1e-5
    assert res['memory']['library']['step_peak_mib'] > 0
    assert set(res['images_per_s']) == {f'{kind}/{variant}' for kind in ('infer', 'train', 'latency')
                                        for variant in ('reference', 'library', 'library-eager')}
    # at 64x64 nano's first stage (16x16 tokens) takes the fast mixing: the compiled kernels in
    # 'library' when they build, the eager ones in 'library-eager'; the later 8x8 stages are plain
    from dynamixer.ops import cpu_kernels
    backend = 'cpp' if cpu_kernels.available() else 'fast'
    assert res['paths_inference']['library'][f'{backend}-inference'] == 6        # two blocks and their ops
    assert res['paths_train']['library'][f'{backend}-train'] == 6
    assert res['paths_inference']['library-eager']['fast-inference'] == 6 + 8     # and the 8 MLPs
    assert not any(p.startswith('cpp') for p in res['paths_train']['library-eager'])


def test_bench_gpu_refuses_without_a_gpu_and_passes_its_defaults(monkeypatch):
    """The GPU check runs bench_speed on CUDA with its GPU defaults; with no GPU it says so."""
    bench_gpu = script('bench_gpu')
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match='needs a CUDA GPU'):
            bench_gpu.main([])
    seen = []
    monkeypatch.setattr(bench_gpu.torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(bench_gpu, 'triton_available', lambda: True)
    monkeypatch.setattr(bench_gpu.bench_speed, 'main', lambda argv: seen.append(argv) or 0)
    assert bench_gpu.main(['--rounds', '3']) == 0
    assert seen == [['--device', 'cuda', '--no-compile', '--models', 'dynamixer_s', '--rounds', '3']]
    monkeypatch.setattr(bench_gpu, 'triton_available', lambda: False)
    with pytest.raises(SystemExit, match='Triton is not installed'):
        bench_gpu.main([])


def test_time_parts_smoke():
    # its own process: it wraps the library's functions with timers
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    run = subprocess.run([sys.executable, os.path.join(BENCH, 'time_parts.py'), '--model', 'dynamixer_nano',
                          '--threads', '1', '--rounds', '1', '--matmul-size', '128'],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert '| mlp_residual_inference_ |' in run.stdout and '| RecomputeGeluMlp.backward |' in run.stdout


def test_gemm_floor_records_every_gemm_and_runs(capsys):
    """The recorder sees each matrix multiply once: on the plain path, in inference mode, one call
    per Linear and convolution module call and one mixing matmul per DynaMixerOp."""
    gemm_floor = script('gemm_floor')
    from dynamixer.model import DynaMixerOp
    model = timm.create_model('dynamixer_nano', num_classes=5).eval()
    calls = {'modules': 0}

    def count(*_):
        calls['modules'] += 1
    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            m.register_forward_hook(count)
    ops = sum(1 for m in model.modules() if isinstance(m, DynaMixerOp))
    with dynamixer.set_fast_path(False), torch.inference_mode():
        with gemm_floor.RecordGemms() as rec:
            model(torch.randn(2, 3, 32, 32))
    assert calls['modules'] > 0 and len(rec.calls) == calls['modules'] + ops
    gemm_floor.replay(rec.calls)()  # the recorded layouts replay
    assert gemm_floor.main(['--model', 'dynamixer_nano', '--img-size', '64', '--rounds', '1', '--warmup', '0',
                            '--infer-batch', '2', '--train-batch', '2']) == 0
    out = capsys.readouterr().out
    assert '| inference (batch 2) |' in out and '| training step, forward + backward (batch 2) |' in out


def test_bench_kernels_smoke(capsys, cpu_kernels_built):
    try:
        assert script('bench_kernels').main(['--models', 'dynamixer_nano', '--threads', '1', '--rounds', '1',
                                             '--warmup', '0', '--infer-batch', '2', '--train-batch', '2',
                                             '--no-compile', '--matmul-size', '128', '--kernels-all-sizes']) == 0
    finally:
        torch.set_num_threads(1)
    out = capsys.readouterr().out
    for row in ('| infer | library-eager |', '| infer | library |', '| train | library-all |',
                '| latency | library-all-sizes |', '| train | reference |'):
        assert row in out


@pytest.mark.slow  # Inductor builds each candidate: about 20 s for one
def test_bench_epilogues_smoke(capsys):
    assert script('bench_epilogues').main(['--rounds', '1', '--scale', '256', '--cases', '1']) == 0
    out = capsys.readouterr().out
    assert '| bias + GELU' in out and 'GELU + GELU backward' not in out


def test_int8_gemm_smoke(capsys):
    pytest.importorskip('onnxruntime')
    assert script('int8_gemm').main(['--rounds', '1', '--threads', '1', '--scale', '256']) == 0
    out = capsys.readouterr().out
    assert '| stage 1 fc1 | 64 x 192 x 576 | 1 |' in out


def test_int8_variants_smoke(capsys, tmp_path):
    pytest.importorskip('onnxruntime')
    assert script('int8_variants').main(['--model', 'dynamixer_nano', '--img-size', '32', '--batch', '2',
                                         '--rounds', '1', '--settings', '0', '--workdir', str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert '| float32 |' in out and '| default (per channel' in out
    assert json.loads((tmp_path / 'dynamixer_nano.opset20.onnx.preprocessing.json').read_text())['input_size'] == [
        3, 32, 32]


def test_int8_accuracy_smoke(tmp_path, capsys):
    pytest.importorskip('onnxruntime')
    from helpers import _make_checkpoint
    kwargs = dict(in_chans=1, img_size=24)
    ckpt = _make_checkpoint(tmp_path / 'ld.pth', kwargs, config=dict(
        model='dynamixer_nano', model_kwargs=dict(kwargs, num_classes=10), dataset='left-digit', num_train=64,
        num_val=32, canvas=24, align=4, data_seed=0), class_names=[str(i) for i in range(10)])
    assert script('int8_accuracy').main([str(ckpt), '--data', 'left-digit', '--calibration-size', '16',
                                         '--configs', 'dynamic, all int8', '--json', str(tmp_path / 'r.json')]) == 0
    rows = json.loads((tmp_path / 'r.json').read_text())
    assert [r['name'] for r in rows] == ['PyTorch float32', 'ONNX float32', 'dynamic, all int8']
    assert rows[1]['max_err'] == 0 and rows[2]['agree'] > 50   # ONNX float is its own reference


def test_resolution_transfer_smoke(tmp_path, capsys):
    out = tmp_path / 'r.md'
    assert script('resolution_transfer').main(['--epochs', '1', '--sizes', '24', '--ft-sizes', '24',
                                               '--ft-steps', '0', '1', '--out', str(out)]) == 0
    text = out.read_text()
    assert '| 24x24 | resampled (default) |' in text and 'baseline: random generators' in text and 'k=1' in text
    assert re.search(r'\| resampled: linear \(default\) \| \d+\.\d \|', text)


@pytest.mark.slow
def test_dense_cost_script_runs(tmp_path):
    """benchmarks/dense_cost.py at a tiny setting (no timing is asserted): both detectors train a
    step, the ratio and the memory figures come out."""
    out = tmp_path / 'cost.json'
    p = subprocess.run([sys.executable, os.path.join(BENCH, 'dense_cost.py'), '--sizes', '56', '--batch', '1',
                        '--rounds', '1', '--warmup', '0', '--threads', '1', '--json', str(out)],
                       capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, PYTHONPATH=os.path.join(os.path.dirname(BENCH), 'src')))
    assert p.returncode == 0, p.stderr[-3000:]
    row = json.loads(out.read_text())['results'][0]
    assert row['size'] == 56 and row['time_ratio'] > 0
    assert row['dynamixer_s']['peak_rss_mib'] > 0 and row['resnet50_fpn']['step_growth_mib'] >= 0
    assert 'load average' in p.stdout

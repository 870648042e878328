"""The benchmark harness runs, and its baseline computes the library's function (small models)."""
import json
import os
import subprocess
import sys

import pytest
import timm
import torch

import dynamixer  # noqa: F401

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks')
sys.path.insert(0, BENCH)
from baseline import BaselineBlock, BaselineLayer, baseline_model  # noqa: E402


def test_baseline_equals_library_on_the_fast_path():
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
    import bench_speed
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


def test_time_parts_smoke():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    run = subprocess.run([sys.executable, os.path.join(BENCH, 'time_parts.py'), '--model', 'dynamixer_nano',
                          '--threads', '1', '--rounds', '1'], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert '| mlp_residual_inference_ |' in run.stdout and '| RecomputeGeluMlp.backward |' in run.stdout


def test_gemm_floor_records_every_gemm_and_runs(capsys):
    """The recorder sees each matrix multiply once: on the plain path, in inference mode, one call
    per Linear and convolution module call and one mixing matmul per DynaMixerOp."""
    import gemm_floor
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

"""`dynamixer benchmark` on dynamixer_nano (32x32), one round: output shape and bad input, no timings."""
import contextlib
import csv
import importlib
import io
import json

import pytest
import torch

from dynamixer import benchmark as bench
from dynamixer import cli

pytestmark = pytest.mark.usefixtures('one_thread')
TINY = ['--img-size', '32', '--rounds', '1', '--iters', '1', '--warmup', '1', '--threads', '1', '--no-progress']


def _cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def test_benchmark_writes_csv_and_json(tmp_path):
    pytest.importorskip('onnxruntime')
    rc, out, err = _cli('benchmark', '--models', 'dynamixer_nano', '--batch-sizes', '1', '2',
                        '--runtimes', 'eager', 'int8', *TINY, '--csv', tmp_path / 'r.csv', '--json', tmp_path / 'r.json')
    assert rc == 0, err
    assert 'FlopCounterMode' in out and 'threads' in out and 'torch ' in out and 'onnxruntime' in out
    rows = list(csv.DictReader(open(tmp_path / 'r.csv')))
    assert list(rows[0]) == bench.CSV_COLUMNS
    assert {(r['runtime'], r['infer_batch_size']) for r in rows} == {('eager', '1'), ('eager', '2'),
                                                                     ('int8', '1'), ('int8', '2')}
    for r in rows:
        assert r['status'] == 'ok' and float(r['infer_samples_per_sec']) > 0 and float(r['infer_step_time']) > 0
        assert r['infer_img_size'] == '32' and float(r['infer_gmacs']) > 0 and r['model'] == 'dynamixer_nano'
        # training only for the PyTorch runtimes
        assert (r['train_samples_per_sec'] != '') == (r['runtime'] == 'eager')
    data = json.load(open(tmp_path / 'r.json'))
    assert {'info', 'results', 'macs_tool', 'args'} <= set(data) and len(data['results']) == 4
    assert {'torch', 'timm', 'threads', 'cpus'} <= set(data['info'])


def test_macs_match_an_independent_count():
    """Counted multiply-adds of a plain Linear + conv model equal the arithmetic."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 4, stride=4), torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 8, 10))
    assert bench.count_macs(model, (3, 32, 32)) == 8 * 8 * 8 * 3 * 16 + 8 * 8 * 8 * 10


def test_unknown_model_suggests_names():
    rc, out, err = _cli('benchmark', '--models', 'dynamixer_small', *TINY)
    assert rc == 2 and "unknown model 'dynamixer_small'" in err and 'dynamixer_s' in err
    rc, _, err = _cli('benchmark', '--models', 'dynamixer_nano', '--compare', 'resmlp_24_22', *TINY)
    assert rc == 2 and 'resmlp_24_224' in err


def test_missing_runtime_names_the_extra(monkeypatch):
    real = importlib.import_module

    def fake(name, *a, **k):
        if name.split('.')[0] == 'onnxruntime':
            raise ImportError(f"No module named '{name}'")
        return real(name, *a, **k)
    monkeypatch.setattr(importlib, 'import_module', fake)
    rc, _, err = _cli('benchmark', '--models', 'dynamixer_nano', '--runtimes', 'eager', 'onnx', *TINY)
    assert rc == 2 and 'pip install "dynamixer[onnx]"' in err and 'Traceback' not in err


def test_out_of_memory_is_reported_and_skipped(monkeypatch):
    infer = bench._Variant.infer

    def maybe_oom(self, bs, input_size):
        if bs == 2:
            raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 20.00 GiB')
        return infer(self, bs, input_size)
    monkeypatch.setattr(bench._Variant, 'infer', maybe_oom)
    rc, out, err = _cli('benchmark', '--models', 'dynamixer_nano', '--batch-sizes', '2', '1', '--bench', 'infer',
                        *TINY)
    assert rc == 0, err
    assert 'batch 2 eager/float32: out of memory; skipped' in out
    table = [l for l in out.splitlines() if l.startswith('| dynamixer_nano')]
    assert len(table) == 2 and 'out of memory' in table[0] and '| 1 |' in table[1]

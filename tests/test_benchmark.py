"""`dynamixer benchmark` on dynamixer_nano (32x32), one round: output shape, tables and bad input;
no timings asserted."""
import csv
import json

import pytest
import timm
import torch

from dynamixer.commands import benchmark as bench
from dynamixer.measure import count_macs
from helpers import block_import
from helpers import cli_result as _cli

pytestmark = pytest.mark.usefixtures('one_thread')
TINY = ['--img-size', '32', '--rounds', '1', '--iters', '1', '--warmup', '1', '--threads', '1', '--no-progress']
assert TINY[-1] == '--no-progress'  # TINY[:-1]: with the progress line


def test_benchmark_writes_csv_and_json(tmp_path):
    pytest.importorskip('onnxruntime')
    rc, out, err = _cli('benchmark', '--models', 'dynamixer_nano', '--batch-sizes', '1', '2',
                        '--runtimes', 'eager', 'int8', 'int8-torch', *TINY[:-1], '--csv', tmp_path / 'r.csv',
                        '--json', tmp_path / 'r.json')
    assert rc == 0, err
    assert 'FlopCounterMode' in out and 'threads: 1' in out and 'torch ' in out and 'onnxruntime' in out
    assert 'round 1/1' in err  # the progress line (a line per update when stderr is not a terminal)
    rows = list(csv.DictReader(open(tmp_path / 'r.csv')))
    assert list(rows[0]) == bench.CSV_COLUMNS
    assert {(r['runtime'], r['infer_batch_size']) for r in rows} == {
        (rt, bs) for rt in ('eager', 'int8', 'int8-torch') for bs in ('1', '2')}
    for r in rows:
        assert r['status'] == 'ok' and float(r['infer_samples_per_sec']) > 0 and float(r['infer_step_time']) > 0
        assert r['infer_img_size'] == '32' and float(r['infer_gmacs']) > 0 and r['model'] == 'dynamixer_nano'
        # training only for the PyTorch runtimes
        assert (r['train_samples_per_sec'] != '') == (r['runtime'] == 'eager')
    data = json.load(open(tmp_path / 'r.json'))
    assert {'info', 'results', 'macs_tool'} <= set(data) and len(data['results']) == 6
    assert {'torch', 'timm', 'threads', 'cpus', 'args'} <= set(data['info'])
    # the counted multiply-adds are the model's, as `dynamixer info` counts them
    macs = count_macs(timm.create_model('dynamixer_nano', img_size=32)) / 1e9
    assert float(rows[0]['infer_gmacs']) == pytest.approx(macs, abs=1e-3)


def test_precisions_and_channels_last(tmp_path):
    rc, out, err = _cli('benchmark', '--models', 'dynamixer_nano', '--batch-sizes', '2', '--bench', 'infer',
                        '--precision', 'float32', 'bf16', '--channels-last', '--runtimes', 'eager', 'int8-torch',
                        *TINY, '--json', tmp_path / 'r.json')
    assert rc == 0, err
    rows = json.load(open(tmp_path / 'r.json'))['results']
    # eager in both precisions with channels-last; int8 (its own number format) in float32 only, without
    assert sorted((r['runtime'], r['precision'], r['channels_last']) for r in rows) == [
        ('eager', 'bf16', True), ('eager', 'float32', True), ('int8-torch', 'float32', False)]
    assert all(r['status'] == 'ok' and r['infer_samples_per_sec'] > 0 for r in rows)


def test_markdown_section_relative_column_and_from_json(tmp_path):
    doc = tmp_path / 'BENCH.md'
    doc.write_text('# title\n\ntext before\n\n<!-- dynamixer benchmark: cmp -->\nold table\n'
                   '<!-- /dynamixer benchmark: cmp -->\n\ntext after\n')
    rc, out, err = _cli('benchmark', '--models', 'dynamixer_nano', '--batch-sizes', '1', '--bench', 'infer',
                        '--runtimes', 'eager', *TINY, '--relative-to', 'eager', '--json', tmp_path / 'r.json',
                        '--markdown', doc, '--section', 'cmp')
    assert rc == 0, err
    text = doc.read_text()
    assert text.startswith('# title\n\ntext before\n\n<!-- dynamixer benchmark: cmp -->\n')
    assert text.endswith('<!-- /dynamixer benchmark: cmp -->\n\ntext after\n') and 'old table' not in text
    assert '| infer vs eager |' in text and '| 1.00x |' in text and 'FlopCounterMode' in text
    # the same table again from the JSON, without measuring: the doc does not change
    before = text
    rc, out2, err = _cli('benchmark', '--from-json', tmp_path / 'r.json', '--relative-to', 'eager',
                         '--markdown', doc, '--section', 'cmp', '--csv', tmp_path / 'again.csv')
    assert rc == 0, err
    assert doc.read_text() == before and 'round' not in err
    assert list(csv.DictReader(open(tmp_path / 'again.csv')))[0]['model'] == 'dynamixer_nano'
    # a document that does not exist yet gets just the section
    rc, _, err = _cli('benchmark', '--from-json', tmp_path / 'r.json', '--markdown', tmp_path / 'new.md')
    new = (tmp_path / 'new.md').read_text()
    assert rc == 0 and new.startswith('<!-- dynamixer benchmark: comparison -->\n```\nmachine: ')
    assert new.endswith('<!-- /dynamixer benchmark: comparison -->\n') and '| dynamixer_nano | eager |' in new
    # a document without the section's markers is left alone, with a message saying what to add
    rc, _, err = _cli('benchmark', '--from-json', tmp_path / 'r.json', '--markdown', doc, '--section', 'other')
    assert rc == 2 and '<!-- dynamixer benchmark: other -->' in err and doc.read_text() == before


def test_relative_to_a_missing_runtime_and_unknown_runtime():
    rc, _, err = _cli('benchmark', '--models', 'dynamixer_nano', '--runtimes', 'eager', '--relative-to', 'onnx', *TINY)
    assert rc == 2 and 'add onnx to --runtimes' in err
    rc, _, err = _cli('benchmark', '--models', 'dynamixer_nano', '--runtimes', 'eagre', *TINY)
    assert rc == 2 and "unknown runtime 'eagre'" in err and 'eager' in err


def test_unknown_model_suggests_names():
    rc, out, err = _cli('benchmark', '--models', 'dynamixer_small', *TINY)
    assert rc == 2 and "unknown model 'dynamixer_small'" in err and 'dynamixer_s' in err
    rc, _, err = _cli('benchmark', '--models', 'dynamixer_nano', '--compare', 'resmlp_24_22', *TINY)
    assert rc == 2 and 'resmlp_24_224' in err


def test_missing_runtime_names_the_extra(monkeypatch):
    block_import(monkeypatch, 'onnxruntime')
    rc, _, err = _cli('benchmark', '--models', 'dynamixer_nano', '--runtimes', 'eager', 'onnx', *TINY)
    assert rc == 2 and 'pip install "dynamixer[onnx]"' in err and 'Traceback' not in err


def test_missing_torchao_names_the_int8_extra(monkeypatch):
    block_import(monkeypatch, 'torchao')
    rc, _, err = _cli('benchmark', '--models', 'dynamixer_nano', '--runtimes', 'int8-torchao', *TINY)
    assert rc == 2 and 'pip install "dynamixer[int8]"' in err


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

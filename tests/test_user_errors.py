"""What a user's mistake gets from the command line: one `error: ...` line and exit code 2, never a
traceback; and what it never gets: a finished run overwritten without an explicit flag.

The tests go by kind, not by case: every command with every kind of damaged checkpoint, every
numeric flag of every command at the bottom of its range, every output path that is a folder, under
a file, or refused by the operating system, and every optional dependency missing.
"""
import argparse
import contextlib
import io
import json
import os
import pickle
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from dynamixer import cli

pytestmark = pytest.mark.usefixtures('one_thread')


def run_cli(*argv, cwd=None):
    """(exit code, stdout, stderr) of `dynamixer ARGV` run in this process."""
    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = cli.main([str(a) for a in argv])
            except SystemExit as e:  # argparse's own errors
                rc = e.code
    finally:
        os.chdir(old)
    return rc, out.getvalue(), err.getvalue()


def assert_user_error(result, *fragments):
    """Exit code 2, one 'error:' message naming each fragment, no traceback."""
    rc, out, err = result
    assert rc == 2, f'exit code {rc}; stdout: {out[-2000:]}; stderr: {err[-2000:]}'
    assert 'Traceback' not in out + err
    assert 'error:' in err, err
    for f in fragments:
        assert f.lower() in err.lower(), f'{f!r} not in: {err}'


# ---- data the tests make ------------------------------------------------------------------------

TINY_FLAGS = ['--epochs', '1', '--batch-size', '64', '--threads', '1', '--no-progress', '--workers', '0']

def _nano_checkpoint(path, num_classes=10, class_names=None, data=None, dataset='digits'):
    """A training checkpoint in this project's format with random nano weights."""
    torch.manual_seed(0)
    model = timm.create_model('dynamixer_nano', num_classes=num_classes)
    names = class_names or [str(i) for i in range(num_classes)]
    torch.save(dict(
        state_dict=model.state_dict(), epoch=0, class_names=names,
        config=dict(model='dynamixer_nano', model_kwargs=dict(num_classes=num_classes),
                    recipe='digits', dataset=dataset, data=data, epochs=1)), path)
    return path


def _image(path, size=32, color=(30, 120, 200)):
    Image.new('RGB', (size, size), color).save(path)
    return path


@pytest.fixture(scope='module')
def work(tmp_path_factory):
    return tmp_path_factory.mktemp('user_errors')


@pytest.fixture(scope='module')
def good_checkpoint(work):
    return _nano_checkpoint(work / 'good.pth')


@pytest.fixture(scope='module')
def image(work):
    return _image(work / 'img.png')


def _damaged(work, good):
    """name -> path of a checkpoint that no command can use."""
    d = work / 'damaged'
    d.mkdir(exist_ok=True)
    blob = Path(good).read_bytes()
    files = {
        'missing': d / 'missing.pth',
        'zero-byte': d / 'empty.pth',
        'truncated': d / 'truncated.pth',
        'random-bytes': d / 'random.pth',
        'text-file': d / 'notes.pth',
        'folder': d / 'a_folder.pth',
        'code-pickle': d / 'evil.pth',
        'bad-safetensors': d / 'bad.safetensors',
        'other-architecture': d / 'resnet.pth',
    }
    files['zero-byte'].write_bytes(b'')
    files['truncated'].write_bytes(blob[: len(blob) // 2])
    files['random-bytes'].write_bytes(np.random.default_rng(0).bytes(4096))
    files['text-file'].write_text('these are not weights\n')
    files['folder'].mkdir(exist_ok=True)

    class Evil:
        def __reduce__(self):
            return (os.system, ('echo pwned > /dev/null',))
    with open(files['code-pickle'], 'wb') as f:
        pickle.dump({'state_dict': Evil()}, f)
    files['bad-safetensors'].write_bytes((20).to_bytes(8, 'little') + b'{"a": [1, 2, 3 oops' + b'\0' * 64)
    torch.save(timm.create_model('resnet10t', num_classes=10).state_dict(), files['other-architecture'])
    return files


DAMAGE = ['missing', 'zero-byte', 'truncated', 'random-bytes', 'text-file', 'folder', 'code-pickle',
          'bad-safetensors', 'other-architecture']


@pytest.fixture(scope='module')
def damaged(work, good_checkpoint):
    return _damaged(work, good_checkpoint)


def _commands_reading(ckpt, work, image):
    """Every command that reads a checkpoint, with arguments that are otherwise fine."""
    return {
        'export': ['export', ckpt, '--format', 'safetensors', '--output', work / 'out' / 'x.safetensors'],
        'export-onnx': ['export', ckpt, '--format', 'onnx', '--output', work / 'out' / 'x.onnx'],
        'predict': ['predict', '-c', ckpt, image],
        'validate': ['validate', ckpt, '--dataset', 'digits'],
        'train-resume': ['train', '--resume', ckpt, '--output', work / 'runs' / 'resumed'],
        'train-pretrained': ['train', '--pretrained', ckpt, '--epochs', '1', '--output', work / 'runs' / 'pre'],
        'train-teacher': ['train', '--kd-checkpoint', ckpt, '--epochs', '1', '--output', work / 'runs' / 'kd'],
        'push-to-hub': ['push-to-hub', ckpt, 'user/repo', '--local-dir', work / 'hub'],
        'show-mixing': ['show-mixing', ckpt, image, '--out', work / 'out' / 'mixing.png'],
        'detect-validate': ['detect', 'validate', ckpt, work / 'none.json'],
        'detect-predict': ['detect', 'predict', ckpt, image, '--out', work / 'out' / 'det'],
        'detect-resume': ['detect', 'train', '--resume', ckpt, '--output', work / 'runs' / 'resumed'],
        'segment-validate': ['segment', 'validate', ckpt, work, work],
        'segment-predict': ['segment', 'predict', ckpt, image, '--out', work / 'out' / 'seg'],
        'segment-resume': ['segment', 'train', '--resume', ckpt, '--output', work / 'runs' / 'resumed'],
    }


@pytest.mark.parametrize('kind', DAMAGE)
@pytest.mark.parametrize('command', ['export', 'export-onnx', 'predict', 'validate', 'train-resume',
                                     'train-pretrained', 'train-teacher', 'push-to-hub', 'show-mixing',
                                     'detect-validate', 'detect-predict', 'detect-resume', 'segment-validate',
                                     'segment-predict', 'segment-resume'])
def test_every_command_refuses_every_damaged_checkpoint(work, damaged, image, command, kind):
    argv = _commands_reading(damaged[kind], work, image)[command]
    assert_user_error(run_cli(*argv))
    assert not (work / 'runs' / 'resumed' / 'last.pth').exists()
    assert not (work / 'runs' / 'kd' / 'last.pth').exists()


@pytest.mark.parametrize('kind', ['random-bytes', 'zero-byte', 'bad-json', 'foreign-json', 'no-json'])
def test_predict_refuses_damaged_onnx_files(work, image, kind):
    """`predict --onnx`: the ONNX file or the preprocessing JSON next to it damaged or missing."""
    from dynamixer.inference import preprocessing_config, preprocessing_path
    d = work / 'onnx' / kind
    d.mkdir(parents=True, exist_ok=True)
    path = d / 'm.onnx'
    path.write_bytes(b'' if kind == 'zero-byte' else np.random.default_rng(0).bytes(2048))
    config = preprocessing_config(timm.create_model('dynamixer_nano', num_classes=3), ['a', 'b', 'c'])
    text = {'bad-json': '{"input_size": [3, 32', 'foreign-json': '[1, 2, 3]'}.get(kind, json.dumps(config))
    if kind != 'no-json':
        preprocessing_path(path).write_text(text)
    assert_user_error(run_cli('predict', '--onnx', path, image), str(d))


@pytest.mark.parametrize('kind', ['zero-byte', 'truncated', 'random-bytes'])
@pytest.mark.parametrize('command', ['export-int8', 'predict', 'validate'])
def test_every_command_refuses_a_broken_onnx_file_alike(work, image, command, kind):
    """An empty, cut-short or random `.onnx` with its preprocessing file present: one message from
    the one reader of ONNX files (`export --quantize int8` used to end in the quantiser's
    ValueError or protobuf's DecodeError)."""
    onnx = pytest.importorskip('onnx')
    from onnx import TensorProto, helper, numpy_helper

    from dynamixer.inference import preprocessing_config, save_preprocessing
    d = work / 'broken-onnx' / command / kind
    d.mkdir(parents=True, exist_ok=True)
    path = d / 'm.onnx'
    weight = numpy_helper.from_array(np.ones((4, 3), np.float32), 'W')
    graph = helper.make_graph([helper.make_node('MatMul', ['input', 'W'], ['logits'])], 'g',
                              [helper.make_tensor_value_info('input', TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info('logits', TensorProto.FLOAT, [1, 3])], [weight])
    whole = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 20)]).SerializeToString()
    onnx.load_from_string(whole)  # the whole file is fine
    path.write_bytes({'zero-byte': b'', 'truncated': whole[:len(whole) // 2],
                      'random-bytes': np.random.default_rng(0).bytes(2048)}[kind])
    save_preprocessing(preprocessing_config(timm.create_model('dynamixer_nano', num_classes=3), ['a', 'b', 'c']),
                       path)
    argv = {'export-int8': ['export', path, '--format', 'onnx', '--quantize', 'int8', '--output', d / 'q.onnx'],
            'predict': ['predict', '--onnx', path, image],
            'validate': ['validate', path, '--dataset', 'digits']}[command]
    result = run_cli(*argv)
    assert_user_error(result, str(path), 'not a whole ONNX file')
    assert not (d / 'q.onnx').exists()


# ---- numeric flags --------------------------------------------------------------------------------

def _numeric_options():
    """(command, option string, declared minimum) for every option whose type is a number."""
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    found = []
    parsers = list(sub.choices.items())
    for name, p in parsers:   # commands with sub-commands (detect train, ...): 'detect train'
        nested = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        parsers += [(f'{name} {n}', q) for a in nested for n, q in a.choices.items()]
    for name, p in parsers:
        for action in p._actions:
            if not action.option_strings or action.type is None:
                continue
            if action.type in (int, float):
                found.append((name, action.option_strings[-1], None))
            elif hasattr(action.type, 'minimum'):
                found.append((name, action.option_strings[-1], action.type))
    return found


def test_every_numeric_flag_declares_its_range():
    bare = [(c, o) for c, o, t in _numeric_options() if t is None]
    assert not bare, f'numeric flags without a range check: {bare}'


@pytest.mark.parametrize('command,option,kind', _numeric_options(), ids=lambda v: str(getattr(v, '__name__', v)))
def test_numeric_flags_below_their_range_are_refused(command, option, kind):
    low = kind.minimum - 1 if kind.kind is int else kind.minimum - 0.5
    if getattr(kind, 'exclusive', False):
        low = kind.minimum
    nargs_extra = []
    rc, out, err = run_cli(*command.split(), *_positional(command), option, str(low), *nargs_extra)
    assert rc == 2 and 'Traceback' not in err, err
    assert option in err and str(low) in err, err


def _positional(command):
    return {'validate': ['x.pth'], 'export': ['x.pth'], 'push-to-hub': ['x.pth', 'u/r'],
            'show-mixing': ['x.pth'], 'predict': ['-c', 'x.pth', 'a.png']}.get(command, [])


@pytest.mark.parametrize('argv', [
    ['predict', '-c', 'x.pth', 'a.png', '-k', '0'],
    ['predict', '-c', 'x.pth', 'a.png', '--batch-size', '0'],
    ['train', '--workers', '-1'],
    ['train', '--threads', '-2'],
    ['train', '--epochs', '0'],
    ['train', '--batch-size', '0'],
    ['train', '--lr', '-1'],
    ['validate', 'x.pth', '--batch-size', '-3'],
    ['export', 'x.pth', '--opset', '7'],
])
def test_reported_flag_values(argv):
    rc, out, err = run_cli(*argv)
    assert rc == 2 and 'Traceback' not in err and argv[-1] in err, err


@pytest.mark.parametrize('text,fragments', [
    ('workers: -1\n', ["'workers'", '-1']),
    ('epochs: 0\n', ["'epochs'", '0']),
    ('opt_betas: [0.9, 1.0]\n', ["'opt_betas'", '1.0']),
    ('scale: [0.5, 0.1]\n', ['scale', 'range']),
])
def test_settings_from_a_file_are_checked_like_flags(tmp_path, text, fragments):
    """The ranges of the flags hold for a YAML file too (one rule: recipes.RANGES)."""
    (tmp_path / 'c.yaml').write_text(text)
    assert_user_error(run_cli('train', '--config', tmp_path / 'c.yaml', '--print-config'), *fragments)


@pytest.mark.parametrize('flags,fragment', [
    (['--model', 'nosuch'], 'nosuch'),
    (['--model-options', '{"nosuch": 1}'], 'nosuch'),
    (['--opt', 'nosuch'], '--opt nosuch'),
    (['--sched', 'nosuch'], '--sched nosuch'),
    (['--auto-augment', 'bogus-m9'], 'bogus'),
    (['--remode', 'nosuch'], 'remode'),
    (['--compile', '--compile-backend', 'nosuch'], '--compile-backend'),
    (['--dataset', 'nosuch'], 'nosuch'),
    (['--device', 'gpu0'], 'gpu0'),
], ids=lambda v: ' '.join(v) if isinstance(v, list) else 'x')
def test_unknown_names_in_settings(tmp_path, flags, fragment):
    """Names timm or torch look up (model, optimiser, schedule, augmentation, backend, device)."""
    assert_user_error(run_cli('train', *TINY_FLAGS, '--output', tmp_path / 'run', *flags), fragment)
    assert not (tmp_path / 'run' / 'last.pth').exists()


def test_optional_numeric_settings_switch_off_with_none():
    rc, out, err = run_cli('train', '--recipe', 'imagenet-s', '--ema-decay', 'none', '--print-config')
    assert rc == 0 and 'ema_decay: null' in out, err
    assert_user_error(run_cli('train', '--ema-decay', '2', '--print-config'), '--ema-decay', '2')


# ---- output paths -----------------------------------------------------------------------------------

def test_export_output_is_an_existing_folder_or_under_a_file(work, good_checkpoint):
    folder = work / 'export_here'
    folder.mkdir(exist_ok=True)
    assert_user_error(run_cli('export', good_checkpoint, '--format', 'safetensors', '--output', folder), str(folder))
    under_file = work / 'img_as_parent.txt'
    under_file.write_text('x')
    assert_user_error(run_cli('export', good_checkpoint, '--format', 'safetensors',
                              '--output', under_file / 'w.safetensors'))


def test_export_opset_newer_than_onnx_knows(work, good_checkpoint, monkeypatch):
    import onnx
    monkeypatch.setattr(onnx.defs, 'onnx_opset_version', lambda: 20)
    assert_user_error(run_cli('export', good_checkpoint, '--opset', '21', '--output', work / 'o21.onnx'),
                      'opset 21', '18 to 20')


def test_export_missing_parent_folder_is_created(work, good_checkpoint):
    out = work / 'new' / 'deeper' / 'w.safetensors'
    rc, _, err = run_cli('export', good_checkpoint, '--format', 'safetensors', '--output', out)
    assert rc == 0, err
    assert out.is_file()


@pytest.mark.parametrize('fmt', ['safetensors', 'torchscript', pytest.param('onnx', marks=pytest.mark.slow)])
def test_export_write_refused_by_the_system(work, good_checkpoint, monkeypatch, fmt):
    """A read-only folder (simulated: the tests run as root, which ignores permission bits)."""
    real_replace = os.replace

    def refuse(src, dst, *a, **k):
        if str(work / 'ro') in str(dst):
            raise PermissionError(13, 'Permission denied', str(dst))
        return real_replace(src, dst, *a, **k)
    monkeypatch.setattr(os, 'replace', refuse)
    (work / 'ro').mkdir(exist_ok=True)
    out = work / 'ro' / f'w.{fmt}'
    assert_user_error(run_cli('export', good_checkpoint, '--format', fmt, '--output', out), 'permission denied')


def test_output_folder_without_write_permission(tmp_path, monkeypatch):
    """Refused before any work (simulated: root may write anywhere, so os.access is made to say no)."""
    from dynamixer import files
    monkeypatch.setattr(files.os, 'access', lambda path, mode: False)
    with pytest.raises(files.OutputError, match='permission denied in'):
        files.check_output_file(tmp_path / 'w.onnx')


@pytest.mark.parametrize('argv', [
    ['export', '{ckpt}', '--format', 'torchscript', '--output', '{file}/w.pt'],
    ['show-mixing', '{ckpt}', '{image}', '--out', '{file}/m.png'],
    ['show-mixing', '{ckpt}', '{image}', '--out', '{work}'],
    ['train', *TINY_FLAGS, '--output', '{file}'],
    ['train', *TINY_FLAGS, '--output', '{file}/run'],
    ['ablate', '--epochs', '1', '--out', '{file}'],
    ['ablate', '--epochs', '1', '--out', '{file}/grid'],
    ['push-to-hub', '{ckpt}', 'user/repo', '--local-dir', '{file}'],
    ['push-to-hub', '{ckpt}', 'user/repo', '--local-dir', '{file}/hub'],
    # benchmark checks its outputs before measuring (it used to measure, then die on the write)
    ['benchmark', '--models', 'dynamixer_nano', '--rounds', '1000', '--csv', '{file}/out.csv'],
    ['benchmark', '--models', 'dynamixer_nano', '--rounds', '1000', '--json', '{file}/out.json'],
    ['benchmark', '--models', 'dynamixer_nano', '--rounds', '1000', '--markdown', '{file}/out.md'],
    ['benchmark', '--models', 'dynamixer_nano', '--rounds', '1000', '--csv', '{work}'],
], ids=lambda argv: argv[0] + argv[-1].rsplit('}', 1)[-1].replace('/', '-under-'))
def test_every_output_path_that_cannot_be_written(work, good_checkpoint, image, argv):
    """Each command's output (file or folder) where a file is, or under a file: refused, naming it,
    before the work starts."""
    file = work / 'a_file.txt'
    file.write_text('not a folder')
    argv = [a.format(ckpt=good_checkpoint, image=image, work=work, file=file) for a in argv]
    assert_user_error(run_cli(*argv), str(work))
    assert file.read_text() == 'not a folder'


# ---- optional dependencies --------------------------------------------------------------------------

@pytest.mark.parametrize('module,extra,argv', [
    ('onnx', 'onnx', ['export', '{ckpt}', '--format', 'onnx', '--output', '{work}/m.onnx']),
    ('onnxruntime', 'onnx', ['predict', '--onnx', '{work}/absent.onnx', '{image}']),
    ('huggingface_hub', 'hub', ['push-to-hub', '{ckpt}', 'user/repo']),
    ('tensorboard', 'tensorboard', ['train', '--tensorboard', '--epochs', '1', '--output', '{work}/tb']),
])
def test_missing_optional_dependency_names_the_extra(work, good_checkpoint, image, monkeypatch, module, extra, argv):
    for name in list(sys.modules):
        if name == module or name.startswith(module + '.'):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    argv = [a.format(ckpt=good_checkpoint, work=work, image=image) for a in argv]
    assert_user_error(run_cli(*argv), f'dynamixer[{extra}]')


def _hide(monkeypatch, module):
    for name in list(sys.modules):
        if name == module or name.startswith(module + '.'):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)


@pytest.mark.parametrize('module,package,argv', [
    ('sklearn', 'scikit-learn', ['validate', '{ckpt}', '--dataset', 'digits']),
    ('matplotlib', 'matplotlib', ['show-mixing', '{ckpt}', '{image}', '--out', '{work}/m.png']),
])
def test_missing_core_dependency_names_the_package(work, good_checkpoint, image, monkeypatch, module, package, argv):
    """Dependencies every install has (pip install --no-deps can still leave them out)."""
    _hide(monkeypatch, module)
    argv = [a.format(ckpt=good_checkpoint, work=work, image=image) for a in argv]
    assert_user_error(run_cli(*argv), f'pip install {package}')


def test_hub_refusal_is_a_user_error(good_checkpoint, monkeypatch):
    """No token, no network, no such repository: huggingface_hub's OSErrors become one message."""
    from dynamixer.commands import hub

    def refuse(*a, **k):
        raise OSError('401 Client Error: Unauthorized')
    monkeypatch.setattr(hub, 'push_to_hf_hub', refuse)
    assert_user_error(run_cli('push-to-hub', good_checkpoint, 'user/repo'), 'could not push', 'Unauthorized',
                      '--local-dir')


# ---- run folders ------------------------------------------------------------------------------------

TINY = TINY_FLAGS


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
    """A real (tiny) digits run in <tmp>/a/runs/first, trained from <tmp>/a."""
    base = tmp_path_factory.mktemp('runs')
    (base / 'a').mkdir()
    rc, out, err = run_cli('train', *TINY, '--output', 'runs/first', cwd=base / 'a')
    assert rc == 0, err
    return base, base / 'a' / 'runs' / 'first'


def test_resume_from_another_folder_writes_next_to_the_checkpoint(finished_run):
    base, run = finished_run
    (base / 'b').mkdir(exist_ok=True)
    before = torch.load(run / 'last.pth', weights_only=False)['epoch']
    rc, out, err = run_cli('train', '--resume', run / 'last.pth', '--epochs', '2', cwd=base / 'b')
    assert rc == 0, err
    assert torch.load(run / 'last.pth', weights_only=False)['epoch'] > before
    assert not (base / 'b' / 'runs').exists()


def test_output_into_a_finished_run_is_refused_unless_overwrite(finished_run):
    base, run = finished_run
    weights = (run / 'last.pth').read_bytes()
    assert_user_error(run_cli('train', *TINY, '--output', run), '--overwrite')
    assert (run / 'last.pth').read_bytes() == weights
    rc, out, err = run_cli('train', *TINY, '--output', run, '--overwrite')
    assert rc == 0, err


def test_resume_with_other_data_is_refused(finished_run, tmp_path):
    base, run = finished_run
    data = tmp_path / 'data'
    for split in ('train', 'val'):
        for c in ('cat', 'dog'):
            (data / split / c).mkdir(parents=True)
            for i in range(4):
                _image(data / split / c / f'{i}.png', color=(i * 40, 0, 0))
    weights = (run / 'last.pth').read_bytes()
    assert_user_error(run_cli('train', data, '--resume', run / 'last.pth'), '--pretrained')
    assert (run / 'last.pth').read_bytes() == weights


def test_resume_after_the_classes_changed_is_refused(tmp_path):
    """The same data folder, now with another class: the class lists are compared."""
    data = _folder(tmp_path / 'd', ['cat', 'dog'])
    run = tmp_path / 'run'
    rc, out, err = run_cli('train', data, *TINY, '--batch-size', '4', '--output', run)
    assert rc == 0, err
    weights = (run / 'last.pth').read_bytes()
    for split in ('train', 'val'):
        (data / split / 'fox').mkdir()
        _image(data / split / 'fox' / '0.png')
    assert_user_error(run_cli('train', '--resume', run / 'last.pth', '--epochs', '2'),
                      'trained on 2 classes', '--pretrained')
    assert (run / 'last.pth').read_bytes() == weights


def test_resume_with_another_dataset_is_refused(finished_run):
    base, run = finished_run
    assert_user_error(run_cli('train', '--resume', run / 'last.pth', '--dataset', 'left-digit'),
                      '--pretrained', 'left-digit')


def test_resume_of_its_own_folder_with_output_is_allowed(finished_run, monkeypatch):
    """--output naming the resumed checkpoint's own folder is not 'another run' (the training
    itself is replaced: what is checked is that it gets past the folder check)."""
    from dynamixer.commands import train as train_module
    base, run = finished_run
    seen = {}

    def fake_train(config, data=None, resume=None, overwrite=False, **kw):
        seen.update(output=config['output'], resume=resume, overwrite=overwrite)
        train_module._claim_run_folder(config['output'], resume, overwrite, True)
        raise KeyboardInterrupt
    monkeypatch.setattr(train_module, 'train', fake_train)
    rc, out, err = run_cli('train', '--resume', run / 'last.pth', '--epochs', '3', '--output', run)
    assert rc == 130 and seen == dict(output=str(run), resume=str(run / 'last.pth'), overwrite=False), err
    # Ctrl-C: exit code 130 and the checkpoint to continue from, no traceback
    assert 'interrupted' in err and f'--resume {run / "last.pth"}' in err and 'Traceback' not in err


@pytest.mark.parametrize('umask,mode', [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_follow_the_umask(tmp_path, good_checkpoint, umask, mode):
    old = os.umask(umask)
    try:
        out = tmp_path / 'w.safetensors'
        rc, _, err = run_cli('export', good_checkpoint, '--format', 'safetensors', '--output', out)
    finally:
        os.umask(old)
    assert rc == 0, err
    assert stat.S_IMODE(out.stat().st_mode) == mode


def test_atomic_replacement_follows_the_umask(tmp_path, monkeypatch):
    """Replacing a file keeps working (new content, no temporary files left) and the new file gets
    the umask's mode; the umask is read without /proc too."""
    from dynamixer import files
    path = tmp_path / 'metrics.json'
    old = os.umask(0o077)
    try:
        files.atomic_write_text('one', path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        os.umask(0o027)
        files.atomic_write_text('two', path)
        assert path.read_text() == 'two' and stat.S_IMODE(path.stat().st_mode) == 0o640
        assert files.current_umask() == 0o027

        def no_proc(name, *a, **k):
            raise OSError('no /proc here')
        monkeypatch.setattr(files, 'open', no_proc, raising=False)
        assert files.current_umask() == 0o027 and os.umask(0o027) == 0o027  # read, and left as it was
    finally:
        os.umask(old)
    assert os.listdir(tmp_path) == ['metrics.json']


def test_training_files_follow_the_umask(finished_run):
    base, run = finished_run
    for f in ('last.pth', 'model.safetensors'):
        assert stat.S_IMODE((run / f).stat().st_mode) == 0o666 & ~0o022, f


# ---- data sets --------------------------------------------------------------------------------------

def _folder(root, classes, n=4, empty=()):
    for split in ('train', 'val'):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            if c in empty:
                continue
            for i in range(n):
                _image(root / split / c / f'{i}.png', color=(i * 40, 10, 10))
    return root


def test_empty_class_folder_is_an_error(tmp_path):
    data = _folder(tmp_path / 'd', ['cat', 'dog', 'fox'], empty=('fox',))
    assert_user_error(run_cli('train', data, *TINY, '--output', tmp_path / 'run'), 'fox')


def test_single_class_needs_a_flag(tmp_path):
    data = _folder(tmp_path / 'd', ['cat'])
    assert_user_error(run_cli('train', data, *TINY, '--output', tmp_path / 'run'), 'single', '--allow-single-class')
    rc, out, err = run_cli('train', data, *TINY, '--batch-size', '4', '--output', tmp_path / 'run',
                           '--allow-single-class')
    assert rc == 0, err
    assert torch.load(tmp_path / 'run' / 'last.pth', weights_only=False)['class_names'] == ['cat']


def test_empty_class_folder_in_validation_data(tmp_path, good_checkpoint):
    data = _folder(tmp_path / 'd', ['3', '7'], empty=('7',))
    assert_user_error(run_cli('validate', good_checkpoint, data), str(data / 'val' / '7'))


# ---- the error policy -------------------------------------------------------------------------------

def test_an_unexpected_exception_is_a_bug_and_shown_in_full(monkeypatch):
    import dynamixer.commands.info as info

    def boom(args):
        raise ZeroDivisionError('a bug')
    monkeypatch.setattr(info, 'run', boom)
    with pytest.raises(ZeroDivisionError):
        cli.main(['info'])


# ---- the model API ----------------------------------------------------------------------------------

@pytest.mark.parametrize('img_size', [32, 64])  # 64: 16x16 tokens, where the fast paths run
def test_empty_batch(img_size):
    """An empty batch gives an empty result, as timm's models do, in every path."""
    model = timm.create_model('dynamixer_nano', num_classes=7, img_size=img_size).eval()
    g = img_size // 8
    x = torch.empty(0, 3, img_size, img_size)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            assert model(x).shape == (0, 7)
            assert model.forward_features(x).shape == (0, g, g, 128)
            final, inter = model.forward_intermediates(x)
            assert [t.shape[0] for t in inter] == [0] * 4
    feats = timm.create_model('dynamixer_nano', features_only=True, img_size=img_size)(x)
    assert [tuple(f.shape) for f in feats] == [
        (0, 64, 2 * g, 2 * g), (0, 128, g, g), (0, 128, g, g), (0, 128, g, g)]
    model.train()
    y = model(x.requires_grad_())
    y.sum().backward()
    assert y.shape == (0, 7) and x.grad.shape == x.shape

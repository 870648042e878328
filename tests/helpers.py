"""Shared test helpers (plain functions and constants; the fixtures are in conftest.py).

Model side: random weights, nano factories, the authors' key names via `dynamixer.layout`.
Command side: tiny image folders, training configs, random-weight checkpoints in this project's
format, running `dynamixer` in this process."""
import contextlib
import importlib
import io
import os
import sys
from typing import Dict

import numpy as np
import timm
import torch
import torch.nn as nn
from PIL import Image

import dynamixer
from dynamixer import cli
from dynamixer.errors import DynaMixerError
from dynamixer.files import read_checkpoint
from dynamixer.layout import ours_to_authors
from dynamixer.model import DynaMixerBlock, DynaMixerOp, MixerLayer
from dynamixer.recipes import resolve_config

# ------------------------------------------------------------------------ model side


def randomize_(module: nn.Module, std: float = 0.5) -> nn.Module:
    """Weights far from init, so that mixing matrices are peaked and every branch matters."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)
    return module


def nano(**kwargs) -> nn.Module:
    """dynamixer_nano at its init."""
    return timm.create_model('dynamixer_nano', **kwargs)


def random_nano(**kwargs) -> nn.Module:
    """A float64 dynamixer_nano with 5 classes and seeded random weights (std 0.1)."""
    torch.manual_seed(0)
    return randomize_(timm.create_model('dynamixer_nano', num_classes=5, **kwargs).double(), std=0.1)


def to_authors(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """This project's keys -> the authors' (the library's one converter, `layout.ours_to_authors`)."""
    return ours_to_authors(state_dict)


# where a module sits in a network, in both layouts: its keys are converted in that context
_CONTEXT = {
    DynaMixerOp: ('stages.0.blocks.0.token_mixer.mix_h.', 'network.0.0.attn.mix_h.'),
    DynaMixerBlock: ('stages.0.blocks.0.token_mixer.', 'network.0.0.attn.'),
    MixerLayer: ('stages.0.blocks.0.', 'network.0.0.'),
}


def authors_names(module: nn.Module, prefix: str, keep_vars: bool = False) -> Dict[str, torch.Tensor]:
    """A module's weights under the authors' names with `prefix`, as tests/reference.py reads them
    (an op's 'reduce' -> '{prefix}.compress', ...). keep_vars=True gives the live parameters."""
    ours, theirs = _CONTEXT[type(module)]
    converted = to_authors({ours + k: v for k, v in module.state_dict(keep_vars=keep_vars).items()})
    return {f'{prefix}.{k[len(theirs):]}': v for k, v in converted.items()}


def grads_close(params_a, params_b, rtol: float = 1e-9) -> None:
    for a, b in zip(params_a, params_b):
        assert a.grad is not None and b.grad is not None
        torch.testing.assert_close(a.grad, b.grad, rtol=rtol, atol=rtol * b.grad.abs().max().item())


# ------------------------------------------------------------------------ command side

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'src')
NUM_CLASSES = 10
CLASS_NAMES = [f'digit {i}' for i in range(NUM_CLASSES)]
ATOL = 1e-4


def _image(cls: int, i: int, size: int = 36) -> Image.Image:
    """A class-dependent pattern: class 0 vertical stripes, 1 horizontal, 2 a square; some noise."""
    rng = np.random.default_rng(cls * 1000 + i)
    a = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
    if cls == 0:
        a[:, ::6] = 255
    elif cls == 1:
        a[::6, :] = 255
    else:
        a[8:28, 8:28] = 200
    return Image.fromarray(a, 'RGB')


def make_folder(root, classes=('a', 'b'), n_train=8, n_val=4):
    for split, n in (('train', n_train), ('val', n_val)):
        for c, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                _image(c, i + (100 if split == 'val' else 0)).save(d / f'{i}.png')
    return root


def config(tmp_path, **kw):
    overrides = dict(model='dynamixer_nano', epochs=1, batch_size=4, workers=0, threads=1, progress=False,
                     auto_augment='none', warmup_epochs=0, lr=1e-3, output=str(tmp_path / 'run'),
                     save_safetensors=True)
    overrides.update(kw)
    return resolve_config('scratch', overrides=overrides)


def weights(path):
    return read_checkpoint(path)['state_dict']


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


def _logits(model, x):
    with torch.no_grad():
        return model(x).numpy()


def _add_bad_files(d):
    (d / 'zero.png').write_bytes(b'')
    (d / 'text.jpg').write_text('this is not an image')
    (d / 'noise.png').write_bytes(os.urandom(300))
    buf = d / 'whole.png'
    _image(0, 99).save(buf)
    (d / 'truncated.png').write_bytes(buf.read_bytes()[:200])
    buf.unlink()
    (d / 'notes.txt').write_text('ignored: not an image extension')


def cli_result(*argv):
    """(exit code, stdout, stderr) of `dynamixer ARGV` in this process. A DynaMixerError that
    leaves the command counts as what the command line makes of it: `error: ...`, exit code 2
    (whether cli.main or this helper catches it)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main([str(a) for a in argv])
        except DynaMixerError as e:
            print(f'error: {e}', file=sys.stderr)
            rc = 2
    return rc, out.getvalue(), err.getvalue()


def block_import(monkeypatch, package: str) -> None:
    """Make `importlib.import_module(package...)` fail as if `package` were not installed (what
    `dynamixer.errors.require` sees)."""
    real = importlib.import_module

    def fake(name, *a, **k):
        if name.split('.')[0] == package:
            raise ImportError(f"No module named '{name}'")
        return real(name, *a, **k)
    monkeypatch.setattr(importlib, 'import_module', fake)

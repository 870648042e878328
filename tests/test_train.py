"""Training, resuming, validating and predicting with the `dynamixer` command line.

Tiny image folders made in tmp_path, dynamixer_nano at 32x32, 1-2 epochs, one CPU thread.
"""
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import dynamixer  # noqa: F401  (registers the models)
from dynamixer.checkpoint import CheckpointError, read_checkpoint
from dynamixer.cli import main as cli_main
from dynamixer.data import DataError, build_datasets, to_rgb
from dynamixer.recipes import ConfigError, RECIPES, resolve_config
from dynamixer.train import TrainingError, train

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'src')


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


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp('data'))


@pytest.fixture(scope='module')
def trained(folder, tmp_path_factory):
    """One epoch on the tiny folder; shared by the validate / predict / checkpoint tests."""
    tmp = tmp_path_factory.mktemp('trained')
    result = train(config(tmp, epochs=1), data=str(folder))
    return result

import os
import sys

import pytest
import torch

# tests import the slow reference (tests/reference.py) as a plain module
sys.path.insert(0, os.path.dirname(__file__))

import timm  # noqa: E402

import dynamixer  # noqa: E402  (registers the models with timm)
from dynamixer.checkpoint import load_model  # noqa: E402
from dynamixer.commands.train import train  # noqa: E402
from dynamixer.data import sample_images  # noqa: E402
from dynamixer.ops import dispatch  # noqa: E402
from helpers import _make_checkpoint, _run_cli, config, make_folder  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope='module')
def one_thread():
    """One intra-op thread for modules of many small ops: on a shared 2-core machine, more
    threads than free cores spin and crawl. Use with pytestmark = usefixtures('one_thread')."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def fast_path_every_size(monkeypatch):
    """The library keeps sequences shorter than 16 tokens on the plain path (decided at
    construction); lets tests run the fast path on small modules."""
    monkeypatch.setattr(dispatch, 'FAST_PATH_MIN_TOKENS', 1)


@pytest.fixture
def eager_kernels():
    """The fast path with its eager PyTorch kernels only (`ops.mixing`, `ops.mlp`), not the
    compiled CPU kernels, for the tests of those eager kernels."""
    with dynamixer.set_cpu_kernels(False):
        yield


@pytest.fixture(scope='session')
def cpu_kernels_built():
    """`dynamixer.ops.cpu_kernels`, built (the first time in a session compiles, about 15-30 s;
    later sessions load the cached library). Skipped only without a C++ compiler: a failing build
    with a compiler present is a test failure (the test extra installs ninja)."""
    import shutil

    from dynamixer.ops import cpu_kernels
    if shutil.which(os.environ.get('CXX', 'c++').split()[0]) is None:
        pytest.skip('no C++ compiler on PATH: the compiled CPU kernels cannot be built here')
    assert cpu_kernels.available(), f'the compiled CPU kernels did not build: {cpu_kernels.build_error()}'
    return cpu_kernels


# ---- command side: a tiny image folder, a trained run, a checkpoint and its exports (per module)


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp('data'))


@pytest.fixture(scope='module')
def trained(folder, tmp_path_factory):
    """One epoch on the tiny folder; shared by the validate / predict / checkpoint tests."""
    tmp = tmp_path_factory.mktemp('trained')
    result = train(config(tmp, epochs=1), data=str(folder))
    return result


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


@pytest.fixture(scope='session')
def digits_coco(tmp_path_factory):
    """The digits detection canvases on disk (dynamixer.dense.write_digits_coco): 16 train and 8
    val 32x32 canvases, COCO JSON + PNGs + class-index masks + classes.txt. Read-only: tests that
    change files copy it first (`copy_digits_coco`)."""
    pytest.importorskip('pycocotools')
    from dynamixer.dense.digits_coco import write_digits_coco
    out = tmp_path_factory.mktemp('digits_coco')
    write_digits_coco(str(out), num_train=16, num_val=8, canvas=32, digit_size=(10, 14), max_digits=2)
    return out

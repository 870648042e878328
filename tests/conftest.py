import os
import sys

import pytest
import torch

# tests import the slow reference (tests/reference.py) as a plain module
sys.path.insert(0, os.path.dirname(__file__))

import dynamixer  # noqa: E402,F401  (registers the models with timm)
from dynamixer.ops import dispatch  # noqa: E402


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

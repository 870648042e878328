import os
import sys

import pytest
import torch

# tests import the slow reference (tests/reference.py) as a plain module
sys.path.insert(0, os.path.dirname(__file__))

import dynamixer  # noqa: E402,F401  (registers the models with timm)


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

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

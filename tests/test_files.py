"""files.py: reading checkpoint files safely, atomic writes, the safetensors metadata schema."""
import math

import pytest
import torch

from helpers import nano
from test_checkpoint import _load


@pytest.mark.parametrize('damage', ['truncated', 'empty', 'text', 'missing', 'truncated_safetensors'])
def test_broken_checkpoint_files(tmp_path, damage):
    from safetensors.torch import save_file
    from dynamixer import CheckpointError
    path = tmp_path / 'ckpt.pth'
    torch.save(nano().state_dict(), path)
    if damage == 'truncated':
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])
        expected, match = CheckpointError, 'truncated'
    elif damage == 'empty':
        path.write_bytes(b'')
        expected, match = CheckpointError, 'empty'
    elif damage == 'text':
        path.write_text('hello')
        expected, match = CheckpointError, 'not a PyTorch checkpoint'
    elif damage == 'missing':
        path = tmp_path / 'nope.pth'
        expected, match = FileNotFoundError, 'not found'
    else:
        path = tmp_path / 'model.safetensors'
        save_file(nano().state_dict(), str(path))
        data = path.read_bytes()
        path.write_bytes(data[:-1000])
        expected, match = CheckpointError, 'truncated'
    with pytest.raises(expected, match=match):
        _load('dynamixer_nano', path)


def test_pickled_code_is_refused(tmp_path):
    from dynamixer import CheckpointError, read_checkpoint
    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': nano().state_dict(), 'extra': math.gcd}, path)
    with pytest.raises(CheckpointError, match='pickled Python objects'):
        read_checkpoint(path)


"""files.py: reading checkpoint files safely, atomic writes, the safetensors metadata schema."""
import math

import pytest
import torch
from test_checkpoint import _load

from helpers import nano


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



def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    from dynamixer import files
    path = tmp_path / 'sub' / 'x.txt'
    files.atomic_write_text('old', path)

    def fail(f):
        f.write(b'partial')
        raise RuntimeError('crash while writing')
    with pytest.raises(RuntimeError):
        files.atomic_write(path, fail)
    assert path.read_text() == 'old' and sorted(p.name for p in path.parent.iterdir()) == ['x.txt']
    files.atomic_torch_save({'a': torch.ones(2)}, tmp_path / 'w.pth')
    assert torch.equal(files.read_checkpoint(tmp_path / 'w.pth')['a'], torch.ones(2))


def test_safetensors_metadata_schema_round_trip_and_old_files(tmp_path):
    from safetensors.torch import save_file

    from dynamixer import files
    sd = {'w': torch.arange(6.).view(2, 3)}
    meta = files.safetensors_metadata('dynamixer_nano', {'img_size': 48}, ['a', 'b'], preprocessing={'crop_pct': 1.0})
    files.save_safetensors(sd, tmp_path / 'm.safetensors', meta)
    got = files.read_safetensors_metadata(tmp_path / 'm.safetensors')
    assert got == dict(model='dynamixer_nano', model_kwargs={'img_size': 48}, class_names=['a', 'b'],
                       preprocessing={'crop_pct': 1.0})
    assert torch.equal(files.read_checkpoint(tmp_path / 'm.safetensors')['w'], sd['w'])
    # what `dynamixer train` wrote before the schema was shared
    old = {'model': 'dynamixer_nano', 'model_kwargs': '{}', 'class_names': '["x"]', 'format': 'dynamixer'}
    save_file(sd, str(tmp_path / 'old.safetensors'), metadata=old)
    assert files.read_safetensors_metadata(tmp_path / 'old.safetensors') == dict(
        model='dynamixer_nano', model_kwargs={}, class_names=['x'], preprocessing=None)
    # other files (timm's save_for_hf writes {'format': 'pt'}) carry none of ours
    save_file(sd, str(tmp_path / 'pt.safetensors'), metadata={'format': 'pt'})
    assert files.read_safetensors_metadata(tmp_path / 'pt.safetensors') == {}

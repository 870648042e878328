"""`dynamixer show-mixing`: the captured matrices are the ones the op applies; the figure for
models trained on the left-digit task by `dynamixer train --dataset left-digit`."""
import numpy as np
import pytest
import timm
import torch
from PIL import Image

from dynamixer import cli
from dynamixer.commands.show_mixing import capture_mixing
from dynamixer.data.digits import make_left_digit_task

pytestmark = pytest.mark.usefixtures('one_thread')


def test_capture_mixing_matches_the_operation():
    """The captured matrices are the ones the op applies: mixing the captured inputs with them
    reproduces the op's output (before its projection)."""
    m = timm.create_model('dynamixer_nano', num_classes=10, in_chans=1).eval()
    x = torch.randn(2, 1, 32, 32)
    block = m.stages[0].blocks[0].token_mixer
    got = {}
    hook = block.mix_w.register_forward_hook(lambda mod, a, o: got.update(inp=a[0], out=o))
    ph, pw = capture_mixing(m, x)
    hook.remove()
    assert ph.shape == (2, 8, 4, 8, 8) and pw.shape == (2, 8, 4, 8, 8)
    assert torch.allclose(ph.sum(-2), torch.ones(()), atol=1e-5)
    xs = got['inp'].unflatten(-1, (4, 16))                               # (B, H, W, S, C/S)
    mixed = torch.einsum('bhsij,bhisc->bhjsc', pw, xs).flatten(-2)
    assert torch.allclose(block.mix_w.proj(mixed), got['out'], atol=1e-5)
    # different images give different matrices (dynamic mixing)
    assert not torch.allclose(pw[0], pw[1])


@pytest.fixture(scope='module')
def left_digit_runs(tmp_path_factory):
    """One tiny epoch of dynamic and of static mixing on the left-digit task, through `dynamixer train`."""
    out = tmp_path_factory.mktemp('mixing')
    runs = {}
    for variant, options in (('dynamic', '{}'), ('static', '{"mixing": "static"}')):
        folder = out / variant
        assert cli.main(['train', '--dataset', 'left-digit', '--recipe', 'scratch', '--num-train', '64',
                         '--num-val', '16', '--epochs', '1', '--batch-size', '32', '--auto-augment', 'none',
                         '--model-options', options, '--output', str(folder), '--no-progress',
                         '--threads', '1', '--workers', '0', '--no-save-safetensors']) == 0
        runs[variant] = folder / 'last.pth'
    return runs


def test_show_mixing_writes_a_png(left_digit_runs, tmp_path, capsys):
    train, _ = make_left_digit_task(2, 1, seed=0)
    paths = []
    for k in range(2):
        p = tmp_path / f'img{k}.png'
        Image.fromarray((train.tensors[0][k, 0].numpy() * 255).astype(np.uint8)).save(p)
        paths.append(str(p))
    fig = tmp_path / 'mix.png'
    for variant in ('dynamic', 'static'):
        assert cli.main(['show-mixing', str(left_digit_runs[variant]), *paths,
                         '--digits', '1', '--out', str(fig)]) == 0
        img = Image.open(fig)
        assert img.format == 'PNG' and img.size[0] > 1000 and img.size[1] > 500   # 3 figure rows
    assert cli.main(['show-mixing', str(left_digit_runs['dynamic']), *paths,
                     '--layer', 'stages.9', '--out', str(fig)]) == 2
    assert "error: --layer 'stages.9' is not in the model" in capsys.readouterr().err

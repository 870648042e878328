"""`dynamixer push-to-hub`: the Hub folder through timm's own functions, offline."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import timm
import torch

from dynamixer.checkpoint import load_model
from helpers import CLASS_NAMES, NUM_CLASSES, SRC, _logits, _make_checkpoint, _run_cli


@pytest.fixture(scope='module')
def hub_checkpoint(workdir):
    # an ablation architecture (plain-sum block): the Hub config must carry the argument
    return _make_checkpoint(workdir / 'nano_plain.pth', dict(reweight=False), seed=1)


@pytest.fixture(scope='module')
def hub_folder(workdir, hub_checkpoint):
    folder = workdir / 'hub'
    rc, out = _run_cli('push-to-hub', hub_checkpoint, 'someone/dynamixer-nano-digits', '--local-dir', folder)
    assert rc == 0, out
    return folder


def test_hub_folder_contents(hub_folder, hub_checkpoint):
    assert sorted(p.name for p in hub_folder.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    cfg = json.loads((hub_folder / 'config.json').read_text())
    assert cfg['architecture'] == 'dynamixer_nano' and cfg['num_classes'] == NUM_CLASSES
    assert cfg['label_names'] == CLASS_NAMES
    assert cfg['model_args']['reweight'] is False
    card = (hub_folder / 'README.md').read_text()
    model, _ = load_model(hub_checkpoint)
    params = sum(p.numel() for p in model.parameters())
    for text in ('library_name: timm', 'dynamixer_nano', f'{params:,}', 'GMACs', 'top1: 93.25',
                 'top5: 99.5', 'lr: 0.002', 'opt: adamw', 'epochs: 30', 'plain sum',
                 "hf-hub:someone/dynamixer-nano-digits", 'arxiv'):
        assert text.lower() in card.lower(), text
    assert 'history' not in card and 'val_top1' not in card  # per-epoch log stays out of the card


def test_hub_local_dir_roundtrip(hub_folder, hub_checkpoint):
    model, _ = load_model(hub_checkpoint)
    loaded = timm.create_model(f'local-dir:{hub_folder}', pretrained=True).eval()
    assert loaded.pretrained_cfg['label_names'] == CLASS_NAMES
    assert loaded.stages[0].blocks[0].token_mixer.reweight is None  # plain-sum block rebuilt
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(_logits(loaded, x), _logits(model, x), rtol=0, atol=0)


HF_HUB_LOAD = textwrap.dedent('''
    import sys
    import numpy as np
    import torch
    import timm
    import dynamixer
    from huggingface_hub import constants
    assert constants.HF_HUB_OFFLINE
    model = timm.create_model('hf-hub:someone/dynamixer-nano-digits', pretrained=True).eval()
    x = torch.from_numpy(np.load(sys.argv[1]))
    with torch.no_grad():
        np.save(sys.argv[2], model(x).numpy())
    print(model.pretrained_cfg['source'], model.pretrained_cfg['hf_hub_id'])
''')


def test_hf_hub_prefix_loads_offline(hub_folder, hub_checkpoint, workdir):
    """`hf-hub:` through timm and huggingface_hub, served from a local Hub cache (offline mode)."""
    cache = workdir / 'hf_cache'
    repo = cache / 'models--someone--dynamixer-nano-digits'
    commit = '0123456789abcdef0123456789abcdef01234567'
    shutil.copytree(hub_folder, repo / 'snapshots' / commit)
    (repo / 'refs').mkdir(parents=True)
    (repo / 'refs' / 'main').write_text(commit)
    script = workdir / 'hf_load.py'
    script.write_text(HF_HUB_LOAD)
    x = torch.randn(3, 3, 32, 32)
    np.save(workdir / 'hub_x.npy', x.numpy())
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_HUB_CACHE=str(cache), PYTHONPATH=SRC)
    proc = subprocess.run([sys.executable, str(script), str(workdir / 'hub_x.npy'), str(workdir / 'hub_y.npy')],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ['hf-hub', 'someone/dynamixer-nano-digits']
    model, _ = load_model(hub_checkpoint)
    np.testing.assert_array_equal(np.load(workdir / 'hub_y.npy'), _logits(model, x))


def test_push_to_hub_uses_timm_upload(hub_checkpoint, workdir, monkeypatch):
    """The online path: timm's push_to_hf_hub with a stand-in for the Hub API (no network)."""
    pytest.importorskip('huggingface_hub')
    import timm.models._hub as timm_hub
    uploaded = workdir / 'uploaded'
    calls = []

    class FakeHfApi:
        def __init__(self, *args, **kwargs):
            pass

        def create_repo(self, repo_id, private=False, exist_ok=False):
            calls.append(('create_repo', repo_id, private))
            return type('RepoUrl', (), {'repo_id': repo_id})()

        def file_exists(self, repo_id, filename, revision=None):
            return False

        def upload_folder(self, repo_id, folder_path, **kwargs):
            calls.append(('upload_folder', repo_id))
            shutil.copytree(folder_path, uploaded)
            return f'https://huggingface.co/{repo_id}/commit/abc'

    monkeypatch.setattr(timm_hub, 'HfApi', FakeHfApi)
    rc, out = _run_cli('push-to-hub', hub_checkpoint, 'someone/dynamixer-nano-digits', '--private')
    assert rc == 0, out
    assert calls == [('create_repo', 'someone/dynamixer-nano-digits', True),
                     ('upload_folder', 'someone/dynamixer-nano-digits')]
    # safetensors only (no pickle), and the same model card as the local folder
    assert sorted(p.name for p in uploaded.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    assert 'top1: 93.25' in (uploaded / 'README.md').read_text()
    loaded = timm.create_model(f'local-dir:{uploaded}', pretrained=True).eval()
    model, _ = load_model(hub_checkpoint)
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(_logits(loaded, x), _logits(model, x), rtol=0, atol=0)


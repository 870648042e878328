"""checkpoint.py and model.checkpoint_filter_fn: the authors' checkpoints give the reference's
logits, this project's round-trip, and mismatches are named."""
import pytest
import timm
import torch

from helpers import nano
from reference import MEDIUM, NANO, SMALL, make_authors_state_dict, reference_logits


def _load(name, path, **kwargs):
    overlay = dict(file=str(path), **kwargs.pop('overlay', {}))
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs).eval()


@pytest.mark.parametrize('wrapping', ['state_dict', 'state_dict_ema', 'bare', 'safetensors'])
def test_authors_checkpoint_gives_reference_logits(tmp_path, wrapping):
    import argparse

    from safetensors.torch import save_file
    w64 = make_authors_state_dict(**NANO, num_classes=1000)
    w32 = {k: v.float() for k, v in w64.items()}
    if wrapping == 'state_dict':
        path = tmp_path / 'ckpt.pth.tar'
        torch.save({'epoch': 3, 'state_dict': {'module.' + k: v for k, v in w32.items()},
                    'args': argparse.Namespace(model='dynamixer_nano', lr=2e-3)}, path)
    elif wrapping == 'state_dict_ema':
        path = tmp_path / 'ckpt.pth.tar'
        wrong = {k: torch.zeros_like(v) for k, v in w32.items()}   # EMA weights must win
        torch.save({'state_dict': wrong, 'state_dict_ema': w32}, path)
    elif wrapping == 'bare':
        path = tmp_path / 'ckpt.pth'
        torch.save(w32, path)
    else:
        path = tmp_path / 'model.safetensors'
        save_file(w32, str(path))
    model = _load('dynamixer_nano', path)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    ref = reference_logits(w64, x)
    torch.testing.assert_close(model.double()(x), ref, rtol=1e-9, atol=1e-9)


def test_authors_checkpoint_float32_relative_error():
    w64 = make_authors_state_dict(**NANO, num_classes=1000, scale=0.3)
    model = timm.create_model('dynamixer_nano', pretrained=True, pretrained_cfg_overlay=dict(
        state_dict={k: v.float() for k, v in w64.items()})).eval()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    ref = reference_logits(w64, x)
    out = model(x.float()).double()
    assert ((out - ref).norm() / ref.norm()).item() <= 1e-6


@pytest.mark.parametrize('name,cfg', [('dynamixer_s', SMALL), ('dynamixer_m', MEDIUM)])
def test_published_layout_maps_every_key(name, cfg):
    """Every key of the authors' S / M layout (transition positions included) lands on our model."""
    w = make_authors_state_dict(**cfg, num_classes=1000, dtype=torch.float32)
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(state_dict=w))
    sd = model.state_dict()
    assert torch.equal(sd['stem.proj.weight'], w['patch_embed.proj.weight'])
    transition = cfg['transition_after'] + 1                 # the stage that starts with it
    flat = cfg['transition_after'] + 1                       # its index in the flat list
    assert torch.equal(sd[f'stages.{transition}.downsample.proj.weight'], w[f'network.{flat}.proj.weight'])
    last = len(cfg['depths'])                                # flat index of stage 4
    assert torch.equal(sd['stages.3.blocks.2.token_mixer.mix_w.reduce.weight'],
                       w[f'network.{last}.2.attn.mix_w.compress.weight'])
    assert torch.equal(sd['stages.0.blocks.1.token_mixer.mix_c.weight'], w['network.0.1.attn.mlp_c.weight'])


@pytest.mark.slow
def test_small_authors_checkpoint_gives_reference_logits():
    w64 = make_authors_state_dict(**SMALL, num_classes=1000, scale=0.5)
    model = timm.create_model('dynamixer_s', pretrained=True, pretrained_cfg_overlay=dict(
        state_dict={k: v.float() for k, v in w64.items()})).eval()
    x = torch.randn(1, 3, 224, 224, dtype=torch.float64)
    ref = reference_logits(w64, x)
    torch.testing.assert_close(model.double()(x), ref, rtol=1e-8, atol=1e-8)


def test_project_checkpoint_round_trip(tmp_path):
    model = nano(num_classes=7).eval()
    path = tmp_path / 'run.pth'
    torch.save({'state_dict': model.state_dict(), 'config': {'model': 'dynamixer_nano'},
                'class_names': list('abcdefg')}, path)
    loaded = _load('dynamixer_nano', path, num_classes=7, overlay=dict(num_classes=7))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    from dynamixer.checkpoint import load_model
    loaded2, info = load_model(path)
    assert info['model'] == 'dynamixer_nano' and info['class_names'] == list('abcdefg')
    torch.testing.assert_close(loaded2(x), model(x), rtol=0, atol=0)


def test_new_head_for_other_class_count(tmp_path):
    path = tmp_path / 'in1k.pth'
    src = nano()
    torch.save(src.state_dict(), path)
    model = _load('dynamixer_nano', path, num_classes=5)
    assert model.head.out_features == 5
    assert torch.equal(model.stem.proj.weight, src.stem.proj.weight)


def test_wrong_architecture_is_named(tmp_path):
    path = tmp_path / 'm.pth'
    with torch.device('meta'):
        other = timm.create_model('dynamixer_m')
    torch.save({'state_dict': {k: torch.zeros(v.shape) for k, v in other.state_dict().items()}}, path)
    with pytest.raises(ValueError, match=r'does not fit this model.*Checkpoint: layers per stage \(4, 3, 14, 3\)'
                                         r'.*transition before stage 3.*Model: layers per stage \(4, 3, 8, 3\)'
                                         r'.*It fits dynamixer_m'):
        _load('dynamixer_s', path)


def test_authors_checkpoint_of_other_size_is_named(tmp_path):
    path = tmp_path / 'm.pth'
    torch.save({'state_dict': make_authors_state_dict(**MEDIUM, dtype=torch.float32, num_classes=1000)}, path)
    with pytest.raises(ValueError,
                       match=r'does not fit this model.*widths \(256, 256, 512, 512\).*It fits dynamixer_m'):
        _load('dynamixer_s', path)


def test_checkpoint_for_another_resolution_loads_resampled(tmp_path):
    # weights trained at another size are converted (tests/test_resolution.py tests how)
    path = tmp_path / 'n48.pth'
    torch.save(nano(img_size=48).state_dict(), path)
    model = _load('dynamixer_nano', path)
    assert model.stages[0].blocks[0].token_mixer.mix_h.generate.weight.shape == (64, 16)


def test_generators_of_another_variant_are_named(tmp_path):
    path = tmp_path / 'd4.pth'
    torch.save(nano(img_size=48, reduced_dim=4).state_dict(), path)
    with pytest.raises(ValueError, match='shape mismatch.*generate'):
        _load('dynamixer_nano', path)


def test_other_class_count_without_new_head_is_explained(tmp_path):
    path = tmp_path / 'ten.pth'
    torch.save(nano(num_classes=10).state_dict(), path)
    with pytest.raises(ValueError, match='classifier has 10 classes.*num_classes=10'):
        _load('dynamixer_nano', path)


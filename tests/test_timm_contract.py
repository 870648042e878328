"""timm's contract for models (timm 1.0.31): device/dtype factory kwargs, meta construction,
in_chans adaptation of pretrained weights, and module swaps (quantisation, LoRA, pruning) that
must fall back to the plain path."""
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.utils.prune as prune

import dynamixer
from helpers import nano, randomize_


@pytest.mark.parametrize('name', ['dynamixer_nano', 'dynamixer_s'])
def test_device_and_dtype_factory_kwargs(name):
    model = timm.create_model(name, device='cpu', dtype=torch.float32)
    assert all(p.dtype == torch.float32 and p.device.type == 'cpu' for p in model.parameters())
    model = timm.create_model(name, device='meta', dtype=torch.bfloat16)
    assert all(p.device.type == 'meta' and p.dtype == torch.bfloat16 for p in model.parameters())
    with torch.device('meta'):
        model = timm.create_model(name)
    assert all(p.device.type == 'meta' for p in model.parameters())


def test_dtype_kwarg_builds_float64_model_that_runs():
    model = timm.create_model('dynamixer_nano', dtype=torch.float64).eval()
    model.reset_classifier(4)
    assert model.head.weight.dtype == torch.float64
    assert model(torch.randn(1, 3, 32, 32, dtype=torch.float64)).shape == (1, 4)


@pytest.mark.parametrize('in_chans', [1, 4])
def test_pretrained_in_chans_adapted_as_timm_does(tmp_path, in_chans):
    from timm.models import adapt_input_conv
    src = nano(num_classes=1000).eval()
    path = tmp_path / 'rgb.pth'
    torch.save(src.state_dict(), path)
    model = timm.create_model('dynamixer_nano', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              in_chans=in_chans).eval()
    w = src.stem.proj.weight
    expected = adapt_input_conv(in_chans, w.clone())
    torch.testing.assert_close(model.stem.proj.weight, expected)
    if in_chans == 1:   # sum over the RGB channels: a gray image gives the RGB model's output
        torch.testing.assert_close(model.stem.proj.weight, w.sum(1, keepdim=True))
        x = torch.rand(2, 1, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(model(x), src(x.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-4)
    # everything else loads unchanged
    assert torch.equal(model.stages[0].blocks[0].token_mixer.mix_h.generate.weight,
                       src.stages[0].blocks[0].token_mixer.mix_h.generate.weight)


def test_other_architecture_still_refused_with_in_chans(tmp_path):
    path = tmp_path / 'big.pth'
    torch.save(nano(embed_dims=(32, 128, 128, 128)).state_dict(), path)
    with pytest.raises(ValueError, match='does not fit this model'):
        timm.create_model('dynamixer_nano', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), in_chans=1)


def _random_nano_f32():
    torch.manual_seed(0)
    return randomize_(timm.create_model('dynamixer_nano', num_classes=10), std=0.05).eval()


def test_dynamic_int8_quantisation_runs_on_the_plain_path():
    from dynamixer.ops import dispatch
    model = _random_nano_f32()
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    q = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    with torch.inference_mode():
        out = q(x)
        paths = dynamixer.explain_paths(q, x)
    assert set(paths.values()) == {'plain'}, paths
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 0.05, rel
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.8
    # and the blocks with long sequences (the fast-mixing candidates) fall back too
    with dispatch_min_tokens(1):
        blk = torch.ao.quantization.quantize_dynamic(
            dynamixer.DynaMixerBlock(16, (4, 4), 2, 2).eval(), {nn.Linear}, dtype=torch.qint8)
        with torch.inference_mode():
            assert dynamixer.explain_paths(blk, torch.randn(2, 4, 4, 16))[''] == 'plain'
    assert dispatch.fast_path_enabled()


class dispatch_min_tokens:
    """Build modules with another fast-mixing minimum (construction reads it)."""

    def __init__(self, n):
        from dynamixer.ops import dispatch
        self.dispatch, self.n = dispatch, n

    def __enter__(self):
        self.old, self.dispatch.FAST_PATH_MIN_TOKENS = self.dispatch.FAST_PATH_MIN_TOKENS, self.n

    def __exit__(self, *exc):
        self.dispatch.FAST_PATH_MIN_TOKENS = self.old


class LoRALinear(nn.Module):
    """A LoRA-style wrapper: the frozen Linear plus a low-rank update."""

    def __init__(self, base: nn.Linear, rank: int = 2):
        super().__init__()
        self.base = base
        self.down = nn.Linear(base.in_features, rank, bias=False)
        self.up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.normal_(self.up.weight, std=0.1)

    def forward(self, x):
        return self.base(x) + self.up(self.down(x))


def test_lora_wrapper_and_pruning_take_the_plain_path():
    with dispatch_min_tokens(1):
        layer = randomize_(dynamixer.MixerLayer(16, (4, 4), 2, 2).double(), std=0.3).eval()
    x = torch.randn(2, 4, 4, 16, dtype=torch.float64)
    # LoRA on the generator and on fc1: the wrapped modules must be called
    layer.token_mixer.mix_h.generate = LoRALinear(layer.token_mixer.mix_h.generate).double()
    layer.mlp.fc1 = LoRALinear(layer.mlp.fc1).double()
    with torch.no_grad():
        paths = dynamixer.explain_paths(layer, x)
        assert paths['token_mixer'] == paths['token_mixer.mix_h'] == paths['mlp'] == 'plain'
        with dynamixer.set_fast_path(False):
            expected = layer(x)
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
    # pruning: the Linear keeps its type, the mask is applied by a forward pre-hook
    with dispatch_min_tokens(1):
        layer = randomize_(dynamixer.MixerLayer(16, (4, 4), 2, 2).double(), std=0.3).eval()
    prune.l1_unstructured(layer.token_mixer.mix_w.generate, 'weight', amount=0.5)
    prune.l1_unstructured(layer.mlp.fc2, 'weight', amount=0.5)
    with torch.no_grad():
        paths = dynamixer.explain_paths(layer, x)
        assert paths['token_mixer'] == paths['mlp'] == 'plain'
        out = layer(x)
        prune.remove(layer.token_mixer.mix_w.generate, 'weight')   # the pruned weights, baked in
        prune.remove(layer.mlp.fc2, 'weight')
        # back on a fast path (the compiled CPU kernels' or the eager ones)
        assert dynamixer.explain_paths(layer, x)['token_mixer'] in ('cpp-inference', 'fast-inference')
        torch.testing.assert_close(layer(x), out, rtol=1e-10, atol=1e-12)


def test_weights_trained_with_one_channel_load_into_a_one_channel_model(tmp_path):
    src = nano(in_chans=1, num_classes=4).eval()
    path = tmp_path / 'gray.pth'
    torch.save(src.state_dict(), path)
    model = timm.create_model('dynamixer_nano', pretrained=True, in_chans=1, num_classes=4,
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=4)).eval()
    assert torch.equal(model.stem.proj.weight, src.stem.proj.weight)
    with pytest.raises(ValueError, match='input channels'):   # 1 channel into 4: not what timm adapts
        timm.create_model('dynamixer_nano', pretrained=True, in_chans=4, num_classes=4,
                          pretrained_cfg_overlay=dict(file=str(path), num_classes=4))

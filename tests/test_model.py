"""The model library against the spec: numerics, sizes, the timm API and input checks."""

import pytest
import timm
import torch
import torch.nn as nn
from timm.models import group_parameters
from torch.utils.flop_counter import FlopCounterMode

from dynamixer import DynaMixerBlock, DynaMixerOp, MixerLayer, list_models
from helpers import authors_names, nano, randomize_
from reference import (
    reference_block,
    reference_layer,
    reference_op,
)

# ---------------------------------------------------------------- numerics against the reference

@pytest.mark.parametrize('n,dim,segments,d', [(5, 12, 3, 2), (8, 16, 4, 1), (7, 30, 5, 3)])
def test_op_matches_reference(n, dim, segments, d):
    op = randomize_(DynaMixerOp(dim, n, segments, d).double())
    x = torch.randn(6, n, dim, dtype=torch.float64)
    ref = reference_op(x, authors_names(op, 'mix_h'), 'mix_h')
    torch.testing.assert_close(op(x), ref, rtol=1e-10, atol=1e-10)


def test_op_gradients_match_reference():
    op = randomize_(DynaMixerOp(12, 6, 3, 2).double())
    x = torch.randn(3, 6, 12, dtype=torch.float64, requires_grad=True)
    w = {k: v.clone().requires_grad_(True) for k, v in authors_names(op, 'mix_h').items()}
    g_out = torch.randn(3, 6, 12, dtype=torch.float64)
    gx, = torch.autograd.grad((op(x) * g_out).sum(), x)
    gx_ref, = torch.autograd.grad((reference_op(x, w, 'mix_h') * g_out).sum(), x)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-9, atol=1e-10)
    grads = torch.autograd.grad((op(x) * g_out).sum(), list(op.parameters()))
    ref_grads = torch.autograd.grad((reference_op(x, w, 'mix_h') * g_out).sum(), list(w.values()))
    ours = {n: g for (n, _), g in zip(op.named_parameters(), grads)}
    theirs = dict(zip(w.keys(), ref_grads))
    for (_, g), key in zip(ours.items(), authors_names(op, 'mix_h')):   # same order
        torch.testing.assert_close(g, theirs[key], rtol=1e-9, atol=1e-10)


def test_mixing_matrices_are_stochastic_over_input_tokens():
    op = randomize_(DynaMixerOp(16, 6, 4, 2))
    p = op.mixing_weights(torch.randn(3, 6, 16))            # (3, S, N_in, N_out)
    assert p.shape == (3, 4, 6, 6)
    assert (p >= 0).all()
    torch.testing.assert_close(p.sum(dim=-2), torch.ones(3, 4, 6))
    # the other axis is not normalised: summing over outputs must not also give ones
    assert (p.sum(dim=-1) - 1).abs().max() > 1e-2


def test_mixing_orientation_first_index_is_input_token():
    """Logits G[i, j] large where i == j + 1: output token j must copy input token j + 1."""
    n, dim = 5, 8
    op = DynaMixerOp(dim, n, num_segments=2, reduced_dim=2)
    with torch.no_grad():
        op.generate.weight.zero_()
        bias = torch.zeros(n, n)
        for j in range(n):
            bias[(j + 1) % n, j] = 50.0
        op.generate.bias.copy_(bias.flatten())             # index i * N + j
        op.proj.weight.copy_(torch.eye(dim))
        op.proj.bias.zero_()
    x = torch.randn(2, n, dim)
    torch.testing.assert_close(op(x), x.roll(-1, dims=1))


@pytest.mark.parametrize('reweight', [True, False])
def test_block_matches_reference(reweight):
    blk = randomize_(DynaMixerBlock(16, (4, 6), 4, 2, reweight=reweight).double(), std=0.3)
    x = torch.randn(2, 4, 6, 16, dtype=torch.float64)
    ref = reference_block(x, authors_names(blk, 'b'), 'b', reweight=reweight)
    torch.testing.assert_close(blk(x), ref, rtol=1e-10, atol=1e-10)


def test_mixer_layer_matches_reference():
    layer = randomize_(MixerLayer(16, (4, 4), 4, 2).double(), std=0.3)
    x = torch.randn(2, 4, 4, 16, dtype=torch.float64)
    ref = reference_layer(x, authors_names(layer, 'l'), 'l')
    torch.testing.assert_close(layer(x), ref, rtol=1e-10, atol=1e-10)


def test_static_mixing_ignores_input_content():
    op = DynaMixerOp(8, 4, 2, mixing='static')
    with torch.no_grad():
        op.static_logits.normal_()
    p1, p2 = op.mixing_weights(torch.randn(4, 8)), op.mixing_weights(torch.randn(4, 8) * 10)
    torch.testing.assert_close(p1, p2)
    torch.testing.assert_close(p1.sum(dim=-2), torch.ones(2, 4))
    assert not hasattr(op, 'generate') or op.generate is None


def test_drop_path_grows_linearly_over_all_layers():
    model = nano(drop_path_rate=0.3)
    rates = [getattr(blk.drop_path1, 'drop_prob', 0.0) for stage in model.stages for blk in stage.blocks]
    k = len(rates)
    assert rates == pytest.approx([0.3 * i / (k - 1) for i in range(k)])


# ---------------------------------------------------------------- sizes

@pytest.mark.parametrize('name,params,gmacs', [
    ('dynamixer_s', 26_265_960, 7.302), ('dynamixer_m', 57_128_264, 16.98), ('dynamixer_l', 97_818_088, 27.34)])
def test_published_parameter_and_mac_counts(name, params, gmacs):
    with torch.device('meta'):
        model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == params
    with FlopCounterMode(display=False) as counter:
        model(torch.empty(1, 3, 224, 224, device='meta'))
    assert round(counter.get_total_flops() / 2 / 1e9, 3 if gmacs < 10 else 2) == gmacs


def test_small_variant_is_small():
    model = nano()
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    assert model.pretrained_cfg['input_size'] == (3, 32, 32)
    assert 'dynamixer_nano' in timm.list_models('dynamixer*')
    assert set(list_models()) <= set(timm.list_models('dynamixer*'))


def test_pretrained_cfgs():
    for name in ('dynamixer_s', 'dynamixer_m', 'dynamixer_l'):
        cfg = timm.get_pretrained_cfg(name).to_dict()
        assert cfg['input_size'] == (3, 224, 224) and cfg['interpolation'] == 'bicubic'
        assert cfg['fixed_input_size'] and cfg['first_conv'] == 'stem.proj' and cfg['classifier'] == 'head'
        assert cfg['mean'] == timm.data.IMAGENET_DEFAULT_MEAN and cfg['paper_ids'] == 'arXiv:2201.12083'
        assert cfg['license']
    assert timm.get_pretrained_cfg('dynamixer_s').crop_pct == 0.9
    assert timm.get_pretrained_cfg('dynamixer_l').crop_pct == 0.875


# ---------------------------------------------------------------- timm model API

def test_forward_features_and_head():
    model = nano(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)
    assert feats.shape == (2, 4, 4, 128)
    pooled = model.forward_head(feats, pre_logits=True)
    assert pooled.shape == (2, 128)
    torch.testing.assert_close(model.forward_head(feats), model.get_classifier()(pooled))
    torch.testing.assert_close(model(x), model.forward_head(feats))



@pytest.mark.parametrize('train', [False, True])
def test_residual_stream_is_contiguous_nhwc(train):
    # The stem and the downsampling write contiguous (B, H, W, C): a permuted NCHW view would
    # carry its channel stride through every residual add of the stage (slow strided adds and a
    # LayerNorm copy per layer; measured in docs/fast_path.md).
    model = nano(num_classes=10).train(train)
    seen = []
    for layer in model.modules():
        if isinstance(layer, MixerLayer):
            layer.register_forward_hook(lambda m, inp, out: seen.append((inp[0], out)))
    with torch.set_grad_enabled(train):
        model(torch.randn(2, 3, 32, 32))
    assert len(seen) == sum(len(s.blocks) for s in model.stages) and len(model.stages) > 1
    for inp, out in seen:
        assert inp.is_contiguous() and out.is_contiguous(), (inp.stride(), out.stride())

def test_reset_classifier():
    model = nano().eval()
    model.reset_classifier(3)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    model.reset_classifier(0, global_pool='')
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 4, 4, 128)
    assert timm.create_model('dynamixer_nano', num_classes=0)(torch.randn(1, 3, 32, 32)).shape == (1, 128)


def test_features_only():
    model = timm.create_model('dynamixer_nano', features_only=True).eval()
    feats = model(torch.randn(2, 3, 32, 32))
    assert [f.shape[1:] for f in feats] == [(64, 8, 8), (128, 4, 4), (128, 4, 4), (128, 4, 4)]
    assert model.feature_info.reduction() == [4, 8, 8, 8]
    assert model.feature_info.channels() == [64, 128, 128, 128]
    sub = timm.create_model('dynamixer_nano', features_only=True, out_indices=(0, 2))
    assert [f.shape[1] for f in sub(torch.randn(1, 3, 32, 32))] == [64, 128]


def test_forward_intermediates_agrees_with_forward():
    model = nano().eval()
    x = torch.randn(2, 3, 32, 32)
    final, inter = model.forward_intermediates(x)
    torch.testing.assert_close(final, model.forward_features(x))
    assert [t.shape for t in inter] == [(2, 64, 8, 8), (2, 128, 4, 4), (2, 128, 4, 4), (2, 128, 4, 4)]
    nhwc = model.forward_intermediates(x, indices=[1], output_fmt='NHWC', intermediates_only=True)
    torch.testing.assert_close(nhwc[0].permute(0, 3, 1, 2), inter[1])
    early = model.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True)
    torch.testing.assert_close(early[0], inter[0])
    normed = model.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)
    torch.testing.assert_close(normed[0], final.permute(0, 3, 1, 2))


def test_prune_intermediate_layers():
    model = nano().eval()
    x = torch.randn(1, 3, 32, 32)
    want = model.forward_intermediates(x, indices=[1], intermediates_only=True)[0]
    kept = model.prune_intermediate_layers(indices=[1])
    assert kept == [1] and len(model.stages) == 2 and isinstance(model.head, nn.Identity)
    torch.testing.assert_close(model.forward_intermediates(x, indices=[1], intermediates_only=True)[0], want)


def test_grad_checkpointing_same_outputs_and_grads():
    model = nano(num_classes=5)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    model.set_grad_checkpointing(True)
    out_ckpt = model(x)
    grads_ckpt = torch.autograd.grad(out_ckpt.square().sum(), list(model.parameters()))
    torch.testing.assert_close(out_ckpt, out)
    for a, b in zip(grads, grads_ckpt):
        torch.testing.assert_close(a, b)


def test_group_matcher_covers_every_parameter():
    model = nano()
    for coarse in (True, False):
        groups = group_parameters(model, model.group_matcher(coarse=coarse))
        names = [n for g in groups.values() for n in g]
        assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert len(group_parameters(model, model.group_matcher(coarse=True))) >= 5  # stem, 4 stages, norm/head


def test_meta_device_construction():
    with torch.device('meta'):
        model = timm.create_model('dynamixer_l')
    assert all(p.is_meta for p in model.parameters())
    model = model.to_empty(device='cpu')
    assert sum(p.numel() for p in model.parameters()) == 97_818_088


@pytest.mark.parametrize('kwargs', [{}, dict(mixing='static', reweight=False)])
def test_torchscript(kwargs):
    model = nano(**kwargs).eval()
    scripted = torch.jit.script(model)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(scripted(x), model(x))
    with pytest.raises(Exception, match='built for 32x32'):
        scripted(torch.randn(1, 3, 40, 40))


def test_fx_trace():
    model = nano().eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(traced(x), model(x))
    nodes, _ = timm.models.get_graph_node_names(model)
    assert any('mix_h' in n for n in nodes)


def test_bf16_forward_and_channels():
    model = nano().eval()
    x = torch.randn(2, 3, 32, 32)
    want = model(x)
    scale = want.abs().max()
    out = nano().eval().to(torch.bfloat16)
    out.load_state_dict(model.state_dict())
    got = out(x.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    assert (got.float() - want).abs().max() < 0.05 * scale
    with torch.autocast('cpu', dtype=torch.bfloat16):
        auto = model(x)
    assert (auto.float() - want).abs().max() < 0.05 * scale
    gray = nano(in_chans=1).eval()
    assert gray(torch.randn(1, 1, 32, 32)).shape == (1, 1000)


# ---------------------------------------------------------------- input checks

def test_wrong_spatial_size_is_explained():
    model = nano()
    with pytest.raises(ValueError, match=r'built for 32x32 input.*got 64x48.*img_size=\(64, 48\)'):
        model(torch.randn(1, 3, 64, 48))


def test_wrong_channels_is_explained():
    with pytest.raises(ValueError, match='expects 3 input channels; got 1.*in_chans=1'):
        nano()(torch.randn(1, 1, 32, 32))


def test_wrong_rank_is_explained():
    with pytest.raises(ValueError, match='batch of images'):
        nano()(torch.randn(3, 32, 32))


def test_size_the_architecture_cannot_take():
    with pytest.raises(ValueError, match='multiples of 8.*height 30: 24 or 32'):
        nano(img_size=30)


def test_other_sizes_build():
    model = nano(img_size=(48, 64)).eval()
    assert model(torch.randn(1, 3, 48, 64)).shape == (1, 1000)
    assert model.stages[0].blocks[0].token_mixer.mix_h.seq_len == 12
    assert model.stages[0].blocks[0].token_mixer.mix_w.seq_len == 16

"""Any input resolution: building, resampling weights between sizes, dense features, size errors."""
import importlib.util
import math
import os

import pytest
import timm
import torch
import torch.nn.functional as F

from dynamixer.checkpoint import load_model
from dynamixer.model import DynaMixerOp, checkpoint_filter_fn
from dynamixer.resample import (
    resample_generator,
    resample_state_dict,
    resample_static_logits,
    resample_to_shapes,
    resampling_matrix,
    trained_img_size,
)
from helpers import to_authors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NANO = 'dynamixer_nano'  # patch 4, one transition (before stage 2): sizes are multiples of 8


def _nano(img_size=32, **kw):
    torch.manual_seed(kw.pop('seed', 0))
    return timm.create_model(NANO, img_size=img_size, num_classes=kw.pop('num_classes', 10), **kw).eval()


pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def trained_like():
    """A nano model at 32x32 whose generators are far from their init (so resampling matters)."""
    model = _nano(32, seed=1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if '.generate.' in name:
                p.normal_(0, 0.3)
    return model


def _save(tmp_path, obj, name='w.pth'):
    path = str(tmp_path / name)
    torch.save(obj, path)
    return path


# ------------------------------------------------------------------------------------------
# 1. building at any size the architecture allows
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize('size', [32, 24, 48, 8, (24, 64), (40, 16), (56, 8)])
def test_build_any_valid_size(size):
    h, w = (size, size) if isinstance(size, int) else size
    model = _nano(size)
    assert model.grid_sizes == [(h // 4, w // 4)] + [(h // 8, w // 8)] * 3
    for i, stage in enumerate(model.stages):
        gh, gw = model.grid_sizes[i]
        op_h, op_w = stage.blocks[0].token_mixer.mix_h, stage.blocks[0].token_mixer.mix_w
        assert op_h.generate.weight.shape == (gh * gh, gh * 2)   # height mixing: N = H'
        assert op_w.generate.weight.shape == (gw * gw, gw * 2)   # width mixing: N = W'
    out = model(torch.randn(2, 3, h, w))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match=f'built for {h}x{w}'):
        model(torch.randn(1, 3, h + 8, w))


def test_build_published_variant_at_other_size_meta():
    with torch.device('meta'):
        model = timm.create_model('dynamixer_s', img_size=(112, 196))
    assert model.grid_sizes == [(16, 28), (8, 14), (8, 14), (8, 14)]
    sd = model.state_dict()
    assert sd['stages.0.blocks.0.token_mixer.mix_w.generate.weight'].shape == (28 * 28, 28 * 2)
    assert sd['stages.2.blocks.0.token_mixer.mix_h.generate.bias'].shape == (8 * 8,)


# ------------------------------------------------------------------------------------------
# 5. sizes the architecture cannot take
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize('size,pattern', [
    ((50, 30), r'multiples of 8 .*height 50: 48 or 56; width 30: 24 or 32 \(e\.g\. img_size=\(48, 32\)\)'),
    (36, r'height 36: 32 or 40'),
    (4, r'height 4: 8; width 4: 8'),
    (0, r'height 0: 8'),
    (-8, r'height -8: 8'),
    ((48, 44), r'width 44: 40 or 48 \(e\.g\. img_size=\(48, 40\)\)'),
])
def test_invalid_size_lists_nearest(size, pattern):
    with pytest.raises(ValueError, match=pattern):
        timm.create_model(NANO, img_size=size)


def test_invalid_size_published_variant():
    with pytest.raises(ValueError, match=r'multiples of 14 \(patch size 7 x 2\^1 transitions\).*98 or 112'):
        timm.create_model('dynamixer_s', img_size=100)


@pytest.mark.parametrize('size', [48.0, (48,), (48, 48, 48), '48', (48.5, 48), True])
def test_malformed_size(size):
    with pytest.raises(ValueError, match='img_size must be an int or a pair of ints'):
        timm.create_model(NANO, img_size=size)


def test_resample_to_invalid_size_lists_nearest(trained_like):
    with pytest.raises(ValueError, match='height 44: 40 or 48'):
        resample_state_dict(trained_like.state_dict(), 44)


# ------------------------------------------------------------------------------------------
# 2. the resampling itself, against independent references
# ------------------------------------------------------------------------------------------

def _ref_antialias_matrix(n_old, n_new):
    """Triangle filter of radius n_old/n_new source tokens, rows normalised (shrinking only)."""
    scale = n_old / n_new
    m = torch.zeros(n_new, n_old, dtype=torch.float64)
    for a in range(n_new):
        centre = (a + 0.5) * scale
        for i in range(n_old):
            m[a, i] = max(0.0, 1.0 - abs((i + 0.5 - centre) / scale))
        m[a] /= m[a].sum()
    return m


def _ref_linear_matrix(n_old, n_new):
    m = torch.zeros(n_new, n_old, dtype=torch.float64)
    for a in range(n_new):
        x = min(max((a + 0.5) * n_old / n_new - 0.5, 0.0), n_old - 1)
        lo = int(math.floor(x))
        hi = min(lo + 1, n_old - 1)
        m[a, lo] += 1 - (x - lo)
        m[a, hi] += x - lo
    return m


@pytest.mark.parametrize('n_old,n_new', [(4, 6), (8, 12), (3, 8), (12, 8), (8, 6), (16, 4)])
def test_resampling_matrix_reference(n_old, n_new):
    m = resampling_matrix(n_old, n_new)
    ref = _ref_linear_matrix(n_old, n_new) if n_new > n_old else _ref_antialias_matrix(n_old, n_new)
    torch.testing.assert_close(m, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.sum(1), torch.ones(n_new, dtype=torch.float64))  # rows average


@pytest.mark.parametrize('mode', ['linear', 'cubic', 'nearest'])
def test_resampling_matrix_identity(mode):
    assert torch.equal(resampling_matrix(7, 7, mode), torch.eye(7, dtype=torch.float64))


def _grid_sample_generator(weight, bias, n, n_new):
    """Reference upsampling: trilinear sampling of W[i, j, t, k] at the new token centres."""
    d = weight.shape[1] // n
    w = weight.double().reshape(n, n, n, d).permute(3, 0, 1, 2)[None]      # (1, d, I, J, T)
    pos = (torch.arange(n_new, dtype=torch.float64) + 0.5) / n_new * 2 - 1  # centres, normalised
    gi, gj, gt = torch.meshgrid(pos, pos, pos, indexing='ij')
    grid = torch.stack([gt, gj, gi], dim=-1)[None]                          # grid_sample wants (x=T, y=J, z=I)
    out = F.grid_sample(w, grid, mode='bilinear', padding_mode='border', align_corners=False)[0]
    new_w = out.permute(1, 2, 3, 0).reshape(n_new * n_new, n_new * d) * (n / n_new)
    b = bias.double().reshape(1, 1, n, n)
    grid2 = torch.stack(torch.meshgrid(pos, pos, indexing='ij')[::-1], dim=-1)[None]
    new_b = F.grid_sample(b, grid2, mode='bilinear', padding_mode='border', align_corners=False).reshape(-1)
    return new_w, new_b


@pytest.mark.parametrize('n,n_new,d', [(4, 6, 2), (3, 8, 2), (4, 7, 3)])
def test_resample_generator_matches_trilinear_reference(n, n_new, d):
    torch.manual_seed(0)
    weight = torch.randn(n * n, n * d, dtype=torch.float64)
    bias = torch.randn(n * n, dtype=torch.float64)
    new_w, new_b = resample_generator(weight, bias, n_new)
    ref_w, ref_b = _grid_sample_generator(weight, bias, n, n_new)
    assert new_w.shape == (n_new * n_new, n_new * d) and new_b.shape == (n_new * n_new,)
    torch.testing.assert_close(new_w, ref_w, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(new_b, ref_b, rtol=1e-10, atol=1e-10)


def test_resample_generator_index_layout():
    """Output index i*N + j and input index t*d + k: a weight that depends only on (i, t) stays so."""
    n, n_new, d = 4, 8, 2
    i = torch.arange(n, dtype=torch.float64)
    w = (i[:, None, None, None] * 10 + i[None, None, :, None] + 0 * torch.zeros(n, n, n, d)).reshape(n * n, n * d)
    new_w, _ = resample_generator(w, None, n_new)
    new_w = new_w.reshape(n_new, n_new, n_new, d)
    # constant along j (output token) and k (feature): the layout was not scrambled
    torch.testing.assert_close(new_w, new_w[:, :1, :, :1].expand_as(new_w))
    # linear in i along the input-token axis: interpolation keeps it linear (away from the clamped border)
    inner = new_w[1:-1, 0, 1:-1, 0] / (n / n_new)
    steps = inner[1:] - inner[:-1]
    torch.testing.assert_close(steps, torch.full_like(steps, 10 * n / n_new))


@pytest.mark.parametrize('n,n_new', [(4, 8), (6, 9), (8, 6)])
def test_pinv_reproduces_logits_of_interpolated_features(n, n_new):
    """method='pinv': for features r' = M r, the new logits are the old ones resampled (exact when enlarging)."""
    torch.manual_seed(0)
    d = 2
    w = torch.randn(n * n, n * d, dtype=torch.float64)
    b = torch.randn(n * n, dtype=torch.float64)
    r = torch.randn(n, d, dtype=torch.float64)
    m = resampling_matrix(n, n_new)
    new_w, new_b = resample_generator(w, b, n_new, method='pinv')
    logits = (w @ r.reshape(-1) + b).reshape(n, n)
    new_logits = (new_w @ (m @ r).reshape(-1) + new_b).reshape(n_new, n_new)
    expected = m @ logits @ m.T
    if n_new > n:
        torch.testing.assert_close(new_logits, expected, rtol=1e-9, atol=1e-9)
    else:  # least squares: close, not exact
        assert (new_logits - expected).abs().max() < (logits.abs().max())


@pytest.mark.parametrize('n,n_new', [(4, 8), (8, 6), (4, 7)])
def test_interpolate_scales_input_sum(n, n_new):
    """A generator that sums its inputs gives the same logits for constant features at any N."""
    d = 2
    w = torch.ones(n * n, n * d, dtype=torch.float64)
    new_w, _ = resample_generator(w, None, n_new)
    r_old, r_new = torch.full((n * d,), 0.7, dtype=torch.float64), torch.full((n_new * d,), 0.7, dtype=torch.float64)
    torch.testing.assert_close(new_w @ r_new, torch.full((n_new * n_new,), (w @ r_old)[0].item(), dtype=torch.float64))


def test_temperature_log_scales_logits():
    torch.manual_seed(0)
    w, b = torch.randn(16, 8), torch.randn(16)
    w1, b1 = resample_generator(w, b, 6)
    w2, b2 = resample_generator(w, b, 6, temperature='log')
    tau = math.log(6) / math.log(4)
    torch.testing.assert_close(w2, w1 * tau)
    torch.testing.assert_close(b2, b1 * tau)


def test_resample_static_logits_reference():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 4, dtype=torch.float64)
    out = resample_static_logits(logits, 8)
    m = _ref_linear_matrix(4, 8)
    torch.testing.assert_close(out, torch.stack([m @ l @ m.T for l in logits]))
    assert resample_static_logits(logits, 4) is logits


def test_bad_options_and_shapes():
    w = torch.randn(16, 8)
    with pytest.raises(ValueError, match='mode must be one of'):
        resample_generator(w, None, 6, mode='bilinear')
    with pytest.raises(ValueError, match='method must be one of'):
        resample_generator(w, None, 6, method='svd')
    with pytest.raises(ValueError, match=r'shape \(N\*N, N\*d\)'):
        resample_generator(torch.randn(15, 8), None, 6)
    with pytest.raises(TypeError, match='target must be'):
        resample_state_dict({}, 'big')


# ------------------------------------------------------------------------------------------
# 2 / 6. state dicts, the checkpoint filter, timm loading, load_model
# ------------------------------------------------------------------------------------------

def test_identity_at_original_size(trained_like, tmp_path):
    sd = trained_like.state_dict()
    same = resample_state_dict(sd, 32)
    assert same.keys() == sd.keys() and all(same[k] is sd[k] for k in sd)
    filtered = checkpoint_filter_fn(sd, trained_like)
    assert all(torch.equal(filtered[k], sd[k]) for k in sd)
    # and through timm: the reloaded model computes exactly what the original does
    path = _save(tmp_path, sd)
    reloaded = timm.create_model(NANO, img_size=32, num_classes=10, pretrained=True,
                                 pretrained_cfg_overlay=dict(file=path, num_classes=10)).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(reloaded(x), trained_like(x))


@pytest.mark.parametrize('size', [48, 24, (24, 64), (40, 16)])
def test_timm_pretrained_file_at_other_size(trained_like, tmp_path, size):
    sd = trained_like.state_dict()
    path = _save(tmp_path, {'state_dict': sd, 'epoch': 3})
    model = timm.create_model(NANO, img_size=size, num_classes=10, pretrained=True,
                              pretrained_cfg_overlay=dict(file=path, num_classes=10)).eval()
    new_sd = model.state_dict()
    expected = resample_state_dict(sd, size)
    for k, v in new_sd.items():
        assert torch.equal(v, expected[k]), k
        if '.generate.' not in k:
            assert torch.equal(v, sd[k]), k                 # per-token weights load unchanged
    h, w = model.img_size if isinstance(size, tuple) else (size, size)
    with torch.no_grad():
        out = model(torch.randn(4, 3, h, w))
        p = model.stages[0].blocks[0].token_mixer.mix_h.mixing_weights(torch.randn(2, w // 4, h // 4, 64))
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    assert p.shape == (2, w // 4, 4, h // 4, h // 4)
    torch.testing.assert_close(p.sum(-2), torch.ones_like(p.sum(-2)))


def test_model_target_equals_size_target(trained_like):
    sd = trained_like.state_dict()
    with torch.device('meta'):
        target = timm.create_model(NANO, img_size=(48, 24), num_classes=10)
    a = resample_state_dict(sd, target)
    b = resample_state_dict(sd, (48, 24))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a features_only wrapper works as a target too
    feats = timm.create_model(NANO, img_size=(48, 24), features_only=True)
    c = resample_state_dict(sd, feats)
    assert all(torch.equal(c[k], b[k]) for k in b)


def test_authors_layout_at_other_size(trained_like):
    sd = trained_like.state_dict()
    authors = to_authors(sd)
    assert any(k.startswith('network.4.') for k in authors)
    resampled = resample_state_dict(authors, 48)              # keeps the authors' layout
    assert resampled.keys() == authors.keys()
    key = 'network.2.1.attn.mix_w.generate.weight'           # stage 2 (after the transition): 6 tokens
    assert resampled[key].shape == (36, 12)
    target = _nano(48)
    ours = resample_state_dict(sd, 48)
    via_filter = checkpoint_filter_fn({'state_dict': {'module.' + k: v for k, v in authors.items()}}, target)
    assert via_filter.keys() == ours.keys() and all(torch.equal(via_filter[k], ours[k]) for k in ours)
    via_model = resample_state_dict(authors, target)
    assert all(torch.equal(via_model[k], ours[k]) for k in ours)


def test_static_mixing_at_other_size(tmp_path):
    model = _nano(32, mixing='static')
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith('static_logits'):
                p.normal_()
    path = _save(tmp_path, model.state_dict())
    big = timm.create_model(NANO, img_size=(48, 32), num_classes=10, mixing='static', pretrained=True,
                            pretrained_cfg_overlay=dict(file=path, num_classes=10)).eval()
    old = model.stages[1].blocks[0].token_mixer.mix_h.static_logits
    new = big.stages[1].blocks[0].token_mixer.mix_h.static_logits
    assert new.shape == (8, 6, 6)
    m = _ref_linear_matrix(4, 6)
    torch.testing.assert_close(new.double(), torch.stack([m @ l @ m.T for l in old.double()]), rtol=1e-6, atol=1e-6)
    assert torch.equal(big.stages[1].blocks[0].token_mixer.mix_w.static_logits,
                       model.stages[1].blocks[0].token_mixer.mix_w.static_logits)   # width unchanged: 32
    assert torch.isfinite(big(torch.randn(2, 3, 48, 32))).all()


def test_other_architecture_still_refused(trained_like):
    """Resampling converts only the token count: weights of another architecture still do not
    load (the filter converts, the load judges the fit)."""
    sd = trained_like.state_dict()
    for kwargs, match in [(dict(reduced_dim=4), r'shape mismatch.*mix_h\.reduce\.weight.*generate\.weight'),
                          (dict(depths=(2, 2, 3, 2)), 'model weights missing'),
                          (dict(embed_dims=(64, 96, 96, 96)), 'shape mismatch')]:
        model = _nano(48, **kwargs)
        with pytest.raises(ValueError, match=match):
            model.load_state_dict(checkpoint_filter_fn(sd, model))


def test_resample_to_shapes_leaves_other_mismatches(trained_like):
    sd = trained_like.state_dict()
    key = 'stages.0.blocks.0.token_mixer.mix_h.generate.weight'
    shapes = {k: v.shape for k, v in sd.items()}
    shapes[key] = torch.Size((144, 48))                        # N 8 -> 12 but d 2 -> 4: not resampled
    assert resample_to_shapes(sd, shapes)[key] is sd[key]


def test_load_model_at_other_size(trained_like, tmp_path):
    checkpoint = {
        'state_dict': trained_like.state_dict(), 'epoch': 1, 'step': 10,
        'config': {'model': NANO, 'model_kwargs': {'img_size': 32, 'num_classes': 10}},
        'class_names': [str(i) for i in range(10)],
    }
    path = _save(tmp_path, checkpoint, 'train.pth')
    model, info = load_model(path, img_size=(48, 40))
    assert info['model'] == NANO and info['num_classes'] == 10
    assert tuple(model.img_size) == (48, 40)
    sd = model.state_dict()
    expected = resample_state_dict(trained_like.state_dict(), (48, 40))
    assert all(torch.equal(sd[k], expected[k]) for k in sd)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, 48, 40))).all()


def test_trained_img_size_read_from_weights(trained_like):
    assert trained_img_size(trained_like.state_dict()) == (32, 32)
    assert trained_img_size(to_authors(_nano((48, 24)).state_dict())) == (48, 24)
    assert trained_img_size(_nano(16, mixing='static').state_dict()) == (16, 16)
    with torch.device('meta'):
        assert trained_img_size(timm.create_model('dynamixer_m', img_size=(448, 224)).state_dict()) == (448, 224)
    assert trained_img_size({'head.weight': torch.zeros(3, 4)}) is None


def test_load_model_bare_state_dict_keeps_its_size(tmp_path):
    # no config: the variant and the size it was trained at are read from the weights
    trained = _nano((48, 24))
    path = _save(tmp_path, trained.state_dict(), 'bare48.pth')
    model, info = load_model(path)
    assert info['model'] == NANO and tuple(model.img_size) == (48, 24)
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in model.state_dict().items())
    model, _ = load_model(path, img_size=32)                   # and resampled on request
    assert tuple(model.img_size) == (32, 32)


def test_resampled_op_follows_resampled_input():
    """Sensible, not just finite: on an input that is an interpolated sequence, the resampled op
    approximates the interpolated output of the original op far better than fresh generators do."""
    torch.manual_seed(0)
    n, n_new, dim = 8, 16, 32
    op = DynaMixerOp(dim, n, num_segments=4, reduced_dim=2)
    with torch.no_grad():
        op.generate.weight.normal_(0, 0.5)                     # sharp, input-dependent mixing
    m = resampling_matrix(n, n_new).float()
    smooth = F.interpolate(torch.randn(64, dim, 4), size=n, mode='linear', align_corners=False)
    x = smooth.transpose(1, 2)                                 # (64, N, dim), smooth along the tokens
    x_new = m @ x
    with torch.no_grad():
        target = m @ op(x)
        errors = {}
        for name in ('resampled', 'random'):
            op_new = DynaMixerOp(dim, n_new, num_segments=4, reduced_dim=2)
            sd = op.state_dict()
            if name == 'resampled':
                sd = resample_to_shapes(sd, {k: v.shape for k, v in op_new.state_dict().items()})
            else:
                sd = {k: (op_new.state_dict()[k] if 'generate' in k else v) for k, v in sd.items()}
            op_new.load_state_dict(sd)
            errors[name] = ((op_new(x_new) - target).norm() / target.norm()).item()
    assert errors['resampled'] < 0.5 * errors['random'], errors


# ------------------------------------------------------------------------------------------
# 4. dense prediction: features at any size
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize('size', [32, (48, 64), (24, 40), (16, 8)])
def test_features_only_any_size(size):
    h, w = (size, size) if isinstance(size, int) else size
    model = timm.create_model(NANO, features_only=True, img_size=size).eval()
    assert model.feature_info.reduction() == [4, 8, 8, 8]
    assert model.feature_info.channels() == [64, 128, 128, 128]
    x = torch.randn(2, 3, h, w)
    with torch.no_grad():
        feats = model(x)
    assert [tuple(f.shape) for f in feats] == [
        (2, c, h // r, w // r) for c, r in zip(model.feature_info.channels(), model.feature_info.reduction())]
    sub = timm.create_model(NANO, features_only=True, img_size=size, out_indices=(0, 2))
    assert sub.feature_info.reduction() == [4, 8]
    assert [f.shape[1:] for f in sub(x)] == [feats[0].shape[1:], feats[2].shape[1:]]


@pytest.mark.parametrize('size', [(48, 64), (40, 24)])
def test_forward_intermediates_any_size(size):
    h, w = size
    model = _nano(size)
    x = torch.randn(2, 3, h, w)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        nhwc = model.forward_intermediates(x, indices=[1, 3], output_fmt='NHWC', intermediates_only=True)
    reductions = [info['reduction'] for info in model.feature_info]
    assert reductions == [4, 8, 8, 8]
    assert [tuple(t.shape[-2:]) for t in inter] == [(h // r, w // r) for r in reductions]
    assert final.shape == (2, h // 8, w // 8, 128)
    assert torch.equal(nhwc[0], inter[1].permute(0, 2, 3, 1))
    with torch.no_grad():
        torch.testing.assert_close(model.forward_head(final), model(x))


def test_features_only_with_weights_from_another_size(trained_like, tmp_path):
    path = _save(tmp_path, trained_like.state_dict())
    # the overlay's num_classes names the checkpoint's head, which features_only then drops
    feats = timm.create_model(NANO, features_only=True, img_size=(48, 24), pretrained=True,
                              pretrained_cfg_overlay=dict(file=path, num_classes=10)).eval()
    full = timm.create_model(NANO, img_size=(48, 24), num_classes=10, pretrained=True,
                             pretrained_cfg_overlay=dict(file=path, num_classes=10)).eval()
    x = torch.randn(1, 3, 48, 24)
    with torch.no_grad():
        a = feats(x)
        b = full.forward_intermediates(x, intermediates_only=True)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def _load_example(name):
    path = os.path.join(ROOT, 'examples', f'{name}.py')
    spec = importlib.util.spec_from_file_location(f'example_{name}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_segmentation_example_learns(trained_like, tmp_path):
    seg = _load_example('segmentation')
    images, masks = seg.make_shapes(3, (24, 40), torch.Generator().manual_seed(0))
    assert images.shape == (3, 3, 24, 40) and masks.shape == (3, 24, 40)
    assert set(masks.unique().tolist()) <= {0, 1, 2} and (masks > 0).any()
    # backbone from weights trained at 32x32, used at a non-square size
    path = _save(tmp_path, trained_like.state_dict())
    out = seg.train(NANO, img_size=(32, 48), steps=16, batch=4, lr=2e-3, seed=0, checkpoint=path,
                    log_every=0, eval_images=4)
    losses = out['losses']
    assert len(losses) == 16 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-4:]) / 4 < 0.9 * sum(losses[:4]) / 4, losses
    assert 0 <= out['miou'] <= 1


def test_resample_keeps_dtype():
    w, b = torch.randn(16, 8, dtype=torch.bfloat16), torch.randn(16, dtype=torch.bfloat16)
    new_w, new_b = resample_generator(w, b, 6)
    assert new_w.dtype == new_b.dtype == torch.bfloat16
    ref_w, ref_b = resample_generator(w.double(), b.double(), 6)
    torch.testing.assert_close(new_w.double(), ref_w, rtol=1e-2, atol=1e-2)

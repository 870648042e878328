"""timm's contract for models (timm 1.0.31): device/dtype factory kwargs, meta construction,
in_chans adaptation of pretrained weights, and module swaps (quantisation, LoRA, pruning) that
must fall back to the plain path."""
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.utils.prune as prune

import dynamixer
from helpers import nano, randomize_, to_authors


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
    q.load_state_dict(q.state_dict())   # the fit check reads entries without a shape (packed params)
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


# ----------------------------------------------------------------- pretrained weights, timm's way
# timm calls checkpoint_filter_fn, then drops the classifier a new head does not want (the
# pretrained cfg's 'classifier', when num_classes differs), adapts the first conv to in_chans and
# loads; the fit is judged at that load (DynaMixer.load_state_dict). Every file kind this library
# reads, into a headless model, a new head, a one-channel model and the file's own head.

FILE_KINDS = ['project', 'bare', 'safetensors', 'authors', 'authors_ema']
SETTINGS = {
    'headless': dict(num_classes=0),
    'new_head': dict(num_classes=7),
    'gray_headless': dict(in_chans=1, num_classes=0),
    'gray_new_head': dict(in_chans=1, num_classes=7),
    'kept_head': dict(),
}


def _wrap(kind, state_dict):
    """`state_dict` (this project's keys) as the weights of a file of `kind`."""
    decoy = {k: torch.zeros_like(v) for k, v in state_dict.items()}
    if kind == 'project':     # `dynamixer train`'s last.pth: weights, optimiser, config, classes
        return {'state_dict': state_dict, 'optimizer': {}, 'epoch': 3, 'class_names': None,
                'config': {'model': 'dynamixer_nano'}}
    if kind in ('bare', 'safetensors'):
        return state_dict
    authors = to_authors(state_dict)
    if kind == 'authors':     # the authors' DDP checkpoint: 'module.' prefixes
        return {'state_dict': {'module.' + k: v for k, v in authors.items()}, 'epoch': 300}
    # their EMA checkpoint: the EMA weights are the ones to load, the raw ones are a decoy
    return {'state_dict': {'module.' + k: v for k, v in to_authors(decoy).items()}, 'state_dict_ema': authors}


def _write(kind, state_dict, folder):
    from safetensors.torch import save_file
    if kind == 'safetensors':
        path = folder / 'weights.safetensors'
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    else:
        path = folder / f'{kind}.pth'
        torch.save(_wrap(kind, state_dict), path)
    return path


def _assert_loaded_from(model, src, num_classes=None, in_chans=3):
    """Every weight of `model` is `src`'s (the first conv as timm adapts it), the head as asked:
    none, the file's, or a fresh one (zero bias, std 0.02 as DynaMixer initialises it)."""
    from timm.models import adapt_input_conv
    got, want = model.state_dict(), src.state_dict()
    body = [k for k in want if not k.startswith('head.')]
    assert set(got) - {'head.weight', 'head.bias'} == set(body)
    for k in body:
        expected = want[k]
        if k == 'stem.proj.weight' and in_chans != expected.shape[1]:
            expected = adapt_input_conv(in_chans, expected.clone())
        assert torch.equal(got[k], expected), k
    if num_classes == 0:
        assert isinstance(model.head, nn.Identity) and 'head.weight' not in got
    elif num_classes is None or num_classes == src.num_classes:
        assert torch.equal(got['head.weight'], want['head.weight'])
        assert torch.equal(got['head.bias'], want['head.bias'])
    else:
        assert got['head.weight'].shape == (num_classes, model.num_features)
        assert torch.count_nonzero(got['head.bias']) == 0
        assert 0.014 < got['head.weight'].std().item() < 0.026


@pytest.fixture(scope='module')
def nano_files(tmp_path_factory):
    """Random (far from init) nano weights with the cfg's 1000 classes, in every file kind; at
    64x64 input, so the first stage's 16x16 token grid takes the fast mixing path."""
    torch.manual_seed(0)
    src = randomize_(nano(img_size=64), std=0.05).eval()
    folder = tmp_path_factory.mktemp('pretrained')
    return src, {kind: _write(kind, src.state_dict(), folder) for kind in FILE_KINDS}


@pytest.mark.parametrize('setting', list(SETTINGS))
@pytest.mark.parametrize('kind', FILE_KINDS)
def test_pretrained_file_of_every_kind_loads_as_timm_builds_it(nano_files, kind, setting):
    src, paths = nano_files
    kwargs = SETTINGS[setting]
    in_chans = kwargs.get('in_chans', 3)
    model = timm.create_model('dynamixer_nano', img_size=64, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(paths[kind])), **kwargs).eval()
    _assert_loaded_from(model, src, kwargs.get('num_classes'), in_chans)
    x = torch.rand(2, in_chans, 64, 64)
    with torch.no_grad(), dynamixer.set_fast_path(False):
        # a gray image through the summed first conv is the RGB model's gray image
        expected = src.forward_features(x.expand(-1, 3, -1, -1))
    # the switch decides at forward time (construction and loading do not read it): both paths
    for fast in (True, False):
        with torch.no_grad(), dynamixer.set_fast_path(fast):
            paths_taken = set(dynamixer.explain_paths(model, x).values())
            assert (paths_taken != {'plain'}) == fast, paths_taken
            torch.testing.assert_close(model.forward_features(x), expected, rtol=1e-4, atol=1e-5)
            if kwargs.get('num_classes') == 0:
                torch.testing.assert_close(model(x), expected.mean((1, 2)), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('kind', FILE_KINDS)
def test_pretrained_file_of_every_kind_gives_features_only_backbone(nano_files, kind):
    src, paths = nano_files
    backbone = timm.create_model('dynamixer_nano', img_size=64, pretrained=True, features_only=True,
                                 pretrained_cfg_overlay=dict(file=str(paths[kind]))).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = src.forward_intermediates(x, intermediates_only=True)
        for got, want in zip(backbone(x), expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def _meta_weights(name, kind, **kwargs):
    """A registered model's weights on the meta device (shapes only), wrapped as a file of `kind`."""
    sd = timm.create_model(name, device='meta', **kwargs).state_dict()
    return _wrap('bare' if kind == 'safetensors' else kind, sd)


def _assert_built_as_asked(model, num_classes=1000, in_chans=3):
    assert model.num_classes == num_classes
    assert model.stem.proj.weight.shape[1] == in_chans
    if num_classes == 0:
        assert isinstance(model.head, nn.Identity)
    else:
        assert model.head.weight.shape == (num_classes, model.num_features)
    assert all(p.device.type == 'meta' for p in model.parameters())


@pytest.mark.parametrize('name', dynamixer.list_models())
def test_every_registered_model_loads_pretrained_weights_on_meta(name):
    """The key and shape logic for S / M / L at full size, without allocating them (meta): every
    layout headless, and every setting from the authors' EMA checkpoint (values: the nano tests
    above and the slow full-size test)."""
    for kind in ('project', 'bare', 'authors'):
        model = timm.create_model(name, pretrained=True, device='meta', num_classes=0,
                                  pretrained_cfg_overlay=dict(state_dict=_meta_weights(name, kind)))
        _assert_built_as_asked(model, num_classes=0)
    weights = _meta_weights(name, 'authors_ema')
    for kwargs in SETTINGS.values():
        model = timm.create_model(name, pretrained=True, device='meta',
                                  pretrained_cfg_overlay=dict(state_dict=weights), **kwargs)
        _assert_built_as_asked(model, **kwargs)


# another variant's weights at the same input size
_OTHER = {'dynamixer_s': ('dynamixer_m', {}), 'dynamixer_m': ('dynamixer_l', {}), 'dynamixer_l': ('dynamixer_s', {}),
          'dynamixer_nano': ('dynamixer_nano', dict(embed_dims=(32, 128, 128, 128)))}


@pytest.mark.parametrize('name', dynamixer.list_models())
def test_every_registered_model_refuses_another_models_weights_headless(name):
    other, other_kwargs = _OTHER[name]
    weights = _meta_weights(other, 'authors', **other_kwargs)
    for setting in ('headless', 'new_head', 'gray_headless'):
        with pytest.raises(ValueError, match='does not fit this model'):
            timm.create_model(name, pretrained=True, device='meta', pretrained_cfg_overlay=dict(state_dict=weights),
                              **SETTINGS[setting])


@pytest.mark.slow
@pytest.mark.parametrize('name', ['dynamixer_s', 'dynamixer_m', 'dynamixer_l'])
def test_full_size_models_load_every_file_kind(tmp_path, name):
    """S / M / L in float from real files of every kind (the meta test above checks shapes only)."""
    torch.manual_seed(0)
    src = timm.create_model(name).eval()
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.01 * torch.randn_like(p))   # off init, so init-valued weights would show
    for kind in FILE_KINDS:    # every kind headless (the common case); every setting from one
        path = _write(kind, src.state_dict(), tmp_path)
        for setting in SETTINGS if kind == 'authors_ema' else ['headless']:
            kwargs = SETTINGS[setting]
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
            _assert_loaded_from(model, src, kwargs.get('num_classes'), kwargs.get('in_chans', 3))
            if kind == 'project':    # and it computes the file's features, on both paths
                x = torch.rand(1, 3, 224, 224)
                with torch.no_grad():
                    with dynamixer.set_fast_path(False):
                        expected = src.forward_features(x)
                    for fast in (True, False):
                        with dynamixer.set_fast_path(fast):
                            torch.testing.assert_close(model.eval().forward_features(x), expected,
                                                       rtol=1e-4, atol=1e-4)
            del model
        path.unlink()


# the clear errors for weights that do not fit, now raised where timm loads them

@pytest.mark.parametrize('kwargs', [dict(num_classes=0), dict(num_classes=7), dict(in_chans=1, num_classes=0),
                                    dict(features_only=True)])
def test_other_architecture_is_refused_at_load(tmp_path, kwargs):
    path = tmp_path / 'wide.pth'
    torch.save({'state_dict': nano(embed_dims=(32, 128, 128, 128)).state_dict()}, path)
    with pytest.raises(ValueError, match=r'does not fit this model.*widths \(32, 128, 128, 128\)'):
        timm.create_model('dynamixer_nano', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)


@pytest.mark.parametrize('kwargs', [dict(num_classes=0), dict(num_classes=7), dict()])
def test_missing_weights_are_refused_even_when_timm_loads_non_strictly(tmp_path, kwargs):
    """timm loads non-strictly after dropping the classifier: that must not let other weights
    go missing (they would stay at random init)."""
    sd = nano().state_dict()
    del sd['stages.3.blocks.1.mlp.fc1.weight']
    path = tmp_path / 'edited.pth'
    torch.save(sd, path)
    with pytest.raises(ValueError, match=r'1 model weights missing.*stages.3.blocks.1.mlp.fc1.weight.*incomplete'):
        timm.create_model('dynamixer_nano', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)


def test_kept_head_of_another_class_count_is_explained(tmp_path):
    path = tmp_path / 'ten.safetensors'
    from safetensors.torch import save_file
    save_file(nano(num_classes=10).state_dict(), str(path))
    with pytest.raises(ValueError, match='classifier has 10 classes, the model 1000.*num_classes=10'):
        timm.create_model('dynamixer_nano', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    # with the class count the head loads; headless, it is dropped
    model = timm.create_model('dynamixer_nano', pretrained=True, num_classes=10,
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=10))
    assert model.head.out_features == 10
    for kwargs in (dict(num_classes=0), dict(features_only=True), dict(num_classes=3)):
        timm.create_model('dynamixer_nano', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)


@pytest.mark.parametrize('suffix', ['.pth', '.safetensors'])
def test_truncated_file_is_refused_before_loading(tmp_path, suffix):
    from safetensors.torch import save_file
    path = tmp_path / f'cut{suffix}'
    sd = nano().state_dict()
    torch.save(sd, path) if suffix == '.pth' else save_file(sd, str(path))
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    with pytest.raises(ValueError, match='truncated'):
        timm.create_model('dynamixer_nano', pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=str(path)))


def test_load_state_dict_names_the_mismatch_and_keeps_torchs_non_strict_meaning():
    from dynamixer.model import WeightsMismatchError
    model = nano()
    other = nano(embed_dims=(32, 128, 128, 128)).state_dict()
    with pytest.raises(WeightsMismatchError, match='does not fit this model') as e:
        model.load_state_dict(other)
    assert isinstance(e.value, ValueError) and isinstance(e.value, RuntimeError)   # ours and torch's
    before = model.stem.proj.weight.clone()
    with pytest.raises(RuntimeError, match='size mismatch'):      # not a pretrained load: torch's rules
        model.load_state_dict(other, strict=False)
    partial = {k: v for k, v in nano().state_dict().items() if k.startswith('stages.0.')}
    result = model.load_state_dict(partial, strict=False)
    assert 'stem.proj.weight' in result.missing_keys and not result.unexpected_keys
    assert torch.equal(model.stem.proj.weight, before)
    # the authors' keys, or a whole training checkpoint, say how to convert them
    with pytest.raises(ValueError, match='checkpoint_filter_fn'):
        model.load_state_dict(to_authors(nano().state_dict()))


# ----------------------------------------------------------------- channels-last output, declared

@pytest.mark.parametrize('name', dynamixer.list_models())
def test_output_fmt_declares_the_layout_of_forward_features(name):
    from timm.layers import get_channel_dim, get_spatial_dim
    model = timm.create_model(name, device='meta')
    assert model.output_fmt == 'NHWC' and model.feature_dim == -1
    size = timm.get_pretrained_cfg_value(name, 'input_size')
    feats = model.forward_features(torch.empty(2, *size, device='meta'))
    assert feats.shape[get_channel_dim(model.output_fmt)] == model.num_features
    assert feats.shape[model.feature_dim] == model.num_features
    spatial = get_spatial_dim(model.output_fmt)
    assert (feats.shape[spatial[0]], feats.shape[spatial[1]]) == model.grid_sizes[-1]


def test_forward_features_intermediates_head_and_features_only_agree():
    torch.manual_seed(0)
    model = randomize_(nano(num_classes=5), std=0.1).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(x)                                   # (B, H, W, C)
        final, nhwc = model.forward_intermediates(x, output_fmt='NHWC')
        _, nchw = model.forward_intermediates(x, output_fmt='NCHW')
        _, normed = model.forward_intermediates(x, norm=True)
        torch.testing.assert_close(final, feats, rtol=0, atol=0)
        torch.testing.assert_close(normed[-1], feats.permute(0, 3, 1, 2), rtol=0, atol=0)
        for a, b in zip(nhwc, nchw, strict=True):
            torch.testing.assert_close(a.permute(0, 3, 1, 2), b, rtol=0, atol=0)
        torch.testing.assert_close(model.forward_head(feats), model(x), rtol=0, atol=0)
        torch.testing.assert_close(model.forward_head(feats, pre_logits=True), feats.mean((1, 2)), rtol=0, atol=0)
        model.reset_classifier(0, '')                                       # no pooling: the map, NHWC
        torch.testing.assert_close(model(x), feats, rtol=0, atol=0)
    # features_only: the getter's maps are NCHW (and say so), the hook / list / dict maps the
    # model's own NHWC (and say so, from output_fmt); all are forward_intermediates' maps
    for cls in ('getter', 'hook', 'list', 'dict'):
        backbone = timm.create_model('dynamixer_nano', features_only=True, feature_cls=cls).eval()
        backbone.load_state_dict({k: v for k, v in _backbone_weights(model, backbone).items()})
        with torch.no_grad():
            out = backbone(x)
        out = list(out.values()) if isinstance(out, dict) else out
        assert backbone.output_fmt == ('NCHW' if cls == 'getter' else 'NHWC'), cls
        want = nchw if cls == 'getter' else nhwc
        for got, expected, chans in zip(out, want, backbone.feature_info.channels(), strict=True):
            assert got.shape[timm.layers.get_channel_dim(backbone.output_fmt)] == chans
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def _backbone_weights(model, backbone):
    """`model`'s weights under the names of a features_only wrapper `backbone`."""
    own = model.state_dict()
    out = {}
    for k in backbone.state_dict():
        plain = k[len('model.'):] if k.startswith('model.') else k
        plain = plain.replace('stages_', 'stages.')
        out[k] = own[plain]
    return out

"""The copy-free fast path (src/dynamixer/fast_mixing.py) against slow independent references.

Float64 throughout the comparisons: the op and block against tests/reference.py (loops over the
spec's equations), the autograd Functions with gradcheck, the network against the plain path and
against reference_logits, and TorchScript / FX / torch.compile against eager.
"""
import copy

import pytest
import timm
import torch

import dynamixer.model as dm
from dynamixer.fast_mixing import (
    DynamicMix, ReweightedSum, generator_rows_out_major, reduced_token_major,
    reweighted_sum)
from dynamixer.model import DynaMixerBlock, DynaMixerOp

from reference import reference_block, reference_logits, reference_op, make_authors_state_dict


@pytest.fixture(autouse=True)
def _fast_path_for_every_size(monkeypatch):
    # the library keeps sequences shorter than 16 tokens on the plain path; test the fast one
    monkeypatch.setattr(dm, 'FAST_PATH_MIN_TOKENS', 1)


def test_short_sequences_take_the_plain_path(monkeypatch):
    monkeypatch.setattr(dm, 'FAST_PATH_MIN_TOKENS', 16)
    calls = []
    monkeypatch.setattr(DynaMixerBlock, 'forward_fast', lambda self, x: calls.append(1))
    DynaMixerBlock(8, (8, 16), 2, 2)(torch.randn(1, 8, 16, 8))
    assert not calls
    DynaMixerBlock(8, (16, 16), 2, 2)(torch.randn(1, 16, 16, 8))
    assert calls


def _randomize(module, std=0.5):
    # away from the init so that mixing matrices are far from uniform and every branch matters
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)
    return module


def _op_weights(op: DynaMixerOp, name: str):
    return {f'{name}.compress.weight': op.reduce.weight, f'{name}.compress.bias': op.reduce.bias,
            f'{name}.generate.weight': op.generate.weight, f'{name}.generate.bias': op.generate.bias,
            f'{name}.out.weight': op.proj.weight, f'{name}.out.bias': op.proj.bias}


def _block_weights(blk: DynaMixerBlock, name: str = 'b'):
    w = {**_op_weights(blk.mix_h, name + '.mix_h'), **_op_weights(blk.mix_w, name + '.mix_w'),
         f'{name}.mlp_c.weight': blk.mix_c.weight,
         f'{name}.proj.weight': blk.proj.weight, f'{name}.proj.bias': blk.proj.bias}
    if blk.reweight is not None:
        for fc in ('fc1', 'fc2'):
            w[f'{name}.reweight.{fc}.weight'] = getattr(blk.reweight, fc).weight
            w[f'{name}.reweight.{fc}.bias'] = getattr(blk.reweight, fc).bias
    return w


def _grads_close(params_a, params_b, rtol=1e-9):
    for a, b in zip(params_a, params_b):
        assert a.grad is not None and b.grad is not None
        torch.testing.assert_close(a.grad, b.grad, rtol=rtol, atol=rtol * b.grad.abs().max().item())


@pytest.mark.parametrize('n,dim,segments,d', [(7, 15, 3, 3), (5, 8, 1, 2), (4, 12, 4, 1)])
def test_op_forward_and_grads_match_reference(n, dim, segments, d):
    op = _randomize(DynaMixerOp(dim, n, segments, d).double())
    x = torch.randn(3, 2, n, dim, dtype=torch.float64, requires_grad=True)
    y = op(x)
    w = {k: v.detach().clone().requires_grad_() for k, v in _op_weights(op, 'op').items()}
    xr = x.detach().clone().requires_grad_()
    yr = reference_op(xr.reshape(-1, n, dim), w, 'op').reshape(x.shape)
    torch.testing.assert_close(y, yr, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (yr * g).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-9, atol=1e-10)
    _grads_close([p for p in _op_weights(op, 'op').values()], list(w.values()))


@pytest.mark.parametrize('reweight', [True, False])
@pytest.mark.parametrize('grid,dim,segments,d', [((5, 7), 12, 3, 3), ((4, 4), 8, 2, 2)])
def test_block_forward_and_grads_match_reference(reweight, grid, dim, segments, d):
    blk = _randomize(DynaMixerBlock(dim, grid, segments, d, reweight=reweight).double(), std=0.3)
    x = torch.randn(2, *grid, dim, dtype=torch.float64, requires_grad=True)
    y = blk(x)
    w = {k: v.detach().clone().requires_grad_() for k, v in _block_weights(blk).items()}
    xr = x.detach().clone().requires_grad_()
    yr = reference_block(xr, w, 'b', reweight=reweight)
    torch.testing.assert_close(y, yr, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (yr * g).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-9, atol=1e-10)
    _grads_close(list(_block_weights(blk).values()), list(w.values()))


@pytest.mark.parametrize('chunked', [False, True])
@pytest.mark.parametrize('reweight', [True, False])
@pytest.mark.parametrize('grid,dim,segments,d', [((5, 7), 12, 3, 3), ((6, 6), 8, 2, 2)])
def test_block_inference_path_matches_reference(monkeypatch, chunked, reweight, grid, dim, segments, d):
    """No autograd: both mixing branches write into one buffer that feeds one GEMM per image chunk."""
    import dynamixer.fast_mixing as fm
    if chunked:   # one sequence batch entry and one image per chunk
        monkeypatch.setattr(fm, 'CHUNK_ELEMENTS', 1)
        monkeypatch.setattr(fm, 'WEIGHT_CHUNK_ELEMENTS', 1)
    blk = _randomize(DynaMixerBlock(dim, grid, segments, d, reweight=reweight).double(), std=0.3)
    x = torch.randn(3, *grid, dim, dtype=torch.float64)
    calls = []
    real = fm.reweighted_sum
    monkeypatch.setattr(dm, 'reweighted_sum', lambda inputs, *a: calls.append(len(inputs)) or real(inputs, *a))
    with torch.no_grad():
        y = blk(x)
    assert calls == [2]   # [h | w] buffer and the block input
    yr = reference_block(x, _block_weights(blk), 'b', reweight=reweight)
    torch.testing.assert_close(y, yr, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('chunk', [1, 7, 10_000])
def test_layer_inference_path_equals_plain_layer(monkeypatch, chunk):
    """Eval-mode CPU inference runs the MLP over chunks of tokens, in place; same function."""
    import dynamixer.fast_mlp as fmlp
    monkeypatch.setattr(fmlp, 'MLP_CHUNK_TOKENS', chunk)
    calls = []
    real = fmlp.mlp_residual_inference_
    monkeypatch.setattr(dm, 'mlp_residual_inference_', lambda *a: calls.append(1) or real(*a))
    layer = _randomize(dm.MixerLayer(12, (5, 7), 3, 3, drop_path=0.2).double(), std=0.3).eval()
    x = torch.randn(2, 5, 7, 12, dtype=torch.float64)
    x0 = x.clone()
    with torch.no_grad():
        fused = layer(x)
        assert calls == [1]
        plain = x + layer.token_mixer(layer.norm1(x))
        plain = plain + layer.mlp(layer.norm2(plain))
    assert torch.equal(x, x0)   # the input is not modified in place
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)
    # training mode (drop-path active), autograd, and CPU autocast do not take it
    assert not layer.train()._fast_mlp_ok(x)[1]
    layer.eval()
    assert layer._fast_mlp_ok(x.requires_grad_()) == (True, False)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        assert layer._fast_mlp_ok(x) == (False, False)


def test_recompute_gelu_mlp_gradcheck_and_layer_training():
    from dynamixer.fast_mlp import RecomputeGeluMlp
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    w1, b1 = torch.randn(9, 4, dtype=torch.float64, requires_grad=True), torch.randn(9, dtype=torch.float64, requires_grad=True)
    w2, b2 = torch.randn(4, 9, dtype=torch.float64, requires_grad=True), torch.randn(4, dtype=torch.float64, requires_grad=True)
    for approximate in ('none', 'tanh'):
        assert torch.autograd.gradcheck(lambda *a: RecomputeGeluMlp.apply(*a, approximate), (x, w1, b1, w2, b2))
    # in a training layer it replaces the MLP module: same output and gradients as the plain layer
    layer = _randomize(dm.MixerLayer(12, (5, 7), 3, 3).double(), std=0.3).train()
    x = torch.randn(2, 5, 7, 12, dtype=torch.float64, requires_grad=True)
    assert layer._fast_mlp_ok(x) == (True, False)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        y = layer(x)
    hidden = 2 * 5 * 7 * 36
    assert sum(1 for shp in saved if shp.numel() == hidden) == 1   # one (tokens, 3C) tensor: fc1's output
    y.square().sum().backward()
    grads = {k: p.grad.clone() for k, p in layer.named_parameters()}
    xg = x.grad.clone()
    layer.zero_grad()
    x.grad = None
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        xx = x + layer.token_mixer(layer.norm1(x))
        y_plain = xx + layer.mlp(layer.norm2(xx))
    assert sum(1 for shp in saved if shp.numel() == hidden) == 3   # the plain MLP keeps two
    torch.testing.assert_close(y, y_plain, rtol=1e-12, atol=1e-12)
    y_plain.square().sum().backward()
    torch.testing.assert_close(x.grad, xg, rtol=1e-10, atol=1e-12)
    for k, p in layer.named_parameters():
        torch.testing.assert_close(grads[k], p.grad, rtol=1e-10, atol=1e-12, msg=k)


def test_block_uses_fast_path_and_stores_no_mixing_matrices():
    blk = _randomize(DynaMixerBlock(16, (8, 8), 4, 2))
    x = torch.randn(2, 8, 8, 16, requires_grad=True)
    saved = []

    def pack(t):
        saved.append((t.shape, t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        blk(x)
    # no (..., S, N, N) mixing matrices; of the (B, H, W, C)-sized tensors only the block input,
    # the two mixed-token tensors and the projection's input (h, w, c are never formed)
    assert not any(len(s) >= 2 and s[-1] == s[-2] == 8 for s, _, _ in saved)
    big = {ptr for _, ptr, nbytes in saved if nbytes >= x.numel() * x.element_size()}
    assert x.untyped_storage().data_ptr() in big
    assert len(big) == 4, saved


def test_dynamic_mix_gradcheck():
    b, n, l, s, cs, d = 2, 5, 3, 3, 2, 2
    x4 = torch.randn(b, n, l, s * cs, dtype=torch.float64, requires_grad=True)
    r2 = torch.randn(b * l * s, n * d, dtype=torch.float64, requires_grad=True)
    w = torch.randn(n * n, n * d, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(n * n, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: DynamicMix.apply(*a, s), (x4, r2, w, bias))
    # the L == 1 layout (rows of the grid) and a strided input
    x4 = torch.randn(b * l, n, 1, 2 * s * cs, dtype=torch.float64)[..., ::2].requires_grad_()
    r2 = torch.randn(b * l * s, n * d, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: DynamicMix.apply(*a, s), (x4, r2, w, bias))


@pytest.mark.parametrize('sequences_per_chunk', [1, 2, 4, 7])   # within an image, whole images
def test_dynamic_mix_chunking(monkeypatch, sequences_per_chunk):
    import dynamixer.fast_mixing as fm
    b, n, l, s, cs, d = 5, 4, 3, 2, 3, 2
    x4 = torch.randn(b, n, l, s * cs, dtype=torch.float64, requires_grad=True)
    r2 = torch.randn(b * l * s, n * d, dtype=torch.float64, requires_grad=True)
    w = torch.randn(n * n, n * d, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(n * n, dtype=torch.float64, requires_grad=True)
    whole = DynamicMix.apply(x4, r2, w, bias, s)
    g = torch.randn_like(whole)
    grads = torch.autograd.grad(whole, (x4, r2, w, bias), g)
    monkeypatch.setattr(fm, 'CHUNK_ELEMENTS', sequences_per_chunk * s * n * n)
    chunks = fm._chunks(x4, s)
    assert len(chunks) == (b * -(-l // sequences_per_chunk) if sequences_per_chunk < l else -(-b // (sequences_per_chunk // l)))
    chunked = DynamicMix.apply(x4, r2, w, bias, s)
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-12)
    for a, c in zip(torch.autograd.grad(chunked, (x4, r2, w, bias), g), grads):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)


def test_generator_permutation_gives_softmax_over_input_tokens():
    n, d, s = 4, 2, 3
    w, bias = torch.randn(n * n, n * d, dtype=torch.float64), torch.randn(n * n, dtype=torch.float64)
    r = torch.randn(2, n, 1, s * d, dtype=torch.float64)
    wt, bt = generator_rows_out_major(w, bias, n)
    r2 = reduced_token_major(r, 2, n, 1, s, d)
    logits_t = (r2 @ wt.t() + bt).view(2, s, n, n)                    # [out j, in i]
    logits = (r2 @ w.t() + bias).view(2, s, n, n)                     # [in i, out j]
    torch.testing.assert_close(logits_t, logits.transpose(-1, -2))
    # token-major flattening: entry t*d + k is feature k of token t
    torch.testing.assert_close(r2.view(2, s, n, d)[1, 2, 3], r[1, 3, 0, 2 * d:3 * d])


def test_reweighted_sum_gradcheck_and_both_forms():
    bsz, c = 2, 3
    for t in (5, 2):   # more tokens than channels, and fewer
        branches = [torch.randn(bsz, t, c, dtype=torch.float64, requires_grad=True) for _ in range(3)]
        weights = [torch.randn(c, c, dtype=torch.float64, requires_grad=True) for _ in range(3)]
        biases = [torch.randn(c, dtype=torch.float64, requires_grad=True) for _ in range(2)] + [None]
        a = torch.rand(bsz, c, 3, dtype=torch.float64, requires_grad=True)
        direct = sum(a[:, None, :, k] * (branches[k] @ weights[k].t() + (biases[k] if biases[k] is not None else 0))
                     for k in range(3))
        with torch.no_grad():   # reweighted_sum writes into buffers; ReweightedSum is its autograd form
            torch.testing.assert_close(reweighted_sum(branches, weights, biases, a), direct)

        def fn(a, *args):
            return ReweightedSum.apply(a, *args)
        args = [v for k in range(3) for v in (branches[k], weights[k], biases[k])]
        assert torch.autograd.gradcheck(fn, (a, *args))


def _nano(**kw):
    torch.manual_seed(0)
    return _randomize(timm.create_model('dynamixer_nano', num_classes=5, **kw).double(), std=0.1)


@pytest.mark.parametrize('kw', [dict(img_size=(32, 48)), dict(reweight=False)])
def test_model_fast_path_equals_plain_path(monkeypatch, kw):
    model = _nano(**kw)
    x = torch.randn(2, 3, *model.img_size, dtype=torch.float64)
    y = model(x)
    y.square().sum().backward()
    fast = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    monkeypatch.setattr(dm, '_fast_path_ok', lambda x, dynamic, seq_len: False)
    y_plain = model(x)
    y_plain.square().sum().backward()
    torch.testing.assert_close(y, y_plain, rtol=1e-10, atol=1e-12)
    for k, p in model.named_parameters():
        torch.testing.assert_close(fast[k], p.grad, rtol=1e-8, atol=1e-10 * p.grad.abs().max().item(), msg=k)


def test_model_matches_spec_reference_non_square():
    w = make_authors_state_dict(depths=(1, 1), widths=(8, 16), transition_after=0, segments=(2, 4),
                                reduced_dim=2, grid=4, num_classes=3, patch_size=4, scale=0.5)
    model = dm.DynaMixer(img_size=(16, 24), patch_size=4, depths=(1, 1), embed_dims=(8, 16),
                         downsamples=(False, True), num_segments=(2, 4), reduced_dim=2, num_classes=3)
    # the authors' layout has square generators; build one for the 4x6 grid from the same scheme
    model = model.double()
    sd = dm.checkpoint_filter_fn(_resize_generators(w, model), model)
    model.load_state_dict(sd)
    x = torch.randn(2, 3, 16, 24, dtype=torch.float64)
    torch.testing.assert_close(model(x), reference_logits(_resize_generators(w, model), x), rtol=1e-9, atol=1e-10)


def _resize_generators(w, model):
    """Random generators of the sizes this (non-square) model needs, in the authors' layout."""
    g = torch.Generator().manual_seed(1)
    out = dict(w)
    sizes = {k: v.shape for k, v in model.state_dict().items()}
    flat = 0
    for i, stage in enumerate(model.stages):
        if isinstance(stage.downsample, dm.Downsample):
            flat += 1
        for j in range(len(stage.blocks)):
            for br in ('mix_h', 'mix_w'):
                for part in ('weight', 'bias'):
                    shape = sizes[f'stages.{i}.blocks.{j}.token_mixer.{br}.generate.{part}']
                    out[f'network.{flat}.{j}.attn.{br}.generate.{part}'] = torch.randn(
                        *shape, generator=g).double()
        flat += 1
    return out


def test_static_mixing_unchanged():
    blk = _randomize(DynaMixerBlock(8, (3, 5), 2, 2, mixing='static').double())
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64)

    def op(o, t):   # t: (..., N, C); independent einsum form of the static op
        p = o.static_logits.softmax(dim=-2)                              # (S, N_in, N_out)
        ts = t.unflatten(-1, (o.num_segments, -1))                       # (..., N, S, C/S)
        return o.proj(torch.einsum('sij,...isc->...jsc', p, ts).flatten(-2))
    h = op(blk.mix_h, x.transpose(1, 2)).transpose(1, 2)
    w = op(blk.mix_w, x)
    c = blk.mix_c(x)
    a = blk.reweight((h + w + c).mean((1, 2))).unflatten(-1, (8, 3)).softmax(-1)[:, None, None]
    expected = blk.proj(h * a[..., 0] + w * a[..., 1] + c * a[..., 2])
    torch.testing.assert_close(blk(x), expected)


def test_torchscript_and_fx_equal_eager():
    model = _nano().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    y = model(x)
    torch.testing.assert_close(torch.jit.script(model)(x), y, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.fx.symbolic_trace(model)(x), y, rtol=1e-10, atol=1e-12)


def test_bf16_and_grad_checkpointing():
    model = _nano().float()
    x = torch.randn(2, 3, 32, 32)
    y = model(x)
    yb = copy.deepcopy(model).to(torch.bfloat16)(x.bfloat16()).float()
    assert (yb - y).abs().max() <= 0.05 * y.abs().max()
    model.set_grad_checkpointing(True)
    y.sum().backward()
    g = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x).sum().backward()
    for a, p in zip(g, model.parameters()):
        torch.testing.assert_close(p.grad, a, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_torch_compile_equals_eager():
    model = _nano().float()
    x = torch.randn(2, 3, 32, 32)
    y = model(x)
    y.square().sum().backward()
    g = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    yc = torch.compile(model)(x)
    yc.square().sum().backward()
    torch.testing.assert_close(yc, y, rtol=1e-4, atol=1e-5)
    for a, p in zip(g, model.parameters()):
        torch.testing.assert_close(p.grad, a, rtol=1e-3, atol=1e-4 * a.abs().max().item())

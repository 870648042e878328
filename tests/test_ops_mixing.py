"""ops/mixing.py and the fast forms of the op and block (ops/fast_forms.py) against slow
independent references: tests/reference.py in float64, gradcheck, unchunked forms."""

import pytest
import torch

import dynamixer
from dynamixer.model import DynaMixerBlock, DynaMixerOp
from dynamixer.ops.mixing import (
    DynamicMix,
    ReweightedSum,
    generator_rows_out_major,
    reduced_token_major,
    reweighted_sum,
)
from helpers import authors_names, grads_close, randomize_
from reference import make_authors_state_dict, reference_block, reference_logits, reference_op

# these files test the fast path with its eager PyTorch kernels (ops.mixing, ops.mlp) on small
# modules; the compiled CPU kernels are tested in test_ops_cpu_kernels.py
pytestmark = pytest.mark.usefixtures('fast_path_every_size', 'eager_kernels')


@pytest.mark.parametrize('n,dim,segments,d', [(7, 15, 3, 3), (5, 8, 1, 2), (4, 12, 4, 1)])
def test_op_forward_and_grads_match_reference(n, dim, segments, d):
    op = randomize_(DynaMixerOp(dim, n, segments, d).double())
    x = torch.randn(3, 2, n, dim, dtype=torch.float64, requires_grad=True)
    y = op(x)
    w = {k: v.detach().clone().requires_grad_() for k, v in authors_names(op, 'op', keep_vars=True).items()}
    xr = x.detach().clone().requires_grad_()
    yr = reference_op(xr.reshape(-1, n, dim), w, 'op').reshape(x.shape)
    torch.testing.assert_close(y, yr, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (yr * g).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-9, atol=1e-10)
    grads_close([p for p in authors_names(op, 'op', keep_vars=True).values()], list(w.values()))


@pytest.mark.parametrize('reweight', [True, False])
@pytest.mark.parametrize('grid,dim,segments,d', [((5, 7), 12, 3, 3), ((4, 4), 8, 2, 2)])
def test_block_forward_and_grads_match_reference(reweight, grid, dim, segments, d):
    blk = randomize_(DynaMixerBlock(dim, grid, segments, d, reweight=reweight).double(), std=0.3)
    x = torch.randn(2, *grid, dim, dtype=torch.float64, requires_grad=True)
    y = blk(x)
    w = {k: v.detach().clone().requires_grad_() for k, v in authors_names(blk, 'b', keep_vars=True).items()}
    xr = x.detach().clone().requires_grad_()
    yr = reference_block(xr, w, 'b', reweight=reweight)
    torch.testing.assert_close(y, yr, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (yr * g).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-9, atol=1e-10)
    grads_close(list(authors_names(blk, 'b', keep_vars=True).values()), list(w.values()))


@pytest.mark.parametrize('chunked', [False, True])
@pytest.mark.parametrize('reweight', [True, False])
@pytest.mark.parametrize('grid,dim,segments,d', [((5, 7), 12, 3, 3), ((6, 6), 8, 2, 2)])
def test_block_inference_path_matches_reference(monkeypatch, chunked, reweight, grid, dim, segments, d):
    """No autograd: both mixing branches write into one buffer that feeds one GEMM per image chunk."""
    import dynamixer.ops.mixing as fm
    if chunked:   # one sequence batch entry and one image per chunk
        monkeypatch.setattr(fm, 'CHUNK_ELEMENTS', 1)
        monkeypatch.setattr(fm, 'WEIGHT_CHUNK_ELEMENTS', 1)
    blk = randomize_(DynaMixerBlock(dim, grid, segments, d, reweight=reweight).double(), std=0.3)
    x = torch.randn(3, *grid, dim, dtype=torch.float64)
    calls = []
    real = fm.reweighted_sum
    import dynamixer.ops.fast_forms as ff
    monkeypatch.setattr(ff, 'reweighted_sum', lambda inputs, *a: calls.append(len(inputs)) or real(inputs, *a))
    with torch.no_grad():
        assert dynamixer.explain_paths(blk, x) == {'': 'fast-inference', 'mix_h': 'fast-inference',
                                                   'mix_w': 'fast-inference'}
        calls.clear()
        y = blk(x)
    assert calls == [2]   # [h | w] buffer and the block input
    yr = reference_block(x, authors_names(blk, 'b', keep_vars=True), 'b', reweight=reweight)
    torch.testing.assert_close(y, yr, rtol=1e-10, atol=1e-10)


def test_block_uses_fast_path_and_stores_no_mixing_matrices():
    blk = randomize_(DynaMixerBlock(16, (8, 8), 4, 2))
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
    import dynamixer.ops.mixing as fm
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
    expected = b * -(-l // sequences_per_chunk) if sequences_per_chunk < l else -(-b // (sequences_per_chunk // l))
    assert len(chunks) == expected
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


def test_model_matches_spec_reference_non_square():
    w = make_authors_state_dict(depths=(1, 1), widths=(8, 16), transition_after=0, segments=(2, 4),
                                reduced_dim=2, grid=4, num_classes=3, patch_size=4, scale=0.5)
    model = dynamixer.DynaMixer(img_size=(16, 24), patch_size=4, depths=(1, 1), embed_dims=(8, 16),
                         downsamples=(False, True), num_segments=(2, 4), reduced_dim=2, num_classes=3)
    # the authors' layout has square generators; build one for the 4x6 grid from the same scheme
    model = model.double()
    sd = dynamixer.checkpoint_filter_fn(_resize_generators(w, model), model)
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
        if isinstance(stage.downsample, dynamixer.model.Downsample):
            flat += 1
        for j in range(len(stage.blocks)):
            for br in ('mix_h', 'mix_w'):
                for part in ('weight', 'bias'):
                    shape = sizes[f'stages.{i}.blocks.{j}.token_mixer.{br}.generate.{part}']
                    out[f'network.{flat}.{j}.attn.{br}.generate.{part}'] = torch.randn(
                        *shape, generator=g).double()
        flat += 1
    return out


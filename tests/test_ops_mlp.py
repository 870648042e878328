"""ops/mlp.py: the channel MLP's fast forms against the plain layer and gradcheck."""

import pytest
import torch

import dynamixer
from dynamixer.model import MixerLayer
from dynamixer.ops import dispatch
from helpers import randomize_

# these files test the fast path with its eager PyTorch kernels (ops.mixing, ops.mlp) on small
# modules; the compiled CPU kernels are tested in test_ops_cpu_kernels.py
pytestmark = pytest.mark.usefixtures('fast_path_every_size', 'eager_kernels')


@pytest.mark.parametrize('chunk', [1, 7, 10_000])
def test_layer_inference_path_equals_plain_layer(monkeypatch, chunk):
    """Eval-mode CPU inference runs the MLP over chunks of tokens, in place; same function."""
    import dynamixer.ops.mlp as fmlp
    monkeypatch.setattr(fmlp, 'MLP_CHUNK_TOKENS', chunk)
    layer = randomize_(MixerLayer(12, (5, 7), 3, 3, drop_path=0.2).double(), std=0.3).eval()
    x = torch.randn(2, 5, 7, 12, dtype=torch.float64)
    x0 = x.clone()
    with torch.no_grad():
        fused = layer(x)
        assert dynamixer.explain_paths(layer, x)['mlp'] == 'fast-inference'
        plain = x + layer.token_mixer(layer.norm1(x))
        plain = plain + layer.mlp(layer.norm2(plain))
    assert torch.equal(x, x0)   # the input is not modified in place
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)
    # training mode (drop-path active), autograd, and CPU autocast do not take it
    with torch.no_grad():
        assert dispatch.mlp_path(layer.train(), x) == 'fast-train'
    layer.eval()
    assert dispatch.mlp_path(layer, x.requires_grad_()) == 'fast-train'
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        assert dispatch.mlp_path(layer, x) == 'plain'


def test_recompute_gelu_mlp_gradcheck_and_layer_training():
    from dynamixer.ops.mlp import RecomputeGeluMlp
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    f64 = dict(dtype=torch.float64, requires_grad=True)
    w1, b1 = torch.randn(9, 4, **f64), torch.randn(9, **f64)
    w2, b2 = torch.randn(4, 9, **f64), torch.randn(4, **f64)
    for approximate in ('none', 'tanh'):
        def mlp(*a, approximate=approximate):
            return RecomputeGeluMlp.apply(*a, approximate)
        assert torch.autograd.gradcheck(mlp, (x, w1, b1, w2, b2))
    # in a training layer it replaces the MLP module: same output and gradients as the plain layer
    layer = randomize_(MixerLayer(12, (5, 7), 3, 3).double(), std=0.3).train()
    x = torch.randn(2, 5, 7, 12, dtype=torch.float64, requires_grad=True)
    assert dispatch.mlp_path(layer, x) == 'fast-train'
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


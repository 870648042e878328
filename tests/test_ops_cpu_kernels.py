"""The compiled CPU kernels (src/dynamixer/ops/cpu_kernels.py, csrc/) and the models on them.

Against tests/reference.py (the spec's equations, float64) on odd sizes, forward and every
gradient; `gradcheck` in float64; the GELU pair; and whole models on the 'cpp' paths of the
dispatch against the plain path in float32 (relative error <= 1e-5, logits and every gradient),
with `explain_paths` showing that the kernels ran. The extension is built once per session by
the `cpu_kernels_built` fixture (conftest.py; later sessions load the cached library). The
dispatch's rules for the kernels (switch, fallback) are tested in test_ops_dispatch.py.
"""
import os
import shutil

import pytest
import timm
import torch

import dynamixer
from dynamixer.ops import dispatch
from dynamixer.ops.mixing import DynamicMix, reduced_token_major
from reference import reference_op

pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture
def kernels(cpu_kernels_built):
    return cpu_kernels_built


def _inputs(b, n, l, c, s, d, dtype=torch.float64, seed=0):
    """Tokens, the reduce Linear's weights and the generator's (rows [in i, out j])."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(dtype)
    return dict(x=rnd(b, n, l, c), wc=rnd(s * d, c, std=0.5), bc=rnd(s * d, std=0.5),
                wg=rnd(n * n, n * d), bg=rnd(n * n))


def _kernel(t, s, d, fn):
    """Mixing by `fn` (the kernel's interface) from the tokens and the reduce Linear."""
    b, n, l, c = t['x'].shape
    r = t['x'] @ t['wc'].T + t['bc']                                   # (B, N, L, S*d)
    return fn(t['x'], reduced_token_major(r, b, n, l, s, d), t['wg'], t['bg'], s)


def _reference(t, s, d):
    """tests/reference.py's op (with an identity output projection) on every sequence."""
    b, n, l, c = t['x'].shape
    w = {'op.compress.weight': t['wc'], 'op.compress.bias': t['bc'], 'op.generate.weight': t['wg'],
         'op.generate.bias': t['bg'], 'op.out.weight': torch.eye(c, dtype=t['x'].dtype),
         'op.out.bias': torch.zeros(c, dtype=t['x'].dtype)}
    seqs = t['x'].permute(0, 2, 1, 3).reshape(b * l, n, c)
    return reference_op(seqs, w, 'op').view(b, l, n, c).permute(0, 2, 1, 3)


# (B, N, L, C, S, d): N not a multiple of the vector width (8 floats / 4 doubles), C/S = 5 or 3,
# S*d not a power of two, batch 1, one sequence, N under 16, N above 32, L > 1 with N != L
SIZES = [(1, 7, 1, 15, 3, 3), (2, 12, 3, 40, 4, 2), (2, 5, 4, 8, 2, 1), (1, 16, 2, 48, 16, 3),
         (3, 9, 2, 12, 4, 2), (1, 33, 2, 24, 3, 2), (2, 32, 3, 64, 8, 2)]


@pytest.mark.parametrize('size', SIZES)
def test_forward_and_gradients_match_reference(kernels, size):
    b, n, l, c, s, d = size
    t = {k: v.requires_grad_() for k, v in _inputs(b, n, l, c, s, d).items()}
    y = _kernel(t, s, d, kernels.cpp_dynamic_mix)
    y_ref = _reference(t, s, d)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, list(t.values()), gy)
    grads_ref = torch.autograd.grad(y_ref, list(t.values()), gy)
    for k, ga, gb in zip(t, grads, grads_ref):
        torch.testing.assert_close(ga, gb, rtol=1e-9, atol=1e-11, msg=k)
    with torch.no_grad():                                              # the forward-only entry
        torch.testing.assert_close(_kernel(t, s, d, kernels.cpp_mix_forward), y_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('size', [(1, 7, 1, 15, 3, 3), (2, 12, 3, 40, 4, 2), (2, 32, 3, 64, 8, 2)])
def test_float32_as_accurate_as_eager_path(kernels, size):
    """Float32 against the float64 reference: no worse than the eager float32 path (ops.mixing),
    whose error here (up to 1e-5, large random logits) comes from float32 itself."""
    b, n, l, c, s, d = size
    t64 = {k: v.requires_grad_() for k, v in _inputs(b, n, l, c, s, d, seed=1).items()}
    y_ref = _reference(t64, s, d)
    gy = torch.randn_like(y_ref)
    grads_ref = torch.autograd.grad(y_ref, list(t64.values()), gy)
    errors = {}
    for name, fn in (('kernel', kernels.cpp_dynamic_mix), ('eager', DynamicMix.apply)):
        t32 = {k: v.detach().float().requires_grad_() for k, v in t64.items()}
        y = _kernel(t32, s, d, fn)
        grads = torch.autograd.grad(y, list(t32.values()), gy.float())
        errors[name] = [_rel(y, y_ref)] + [_rel(ga, gb) for ga, gb in zip(grads, grads_ref)]
    for what, e_k, e_e in zip(['output'] + list(t64), errors['kernel'], errors['eager']):
        assert e_k <= 2 * e_e + 1e-6, (what, e_k, e_e)


def test_gradcheck(kernels):
    b, n, l, c, s, d = 2, 6, 3, 10, 2, 2
    t = _inputs(b, n, l, c, s, d)
    r2 = torch.randn(b * l * s, n * d, dtype=torch.float64)
    args = [t['x'], r2, t['wg'], t['bg']]
    args = [a.requires_grad_() for a in args]
    assert torch.autograd.gradcheck(lambda *a: kernels.cpp_dynamic_mix(*a, s), args)
    # a strided input (channels contiguous): the height branch's view of a larger tensor
    xs = torch.randn(b, l, n, c, dtype=torch.float64).transpose(1, 2).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: kernels.cpp_dynamic_mix(x, r2.detach(), t['wg'].detach(),
                                                                      t['bg'].detach(), s), (xs,))


def test_strided_input_and_out_slot(kernels):
    """out= may be one branch's slot of a shared buffer; x4 may be a strided view."""
    b, n, l, c, s, d = 2, 12, 5, 40, 4, 2
    t = _inputs(b, n, l, c, s, d, dtype=torch.float32)
    y_ref = _kernel(t, s, d, kernels.cpp_mix_forward)
    both = torch.full((b, n, l, 2, c), float('nan'))
    xs = t['x'].transpose(1, 2).contiguous().transpose(1, 2)          # same values, (B, L, N, C) memory
    r = t['x'] @ t['wc'].T + t['bc']
    out = kernels.cpp_mix_forward(xs, reduced_token_major(r, b, n, l, s, d), t['wg'], t['bg'], s,
                                  out=both[..., 1, :])
    assert out.data_ptr() == both[..., 1, :].data_ptr()
    torch.testing.assert_close(both[..., 1, :], y_ref, rtol=0, atol=0)
    assert torch.isnan(both[..., 0, :]).all()                         # the other slot is untouched


def test_bad_input_is_refused(kernels):
    t = _inputs(1, 4, 1, 8, 2, 1, dtype=torch.float32)
    r2 = torch.randn(2, 4)
    with pytest.raises(RuntimeError, match='divisible'):
        kernels.cpp_mix_forward(t['x'], r2, t['wg'], t['bg'], 3)
    with pytest.raises(RuntimeError, match='one dtype'):
        kernels.cpp_mix_forward(t['x'], r2.double(), t['wg'], t['bg'], 2)


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def test_empty_batch(kernels):
    """A batch of 0 sequences: empty outputs, zero generator gradients, no crash (also with the
    broadcast gradient an empty sum gives)."""
    x4, r2, w, b = torch.randn(0, 16, 3, 32), torch.randn(0, 32), torch.randn(256, 32), torch.randn(256)
    assert kernels.cpp_mix_forward(x4, r2, w, b, 8).shape == (0, 16, 3, 32)
    out = torch.empty(0, 16, 3, 32)
    assert kernels.cpp_mix_forward(x4, r2, w, b, 8, out=out).data_ptr() == out.data_ptr()
    args = [t.requires_grad_() for t in (x4, r2, w, b)]
    grads = torch.autograd.grad(kernels.cpp_dynamic_mix(*args, 8).sum(), args)
    assert [g.shape for g in grads] == [a.shape for a in args]
    assert not grads[2].any() and not grads[3].any()


def _model(name, **kw):
    """A float32 model with weights away from init (std 0.05 on every parameter)."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=7, **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


def _train_and_infer(model, x):
    """(training logits, every parameter's gradient of a fixed loss, inference logits, the paths
    taken in training and in inference)."""
    model.train().zero_grad(set_to_none=True)
    y = model(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).square().sum().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    paths_train = set(dynamixer.explain_paths(model, x).values())
    model.zero_grad(set_to_none=True)
    with torch.inference_mode():
        y_infer = model.eval()(x)
        paths_infer = set(dynamixer.explain_paths(model, x).values())
    model.train()
    return y.detach(), grads, y_infer, paths_train, paths_infer


@pytest.mark.parametrize('name,kw,min_tokens,mode', [
    # nano, non-square: 8x12 and 4x6 grids, all through the kernels (sequences under 16 tokens)
    ('dynamixer_nano', dict(img_size=(32, 48)), 1, 'mixing'),
    ('dynamixer_nano', dict(img_size=(32, 48)), 1, 'all'),
    # dynamixer_s at a small non-square size with the library's default rule: its 16x20 stage
    # on the kernels, the 8x10 stages plain
    ('dynamixer_s', dict(img_size=(112, 140)), 16, 'mixing'),
])
def test_model_on_cpp_path_equals_plain_path(kernels, monkeypatch, name, kw, min_tokens, mode):
    """Logits (training and inference) and every gradient in float32, cpp path vs plain path."""
    monkeypatch.setattr(dispatch, 'FAST_PATH_MIN_TOKENS', min_tokens)   # read at construction
    model = _model(name, **kw)
    x = torch.randn(2, 3, *model.img_size)
    with dynamixer.set_cpu_kernels(mode):
        y, grads, y_infer, paths_train, paths_infer = _train_and_infer(model, x)
    assert 'cpp-train' in paths_train and 'cpp-inference' in paths_infer
    # the MLPs: the compiled GELU pair in training with 'all' only; inference MLPs stay eager
    assert ('fast-train' in paths_train) == (mode == 'mixing')
    assert 'fast-inference' in paths_infer
    with dynamixer.set_fast_path(False):
        y_plain, grads_plain, y_infer_plain, paths, _ = _train_and_infer(model, x)
    assert paths == {'plain'}
    assert _rel(y, y_plain) <= 1e-5
    assert _rel(y_infer, y_infer_plain) <= 1e-5
    for k, g in grads_plain.items():
        assert _rel(grads[k], g) <= 1e-5, k


def test_two_threads_equal_one(kernels):
    """The build is parallel (OpenMP, as ATen's parallel_for needs) and per-thread gradient
    accumulators and parallel sequence groups give the same result with 2 threads."""
    torch.set_num_threads(2)
    try:
        assert kernels.threads_used(8) == 2
    finally:
        torch.set_num_threads(1)
    assert kernels.threads_used(8) == 1
    b, n, l, c, s, d = 3, 16, 5, 32, 4, 2
    t = _inputs(b, n, l, c, s, d, dtype=torch.float32)
    r2 = torch.randn(b * l * s, n * d)
    gy = torch.randn(b, n, l, c)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        try:
            args = [a.clone().requires_grad_() for a in (t['x'], r2, t['wg'], t['bg'])]
            y = kernels.cpp_dynamic_mix(*args, s)
            results.append([y, *torch.autograd.grad(y, args, gy)])
        finally:
            torch.set_num_threads(1)
    for a, b_ in zip(*results):
        torch.testing.assert_close(a, b_, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_gelu_pair(kernels, dtype):
    h = torch.randn(1000, 37, dtype=dtype) * 3                         # 37000: not a multiple of 8
    h[0, :6] = torch.tensor([0.0, -0.0, 1e-8, -30.0, 30.0, -5.0])
    dy = torch.randn_like(h)
    g, dh = kernels.cpp_gelu_pair(h, dy)
    exact_g = torch.nn.functional.gelu(h.double())
    exact_dh = torch.ops.aten.gelu_backward(dy.double(), h.double())
    tol = 1e-6 if dtype == torch.float32 else 1e-14
    assert _rel(g, exact_g) <= tol and _rel(dh, exact_dh) <= tol


def test_recompute_gelu_mlp(kernels):
    from dynamixer.ops.mlp import RecomputeGeluMlp
    args = [torch.randn(9, 6), torch.randn(10, 6), torch.randn(10), torch.randn(6, 10), torch.randn(6)]
    args = [a.double().requires_grad_() for a in args]
    assert torch.autograd.gradcheck(lambda *a: kernels.CppRecomputeGeluMlp.apply(*a, 'none'), args)
    for approximate in ('none', 'tanh'):
        y = kernels.CppRecomputeGeluMlp.apply(*args, approximate)
        y_ref = RecomputeGeluMlp.apply(*args, approximate)
        gy = torch.randn_like(y)
        torch.testing.assert_close(y, y_ref)
        for a, b_ in zip(torch.autograd.grad(y, args, gy), torch.autograd.grad(y_ref, args, gy)):
            torch.testing.assert_close(a, b_)
    # backward passes that need only some gradients (the eager fallback, or the pair without dx)
    for needed in ([0], [3], [1, 2, 3, 4]):
        part = [a.detach().requires_grad_(i in needed) for i, a in enumerate(args)]
        y = kernels.CppRecomputeGeluMlp.apply(*part, 'none')
        y_ref = RecomputeGeluMlp.apply(*part, 'none')
        gy = torch.randn_like(y)
        inputs = [part[i] for i in needed]
        for a, b_ in zip(torch.autograd.grad(y, inputs, gy), torch.autograd.grad(y_ref, inputs, gy)):
            torch.testing.assert_close(a, b_)


@pytest.mark.slow
def test_portable_build(tmp_path):
    """The build without -mavx2 -mfma (CPUs without AVX2) compiles and computes the same; a fresh
    process, as the ISA is chosen once per process (about a minute to build)."""
    import subprocess
    import sys
    if shutil.which(os.environ.get('CXX', 'c++').split()[0]) is None:
        pytest.skip('no C++ compiler on PATH')
    code = (
        'import sys, torch; sys.path.insert(0, "tests")\n'
        'from dynamixer.ops import cpu_kernels as k\n'
        'from dynamixer.ops.mixing import DynamicMix\n'
        'assert k.available(), k.build_error()\n'
        'assert "_portable_" in k._ops.name, k._ops.name\n'
        'args = [torch.randn(2, 12, 3, 40, dtype=torch.float64), torch.randn(24, 24, dtype=torch.float64),\n'
        '        torch.randn(144, 24, dtype=torch.float64), torch.randn(144, dtype=torch.float64)]\n'
        'for dt in (torch.float64, torch.float32):\n'
        '    a = [t.to(dt).requires_grad_() for t in args]\n'
        '    y, y_ref = k.cpp_dynamic_mix(*a, 4), DynamicMix.apply(*a, 4)\n'
        '    gy = torch.randn_like(y)\n'
        '    for u, v in zip([y, *torch.autograd.grad(y, a, gy)], [y_ref, *torch.autograd.grad(y_ref, a, gy)]):\n'
        '        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)\n')
    env = dict(os.environ, DYNAMIXER_CPU_KERNELS_ISA='portable')
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, '-c', code], env=env, cwd=root, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]


def test_build_tools_are_found_or_named(monkeypatch, tmp_path):
    """The compiler and ninja: ninja from this Python's scripts folder (the PyPI package, in a
    virtual environment that is not activated) goes on PATH; a missing one is named."""
    import stat
    import sysconfig

    from dynamixer.ops import cpu_kernels
    bin_dir, scripts = tmp_path / 'bin', tmp_path / 'scripts'
    for d, tool in ((bin_dir, 'c++'), (scripts, 'ninja')):
        d.mkdir()
        (d / tool).write_text('#!/bin/sh\n')
        (d / tool).chmod(stat.S_IRWXU)
    monkeypatch.setenv('PATH', str(bin_dir))
    monkeypatch.delenv('CXX', raising=False)
    monkeypatch.setattr(sysconfig, 'get_path', lambda name: str(tmp_path / 'nowhere'))
    with pytest.raises(RuntimeError, match=r"no 'ninja' build tool on PATH \(pip install ninja\)"):
        cpu_kernels._find_tools()
    monkeypatch.setattr(sysconfig, 'get_path', lambda name: str(scripts))
    cpu_kernels._find_tools()
    assert shutil.which('ninja') == str(scripts / 'ninja')
    monkeypatch.setenv('CXX', 'clang++-none')
    with pytest.raises(RuntimeError, match=r"no C\+\+ compiler \('clang\+\+-none'\) on PATH"):
        cpu_kernels._find_tools()

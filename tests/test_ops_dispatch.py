"""ops/dispatch.py: which path runs when (docs/fast_path.md's table), the switch, the explain
helper, and that every path computes the same function (plain vs fast, TorchScript, FX, compile)."""
import copy

import pytest
import timm
import torch

import dynamixer
from dynamixer.model import DynaMixerBlock, DynaMixerOp, MixerLayer
from dynamixer.ops import dispatch
from helpers import random_nano, randomize_

# these files test the fast path with its eager PyTorch kernels (ops.mixing, ops.mlp) on small
# modules; the compiled CPU kernels are tested in test_ops_cpu_kernels.py
pytestmark = pytest.mark.usefixtures('fast_path_every_size', 'eager_kernels')


def test_short_sequences_take_the_plain_path(monkeypatch):
    monkeypatch.setattr(dispatch, 'FAST_PATH_MIN_TOKENS', 16)
    # one decision for the block and both of its ops: an 8-token axis keeps all of it plain
    paths = dynamixer.explain_paths(DynaMixerBlock(8, (8, 16), 2, 2), torch.randn(1, 8, 16, 8))
    assert paths == {'': 'plain', 'mix_h': 'plain', 'mix_w': 'plain'}
    paths = dynamixer.explain_paths(DynaMixerBlock(8, (16, 16), 2, 2), torch.randn(1, 16, 16, 8))
    assert set(paths.values()) == {'fast-train'}
    # an op on its own follows the same length rule
    assert dynamixer.explain_paths(DynaMixerOp(8, 8, 2, 2), torch.randn(2, 8, 8)) == {'': 'plain'}


@pytest.mark.parametrize('kw', [dict(img_size=(32, 48)), dict(reweight=False)])
def test_model_fast_path_equals_plain_path(monkeypatch, kw):
    model = random_nano(**kw)
    x = torch.randn(2, 3, *model.img_size, dtype=torch.float64)
    y = model(x)
    y.square().sum().backward()
    fast = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    assert 'fast-train' in dynamixer.explain_paths(model, x).values()
    model.zero_grad()
    with dynamixer.set_fast_path(False):
        assert set(dynamixer.explain_paths(model, x).values()) == {'plain'}
        model.zero_grad()
        y_plain = model(x)
    y_plain.square().sum().backward()
    torch.testing.assert_close(y, y_plain, rtol=1e-10, atol=1e-12)
    for k, p in model.named_parameters():
        torch.testing.assert_close(fast[k], p.grad, rtol=1e-8, atol=1e-10 * p.grad.abs().max().item(), msg=k)


def test_static_mixing_unchanged():
    blk = randomize_(DynaMixerBlock(8, (3, 5), 2, 2, mixing='static').double())
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
    model = random_nano().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    y = model(x)
    torch.testing.assert_close(torch.jit.script(model)(x), y, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.fx.symbolic_trace(model)(x), y, rtol=1e-10, atol=1e-12)


def test_bf16_and_grad_checkpointing():
    model = random_nano().float()
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
    model = random_nano().float()
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



def test_switch_global_and_as_context_manager():
    blk = DynaMixerBlock(8, (4, 4), 2, 2)
    x = torch.randn(1, 4, 4, 8)
    assert dynamixer.fast_path_enabled()
    with dynamixer.set_fast_path(False):
        assert not dynamixer.fast_path_enabled()
        assert dynamixer.explain_paths(blk, x)[''] == 'plain'
    assert dynamixer.fast_path_enabled()
    dynamixer.set_fast_path(False)
    try:
        assert dynamixer.explain_paths(blk, x)[''] == 'plain'
    finally:
        dynamixer.set_fast_path(True)
    assert dynamixer.explain_paths(blk, x)[''] == 'fast-train'


def test_environment_variables_turn_the_fast_paths_and_the_compiled_kernels_off():
    """DYNAMIXER_FAST_PATH=0 gives the plain path, also with the compiled kernels allowed;
    DYNAMIXER_CPU_KERNELS=0 keeps the eager kernels. Neither builds anything."""
    import os
    import subprocess
    import sys
    code = ('import dynamixer, torch\n'
            'from dynamixer.ops import cpu_kernels, dispatch\n'
            'dispatch.FAST_PATH_MIN_TOKENS = 1\n'
            'b = dynamixer.DynaMixerBlock(8, (4, 4), 2, 2)\n'
            'print(dynamixer.fast_path_enabled(), dynamixer.explain_paths(b, torch.randn(1, 4, 4, 8))[""],'
            ' dynamixer.cpu_kernels_mode(), cpu_kernels._tried)')
    for fast, kernels, expected in (('0', '0', 'False plain off False'), ('off', '1', 'False plain mixing False'),
                                    ('1', '0', 'True fast-train off False')):
        env = dict(os.environ, DYNAMIXER_FAST_PATH=fast, DYNAMIXER_CPU_KERNELS=kernels)
        out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == expected


def test_per_call_rules():
    blk = DynaMixerBlock(8, (4, 4), 2, 2)
    layer = MixerLayer(8, (4, 4), 2, 2).eval()
    x = torch.randn(1, 4, 4, 8)
    assert dispatch.mixing_path(blk, x) == 'fast-train'                 # parameters require grad
    with torch.no_grad():
        assert dispatch.mixing_path(blk, x) == 'fast-inference'
        assert dispatch.mlp_path(layer, x) == 'fast-inference'
        with torch.autocast('cpu', dtype=torch.bfloat16):                # CPU autocast: plain
            assert dispatch.mixing_path(blk, x) == 'plain'
            assert dispatch.mlp_path(layer, x) == 'plain'
        xm = torch.empty(1, 4, 4, 8, device='meta')                      # meta: the spec's op sequence
        assert dispatch.mixing_path(blk, xm) == 'plain' and dispatch.mlp_path(layer, xm) == 'plain'
    static = DynaMixerBlock(8, (4, 4), 2, 2, mixing='static')
    assert dispatch.mixing_path(static, x) == 'plain'
    # MLP dropout in training mode keeps the plain MLP (its dropout masks are the module's)
    drop = MixerLayer(8, (4, 4), 2, 2).train()
    drop.mlp.drop1.p = 0.1
    assert dispatch.mlp_path(drop, x) == 'plain'


def test_hooks_and_swapped_modules_take_the_plain_path():
    blk = randomize_(DynaMixerBlock(8, (4, 4), 2, 2).double(), std=0.3)
    x = torch.randn(2, 4, 4, 8, dtype=torch.float64)
    with torch.no_grad():
        fast = blk(x)
        seen = []
        handle = blk.mix_h.generate.register_forward_hook(lambda m, i, o: seen.append(o.shape))
        assert dynamixer.explain_paths(blk, x)[''] == 'plain'
        assert seen                                                      # the hook ran
        torch.testing.assert_close(blk(x), fast, rtol=1e-10, atol=1e-12)
        handle.remove()
        # a hook on an op: the block calls its ops (plain, as decided once for the block)
        handle = blk.mix_w.register_forward_pre_hook(lambda m, args: seen.append('op'))
        assert dynamixer.explain_paths(blk, x) == {'': 'plain', 'mix_h': 'plain', 'mix_w': 'plain'}
        assert seen[-1] == 'op'
        handle.remove()
        handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
        try:
            assert dynamixer.explain_paths(blk, x)[''] == 'plain'
        finally:
            handle.remove()
        assert dynamixer.explain_paths(blk, x)[''] == 'fast-inference'


class _WeightSubclass(torch.Tensor):
    """Stands in for torchao's int8 weights and FSDP's DTensor: the module stays, its weight is a subclass."""


def test_weights_swapped_for_tensor_subclasses_take_the_plain_path():
    blk = randomize_(DynaMixerBlock(8, (4, 4), 2, 2).double(), std=0.3)
    layer = MixerLayer(8, (4, 4), 2, 2).double()
    x = torch.randn(2, 4, 4, 8, dtype=torch.float64)
    with torch.no_grad():
        expected = blk(x)
        assert dynamixer.explain_paths(blk, x)[''] == 'fast-inference'
        gen = blk.mix_w.generate
        gen.weight = torch.nn.Parameter(gen.weight.detach().as_subclass(_WeightSubclass))
        assert dynamixer.explain_paths(blk, x)[''] == 'plain'
        torch.testing.assert_close(blk(x).as_subclass(torch.Tensor), expected, rtol=1e-10, atol=1e-12)
        assert dispatch.mlp_path(layer.eval(), x) == 'fast-inference'
        fc = layer.mlp.fc2
        fc.bias = torch.nn.Parameter(fc.bias.detach().as_subclass(_WeightSubclass))
        assert dispatch.mlp_path(layer, x) == 'plain'


def test_explain_paths_on_nano():
    model = timm.create_model('dynamixer_nano').eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        paths = dynamixer.explain_paths(model, x)
    # nano's 8x8 and 4x4 grids are built with the 16-token minimum patched to 1 here
    assert paths['stages.0.blocks.0.token_mixer'] == paths['stages.0.blocks.0.token_mixer.mix_h'] == 'fast-inference'
    assert paths['stages.3.blocks.1.mlp'] == 'fast-inference'
    assert len(paths) == 8 * 4


def test_empty_batch_takes_the_plain_path():
    """A batch of 0 goes down the plain path (the fast kernels split their work by batch) and gives
    the plain path's empty result, with and without autograd; a batch of 1 still takes the fast one."""
    model = random_nano().eval()
    empty, one = torch.empty(0, 3, 32, 32, dtype=torch.float64), torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert set(dynamixer.explain_paths(model, one).values()) == {'fast-inference'}
        assert set(dynamixer.explain_paths(model, empty).values()) == {'plain'}
        with dynamixer.set_fast_path(False):
            plain = model(empty)
        out = model(empty)
    assert out.shape == plain.shape == (0, 5) and out.dtype == plain.dtype
    model.train()
    assert 'fast-train' in dynamixer.explain_paths(model, one).values()
    x = empty.clone().requires_grad_()
    assert set(dynamixer.explain_paths(model, x).values()) == {'plain'}
    y = model(x)
    y.sum().backward()
    assert y.shape == (0, 5) and x.grad.shape == x.shape
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------ the compiled CPU kernels' rules


def test_cpp_kernels_serve_the_cpu_fast_path(cpu_kernels_built, monkeypatch):
    blk = randomize_(DynaMixerBlock(8, (4, 5), 2, 2), std=0.3)                 # float32
    layer = MixerLayer(8, (4, 5), 2, 2)
    x = torch.randn(2, 4, 5, 8)
    with dynamixer.set_cpu_kernels(True):
        assert dynamixer.cpu_kernels_mode() == 'mixing'
        assert dynamixer.explain_paths(blk, x) == {'': 'cpp-train', 'mix_h': 'cpp-train', 'mix_w': 'cpp-train'}
        with torch.no_grad():
            assert dispatch.mixing_path(blk, x) == 'cpp-inference'
            assert dispatch.mixing_path(blk.mix_w, x) == 'cpp-inference'         # an op on its own
            assert dispatch.mlp_path(layer.eval(), x) == 'fast-inference'
            with torch.autocast('cpu', dtype=torch.bfloat16):                  # CPU autocast: plain
                assert dispatch.mixing_path(blk, x) == 'plain'
        assert dispatch.mlp_path(layer.train(), x) == 'fast-train'              # the MLP: only with 'all'
        with dynamixer.set_cpu_kernels('all'):
            assert dispatch.mlp_path(layer, x) == 'cpp-train'
            with torch.no_grad():
                assert dispatch.mlp_path(layer.eval(), x) == 'fast-inference'   # inference MLP stays eager
            layer.train().mlp.act.approximate = 'tanh'                          # the pair is exact-erf GELU
            assert dispatch.mlp_path(layer, x) == 'fast-train'
        # dtypes the kernels do not take, and sequences longer than they take: the eager kernels
        bf = copy.deepcopy(blk).bfloat16()
        assert dispatch.mixing_path(bf, x.bfloat16()) == 'fast-train'
        assert dispatch.mixing_path(copy.deepcopy(blk).double(), x.double()) == 'cpp-train'
        monkeypatch.setattr(dispatch, 'CPP_MAX_TOKENS', 4)                     # the width branch has 5
        assert dispatch.mixing_path(blk, x) == 'fast-train'
        monkeypatch.setattr(dispatch, 'CPP_MAX_TOKENS', 5)
        assert dispatch.mixing_path(blk, x) == 'cpp-train'
        # the fast-path switch still selects the plain path
        with dynamixer.set_fast_path(False):
            assert dispatch.mixing_path(blk, x) == 'plain'
    with dynamixer.set_cpu_kernels(False):
        assert dispatch.mixing_path(blk, x) == 'fast-train'
    # the same function on every path (float64)
    blk64 = randomize_(DynaMixerBlock(8, (4, 5), 2, 2).double(), std=0.3)
    x64 = torch.randn(2, 4, 5, 8, dtype=torch.float64)
    outs = {}
    for mode in (True, False):
        with dynamixer.set_cpu_kernels(mode), torch.no_grad():
            outs[mode] = blk64(x64)
    with dynamixer.set_fast_path(False), torch.no_grad():
        plain = blk64(x64)
    torch.testing.assert_close(outs[True], plain, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(outs[False], plain, rtol=1e-10, atol=1e-12)


def test_cpu_kernels_switch_values():
    from dynamixer.errors import DynaMixerError
    before = dynamixer.cpu_kernels_mode()
    for value, mode in ((False, 'off'), (True, 'mixing'), ('0', 'off'), ('off', 'off'), ('1', 'mixing'),
                        ('ON', 'mixing'), ('all', 'all'), (' All ', 'all')):
        with dynamixer.set_cpu_kernels(value):
            assert dynamixer.cpu_kernels_mode() == mode
        assert dynamixer.cpu_kernels_mode() == before
    dynamixer.set_cpu_kernels('all')
    try:
        assert dynamixer.cpu_kernels_mode() == 'all'
    finally:
        dynamixer.set_cpu_kernels(before)
    assert dynamixer.cpu_kernels_mode() == before
    with pytest.raises(DynaMixerError,
                       match=r"set_cpu_kernels\(mode\) = 'fastest' is not understood: use 0 .* 1 .* all"):
        dynamixer.set_cpu_kernels('fastest')
    assert dynamixer.cpu_kernels_mode() == before


def test_unknown_cpu_kernels_value_stops_the_import():
    import os
    import subprocess
    import sys
    out = subprocess.run([sys.executable, '-c', 'import dynamixer'], env=dict(os.environ, DYNAMIXER_CPU_KERNELS='fast'),
                         capture_output=True, text=True)
    assert out.returncode != 0
    assert "DYNAMIXER_CPU_KERNELS = 'fast' is not understood: use 0" in out.stderr


def test_failed_build_falls_back_to_the_eager_kernels_once(monkeypatch, tmp_path):
    """A build that fails (here: sources that do not compile, in a scratch extension folder): one
    RuntimeWarning with the reason and the switch that silences it, then the eager fast path,
    computing the same function; no compiler: the reason names it."""
    import warnings

    from dynamixer.ops import cpu_kernels
    broken = tmp_path / 'csrc'
    broken.mkdir()
    for f in cpu_kernels._SOURCES + cpu_kernels._HEADERS:
        (broken / f).write_text('#error simulated build failure\n')
    monkeypatch.setattr(cpu_kernels, '_CSRC', str(broken))
    monkeypatch.setenv('TORCH_EXTENSIONS_DIR', str(tmp_path / 'extensions'))

    def fresh_state():
        for name, value in (('_ops', None), ('_error', None), ('_tried', False)):
            monkeypatch.setattr(cpu_kernels, name, value)
        monkeypatch.setattr(dispatch, '_cpp_ok', None)
    fresh_state()
    blk = randomize_(DynaMixerBlock(8, (4, 5), 2, 2).double(), std=0.3)
    x = torch.randn(2, 4, 5, 8, dtype=torch.float64)
    with dynamixer.set_cpu_kernels(True), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        y = blk(x)
        assert dynamixer.explain_paths(blk, x)[''] == 'fast-train'
        with torch.no_grad():
            assert dispatch.mixing_path(blk, x) == 'fast-inference'
        assert not cpu_kernels.available()
    ours = [w for w in caught if 'compiled CPU kernels' in str(w.message)]
    assert len(ours) == 1 and ours[0].category is RuntimeWarning
    msg = str(ours[0].message)
    assert 'simulated build failure' in msg and 'the eager PyTorch fast path runs instead' in msg
    assert 'DYNAMIXER_CPU_KERNELS=0' in msg
    assert 'simulated build failure' in cpu_kernels.build_error()
    with dynamixer.set_fast_path(False):
        torch.testing.assert_close(y, blk(x), rtol=1e-10, atol=1e-12)
    with pytest.raises(RuntimeError, match='unavailable'):
        cpu_kernels.cpp_mix_forward(torch.zeros(1, 2, 1, 2), torch.zeros(1, 2), torch.zeros(4, 2), torch.zeros(4), 1)
    # no compiler at all
    fresh_state()
    monkeypatch.setenv('CXX', 'no-such-compiler-dynamixer')
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler \\('no-such-compiler-dynamixer'\\)"):
        assert not cpu_kernels.available()

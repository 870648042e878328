"""The Triton kernels (src/dynamixer/ops/triton_mixing.py) on the CPU, under TRITON_INTERPRET=1.

Triton reads TRITON_INTERPRET when it is imported, so the checks run in a fresh interpreter
(`python tests/test_ops_triton.py <case>`). They compare forward and gradients with a float64 loop
over the spec's equations, at odd sizes (N=7, d=3, S=3, C/S=5) and with strided inputs.
"""
import os
import subprocess
import sys

import pytest

pytest.importorskip('triton')

CASES = {
    # B, N, L, S, C/S, d, strided input
    'odd': (2, 7, 2, 3, 5, 3, False),
    'rows_strided': (3, 5, 1, 2, 4, 2, True),
    'wide': (1, 16, 3, 8, 3, 2, False),
}


def _reference(x4, r2, weight, bias, s):
    """out[b, j, l, seg] = sum_i softmax_i(G[i, j]) x[b, i, l, seg]; weight rows are [i*N + j]."""
    import torch
    b, n, l, c = x4.shape
    cs = c // s
    out = torch.zeros_like(x4)
    for bb in range(b):
        for ll in range(l):
            for ss in range(s):
                g = (r2[(bb * l + ll) * s + ss] @ weight.t() + bias).view(n, n)   # [in i, out j]
                p = torch.softmax(g, dim=0)
                out[bb, :, ll, ss * cs:(ss + 1) * cs] = p.t() @ x4[bb, :, ll, ss * cs:(ss + 1) * cs]
    return out


def _check(case: str) -> None:
    import torch

    from dynamixer.ops.mixing import generator_rows_out_major
    from dynamixer.ops.triton_mixing import triton_available, triton_dynamic_mix, triton_mix_forward
    assert triton_available()
    torch.manual_seed(0)
    b, n, l, s, cs, d, strided = CASES[case]
    c = s * cs
    x = torch.randn(b, n, l, 2 * c if strided else c, dtype=torch.float64)
    x = (x[..., ::2] if strided else x).requires_grad_()
    r2 = torch.randn(b * l * s, n * d, dtype=torch.float64, requires_grad=True)
    w = torch.randn(n * n, n * d, dtype=torch.float64, requires_grad=True)      # rows [in i, out j]
    bias = torch.randn(n * n, dtype=torch.float64, requires_grad=True)
    ref = _reference(x, r2, w, bias, s)
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad((ref * g).sum(), (x, r2, w, bias))

    leaves = [t.detach().float().requires_grad_() for t in (x, r2, w, bias)]
    if strided:   # the kernel reads strided tokens directly
        leaves[0] = torch.empty(b, n, l, 2 * c).requires_grad_(False)[..., ::2].copy_(x.detach()).requires_grad_()
    wt, bt = generator_rows_out_major(leaves[2], leaves[3], n)
    out = triton_dynamic_mix(leaves[0], leaves[1], wt, bt, s)
    grads = torch.autograd.grad((out * g.float()).sum(), leaves)
    scale = ref.abs().max().item()
    assert (out.double() - ref).abs().max().item() <= 1e-5 * scale, case
    for name, a, e in zip(('x', 'r2', 'weight', 'bias'), grads, ref_grads):
        err = (a.double() - e).abs().max().item() / e.abs().max().item()
        assert err <= 1e-5, (case, name, err)
    with torch.no_grad():
        again = triton_mix_forward(leaves[0], leaves[1], wt, bt, s)
    assert torch.equal(again, out.detach())
    print('ok', case)


@pytest.mark.parametrize('case', sorted(CASES))
def test_triton_kernels_interpreted(case):
    env = dict(os.environ, TRITON_INTERPRET='1')
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'src')
    env['PYTHONPATH'] = src + os.pathsep + env.get('PYTHONPATH', '')
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), case], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and f'ok {case}' in proc.stdout, proc.stdout + proc.stderr


if __name__ == '__main__':
    _check(sys.argv[1])

"""Fused dynamic mixing on CUDA GPUs, in Triton.

One program per sequence (a row or a column of one image), all S segments at once:

forward  for every output token j: logits (S, N) = R (S, N*d) @ W_j^T + b_j, the generator rows of
         output j; softmax over the input tokens; out[j, segment s] = sum_i P[s, i] X[i, segment s].
         The N x N mixing matrices live only in registers: nothing of size S*N*N per sequence is
         written to memory, forward or backward.
backward recomputes P per output token, accumulates dX = sum_j P^T G_j in registers, and writes
         the logits' gradient (softmax backward of dP = G_j X^T); the generator's gradients then
         are two GEMMs (cuBLAS) on it.

Layout as in `ops.mixing`: tokens x4 (B, N, L, C) mixed along N, reduced features r2
(B*L*S, N*d) in token-major order, generator weight (N*N, N*d) with rows [out j, in i].
`triton_dynamic_mix` is chosen by `ops.dispatch` on CUDA when Triton is installed;
on the CPU the kernels run under ``TRITON_INTERPRET=1`` (that is how the tests check them).
"""
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the PyTorch path is used instead
    triton = None
    tl = None

__all__ = ['triton_available', 'triton_dynamic_mix', 'triton_mix_forward', 'TritonDynamicMix']


def triton_available() -> bool:
    """Triton importable and a CUDA device present (or the interpreter switched on)."""
    if triton is None:
        return False
    return torch.cuda.is_available() or os.environ.get('TRITON_INTERPRET', '0') == '1'


def _pow2(n: int, lo: int = 1) -> int:
    return max(lo, 1 << (max(n, 1) - 1).bit_length())


if triton is not None:

    @triton.jit
    def _load_seq(r_ptr, x_ptr, pid, b, l, sxb, sxn, sxl,
                  N: tl.constexpr, S: tl.constexpr, CS: tl.constexpr, ND: tl.constexpr,
                  BS: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr):
        s_idx = tl.arange(0, BS)
        k_idx = tl.arange(0, BK)
        r = tl.load(r_ptr + (pid * S + s_idx[:, None]) * ND + k_idx[None, :],
                    mask=(s_idx[:, None] < S) & (k_idx[None, :] < ND), other=0.0)
        i_idx = tl.arange(0, BN)
        c_idx = tl.arange(0, BC)
        s3 = s_idx[:, None, None]
        i3 = i_idx[None, :, None]
        c3 = c_idx[None, None, :]
        xm = (s3 < S) & (i3 < N) & (c3 < CS)
        x = tl.load(x_ptr + b * sxb + i3 * sxn + l * sxl + s3 * CS + c3, mask=xm, other=0.0)
        return r, x.to(tl.float32)

    @triton.jit
    def _probs_j(r, w_ptr, bias_ptr, j,
                 N: tl.constexpr, ND: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 IEEE: tl.constexpr):
        """Softmax-normalised mixing weights of output token j for all segments: (BS, BN)."""
        i_idx = tl.arange(0, BN)
        k_idx = tl.arange(0, BK)
        w = tl.load(w_ptr + (j * N + i_idx[:, None]) * ND + k_idx[None, :],
                    mask=(i_idx[:, None] < N) & (k_idx[None, :] < ND), other=0.0)
        if IEEE:
            logits = tl.dot(r, tl.trans(w), input_precision='ieee')
        else:
            logits = tl.dot(r, tl.trans(w))
        bias = tl.load(bias_ptr + j * N + i_idx, mask=i_idx < N, other=0.0).to(tl.float32)
        logits = logits + bias[None, :]
        logits = tl.where(i_idx[None, :] < N, logits, float('-inf'))
        m = tl.max(logits, axis=1)
        e = tl.exp(logits - m[:, None])
        return e / tl.sum(e, axis=1)[:, None]

    @triton.jit
    def _mix_fwd_kernel(x_ptr, r_ptr, w_ptr, bias_ptr, out_ptr,
                        L, sxb, sxn, sxl, sob, son, sol,
                        N: tl.constexpr, S: tl.constexpr, CS: tl.constexpr, ND: tl.constexpr,
                        BS: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                        IEEE: tl.constexpr):
        pid = tl.program_id(0)
        b = pid // L
        l = pid % L
        r, x = _load_seq(r_ptr, x_ptr, pid, b, l, sxb, sxn, sxl, N, S, CS, ND, BS, BN, BC, BK)
        s_idx = tl.arange(0, BS)
        c_idx = tl.arange(0, BC)
        om = (s_idx[:, None] < S) & (c_idx[None, :] < CS)
        for j in range(N):
            p = _probs_j(r, w_ptr, bias_ptr, j, N, ND, BN, BK, IEEE)       # (BS, BN)
            o = tl.sum(p[:, :, None] * x, axis=1)                          # (BS, BC)
            tl.store(out_ptr + b * sob + j * son + l * sol + s_idx[:, None] * CS + c_idx[None, :],
                     o.to(out_ptr.dtype.element_ty), mask=om)

    @triton.jit
    def _mix_bwd_kernel(x_ptr, r_ptr, w_ptr, bias_ptr, g_ptr, dx_ptr, dlogit_ptr,
                        L, sxb, sxn, sxl, sgb, sgn, sgl,
                        N: tl.constexpr, S: tl.constexpr, CS: tl.constexpr, ND: tl.constexpr,
                        BS: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                        IEEE: tl.constexpr):
        pid = tl.program_id(0)
        b = pid // L
        l = pid % L
        r, x = _load_seq(r_ptr, x_ptr, pid, b, l, sxb, sxn, sxl, N, S, CS, ND, BS, BN, BC, BK)
        s_idx = tl.arange(0, BS)
        i_idx = tl.arange(0, BN)
        c_idx = tl.arange(0, BC)
        gm = (s_idx[:, None] < S) & (c_idx[None, :] < CS)
        lm = (s_idx[:, None] < S) & (i_idx[None, :] < N)
        dx = tl.zeros((BS, BN, BC), dtype=tl.float32)
        for j in range(N):
            p = _probs_j(r, w_ptr, bias_ptr, j, N, ND, BN, BK, IEEE)       # (BS, BN)
            g = tl.load(g_ptr + b * sgb + j * sgn + l * sgl + s_idx[:, None] * CS + c_idx[None, :],
                        mask=gm, other=0.0).to(tl.float32)                # (BS, BC)
            dx += p[:, :, None] * g[:, None, :]
            dp = tl.sum(g[:, None, :] * x, axis=2)                         # (BS, BN)
            dl = p * (dp - tl.sum(p * dp, axis=1)[:, None])
            tl.store(dlogit_ptr + (pid * S + s_idx[:, None]) * (N * N) + j * N + i_idx[None, :], dl, mask=lm)
        s3 = s_idx[:, None, None]
        i3 = i_idx[None, :, None]
        c3 = c_idx[None, None, :]
        tl.store(dx_ptr + b * sxb + i3 * sxn + l * sxl + s3 * CS + c3, dx.to(dx_ptr.dtype.element_ty),
                 mask=(s3 < S) & (i3 < N) & (c3 < CS))


def _meta(x4: torch.Tensor, r2: torch.Tensor, s: int):
    bsz, n, l, c = x4.shape
    cs, nd = c // s, r2.shape[1]
    return dict(N=n, S=s, CS=cs, ND=nd, BS=_pow2(s, 16), BN=_pow2(n, 16), BC=_pow2(cs), BK=_pow2(nd, 16),
                IEEE=x4.dtype == torch.float32, num_warps=8)


def _prepare(x4, r2, weight, bias):
    if torch.is_autocast_enabled(x4.device.type):
        dt = torch.get_autocast_dtype(x4.device.type)
        x4 = x4.to(dt)
    if x4.stride(3) != 1:
        x4 = x4.contiguous()
    dt = x4.dtype
    return x4, r2.to(dt).contiguous(), weight.to(dt).contiguous(), bias.to(dt).contiguous()


def _forward(x4: torch.Tensor, r2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, s: int) -> torch.Tensor:
    bsz, n, l, c = x4.shape
    out = torch.empty((bsz, n, l, c), dtype=x4.dtype, device=x4.device)
    _mix_fwd_kernel[(bsz * l,)](
        x4, r2, weight, bias, out, l, x4.stride(0), x4.stride(1), x4.stride(2),
        out.stride(0), out.stride(1), out.stride(2), **_meta(x4, r2, s))
    return out


def triton_mix_forward(x4: torch.Tensor, r2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                       s: int) -> torch.Tensor:
    """Forward only (inference, or recomputation): (B, N, L, C) -> (B, N, L, C)."""
    return _forward(*_prepare(x4, r2, weight, bias), s)  # type: ignore[call-arg]  # a triton.jit launcher


class TritonDynamicMix(torch.autograd.Function):
    """Fused generate-normalise-mix; same inputs and output as `fast_mixing.DynamicMix`."""

    @staticmethod
    def forward(ctx, x4: torch.Tensor, r2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, s: int):
        x4, r2, weight, bias = _prepare(x4, r2, weight, bias)
        ctx.save_for_backward(x4, r2, weight, bias)
        ctx.s = s
        return _forward(x4, r2, weight, bias, s)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x4, r2, weight, bias = ctx.saved_tensors
        s = ctx.s
        bsz, n, l, c = x4.shape
        grad = grad.to(x4.dtype)
        if grad.stride(3) != 1:
            grad = grad.contiguous()
        dx = torch.empty((bsz, n, l, c), dtype=x4.dtype, device=x4.device)
        dlogits = torch.empty((r2.shape[0], n * n), dtype=torch.float32, device=x4.device)
        _mix_bwd_kernel[(bsz * l,)](
            x4, r2, weight, bias, grad, dx, dlogits, l, x4.stride(0), x4.stride(1), x4.stride(2),
            grad.stride(0), grad.stride(1), grad.stride(2), **_meta(x4, r2, s))
        dlogits = dlogits.to(x4.dtype)
        dr2 = dlogits @ weight if ctx.needs_input_grad[1] else None
        dw = dlogits.t() @ r2 if ctx.needs_input_grad[2] else None
        db = dlogits.sum(0) if ctx.needs_input_grad[3] else None
        return dx, dr2, dw, db, None


def triton_dynamic_mix(x4: torch.Tensor, r2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                       s: int) -> torch.Tensor:
    """(B, N, L, C) tokens mixed along N -> (B, N, L, C), differentiable; see the module docstring.

    Under autocast everything runs in the autocast dtype (as the plain path's matmul does).
    """
    if torch.is_autocast_enabled(x4.device.type):
        dt = torch.get_autocast_dtype(x4.device.type)
        x4, r2, weight, bias = x4.to(dt), r2.to(dt), weight.to(dt), bias.to(dt)
        with torch.autocast(x4.device.type, enabled=False):
            return TritonDynamicMix.apply(x4, r2, weight, bias, s)
    return TritonDynamicMix.apply(x4, r2, weight, bias, s)

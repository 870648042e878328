"""Copy-free dynamic mixing for eager PyTorch (CPU, and GPUs without Triton).

The straightforward implementation permutes the input into a (sequence, segment, token, feature)
layout, runs a softmax over a strided axis, a batched matmul and permutes back: four full copies
of the activations per branch, and autograd keeps the copies and the N x N mixing matrices of
every sequence and segment. Here:

* The generator's output rows are permuted once per call (a copy of the small weight, not of the
  activations) so that its logits come out as [output token j, input token i]: the softmax over
  the input tokens runs along the contiguous last axis, and the result is already the matrix that
  multiplies the tokens.
* The mixing reads the tokens of every (sequence, segment) straight from the channels-last grid
  and writes its result straight into a channels-last buffer: each segment of a row or column is
  an ordinary strided matrix, so `torch.bmm` with strided operands and `out=` needs no copy.
* `DynamicMix` (an autograd Function) stores only its input and the small reduced features; the
  mixing matrices are recomputed in the backward pass (one small GEMM and a softmax) instead of
  being kept for every sequence, which is where most of the straightforward version's memory goes.

Layout used throughout: tokens ``x4`` of shape (B, N, L, C) mixes along N, for the B*L sequences
(B, :, l); mixing matrices ``pt`` of shape (B, L, S, N_out, N_in).
"""
from typing import List, Optional, Tuple

import torch

__all__ = [
    'generator_rows_out_major', 'reduced_token_major', 'mixing_probs', 'mix_tokens', 'mix_outer',
    'dynamic_mix_forward', 'DynamicMix', 'reweighted_sum', 'ReweightedSum',
]


def generator_rows_out_major(weight: torch.Tensor, bias: torch.Tensor, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Permute the generator's N*N outputs from [in i, out j] to [out j, in i] (weight copy only)."""
    k = weight.shape[-1]
    w = weight.view(n, n, k).transpose(0, 1).reshape(n * n, k)
    b = bias.view(n, n).t().reshape(n * n)
    return w, b


def reduced_token_major(r: torch.Tensor, b: int, n: int, l: int, s: int, d: int) -> torch.Tensor:
    """(B, N, L, S*d) reduced features -> (B*L*S, N*d), token-major per (sequence, segment)."""
    return r.reshape(b, n, l, s, d).permute(0, 2, 3, 1, 4).reshape(b * l * s, n * d)


def mixing_probs(r2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, shape: List[int]) -> torch.Tensor:
    """Generator + softmax over input tokens: -> (B, L, S, N_out, N_in), rows sum to 1."""
    logits = torch.addmm(bias, r2, weight.t())
    return torch.softmax(logits.view(shape), dim=-1)


def _token_views(t4: torch.Tensor, s: int) -> List[torch.Tensor]:
    """(B, N, L, C) -> list of (batch, N, C/S) strided views covering every (sequence, segment).

    With L == 1 one view per segment (batch B); otherwise one per image (batch L*S), because a
    (column, segment) pair of one image is a single stride apart in the channels-last grid.
    """
    bsz, n, l, c = t4.shape
    cs = c // s
    if l == 1:
        return [t4[:, :, 0, i * cs:(i + 1) * cs] for i in range(s)]
    if t4.stride(3) != 1 or t4.stride(2) != c:
        raise RuntimeError('mix_tokens needs each token\'s channels contiguous')
    return [t4[i].unflatten(-1, (s, cs)).flatten(1, 2).transpose(0, 1) for i in range(bsz)]


def _matrix_views(pt: torch.Tensor) -> List[torch.Tensor]:
    """(B, L, S, N, N) -> list of (batch, N, N) views matching `_token_views`."""
    bsz, l, s, n, _ = pt.shape
    if l == 1:
        return [pt[:, 0, i] for i in range(s)]
    return [pt[i].reshape(l * s, n, n) for i in range(bsz)]


def mix_tokens(pt: torch.Tensor, x4: torch.Tensor, out: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """out[b, j, l, seg s] = sum_i pt[b, l, s, j, i] * x4[b, i, l, seg s]   (pt^T with transpose).

    x4, out: (B, N, L, C), channels contiguous; pt: (B, L, S, N, N). Writes `out` in place.
    """
    s = pt.shape[2]
    for p, xv, ov in zip(_matrix_views(pt), _token_views(x4, s), _token_views(out, s)):
        torch.bmm(p.transpose(-1, -2) if transpose else p, xv, out=ov)
    return out


def mix_outer(g4: torch.Tensor, x4: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[b, l, s, j, i] = sum_c g4[b, j, l, seg s, c] * x4[b, i, l, seg s, c] (mixing-matrix grad)."""
    s = out.shape[2]
    for ov, gv, xv in zip(_matrix_views(out), _token_views(g4, s), _token_views(x4, s)):
        torch.bmm(gv, xv.transpose(-1, -2), out=ov)
    return out


# Mixing matrices of one chunk of sequences stay below this many elements (about 1 MiB in
# float32): they are generated, normalised and used while in cache, and the allocator reuses the
# chunk buffers instead of faulting in fresh pages for a (sequences x S x N x N) tensor.
CHUNK_ELEMENTS = 1 << 18


def _chunks(x4: torch.Tensor, s: int) -> List[Tuple[int, int]]:
    bsz, n, l, _ = x4.shape
    step = max(1, CHUNK_ELEMENTS // (l * s * n * n))
    return [(i, min(i + step, bsz)) for i in range(0, bsz, step)]


def dynamic_mix_forward(x4: torch.Tensor, r2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                        s: int) -> torch.Tensor:
    """Generate, normalise and mix, chunk by chunk: (B, N, L, C) -> (B, N, L, C) contiguous."""
    bsz, n, l, c = x4.shape
    out = torch.empty((bsz, n, l, c), dtype=x4.dtype, device=x4.device)
    rows = l * s
    for i, j in _chunks(x4, s):
        pt = mixing_probs(r2[i * rows:j * rows], weight, bias, [j - i, l, s, n, n])
        mix_tokens(pt, x4[i:j], out[i:j])
    return out


class DynamicMix(torch.autograd.Function):
    """Generate, normalise and mix; recomputes the mixing matrices in backward.

    Inputs: x4 (B, N, L, C) tokens, r2 (B*L*S, N*d) reduced features (token-major), weight
    (N*N, N*d) and bias (N*N) of the generator with rows [out j, in i]. Output: (B, N, L, C).
    Saves only x4 and r2 (r2 is S*d/C of the activations' size).
    """

    @staticmethod
    def forward(ctx, x4: torch.Tensor, r2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, s: int):
        ctx.save_for_backward(x4, r2, weight, bias)
        ctx.s = s
        return dynamic_mix_forward(x4, r2, weight, bias, s)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x4, r2, weight, bias = ctx.saved_tensors
        s = ctx.s
        bsz, n, l, c = x4.shape
        rows = l * s
        grad = grad.contiguous()
        need_x, need_r, need_w, need_b = ctx.needs_input_grad[:4]
        dx = torch.empty_like(grad) if need_x else None
        dr2 = torch.empty_like(r2) if need_r else None
        dw = torch.zeros_like(weight) if need_w else None
        db = torch.zeros_like(bias) if need_b else None
        for i, j in _chunks(x4, s):
            pt = mixing_probs(r2[i * rows:j * rows], weight, bias, [j - i, l, s, n, n])
            if dx is not None:
                mix_tokens(pt, grad[i:j], dx[i:j], transpose=True)
            if need_r or need_w or need_b:
                dp = mix_outer(grad[i:j], x4[i:j], torch.empty_like(pt))
                dlogits = torch._softmax_backward_data(dp, pt, -1, pt.dtype).view(-1, n * n)
                if dr2 is not None:
                    torch.mm(dlogits, weight, out=dr2[i * rows:j * rows])
                if dw is not None:
                    dw.addmm_(dlogits.t(), r2[i * rows:j * rows])
                if db is not None:
                    db += dlogits.sum(0)
        return dx, dr2, dw, db, None


def reweighted_sum(branches: List[torch.Tensor], weights: List[torch.Tensor], biases: List[Optional[torch.Tensor]],
                   a: torch.Tensor) -> torch.Tensor:
    """z = sum_k a[..., k] * (branches[k] @ weights[k]^T + biases[k]): (B, T, C) each -> (B, T, C).

    `a` (B, C, K) weights every branch's output channels per image. With T >= C the weights are
    folded into per-image projection weights (h, w and c are never materialised); otherwise the
    branch outputs are formed with one large GEMM each and combined in place.
    """
    bsz, t, c = branches[0].shape
    bias = sum(a[..., k] * b for k, b in enumerate(biases) if b is not None)
    if t >= c:
        z = None
        for k, (o, w) in enumerate(zip(branches, weights)):
            wk = (w * a[..., k, None]).transpose(1, 2)                  # (B, C_in, C_out)
            z = torch.baddbmm(bias[:, None], o, wk) if z is None else z.baddbmm_(o, wk)
        return z
    z = torch.zeros_like(branches[0]) + bias[:, None]
    for k, (o, w) in enumerate(zip(branches, weights)):
        z.addcmul_(torch.matmul(o, w.t()), a[:, None, :, k])
    return z


class ReweightedSum(torch.autograd.Function):
    """`reweighted_sum` that stores no branch: `recompute()` gives them again in backward.

    The weight gradient of branch k is sum_b a_b[:, k] * (dz_b^T o_b), and the gradient of a_b[:, k]
    is the row-wise dot of W_k with the same (C x C) product: one per-image GEMM gives both, so h,
    w and c are needed neither in forward nor in backward.
    Inputs: a (B, C, K), then per branch its input (B, T, C), weight (C, C) and bias (C or None),
    and `recompute`, a callable returning the branch inputs.
    """

    @staticmethod
    def forward(ctx, recompute, a: torch.Tensor, *args):
        k = len(args) // 3
        branches, weights, biases = list(args[0::3]), list(args[1::3]), list(args[2::3])
        ctx.recompute, ctx.k = recompute, k
        ctx.has_bias = [b is not None for b in biases]
        ctx.save_for_backward(a, *weights, *[b for b in biases if b is not None])
        return reweighted_sum(branches, weights, biases, a)

    @staticmethod
    def backward(ctx, dz: torch.Tensor):
        saved = ctx.saved_tensors
        k = ctx.k
        a, weights, rest = saved[0], saved[1:1 + k], list(saved[1 + k:])
        biases = [rest.pop(0) if hb else None for hb in ctx.has_bias]
        branches = ctx.recompute()
        dz = dz.contiguous()
        dz_sum = dz.sum(1)                                               # (B, C)
        da = torch.zeros_like(a) if ctx.needs_input_grad[1] else None
        grads = []
        for i, (o, w, b) in enumerate(zip(branches, weights, biases)):
            ai = a[..., i]                                               # (B, C)
            need_o, need_w, need_b = ctx.needs_input_grad[2 + 3 * i:5 + 3 * i]
            do = torch.matmul(dz * ai[:, None], w) if need_o else None
            dw = db = None
            if need_w or da is not None:
                m = torch.bmm(dz.transpose(1, 2), o)                      # (B, C_out, C_in)
                if need_w:
                    dw = (m * ai[:, :, None]).sum(0)
                if da is not None:
                    da[..., i] = (m * w).sum(-1)
                    if b is not None:
                        da[..., i] += dz_sum * b
                del m
            if b is not None and need_b:
                db = (dz_sum * ai).sum(0)
            grads += [do, dw, db]
        return (None, da, *grads)

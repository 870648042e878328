"""Fast dynamic mixing for eager PyTorch (CPU, and GPUs without Triton).

The straightforward implementation permutes the whole input into a (sequence, segment, token,
feature) layout, generates the N x N logits of every sequence and segment at once, runs a softmax
over a strided axis, a batched matmul and permutes back; autograd keeps the copies and the mixing
matrices of every sequence. Here:

* The generator's output rows are permuted once per call (a copy of the small weight, not of the
  activations) so that its logits come out as [output token j, input token i]: the softmax over
  the input tokens runs along the contiguous last axis, and the result is already the matrix that
  multiplies the tokens.
* Sequences are processed in chunks whose mixing matrices fit in 2 MiB: generate, normalise,
  gather the chunk's tokens into one contiguous (sequence x segment, N, C/S) block, one batched
  GEMM, scatter the result into the output, into buffers reused from chunk to chunk. (Batched
  GEMMs with strided operands or outputs measured 2-4x slower on the CPU: PyTorch then loops over
  the small matrices one by one.)
* The output can be written into a slot of a larger buffer, so that both mixing branches sit side
  by side and feed one GEMM (`reweighted_sum`).
* `DynamicMix` (an autograd Function) stores only its input and the small reduced features; the
  mixing matrices are recomputed chunk by chunk in the backward pass instead of being kept for
  every sequence, which is where most of the straightforward version's memory goes.

Layout used throughout: tokens ``x4`` of shape (B, N, L, C) mixes along N, for the B*L sequences
(B, :, l); reduced features ``r2`` (B*L*S, N*d), token-major per (sequence, segment).
"""
import math
from typing import List, Optional, Tuple

import torch

__all__ = [
    'generator_rows_out_major', 'reduced_token_major', 'dynamic_mix_forward', 'DynamicMix', 'reweighted_sum',
    'ReweightedSum',
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


# Mixing matrices of one chunk of sequences stay below this many elements (2 MiB in float32): the
# chunk's buffers are reused from chunk to chunk instead of one (sequences x S x N x N) tensor.
# Measured on dynamixer_s (one thread): 2^14-2^17 were 3-50% slower (more calls, each with its
# fixed cost), 2^18-2^19 the fastest.
CHUNK_ELEMENTS = 1 << 19


def _chunks(x4: torch.Tensor, s: int) -> List[Tuple[slice, slice, int]]:
    """Chunks of sequences, as (batch slice, L slice, number of (sequence, segment) rows): whole
    images while an image's matrices fit in the chunk, else one image's columns in groups."""
    bsz, n, l, _ = x4.shape
    per_seq = s * n * n
    if l * per_seq <= CHUNK_ELEMENTS:
        step = CHUNK_ELEMENTS // (l * per_seq)
        return [(slice(i, min(i + step, bsz)), slice(0, l), (min(i + step, bsz) - i) * l * s)
                for i in range(0, bsz, step)]
    step = max(1, CHUNK_ELEMENTS // per_seq)
    return [(slice(i, i + 1), slice(k, min(k + step, l)), (min(k + step, l) - k) * s)
            for i in range(bsz) for k in range(0, l, step)]


def _rows(r2: torch.Tensor, x4: torch.Tensor, s: int, b: slice, l: slice) -> torch.Tensor:
    """The rows of r2 (B*L*S, N*d) that belong to chunk (b, l): a view (also written through)."""
    return r2.view(x4.shape[0], x4.shape[2] * s, -1)[b, l.start * s:l.stop * s].view(-1, r2.shape[-1])


def _gather(t4: torch.Tensor, s: int, buf: torch.Tensor) -> torch.Tensor:
    """(k, N, L, C) tokens -> buf viewed (k*L*S, N, C/S): each (sequence, segment) one contiguous
    matrix, so that one batched GEMM (MKL's strided batch) serves the whole chunk."""
    k, n, l, c = t4.shape
    buf = buf[:k * l * s]
    buf.view(k, l, s, n, c // s).copy_(t4.unflatten(-1, (s, c // s)).permute(0, 2, 3, 1, 4))
    return buf


def _scatter(m: torch.Tensor, out4: torch.Tensor) -> None:
    """Inverse of `_gather`: (k*L*S, N, C/S) -> out4 (k, N, L, C), which may be a strided view."""
    k, n, l, c = out4.shape
    s = c // m.shape[-1]
    out4.unflatten(-1, (s, c // s)).copy_(m.view(k, l, s, n, c // s).permute(0, 3, 1, 2, 4))


def dynamic_mix_forward(x4: torch.Tensor, r2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                        s: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Generate, normalise and mix, chunk by chunk: (B, N, L, C) -> (B, N, L, C).

    `weight` (N*N, N*d) and `bias` (N*N) are the generator's, rows [input i, output j]. Writes into
    `out` when given (it may be a strided view, e.g. one branch's slot in a concatenated buffer);
    otherwise returns a new contiguous tensor.
    """
    bsz, n, l, c = x4.shape
    if out is None:
        out = torch.empty((bsz, n, l, c), dtype=x4.dtype, device=x4.device)
    chunks = _chunks(x4, s)
    most = max(m for _, _, m in chunks)
    logits, probs = x4.new_empty((most, n * n)), x4.new_empty((most, n * n))
    tokens = x4.new_empty((most, n, c // s))
    mixed = torch.empty_like(tokens)
    for b, ls, m in chunks:
        p = _probs(_rows(r2, x4, s, b, ls), weight, bias, logits[:m], probs[:m])
        torch.bmm(p.transpose(1, 2), _gather(x4[b, :, ls], s, tokens), out=mixed[:m])
        _scatter(mixed[:m], out[b, :, ls])
    return out


def _probs(r2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, logits: torch.Tensor,
           probs: torch.Tensor) -> torch.Tensor:
    """Mixing matrices P[i, j] (m, N_in, N_out), normalised over the input token i, written into
    `probs` (logits into `logits`). The softmax over the middle axis is vectorised along j and
    measured faster than one along a last axis of 16-32 elements; P^T is a free transposed
    operand for the GEMMs."""
    n = math.isqrt(weight.shape[0])
    torch.addmm(bias, r2, weight.t(), out=logits)
    return torch.ops.aten._softmax.out(logits.view(-1, n, n), -2, False, out=probs.view(-1, n, n))


class DynamicMix(torch.autograd.Function):
    """Generate, normalise and mix; recomputes the mixing matrices in backward.

    Inputs: x4 (B, N, L, C) tokens, r2 (B*L*S, N*d) reduced features (token-major), weight
    (N*N, N*d) and bias (N*N) of the generator (rows [in i, out j]). Output: (B, N, L, C).
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
        need_x, need_r, need_w, need_b = ctx.needs_input_grad[:4]
        need_p = need_r or need_w or need_b
        dx = torch.empty(x4.shape, dtype=grad.dtype, device=grad.device) if need_x else None
        dr2 = torch.empty_like(r2) if need_r else None
        dw = torch.zeros_like(weight) if need_w else None
        db = torch.zeros_like(bias) if need_b else None
        chunks = _chunks(x4, s)
        most = max(m for _, _, m in chunks)
        logits, probs = x4.new_empty((most, n * n)), x4.new_empty((most, n * n))
        g_buf, x_buf = x4.new_empty((most, n, c // s)), x4.new_empty((most, n, c // s))
        mixed = torch.empty_like(g_buf)
        for b, ls, m in chunks:
            r_rows = _rows(r2, x4, s, b, ls)
            p = _probs(r_rows, weight, bias, logits[:m], probs[:m])          # [in i, out j]
            g = _gather(grad[b, :, ls], s, g_buf)
            if dx is not None:                                              # dx = P g
                torch.bmm(p, g, out=mixed[:m])
                _scatter(mixed[:m], dx[b, :, ls])
            if need_p:                                                      # dP[i, j] = x_i . g_j
                dp = torch.bmm(_gather(x4[b, :, ls], s, x_buf), g.transpose(1, 2))
                dlogits = torch._softmax_backward_data(dp, p, -2, p.dtype).view(m, n * n)
                if dr2 is not None:
                    torch.mm(dlogits, weight, out=_rows(dr2, x4, s, b, ls))
                if dw is not None:
                    dw.addmm_(dlogits.t(), r_rows)
                if db is not None:
                    db += dlogits.sum(0)
        return dx, dr2, dw, db, None


# Per-image projection weights of one chunk of images stay below this many elements (2 MiB in
# float32): they are written and read by the GEMM right away, and no (B, C, K*C) tensor is
# allocated. Chunks of 2^17-2^21 elements measured within noise of each other on dynamixer_s.
WEIGHT_CHUNK_ELEMENTS = 1 << 19


def reweighted_sum(inputs: List[torch.Tensor], weights: List[torch.Tensor], biases: List[Optional[torch.Tensor]],
                   a: torch.Tensor) -> torch.Tensor:
    """z = sum_k a[..., k] * (o_k @ weights[k]^T + biases[k]) for K branches o_k: -> (B, T, C).

    `inputs` hold the branches in order, each (B, T, m*C) with m >= 1 branches side by side (the
    two mixing branches can share one buffer). `a` (B, C, K) weights every branch's output
    channels per image; it is folded into per-image weights (a column scaling of each W_k^T,
    K*C*C multiplies per image), so each input takes one batched GEMM over all its branches and
    no branch output (T x C per branch and image) is ever formed. On the CPU the images go in
    chunks of at most WEIGHT_CHUNK_ELEMENTS weights. Not differentiable (it writes into buffers):
    under autograd use `ReweightedSum`.
    """
    bsz, t = inputs[0].shape[:2]
    c = weights[0].shape[0]
    kc = len(weights) * c
    if sum(inp.shape[-1] for inp in inputs) != kc:
        raise ValueError('inputs must hold one branch per weight')
    terms = [a[..., k] * b for k, b in enumerate(biases) if b is not None]
    bias = sum(terms) if terms else None
    step = bsz if a.is_cuda else max(1, WEIGHT_CHUNK_ELEMENTS // (c * kc))
    wbuf = a.new_empty((min(step, bsz), c, kc))                         # per image: [a_k * W_k] side by side
    z = None if step >= bsz else torch.empty((bsz, t, c), dtype=inputs[0].dtype, device=inputs[0].device)
    for i in range(0, bsz, step):
        j = min(i + step, bsz)
        wc = wbuf[:j - i]
        for k, w in enumerate(weights):
            torch.mul(w, a[i:j, :, k, None], out=wc[:, :, k * c:(k + 1) * c])
        zc = None if z is None else z[i:j]
        col = 0
        for inp in inputs:
            wk = wc[:, :, col:col + inp.shape[-1]].transpose(1, 2)         # (images, m*C, C)
            if col > 0:
                assert zc is not None
                zc.baddbmm_(inp[i:j], wk)
            elif bias is not None:
                zc = torch.baddbmm(bias[i:j, None], inp[i:j], wk, out=zc)
            else:
                zc = torch.bmm(inp[i:j], wk, out=zc)
            col += inp.shape[-1]
        if z is None:
            z = zc
    assert z is not None
    return z


class ReweightedSum(torch.autograd.Function):
    """`reweighted_sum` whose backward needs only the branch inputs, not h, w, c.

    The weight gradient of branch k is sum_b a_b[:, k] * (dz_b^T o_b), and the gradient of a_b[:, k]
    is the row-wise dot of W_k with the same (C x C) product: one per-image GEMM gives both.
    Inputs: a (B, C, K), then per branch its input (B, T, C), weight (C, C) and bias (C or None).
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, *args):
        k = len(args) // 3
        branches, weights, biases = list(args[0::3]), list(args[1::3]), list(args[2::3])
        ctx.k = k
        ctx.has_bias = [b is not None for b in biases]
        ctx.save_for_backward(a, *branches, *weights, *[b for b in biases if b is not None])
        return reweighted_sum(branches, weights, biases, a)

    @staticmethod
    def backward(ctx, dz: torch.Tensor):
        saved = ctx.saved_tensors
        k = ctx.k
        a, branches, weights, rest = saved[0], saved[1:1 + k], saved[1 + k:1 + 2 * k], list(saved[1 + 2 * k:])
        biases = [rest.pop(0) if hb else None for hb in ctx.has_bias]
        dz = dz.contiguous()
        dz_sum = dz.sum(1)                                               # (B, C)
        da = torch.zeros_like(a) if ctx.needs_input_grad[0] else None
        grads = []
        for i, (o, w, b) in enumerate(zip(branches, weights, biases)):
            ai = a[..., i]                                               # (B, C)
            need_o, need_w, need_b = ctx.needs_input_grad[1 + 3 * i:4 + 3 * i]
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
        return (da, *grads)

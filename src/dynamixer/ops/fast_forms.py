"""The fast forms of the op, the block and the layer: the same functions as their plain `forward`
in `model.py`, assembled from the kernels of `ops.mixing`, `ops.mlp`, `ops.triton_mixing` and
`ops.cpu_kernels` (through `ops.dispatch`'s tables).

`ops.dispatch` chooses the path; `model.py` calls these with it. They read the weights of the
modules they bypass (the dispatch has checked that those are exactly nn.Linear / nn.LayerNorm /
timm's Mlp without hooks). See docs/fast_path.md for what each form saves.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dispatch import is_training_path, mixing_backend, mlp_kernel
from .mixing import ReweightedSum, generator_rows_out_major, reduced_token_major, reweighted_sum
from .mlp import mlp_residual_inference_

__all__ = ['mix_tokens_fast', 'op_forward_fast', 'block_forward_fast', 'layer_forward_fast']


def mix_tokens_fast(op: nn.Module, x4: torch.Tensor, r: torch.Tensor, path: str,
                    out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Dynamic mixing of a DynaMixerOp without its output projection.

    x4: (B, N, L, C) tokens mixed along N (channels contiguous); r: their reduced features
    (B, N, L, S*d). Returns the mixed tokens (B, N, L, C), written into `out` when given (CPU
    inference only).
    """
    b, n, l, _ = x4.shape
    s, d = op.num_segments, op.reduced_dim
    r2 = reduced_token_major(r, b, n, l, s, d)
    backend, kernel = mixing_backend(path)
    if backend == 'triton':
        weight, bias = generator_rows_out_major(op.generate.weight, op.generate.bias, n)
    else:
        weight, bias = op.generate.weight, op.generate.bias
    if out is None:
        return kernel(x4, r2, weight, bias, s)
    assert not is_training_path(path) and backend != 'triton', 'out= is for the CPU inference path only'
    return kernel(x4, r2, weight, bias, s, out=out)


def op_forward_fast(op: nn.Module, x: torch.Tensor, path: str) -> torch.Tensor:
    """DynaMixerOp.forward on a fast path: (..., N, C) -> (..., N, C)."""
    n, c = x.shape[-2], x.shape[-1]
    x4 = x.reshape(-1, n, 1, c)
    out = mix_tokens_fast(op, x4, op.reduce(x4), path)
    return op.proj(out.view(x.shape))


def block_forward_fast(block: nn.Module, x: torch.Tensor, path: str) -> torch.Tensor:
    """DynaMixerBlock.forward on a fast path: (B, H, W, C) -> (B, H, W, C).

    Both reductions run as one GEMM. The branches' output projections are linear, so the
    re-weighting mean is taken before them, and `reweighted_sum` folds a_h, a_w, a_c into
    per-image projection weights: h, w and c are never formed. In CPU inference both mixing
    branches write into one (B, H, W, 2C) buffer that feeds a single GEMM. In training,
    `DynamicMix` keeps no mixing matrices (they are recomputed in backward) and `ReweightedSum`
    keeps the mixed tokens but not h, w, c.
    """
    bsz, hh, ww, c = x.shape
    x = x.contiguous()
    mh, mw = block.mix_h, block.mix_w
    sd = mh.reduce.out_features
    r = torch.addmm(
        torch.cat([mh.reduce.bias, mw.reduce.bias]), x.view(-1, c),
        torch.cat([mh.reduce.weight, mw.reduce.weight]).t())
    r = r.view(bsz, hh, ww, 2 * sd)
    r_h, r_w = r[..., :sd], r[..., sd:].reshape(-1, ww, 1, sd)
    w_h, b_h, w_w, b_w, w_c = mh.proj.weight, mh.proj.bias, mw.proj.weight, mw.proj.bias, block.mix_c.weight
    xt = x.view(bsz, -1, c)
    train = is_training_path(path)
    if not train and not x.is_cuda:
        both = x.new_empty((bsz, hh, ww, 2, c))                                 # [h | w] per token
        mix_tokens_fast(mh, x, r_h, path, out=both[..., 0, :])                  # along H
        mix_tokens_fast(mw, x.view(-1, ww, 1, c), r_w, path, out=both[..., 1, :].view(-1, ww, 1, c))
        hw = both.view(bsz, -1, 2 * c)
        mean_hw = hw.mean(1)
        means = (mean_hw[:, :c], mean_hw[:, c:], xt.mean(1))
        inputs = [hw, xt]
    else:
        o_h = mix_tokens_fast(mh, x, r_h, path).view(bsz, -1, c)                         # along H
        o_w = mix_tokens_fast(mw, x.view(-1, ww, 1, c), r_w, path).view(bsz, -1, c)      # along W
        means = (o_h.mean(1), o_w.mean(1), xt.mean(1))
        inputs = [o_h, o_w, xt]
    if block.reweight is None:
        a = x.new_ones(bsz, c, 3)
    else:
        # mean over tokens of h + w + c, through the (linear) branch projections
        m = F.linear(means[0], w_h, b_h) + F.linear(means[1], w_w, b_w) + F.linear(means[2], w_c)
        a = block.reweight(m).unflatten(-1, (c, 3)).softmax(dim=-1)               # (B, C, 3)
    weights, biases = [w_h, w_w, w_c], [b_h, b_w, None]
    if train:
        args = [v for k in range(3) for v in (inputs[k], weights[k], biases[k])]
        z = ReweightedSum.apply(a, *args)
    else:
        z = reweighted_sum(inputs, weights, biases, a)
    return block.proj(z.view(bsz, hh, ww, c))


def layer_forward_fast(layer: nn.Module, x: torch.Tensor, path: str) -> torch.Tensor:
    """MixerLayer.forward with the channel MLP on a fast path: (B, H, W, C) -> (B, H, W, C).

    'fast-inference': the MLP runs in chunks added straight into the residual stream;
    'fast-train' / 'cpp-train': `RecomputeGeluMlp` / `CppRecomputeGeluMlp` store fc1's output only.
    """
    mlp = layer.mlp
    if not is_training_path(path):
        x = layer.token_mixer(layer.norm1(x)).add_(x)             # the mixer's output is a new tensor
        return mlp_residual_inference_(x, layer.norm2, mlp.fc1, mlp.fc2, mlp.act.approximate)
    x = x + layer.drop_path1(layer.token_mixer(layer.norm1(x)))
    y = mlp_kernel(path)(layer.norm2(x).reshape(-1, x.shape[-1]), mlp.fc1.weight, mlp.fc1.bias,
                         mlp.fc2.weight, mlp.fc2.bias, mlp.act.approximate)
    return x + layer.drop_path2(y.view(x.shape))

"""The channel MLP of a mixer layer, fc2(GELU(fc1(x))), with less memory traffic (CPU eager).

* Inference (`mlp_residual_inference_`): tokens go in chunks through norm, fc1, an in-place GELU
  and fc2, whose result is added straight into the residual stream, so no (tokens, 3C) hidden
  tensor is ever allocated and the chunk's hidden activations are reused from chunk to chunk.
* Training (`RecomputeGeluMlp`): autograd keeps only the MLP input and fc1's output; the GELU's
  output, which fc2's weight gradient needs, is recomputed in backward (one elementwise pass)
  instead of being stored. That halves the MLP's stored activations, the largest share of a
  layer's, at the cost of one GELU per layer.
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['MLP_CHUNK_TOKENS', 'mlp_residual_inference_', 'RecomputeGeluMlp']

# Tokens per chunk in inference: the (chunk, 3C) hidden activations (2-5 MiB in float32 for
# C = 192-384) are reused from chunk to chunk. 256-2048 measured within noise of each other on
# dynamixer_s.
MLP_CHUNK_TOKENS = 1024


def mlp_residual_inference_(x: torch.Tensor, norm: nn.LayerNorm, fc1: nn.Linear, fc2: nn.Linear,
                            approximate: str = 'none') -> torch.Tensor:
    """x += fc2(GELU(fc1(norm(x)))) in place, chunk by chunk over tokens. x: (..., C), contiguous."""
    assert fc1.bias is not None and fc2.bias is not None
    tokens = x.view(-1, x.shape[-1])
    step = MLP_CHUNK_TOKENS
    hidden = x.new_empty((min(step, tokens.shape[0]), fc1.out_features))
    for i in range(0, tokens.shape[0], step):
        xc = tokens[i:i + step]
        h = torch.addmm(fc1.bias, F.layer_norm(xc, norm.normalized_shape, norm.weight, norm.bias, norm.eps),
                        fc1.weight.t(), out=hidden[:xc.shape[0]])
        torch._C._nn.gelu_(h, approximate=approximate)  # type: ignore[attr-defined]  # missing from torch's stubs
        xc.addmm_(h, fc2.weight.t()).add_(fc2.bias)
    return x


class RecomputeGeluMlp(torch.autograd.Function):
    """fc2(GELU(fc1(x))) that stores x and fc1's output only.

    Inputs: x (M, C), fc1 weight (H, C) and bias (H), fc2 weight (C, H) and bias (C), the GELU's
    `approximate` mode. Output (M, C).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                approximate: str) -> torch.Tensor:
        h = torch.addmm(b1, x, w1.t())
        out = torch.addmm(b2, F.gelu(h, approximate=approximate), w2.t())
        ctx.save_for_backward(x, h, w1, w2)
        ctx.approximate = approximate
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        x, h, w1, w2 = ctx.saved_tensors
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
        dout = dout.contiguous()
        dw2 = db2 = dx = dw1 = db1 = None
        if need_w2:
            dw2 = dout.t().mm(F.gelu(h, approximate=ctx.approximate))
        if need_b2:
            db2 = dout.sum(0)
        if need_x or need_w1 or need_b1:
            dh = torch.ops.aten.gelu_backward(dout.mm(w2), h, approximate=ctx.approximate)
            if need_w1:
                dw1 = dh.t().mm(x)
            if need_b1:
                db1 = dh.sum(0)
            if need_x:
                dx = dh.mm(w1)
        return dx, dw1, db1, dw2, db2, None

"""The straightforward DynaMixer token mixer, step by step with standard PyTorch ops.

This is the reference the benchmarks compare the library against. It computes each step of the
spec the obvious way, as the authors' release does: per branch a Linear, reshape/permute copies
into the (sequence, segment, token, feature) layout, a separate softmax over the input-token
axis, a batched matmul, permutes back, and the re-weighting with a permuted mean. It has the
library's submodule names, so it loads the library's state dict unchanged.

`baseline_model(model)` returns a deep copy of a library model whose token mixers are replaced
by `BaselineBlock`, and whose patch embedding and downsampling return the convolution's output
permuted to (B, H, W, C) without a copy, as the authors' release does (so the residual stream
keeps the NCHW memory order; the library writes contiguous NHWC). Everything else (LayerNorm,
MLP, head, the convolutions' weights) is the same module code.
"""
import copy
from typing import Tuple

import torch
import torch.nn as nn
from timm.layers import Mlp

__all__ = ['BaselineOp', 'BaselineBlock', 'BaselinePermuteConv', 'baseline_model']


class BaselineOp(nn.Module):
    """Mixing along the token axis of (B, L, N, C) -> (B, L, N, C); L sequences of N tokens."""

    def __init__(self, dim: int, seq_len: int, num_segments: int, reduced_dim: int, mixing: str):
        super().__init__()
        self.dim, self.seq_len, self.num_segments, self.reduced_dim = dim, seq_len, num_segments, reduced_dim
        if mixing == 'dynamic':
            self.reduce = nn.Linear(dim, num_segments * reduced_dim)
            self.generate = nn.Linear(seq_len * reduced_dim, seq_len * seq_len)
            self.static_logits = None
        else:
            self.reduce = self.generate = None
            self.static_logits = nn.Parameter(torch.zeros(num_segments, seq_len, seq_len))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, N, C = x.shape
        S, d = self.num_segments, self.reduced_dim
        if self.static_logits is None:
            w = self.reduce(x)                                          # (B, L, N, S*d)
            w = w.reshape(B, L, N, S, d).permute(0, 1, 3, 2, 4).reshape(B, L, S, N * d)
            w = self.generate(w).reshape(B, L, S, N, N)                 # [input i, output j]
        else:
            w = self.static_logits.reshape(1, 1, S, N, N)
        w = w.softmax(dim=-2)                                           # over input tokens
        v = x.reshape(B, L, N, S, C // S).permute(0, 1, 3, 2, 4)        # (B, L, S, N, C/S)
        out = torch.matmul(w.transpose(-1, -2), v)                      # (B, L, S, N_out, C/S)
        out = out.permute(0, 1, 3, 2, 4).reshape(B, L, N, C)
        return self.proj(out)


class BaselineBlock(nn.Module):
    """Height, width and channel branches with re-weighting: (B, H, W, C) -> (B, H, W, C)."""

    def __init__(self, dim: int, grid_size: Tuple[int, int], num_segments: int, reduced_dim: int,
                 mixing: str = 'dynamic', reweight: bool = True):
        super().__init__()
        self.dim = dim
        self.mix_h = BaselineOp(dim, grid_size[0], num_segments, reduced_dim, mixing)
        self.mix_w = BaselineOp(dim, grid_size[1], num_segments, reduced_dim, mixing)
        self.mix_c = nn.Linear(dim, dim, bias=False)
        self.reweight = Mlp(dim, dim // 4, dim * 3) if reweight else None
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        h = self.mix_h(x.permute(0, 2, 1, 3)).permute(0, 2, 1, 3)
        w = self.mix_w(x)
        c = self.mix_c(x)
        if self.reweight is None:
            return self.proj(h + w + c)
        a = (h + w + c).permute(0, 3, 1, 2).flatten(2).mean(2)          # (B, C)
        a = self.reweight(a).reshape(B, C, 3).permute(2, 0, 1).softmax(dim=0)
        a = a.unsqueeze(2).unsqueeze(2)                                 # (3, B, 1, 1, C)
        return self.proj(h * a[0] + w * a[1] + c * a[2])


class BaselinePermuteConv(nn.Module):
    """The authors' patch embedding / downsampling: conv, then a permute to (B, H, W, C), no copy.

    `nhwc_in`: the input is (B, H, W, C) and is permuted to NCHW first (downsampling).
    """

    def __init__(self, proj: nn.Conv2d, nhwc_in: bool):
        super().__init__()
        self.proj, self.nhwc_in = proj, nhwc_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.nhwc_in:
            x = x.permute(0, 3, 1, 2)
        return self.proj(x).permute(0, 2, 3, 1)


class BaselineLayer(nn.Module):
    """Pre-norm residual layer, step by step: x + block(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, layer: nn.Module, token_mixer: nn.Module):
        super().__init__()
        self.norm1, self.token_mixer, self.drop_path1 = layer.norm1, token_mixer, layer.drop_path1
        self.norm2, self.mlp, self.drop_path2 = layer.norm2, layer.mlp, layer.drop_path2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.token_mixer(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


def baseline_model(model: nn.Module) -> nn.Module:
    """A copy of a library DynaMixer whose mixer layers are `BaselineLayer`s with `BaselineBlock`s."""
    from dynamixer.model import Downsample, MixerLayer
    ref = copy.deepcopy(model)
    ref.stem = BaselinePermuteConv(ref.stem.proj, nhwc_in=False)
    for stage in ref.stages:
        if isinstance(stage.downsample, Downsample):
            stage.downsample = BaselinePermuteConv(stage.downsample.proj, nhwc_in=True)
        for j, layer in enumerate(stage.blocks):
            assert isinstance(layer, MixerLayer)
            mixer = layer.token_mixer
            op = mixer.mix_h
            new = BaselineBlock(
                mixer.dim, (mixer.mix_h.seq_len, mixer.mix_w.seq_len), op.num_segments,
                op.reduced_dim, op.mixing, mixer.reweight is not None).to(next(mixer.parameters()))
            new.load_state_dict(mixer.state_dict())   # after .to(): float64 weights stay float64
            stage.blocks[j] = BaselineLayer(layer, new)
    return ref

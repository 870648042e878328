"""A slow, direct transcription of the spec's equations, for testing.

It reads weights by the authors' key names (spec section 4) and derives every size from the weight
shapes, so it shares nothing with the library's modules. Loops run over segments and output tokens;
only the batch of sequences is vectorised. Use float64.
"""
import math
from typing import Dict, List

import torch
import torch.nn.functional as F

Weights = Dict[str, torch.Tensor]


def linear(x: torch.Tensor, w: Weights, name: str) -> torch.Tensor:
    y = x @ w[name + '.weight'].T
    b = w.get(name + '.bias')
    return y if b is None else y + b


def layer_norm(x: torch.Tensor, w: Weights, name: str, eps: float = 1e-5) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w[name + '.weight'] + w[name + '.bias']


def gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def reference_op(x: torch.Tensor, w: Weights, name: str) -> torch.Tensor:
    """One DynaMixer operation on a batch of sequences x: (M, N, D) -> (M, N, D)."""
    M, N, D = x.shape
    gen_w = w[name + '.generate.weight']                  # (N*N, N*d)
    d = gen_w.shape[1] // N
    S = w[name + '.compress.weight'].shape[0] // d
    block = D // S
    R = linear(x, w, name + '.compress')                  # (M, N, S*d)
    out = torch.zeros_like(x)
    for s in range(S):
        # token-major flattening: index t*d + k holds feature k of token t
        v = torch.cat([R[:, t, s * d:(s + 1) * d] for t in range(N)], dim=1)  # (M, N*d)
        g = linear(v, w, name + '.generate')              # (M, N*N); g[:, i*N + j] = G[i, j]
        for j in range(N):
            col = torch.stack([g[:, i * N + j] for i in range(N)], dim=1)     # (M, N_in)
            e = torch.exp(col - col.max(dim=1, keepdim=True).values)
            p = e / e.sum(dim=1, keepdim=True)            # softmax over the input token i
            xs = x[:, :, s * block:(s + 1) * block]       # (M, N_in, block)
            out[:, j, s * block:(s + 1) * block] = (p[:, :, None] * xs).sum(dim=1)
    return linear(out, w, name + '.out')


def reference_block(x: torch.Tensor, w: Weights, name: str, reweight: bool = True) -> torch.Tensor:
    """DynaMixer block on a grid x: (B, H, W, D) -> (B, H, W, D)."""
    B, H, W, D = x.shape
    h = torch.zeros_like(x)
    for col in range(W):                                  # mix the H tokens of every column
        h[:, :, col] = reference_op(x[:, :, col], w, name + '.mix_h')
    wb = torch.zeros_like(x)
    for row in range(H):                                  # mix the W tokens of every row
        wb[:, row] = reference_op(x[:, row], w, name + '.mix_w')
    c = linear(x, w, name + '.mlp_c')
    if not reweight:
        return linear(h + wb + c, w, name + '.proj')
    a = (h + wb + c).mean(dim=(1, 2))                     # (B, D)
    a = linear(gelu(linear(a, w, name + '.reweight.fc1')), w, name + '.reweight.fc2')  # (B, 3D)
    mixed = torch.zeros_like(x)
    for k in range(D):
        logits = torch.stack([a[:, 3 * k + j] for j in range(3)], dim=1)  # branch j of channel k
        p = torch.exp(logits) / torch.exp(logits).sum(dim=1, keepdim=True)
        mixed[..., k] = (p[:, 0, None, None] * h[..., k] + p[:, 1, None, None] * wb[..., k]
                         + p[:, 2, None, None] * c[..., k])
    return linear(mixed, w, name + '.proj')


def reference_layer(x: torch.Tensor, w: Weights, name: str) -> torch.Tensor:
    x = x + reference_block(layer_norm(x, w, name + '.norm1'), w, name + '.attn')
    y = layer_norm(x, w, name + '.norm2')
    return x + linear(gelu(linear(y, w, name + '.mlp.fc1')), w, name + '.mlp.fc2')


def reference_logits(w: Weights, images: torch.Tensor) -> torch.Tensor:
    """Logits of the network described by an authors'-layout state dict: (B, 3, H, W) -> (B, K)."""
    pw = w['patch_embed.proj.weight']
    x = F.conv2d(images, pw, w['patch_embed.proj.bias'], stride=pw.shape[-1]).permute(0, 2, 3, 1)
    flat: List[int] = sorted({int(k.split('.')[1]) for k in w if k.startswith('network.')})
    for i in flat:
        if f'network.{i}.proj.weight' in w:               # a transition
            x = F.conv2d(x.permute(0, 3, 1, 2), w[f'network.{i}.proj.weight'],
                         w[f'network.{i}.proj.bias'], stride=2).permute(0, 2, 3, 1)
            continue
        layers = sorted({int(k.split('.')[2]) for k in w if k.startswith(f'network.{i}.')})
        for j in layers:
            x = reference_layer(x, w, f'network.{i}.{j}')
    x = layer_norm(x, w, 'norm').mean(dim=(1, 2))
    return linear(x, w, 'head')


def make_authors_state_dict(
        depths, widths, transition_after, segments, reduced_dim, grid, num_classes=10,
        patch_size=7, seed=0, dtype=torch.float64, scale=1.0,
) -> Weights:
    """Random weights in the authors' layout, built from the spec's key list (section 4).

    `transition_after` is the stage index (0-based) followed by the 2x2 stride-2 conv; `grid` is
    the first stage's token grid side. Scales are chosen so that the mixing matrices are far from
    uniform and every branch matters; `scale` multiplies every standard deviation.
    """
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.1, mean=0.0):
        # representable in float32, so float32 and float64 copies hold the same numbers
        return (torch.randn(*shape, generator=g) * std * scale + mean).float().to(dtype)

    w: Weights = {
        'patch_embed.proj.weight': rnd(widths[0], 3, patch_size, patch_size, std=0.1),
        'patch_embed.proj.bias': rnd(widths[0]),
    }
    flat, n = 0, grid
    for s, (depth, dim) in enumerate(zip(depths, widths)):
        if s > 0 and s - 1 == transition_after:
            w[f'network.{flat}.proj.weight'] = rnd(dim, widths[s - 1], 2, 2, std=0.1)
            w[f'network.{flat}.proj.bias'] = rnd(dim)
            flat += 1
            n //= 2
        S, d = segments[s], reduced_dim
        for j in range(depth):
            p = f'network.{flat}.{j}.'
            for norm in ('norm1', 'norm2'):
                w[p + norm + '.weight'] = rnd(dim, mean=1.0)
                w[p + norm + '.bias'] = rnd(dim)
            for br in ('mix_h', 'mix_w'):
                q = p + 'attn.' + br + '.'
                w[q + 'compress.weight'] = rnd(S * d, dim, std=0.3)
                w[q + 'compress.bias'] = rnd(S * d)
                w[q + 'generate.weight'] = rnd(n * n, n * d, std=1.0)
                w[q + 'generate.bias'] = rnd(n * n, std=1.0)
                w[q + 'out.weight'] = rnd(dim, dim, std=0.2)
                w[q + 'out.bias'] = rnd(dim)
            w[p + 'attn.mlp_c.weight'] = rnd(dim, dim, std=0.2)
            w[p + 'attn.reweight.fc1.weight'] = rnd(dim // 4, dim, std=0.5)
            w[p + 'attn.reweight.fc1.bias'] = rnd(dim // 4)
            w[p + 'attn.reweight.fc2.weight'] = rnd(3 * dim, dim // 4, std=0.5)
            w[p + 'attn.reweight.fc2.bias'] = rnd(3 * dim)
            w[p + 'attn.proj.weight'] = rnd(dim, dim, std=0.2)
            w[p + 'attn.proj.bias'] = rnd(dim)
            w[p + 'mlp.fc1.weight'] = rnd(3 * dim, dim, std=0.1)
            w[p + 'mlp.fc1.bias'] = rnd(3 * dim)
            w[p + 'mlp.fc2.weight'] = rnd(dim, 3 * dim, std=0.1)
            w[p + 'mlp.fc2.bias'] = rnd(dim)
        flat += 1
    w['norm.weight'] = rnd(widths[-1], mean=1.0)
    w['norm.bias'] = rnd(widths[-1])
    w['head.weight'] = rnd(num_classes, widths[-1], std=0.5)
    w['head.bias'] = rnd(num_classes)
    return w


# The published configurations, written out from the spec's table for the reference's use.
NANO = dict(depths=(2, 2, 2, 2), widths=(64, 128, 128, 128), transition_after=0,
            segments=(4, 8, 8, 8), reduced_dim=2, grid=8, patch_size=4)
SMALL = dict(depths=(4, 3, 8, 3), widths=(192, 384, 384, 384), transition_after=0,
             segments=(8, 16, 16, 16), reduced_dim=2, grid=32)
MEDIUM = dict(depths=(4, 3, 14, 3), widths=(256, 256, 512, 512), transition_after=1,
              segments=(8, 8, 16, 16), reduced_dim=2, grid=32)

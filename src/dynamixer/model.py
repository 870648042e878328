"""DynaMixer: dynamic token mixing for vision (Wang et al., ICML 2022, arXiv:2201.12083).

The network works on a channels-last token grid (B, H, W, C). Every DynaMixer block mixes the
tokens of each column (height branch) and of each row (width branch) with N x N matrices that are
generated from the tokens themselves, adds a per-token channel branch, and re-weights the three
branches per channel (as in Vision Permutator).

Module layout (this project's own state-dict keys)::

    stem.proj                               Conv2d(in_chans, D0, patch, stride patch)
    stages.i.downsample.proj                Conv2d(D_{i-1}, D_i, 2, stride 2)   (marked stages)
    stages.i.blocks.j.{norm1,token_mixer,norm2,mlp}
    ... token_mixer.{mix_h,mix_w}.{reduce,generate,proj}, token_mixer.{mix_c,reweight,proj}
    norm, head

`checkpoint_filter_fn` converts the authors' release layout (``network.i.j.attn.mix_h.compress``
and so on, see the spec) to this one.
"""
import operator
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, to_2tuple, trunc_normal_
from timm.layers import register_notrace_function
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

from .fast_mixing import (
    DynamicMix, ReweightedSum, dynamic_mix_forward, generator_rows_out_major, reduced_token_major, reweighted_sum)
from .fast_mlp import RecomputeGeluMlp, mlp_residual_inference_

__all__ = [
    'DynaMixerOp', 'DynaMixerBlock', 'MixerLayer', 'DynaMixerStage', 'DynaMixer',
    'checkpoint_filter_fn', 'token_grids',
]


def token_grids(
        img_size: Tuple[int, int],
        patch_size: int,
        downsamples: Sequence[bool],
) -> List[Tuple[int, int]]:
    """Token grid (H, W) of every stage for an input of `img_size`.

    Raises ValueError, naming the nearest sizes that work, when the size is not divisible by the
    patch size and by 2 for every 2x2 stride-2 transition.
    """
    num_down = sum(bool(d) for d in downsamples)
    step = patch_size * 2 ** num_down
    try:
        if len(img_size) != 2 or any(isinstance(s, bool) for s in img_size):
            raise TypeError
        img_size = tuple(operator.index(s) for s in img_size)  # ints only: 48.0 or '48' are refused
    except TypeError:
        raise ValueError(
            f'img_size must be an int or a pair of ints (height, width); got {img_size!r}.') from None
    if any(s % step != 0 or s < step for s in img_size):
        near, fits = [], []
        for axis, s in zip(('height', 'width'), img_size):
            lower = (s // step) * step
            options = sorted({v for v in (lower, lower + step) if v >= step} or {step})
            near.append(f'{axis} {s}: ' + (str(s) if s % step == 0 and s >= step else ' or '.join(map(str, options))))
            fits.append(s if s % step == 0 and s >= step else min(options, key=lambda v: (abs(v - s), v)))
        raise ValueError(
            f'img_size {tuple(img_size)} does not fit this architecture: height and width must be '
            f'positive multiples of {step} (patch size {patch_size} x 2^{num_down} transitions). '
            f'Nearest sizes that work: {"; ".join(near)} (e.g. img_size={tuple(fits)}).')
    grids = []
    h, w = img_size[0] // patch_size, img_size[1] // patch_size
    for down in downsamples:
        if down:
            h, w = h // 2, w // 2
        grids.append((h, w))
    return grids


@register_notrace_function  # a leaf for FX tracing: its branches read concrete shapes
def _check_input(x: torch.Tensor, in_chans: int, img_size: Tuple[int, int], name: str) -> None:
    """Raise ValueError unless x is (B, in_chans, *img_size)."""
    if x.dim() != 4:
        raise ValueError(
            '{} expects a batch of images (B, {}, {}, {}); got a tensor of shape {}.'.format(
                name, in_chans, img_size[0], img_size[1], list(x.shape)))
    if x.shape[1] != in_chans:
        raise ValueError(
            '{} expects {} input channels; got {} (input shape {}). Convert the images, or build '
            'the model with in_chans={}.'.format(
                name, in_chans, x.shape[1], list(x.shape), x.shape[1]))
    if x.shape[2] != img_size[0] or x.shape[3] != img_size[1]:
        raise ValueError(
            '{} was built for {}x{} input (its mixing weights are shaped by the token grid); got '
            '{}x{}. Resize the images, or build a model for this size with '
            'timm.create_model(name, img_size=({}, {})).'.format(
                name, img_size[0], img_size[1], x.shape[2], x.shape[3], x.shape[2], x.shape[3]))


torch.fx.wrap('_check_input')  # plain torch.fx.symbolic_trace keeps it as one call, too


def _triton_mixing_available() -> bool:
    try:
        from .triton_mixing import triton_available
    except ImportError:
        return False
    return triton_available()


# Shorter sequences take the plain path: with N x N matrices of 8 x 8 or smaller the copies the
# fast path saves are tiny, and its per-matrix bmm calls and last-axis softmax over a handful of
# elements cost more (dynamixer_nano's blocks measured about 3-6x slower on the CPU).
FAST_PATH_MIN_TOKENS = 16


@torch.jit.unused
def _fast_path_ok(x: torch.Tensor, dynamic: bool, seq_len: int) -> bool:
    """Use the copy-free eager path? Not while tracing or compiling (the plain ops are what FX,
    TorchScript and Inductor handle best), and under autocast only on CUDA with Triton (the
    fused kernel follows the plain path's casts; on the CPU the plain path defines them). On the
    meta device (shape inference, op counting) the plain path's op sequence is the canonical one:
    the fast path spends 3*C*C extra multiply-adds per image and block on the re-weighting mean."""
    if not dynamic or seq_len < FAST_PATH_MIN_TOKENS or is_fx_symbolic_tracing() or torch.compiler.is_compiling():
        return False
    if x.device.type not in ('cpu', 'cuda'):
        return False
    if torch.is_autocast_enabled(x.device.type):
        return x.is_cuda and _triton_mixing_available()
    return True


@torch.jit.unused
def _needs_grad(x: torch.Tensor, module: nn.Module) -> bool:
    """Will autograd record this call (the fast paths then take their training form)?"""
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters()))


class DynaMixerOp(nn.Module):
    """Dynamic mixing of N tokens along one axis: (..., N, C) -> (..., N, C).

    Each token is reduced to S segments of d features; each segment's N*d features (token-major)
    go through one generator shared by the segments, Linear(N*d, N*N), whose output, read as
    [input token i, output token j] and softmax-normalised over i, mixes channel block s.

    With ``mixing='static'`` the N x N logits of every segment are learned parameters that do not
    depend on the input (same softmax and mixing); used for ablations.
    """

    def __init__(
            self,
            dim: int,
            seq_len: int,
            num_segments: int = 8,
            reduced_dim: int = 2,
            mixing: str = 'dynamic',
    ):
        super().__init__()
        if dim % num_segments != 0:
            raise ValueError(f'dim {dim} must be divisible by num_segments {num_segments}')
        if mixing not in ('dynamic', 'static'):
            raise ValueError(f"mixing must be 'dynamic' or 'static', got {mixing!r}")
        self.dim = dim
        self.seq_len = seq_len
        self.num_segments = num_segments
        self.reduced_dim = reduced_dim
        self.mixing = mixing
        if mixing == 'dynamic':
            self.reduce = nn.Linear(dim, num_segments * reduced_dim)
            self.generate = nn.Linear(seq_len * reduced_dim, seq_len * seq_len)
            self.static_logits = None
        else:
            self.reduce = self.generate = None
            self.static_logits = nn.Parameter(torch.zeros(num_segments, seq_len, seq_len))
        self.proj = nn.Linear(dim, dim)

    def mixing_weights(self, x: torch.Tensor) -> torch.Tensor:
        """The mixing matrices P: (..., N, C) -> (..., S, N_in, N_out), columns sum to 1."""
        n, s, d = self.seq_len, self.num_segments, self.reduced_dim
        if self.static_logits is not None:
            return self.static_logits.softmax(dim=-2)
        assert self.reduce is not None and self.generate is not None
        r = self.reduce(x).unflatten(-1, (s, d))                # (..., N, S, d)
        r = r.transpose(-3, -2).flatten(-2)                     # (..., S, N*d), token-major
        logits = self.generate(r).unflatten(-1, (n, n))         # (..., S, N_in, N_out)
        return logits.softmax(dim=-2)

    @torch.jit.unused
    def mix_tokens_fast(self, x4: torch.Tensor, r: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Dynamic mixing without the output projection (see `fast_mixing`).

        x4: (B, N, L, C) tokens mixed along N (channels contiguous); r: their reduced features
        (B, N, L, S*d). Returns the mixed tokens (B, N, L, C), written into `out` when given
        (CPU inference only).
        """
        assert self.reduce is not None and self.generate is not None
        b, n, l, _ = x4.shape
        s, d = self.num_segments, self.reduced_dim
        r2 = reduced_token_major(r, b, n, l, s, d)
        training = torch.is_grad_enabled() and any(t.requires_grad for t in (x4, r2, self.generate.weight))
        if x4.is_cuda and _triton_mixing_available():
            from .triton_mixing import triton_dynamic_mix, triton_mix_forward
            assert out is None, 'out= is for the CPU inference path only'
            weight, bias = generator_rows_out_major(self.generate.weight, self.generate.bias, n)
            if training:
                return triton_dynamic_mix(x4, r2, weight, bias, s)
            return triton_mix_forward(x4, r2, weight, bias, s)
        weight, bias = self.generate.weight, self.generate.bias
        if training:
            assert out is None, 'out= is for the CPU inference path only'
            return DynamicMix.apply(x4, r2, weight, bias, s)
        return dynamic_mix_forward(x4, r2, weight, bias, s, out=out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and _fast_path_ok(x, self.static_logits is None, self.seq_len):
            n, c = x.shape[-2], x.shape[-1]
            x4 = x.reshape(-1, n, 1, c)
            out = self.mix_tokens_fast(x4, self.reduce(x4))
            return self.proj(out.view(x.shape))
        s = self.num_segments
        p = self.mixing_weights(x)                              # (..., S, N_in, N_out)
        xs = x.unflatten(-1, (s, self.dim // s)).transpose(-3, -2)  # (..., S, N_in, C/S)
        out = torch.matmul(p.transpose(-1, -2), xs)             # (..., S, N_out, C/S)
        out = out.transpose(-3, -2).flatten(-2)                 # (..., N, C)
        return self.proj(out)


class DynaMixerBlock(nn.Module):
    """Token mixing on a grid: (B, H, W, C) -> (B, H, W, C).

    Height branch (mix every column), width branch (mix every row) and a per-token channel branch,
    combined with per-channel softmax weights computed from their global mean (``reweight=True``,
    the published models) or summed (``reweight=False``, the paper's Algorithm 1).
    """

    def __init__(
            self,
            dim: int,
            grid_size: Tuple[int, int],
            num_segments: int = 8,
            reduced_dim: int = 2,
            mixing: str = 'dynamic',
            reweight: bool = True,
    ):
        super().__init__()
        self.dim = dim
        self.mix_h = DynaMixerOp(dim, grid_size[0], num_segments, reduced_dim, mixing)
        self.mix_w = DynaMixerOp(dim, grid_size[1], num_segments, reduced_dim, mixing)
        self.mix_c = nn.Linear(dim, dim, bias=False)
        self.reweight = Mlp(dim, dim // 4, dim * 3) if reweight else None
        self.proj = nn.Linear(dim, dim)

    @torch.jit.unused
    def forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        """Same function as the plain path, with less memory traffic (see `fast_mixing`).

        Both reductions run as one GEMM. The branches' output projections are linear, so the
        re-weighting mean is taken before them, and `reweighted_sum` folds a_h, a_w, a_c into
        per-image projection weights: h, w and c are never formed. In inference both mixing
        branches write into one (B, H, W, 2C) buffer that feeds a single GEMM. In training,
        `DynamicMix` keeps no mixing matrices (they are recomputed in backward) and
        `ReweightedSum` keeps the mixed tokens but not h, w, c.
        """
        bsz, hh, ww, c = x.shape
        x = x.contiguous()
        mh, mw = self.mix_h, self.mix_w
        assert mh.reduce is not None and mw.reduce is not None
        sd = mh.reduce.out_features
        r = torch.addmm(
            torch.cat([mh.reduce.bias, mw.reduce.bias]), x.view(-1, c),
            torch.cat([mh.reduce.weight, mw.reduce.weight]).t())
        r = r.view(bsz, hh, ww, 2 * sd)
        r_h, r_w = r[..., :sd], r[..., sd:].reshape(-1, ww, 1, sd)
        w_h, b_h, w_w, b_w, w_c = mh.proj.weight, mh.proj.bias, mw.proj.weight, mw.proj.bias, self.mix_c.weight
        xt = x.view(bsz, -1, c)
        training = _needs_grad(x, self)
        if not training and not x.is_cuda:
            both = x.new_empty((bsz, hh, ww, 2, c))                             # [h | w] per token
            mh.mix_tokens_fast(x, r_h, out=both[..., 0, :])                    # along H
            mw.mix_tokens_fast(x.view(-1, ww, 1, c), r_w, out=both[..., 1, :].view(-1, ww, 1, c))
            hw = both.view(bsz, -1, 2 * c)
            mean_hw = hw.mean(1)
            means = (mean_hw[:, :c], mean_hw[:, c:], xt.mean(1))
            inputs = [hw, xt]
        else:
            o_h = mh.mix_tokens_fast(x, r_h).view(bsz, -1, c)                   # along H
            o_w = mw.mix_tokens_fast(x.view(-1, ww, 1, c), r_w).view(bsz, -1, c)  # along W
            means = (o_h.mean(1), o_w.mean(1), xt.mean(1))
            inputs = [o_h, o_w, xt]
        if self.reweight is None:
            a = x.new_ones(bsz, c, 3)
        else:
            # mean over tokens of h + w + c, through the (linear) branch projections
            m = F.linear(means[0], w_h, b_h) + F.linear(means[1], w_w, b_w) + F.linear(means[2], w_c)
            a = self.reweight(m).unflatten(-1, (c, 3)).softmax(dim=-1)          # (B, C, 3)
        weights, biases = [w_h, w_w, w_c], [b_h, b_w, None]
        if training:
            args = [v for k in range(3) for v in (inputs[k], weights[k], biases[k])]
            z = ReweightedSum.apply(a, *args)
        else:
            z = reweighted_sum(inputs, weights, biases, a)
        return self.proj(z.view(bsz, hh, ww, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and _fast_path_ok(
                x, self.mix_h.static_logits is None, min(self.mix_h.seq_len, self.mix_w.seq_len)):
            return self.forward_fast(x)
        h = self.mix_h(x.transpose(1, 2)).transpose(1, 2)       # mix along H, per column
        w = self.mix_w(x)                                       # mix along W, per row
        c = self.mix_c(x)
        if self.reweight is None:
            return self.proj(h + w + c)
        a = (h + w + c).mean(dim=(1, 2))                        # (B, C)
        a = self.reweight(a).unflatten(-1, (self.dim, 3)).softmax(dim=-1)  # (B, C, 3)
        a = a[:, None, None]                                    # (B, 1, 1, C, 3)
        return self.proj(h * a[..., 0] + w * a[..., 1] + c * a[..., 2])


class MixerLayer(nn.Module):
    """Pre-norm residual layer: DynaMixer block, then a channel MLP. (B, H, W, C) -> same."""

    def __init__(
            self,
            dim: int,
            grid_size: Tuple[int, int],
            num_segments: int = 8,
            reduced_dim: int = 2,
            mlp_ratio: float = 3.0,
            drop_path: float = 0.0,
            mixing: str = 'dynamic',
            reweight: bool = True,
            norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
            act_layer: Callable[..., nn.Module] = nn.GELU,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.token_mixer = DynaMixerBlock(dim, grid_size, num_segments, reduced_dim, mixing, reweight)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    @torch.jit.unused
    def _mlp_is_plain(self) -> bool:
        mlp = self.mlp
        return (type(self.norm2) is nn.LayerNorm and type(mlp.act) is nn.GELU and isinstance(mlp.norm, nn.Identity)
                and mlp.fc1.bias is not None and mlp.fc2.bias is not None
                and not (self.training and (mlp.drop1.p > 0 or mlp.drop2.p > 0)))

    @torch.jit.unused
    def _fast_mlp_ok(self, x: torch.Tensor) -> Tuple[bool, bool]:
        """(use `fast_mlp` at all, in its inference form). Eager CPU/CUDA only, and not under
        autocast, whose casts the plain modules define."""
        if is_fx_symbolic_tracing() or torch.compiler.is_compiling() or not self._mlp_is_plain():
            return False, False
        if x.device.type not in ('cpu', 'cuda') or torch.is_autocast_enabled(x.device.type):
            return False, False
        return True, not _needs_grad(x, self) and not self.training and x.device.type == 'cpu'

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            fast, inference = self._fast_mlp_ok(x)
            if inference:
                x = self.token_mixer(self.norm1(x)).add_(x)             # the mixer's output is a new tensor
                return mlp_residual_inference_(x, self.norm2, self.mlp.fc1, self.mlp.fc2, self.mlp.act.approximate)
            if fast:
                x = x + self.drop_path1(self.token_mixer(self.norm1(x)))
                mlp = self.mlp
                y = RecomputeGeluMlp.apply(self.norm2(x).reshape(-1, x.shape[-1]), mlp.fc1.weight, mlp.fc1.bias,
                                           mlp.fc2.weight, mlp.fc2.bias, mlp.act.approximate)
                return x + self.drop_path2(y.view(x.shape))
        x = x + self.drop_path1(self.token_mixer(self.norm1(x)))
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x


class Downsample(nn.Module):
    """2x2 stride-2 convolution between stages: (B, H, W, C_in) -> (B, H/2, W/2, C_out)."""

    def __init__(self, in_chs: int, out_chs: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chs, out_chs, kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class PatchEmbed(nn.Module):
    """Non-overlapping patches: (B, C, H, W) -> (B, H/p, W/p, D)."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class DynaMixerStage(nn.Module):
    """Optional 2x2 stride-2 transition, then `depth` mixer layers. NHWC in and out."""

    def __init__(
            self,
            in_dim: int,
            dim: int,
            depth: int,
            grid_size: Tuple[int, int],
            downsample: bool,
            drop_path: Sequence[float],
            **layer_kwargs: Any,
    ):
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = Downsample(in_dim, dim) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[
            MixerLayer(dim, grid_size, drop_path=drop_path[j], **layer_kwargs) for j in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return x


class DynaMixer(nn.Module):
    """DynaMixer network: (B, in_chans, H, W) images -> (B, num_classes) logits.

    `forward_features` returns the normed last-stage tokens, (B, H', W', C), channels last.
    The model is built for one input size (the generators are shaped by the token grid); the
    input is checked against it.
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            patch_size: int = 7,
            depths: Sequence[int] = (4, 3, 8, 3),
            embed_dims: Sequence[int] = (192, 384, 384, 384),
            downsamples: Sequence[bool] = (False, True, False, False),
            num_segments: Sequence[int] = (8, 16, 16, 16),
            reduced_dim: int = 2,
            mlp_ratio: float = 3.0,
            mixing: str = 'dynamic',
            reweight: bool = True,
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            norm_layer: Callable[..., nn.Module] = partial(nn.LayerNorm, eps=1e-5),
    ):
        super().__init__()
        if global_pool not in ('', 'avg'):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        if not len(depths) == len(embed_dims) == len(downsamples) == len(num_segments):
            raise ValueError('depths, embed_dims, downsamples and num_segments need one entry per stage')
        self.img_size = to_2tuple(img_size)
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.patch_size = patch_size
        self.grid_sizes = token_grids(self.img_size, patch_size, downsamples)
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.grad_checkpointing = False

        self.stem = PatchEmbed(in_chans, embed_dims[0], patch_size)
        total = sum(depths)
        # drop-path grows linearly over all layers: layer k of K gets rate * k / (K - 1)
        dpr = [drop_path_rate * k / max(total - 1, 1) for k in range(total)]
        stages = []
        self.feature_info = []
        prev_dim, reduction, first = embed_dims[0], patch_size, 0
        for i, (depth, dim) in enumerate(zip(depths, embed_dims)):
            if downsamples[i]:
                reduction *= 2
            stages.append(DynaMixerStage(
                prev_dim, dim, depth, self.grid_sizes[i], bool(downsamples[i]),
                drop_path=dpr[first:first + depth],
                num_segments=num_segments[i],
                reduced_dim=reduced_dim,
                mlp_ratio=mlp_ratio,
                mixing=mixing,
                reweight=reweight,
                norm_layer=norm_layer,
            ))
            self.feature_info.append(dict(num_chs=dim, reduction=reduction, module=f'stages.{i}'))
            prev_dim, first = dim, first + depth
        self.stages = nn.Sequential(*stages)
        self.norm = norm_layer(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # Linear: truncated normal 0.02, zero bias; LayerNorm: 1, 0; convs keep PyTorch's default
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^stem',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.downsample', (0,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
                (r'^norm', (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for s in self.stages:
            s.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ('', 'avg'):
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def _check(self, x: torch.Tensor) -> None:
        _check_input(x, self.in_chans, self.img_size, 'DynaMixer')

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Per-stage feature maps.

        Args:
            x: images (B, in_chans, H, W).
            indices: stages to return: None for all, an int n for the last n, or a list.
            norm: apply the final norm to the last stage's map.
            stop_early: stop after the last requested stage.
            output_fmt: 'NCHW' (B, C_i, H_i, W_i) or 'NHWC'.
            intermediates_only: return only the list of maps.
        """
        if output_fmt not in ('NCHW', 'NHWC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        self._check(x)
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last_idx = len(self.stages) - 1
        x = self.stem(x)
        if torch.jit.is_scripting() or not stop_early:
            stages = self.stages
        else:
            stages = self.stages[:max_index + 1]
        feat_idx = 0
        for feat_idx, stage in enumerate(stages):
            x = stage(x)
            if feat_idx in take_indices:
                x_inter = self.norm(x) if norm and feat_idx == last_idx else x
                intermediates.append(x_inter.permute(0, 3, 1, 2) if output_fmt == 'NCHW' else x_inter)
        if intermediates_only:
            return intermediates
        if feat_idx == last_idx:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages (and optionally norm and head) after the last of `indices`."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> normed last-stage tokens (B, H', W', C)."""
        self._check(x)
        x = self.stem(x)
        x = self.stages(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, H', W', C) -> (B, num_classes), or the pooled (B, C) with pre_logits."""
        if self.global_pool == 'avg':
            x = x.mean(dim=(1, 2))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# --------------------------------------------------------------------------------------------
# The authors' checkpoint layout (spec section 4)
# --------------------------------------------------------------------------------------------

_AUTHORS_RENAMES = (
    ('.attn.mix_h.compress.', '.token_mixer.mix_h.reduce.'),
    ('.attn.mix_w.compress.', '.token_mixer.mix_w.reduce.'),
    ('.attn.mix_h.out.', '.token_mixer.mix_h.proj.'),
    ('.attn.mix_w.out.', '.token_mixer.mix_w.proj.'),
    ('.attn.mlp_c.', '.token_mixer.mix_c.'),
    ('.attn.', '.token_mixer.'),
)


def _unwrap_state_dict(checkpoint: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """A bare state dict from a training checkpoint; EMA weights win, 'module.' is stripped."""
    for key in ('state_dict_ema', 'model_ema', 'state_dict', 'model'):
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    return {(k[7:] if k.startswith('module.') else k): v for k, v in checkpoint.items()}


def _authors_stage_map(model: DynaMixer) -> Dict[str, str]:
    """Prefix map from the authors' flat `network.i` list (stages and transitions) to ours."""
    mapping = {}
    flat = 0
    for i, stage in enumerate(model.stages):
        if isinstance(stage.downsample, Downsample):
            mapping[f'network.{flat}.'] = f'stages.{i}.downsample.'
            flat += 1
        mapping[f'network.{flat}.'] = f'stages.{i}.blocks.'
        flat += 1
    return mapping


def _convert_authors_layout(state_dict: Dict[str, torch.Tensor], model: DynaMixer) -> Dict[str, torch.Tensor]:
    stage_map = _authors_stage_map(model)
    out = {}
    for k, v in state_dict.items():
        if k.startswith('patch_embed.'):
            k = 'stem.' + k[len('patch_embed.'):]
        elif k.startswith('network.'):
            idx = k.split('.')[1]
            prefix = f'network.{idx}.'
            if prefix not in stage_map:
                raise ValueError(
                    f'checkpoint entry {k!r} belongs to network.{idx}, but this model has only '
                    f'{len(stage_map)} stages and transitions')
            # a transition's 'network.i.proj.*' becomes 'stages.k.downsample.proj.*'
            k = stage_map[prefix] + k[len(prefix):]
            for old, new in _AUTHORS_RENAMES:
                k = k.replace(old, new)
        out[k] = v
    return out


def _describe(state_dict: Dict[str, torch.Tensor]) -> str:
    """Architecture summary (layers and width per stage, transitions, classes) of a state dict in
    either layout, for error messages."""
    authors = any(k.startswith('network.') for k in state_dict)
    stages: Dict[int, Dict[str, int]] = {}  # position -> depth, width, transition flag
    for k, v in state_dict.items():
        parts = k.split('.')
        if authors and parts[0] == 'network' and len(parts) > 2:
            pos = int(parts[1])
            if parts[2] == 'proj':                     # a transition in the flat list
                stages.setdefault(pos, {})['transition'] = 1
            elif parts[2].isdigit():
                st = stages.setdefault(pos, {})
                st['depth'] = max(st.get('depth', 0), int(parts[2]) + 1)
                if parts[3] == 'norm1' and parts[-1] == 'weight':
                    st['width'] = v.shape[0]
        elif not authors and parts[0] == 'stages' and len(parts) > 3:
            st = stages.setdefault(int(parts[1]), {})
            if parts[2] == 'downsample':
                st['down'] = 1
            elif parts[2] == 'blocks' and parts[3].isdigit():
                st['depth'] = max(st.get('depth', 0), int(parts[3]) + 1)
                if parts[4] == 'norm1' and parts[-1] == 'weight':
                    st['width'] = v.shape[0]
    depths, widths, transitions, pending = [], [], [], False
    for pos in sorted(stages):
        st = stages[pos]
        if st.get('transition'):
            pending = True
            continue
        if pending or st.get('down'):
            transitions.append(len(depths) + 1)
        pending = False
        depths.append(st.get('depth', 0))
        widths.append(st.get('width', -1))
    head = state_dict.get('head.weight')
    classes = f', {head.shape[0]} classes' if head is not None else ''
    return (f'layers per stage {tuple(depths)}, widths {tuple(widths)}, '
            f'transition before stage {", ".join(map(str, transitions)) or "-"}{classes}')


def _mismatch(state_dict: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor]) -> Optional[str]:
    """What keeps `state_dict` (our layout) from loading into a model with `expected`; None if it fits.
    The classifier may differ (a new head)."""
    classifier = ('head.weight', 'head.bias')
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [
        k for k in expected
        if k in state_dict and k not in classifier and state_dict[k].shape != expected[k].shape]
    if not (missing or unexpected or wrong_shape):
        return None
    parts = []
    if wrong_shape:
        parts.append('shape mismatch for ' + ', '.join(
            f'{k} (checkpoint {tuple(state_dict[k].shape)}, model {tuple(expected[k].shape)})'
            for k in wrong_shape[:3]) + (f' and {len(wrong_shape) - 3} more' if len(wrong_shape) > 3 else ''))
    if missing:
        parts.append(f'{len(missing)} model weights missing from the checkpoint (first: {missing[0]})')
    if unexpected:
        parts.append(f'{len(unexpected)} checkpoint weights the model does not have (first: {unexpected[0]})')
    if wrong_shape and all('generate' in k or 'static_logits' in k for k in wrong_shape):
        # a different token count alone is resampled by _convert, so this is not a resolution change
        parts.append('the mixing generators differ in more than their token count (reduced '
                     'dimension d or segment count): a different variant')
    return '; '.join(parts)


def _convert(state_dict: Dict[str, Any], model: DynaMixer) -> Dict[str, torch.Tensor]:
    from .resample import resample_to_shapes  # imported here: resample imports this module
    state_dict = _unwrap_state_dict(state_dict)
    if any(k.startswith(('network.', 'patch_embed.')) for k in state_dict):
        state_dict = _convert_authors_layout(state_dict, model)
    # another input size changes only the token count N of the mixing generators: resample them
    return resample_to_shapes(state_dict, {k: v.shape for k, v in model.state_dict().items()})


def fits(state_dict: Dict[str, Any], model: DynaMixer) -> bool:
    """Whether the weights (either layout) have this model's architecture (the head may differ)."""
    try:
        return _mismatch(_convert(state_dict, model), model.state_dict()) is None
    except ValueError:
        return False


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: DynaMixer) -> Dict[str, torch.Tensor]:
    """Convert a checkpoint (authors' layout or this project's) for `model`, or explain why not.

    Accepts a bare state dict or a training checkpoint dict ('state_dict_ema', 'state_dict', ...),
    with or without 'module.' prefixes. Weights trained at another input size are converted: the
    mixing generators (and static logits) are resampled to this model's token grid (see
    `dynamixer.resample`). Raises ValueError naming the mismatch when the weights are for another
    architecture or class count.
    """
    raw = _unwrap_state_dict(state_dict)
    try:
        state_dict = _convert(raw, model)
        problem = _mismatch(state_dict, model.state_dict())
    except ValueError as e:
        problem = str(e)
    if problem is not None:
        from .checkpoint import infer_variant
        guess = infer_variant(raw)
        guess = f' It fits {guess}.' if guess else ''
        raise ValueError(
            f'checkpoint does not fit this model: {problem}. Checkpoint: {_describe(raw)}. '
            f'Model: {_describe(model.state_dict())}.{guess} Build the model the checkpoint was '
            f'trained as (names: dynamixer.list_models()).')

    head_w = state_dict.get('head.weight')
    expected_head = model.state_dict().get('head.weight')
    if head_w is not None and expected_head is not None and head_w.shape != expected_head.shape:
        cfg_classes = (getattr(model, 'pretrained_cfg', None) or {}).get('num_classes', model.num_classes)
        if cfg_classes == model.num_classes:
            # timm would try to load this head and fail with a bare size-mismatch error
            raise ValueError(
                f'checkpoint classifier has {head_w.shape[0]} classes, the model {model.num_classes}. '
                f'To keep the trained head pass num_classes={head_w.shape[0]} and '
                f'pretrained_cfg_overlay=dict(file=..., num_classes={head_w.shape[0]}); for a new '
                f'head pass num_classes=N (timm then drops the old one).')
    return state_dict


# --------------------------------------------------------------------------------------------
# Model configs and registration
# --------------------------------------------------------------------------------------------

MODEL_ARGS: Dict[str, Dict[str, Any]] = {
    'dynamixer_s': dict(
        depths=(4, 3, 8, 3), embed_dims=(192, 384, 384, 384), downsamples=(False, True, False, False),
        num_segments=(8, 16, 16, 16), reduced_dim=2),
    'dynamixer_m': dict(
        depths=(4, 3, 14, 3), embed_dims=(256, 256, 512, 512), downsamples=(False, False, True, False),
        num_segments=(8, 8, 16, 16), reduced_dim=2),
    'dynamixer_l': dict(
        depths=(8, 8, 16, 4), embed_dims=(256, 512, 512, 512), downsamples=(False, True, False, False),
        num_segments=(8, 16, 16, 16), reduced_dim=8),
    # not published: a CPU-sized variant for 32x32 images (8x8 then 4x4 tokens)
    'dynamixer_nano': dict(
        img_size=32, patch_size=4, depths=(2, 2, 2, 2), embed_dims=(64, 128, 128, 128),
        downsamples=(False, True, False, False), num_segments=(4, 8, 8, 8), reduced_dim=2),
}


def _create_dynamixer(variant: str, pretrained: bool = False, **kwargs: Any) -> DynaMixer:
    from .checkpoint import authors_pickle_globals, check_pretrained_file
    model_args = dict(MODEL_ARGS[variant], **kwargs)
    out_indices = model_args.pop('out_indices', tuple(range(len(model_args['depths']))))
    if pretrained:
        check_pretrained_file(model_args.get('pretrained_cfg'), model_args.get('pretrained_cfg_overlay'))
    # the authors' checkpoints pickle their argparse.Namespace; allow just that under weights_only
    with authors_pickle_globals():
        return build_model_with_cfg(
            DynaMixer, variant, pretrained,
            pretrained_filter_fn=checkpoint_filter_fn,
            feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
            **model_args,
        )


def _cfg(url: str = '', **kwargs: Any) -> Dict[str, Any]:
    return {
        'url': url,
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': None,
        'crop_pct': 0.9, 'interpolation': 'bicubic', 'fixed_input_size': True,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.proj', 'classifier': 'head',
        'paper_ids': 'arXiv:2201.12083',
        'paper_name': 'DynaMixer: A Vision MLP Architecture with Dynamic Mixing',
        'origin_url': 'https://arxiv.org/abs/2201.12083',
        'license': 'apache-2.0',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'dynamixer_s': _cfg(crop_pct=0.9),
    'dynamixer_m': _cfg(crop_pct=0.9),
    'dynamixer_l': _cfg(crop_pct=0.875),
    'dynamixer_nano': _cfg(input_size=(3, 32, 32), crop_pct=1.0, paper_ids='', paper_name=''),
})


@register_model
def dynamixer_s(pretrained: bool = False, **kwargs: Any) -> DynaMixer:
    """DynaMixer-S: 26.3M params, 7.30 GMACs at 224, 82.7% ImageNet top-1 reported."""
    return _create_dynamixer('dynamixer_s', pretrained=pretrained, **kwargs)


@register_model
def dynamixer_m(pretrained: bool = False, **kwargs: Any) -> DynaMixer:
    """DynaMixer-M: 57.1M params, 16.98 GMACs at 224, 83.7% ImageNet top-1 reported."""
    return _create_dynamixer('dynamixer_m', pretrained=pretrained, **kwargs)


@register_model
def dynamixer_l(pretrained: bool = False, **kwargs: Any) -> DynaMixer:
    """DynaMixer-L: 97.8M params, 27.34 GMACs at 224, 84.3% ImageNet top-1 reported."""
    return _create_dynamixer('dynamixer_l', pretrained=pretrained, **kwargs)


@register_model
def dynamixer_nano(pretrained: bool = False, **kwargs: Any) -> DynaMixer:
    """DynaMixer-nano (this project's): 1.38M params for 32x32 images, trains on a CPU in minutes."""
    return _create_dynamixer('dynamixer_nano', pretrained=pretrained, **kwargs)

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
and so on, see the spec and `layout.py`) to this one. Whether a module runs this file's plain
math or a fast form (`ops/`) is decided by `ops.dispatch`, once per block and per layer.
"""
import contextlib
import contextvars
from functools import partial
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, register_notrace_function, to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from . import files, layout, resample
from .grids import token_grids
from .ops import dispatch, fast_forms

__all__ = [
    'DynaMixerOp', 'DynaMixerBlock', 'MixerLayer', 'DynaMixerStage', 'DynaMixer',
    'WeightsMismatchError', 'checkpoint_filter_fn', 'token_grids',
]


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
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
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
            self.reduce = nn.Linear(dim, num_segments * reduced_dim, **dd)
            self.generate = nn.Linear(seq_len * reduced_dim, seq_len * seq_len, **dd)
            self.static_logits = None
        else:
            self.reduce = self.generate = None
            self.static_logits = nn.Parameter(torch.zeros(num_segments, seq_len, seq_len, **dd))
        self.proj = nn.Linear(dim, dim, **dd)
        self._fast_mixing = dispatch.static_mixing_ok(mixing == 'dynamic', [seq_len])

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

    def forward(self, x: torch.Tensor, plain: bool = False) -> torch.Tensor:
        """`plain=True`: the block has decided for the plain path (one decision for both ops)."""
        if not torch.jit.is_scripting():
            path = dispatch.PLAIN if plain else dispatch.mixing_path(self, x)
            if path != dispatch.PLAIN:
                return fast_forms.op_forward_fast(self, x, path)
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
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.dim = dim
        self.mix_h = DynaMixerOp(dim, grid_size[0], num_segments, reduced_dim, mixing, **dd)
        self.mix_w = DynaMixerOp(dim, grid_size[1], num_segments, reduced_dim, mixing, **dd)
        self.mix_c = nn.Linear(dim, dim, bias=False, **dd)
        self.reweight = Mlp(dim, dim // 4, dim * 3, **dd) if reweight else None
        self.proj = nn.Linear(dim, dim, **dd)
        # one decision for both ops (the dispatch's table; docs/fast_path.md)
        self._fast_mixing = self.mix_h._fast_mixing and self.mix_w._fast_mixing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            path = dispatch.mixing_path(self, x)
            if path != dispatch.PLAIN:
                return fast_forms.block_forward_fast(self, x, path)
        h = self.mix_h(x.transpose(1, 2), plain=True).transpose(1, 2)   # mix along H, per column
        w = self.mix_w(x, plain=True)                                    # mix along W, per row
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
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.norm1 = norm_layer(dim, **dd)
        self.token_mixer = DynaMixerBlock(dim, grid_size, num_segments, reduced_dim, mixing, reweight, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            path = dispatch.mlp_path(self, x)
            if path != dispatch.PLAIN:
                return fast_forms.layer_forward_fast(self, x, path)
        x = x + self.drop_path1(self.token_mixer(self.norm1(x)))
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x


class Downsample(nn.Module):
    """2x2 stride-2 convolution between stages: (B, H, W, C_in) -> (B, H/2, W/2, C_out)."""

    def __init__(self, in_chs: int, out_chs: int, device: Optional[torch.device] = None,
                 dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.proj = nn.Conv2d(in_chs, out_chs, kernel_size=2, stride=2, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # NHWC in is channels-last NCHW for the convolution, whose output is then channels-last
        # too: the permute back is contiguous NHWC without a copy (see PatchEmbed); the final
        # contiguous() only copies on a backend that returns NCHW anyway
        x = self.proj(x.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last))
        return x.permute(0, 2, 3, 1).contiguous()


class PatchEmbed(nn.Module):
    """Non-overlapping patches: (B, C, H, W) -> (B, H/p, W/p, D)."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, device: Optional[torch.device] = None,
                 dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size,
                              device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Contiguous NHWC out, not a permuted view of an NCHW result: the residual additions
        # keep their first operand's layout, so a permuted stem output would leave every layer
        # of the stage reading and writing the stream with a channel stride of H*W (LayerNorm
        # copies, slow strided adds). A channels-last convolution writes NHWC directly.
        x = self.proj(x.contiguous(memory_format=torch.channels_last))
        return x.permute(0, 2, 3, 1).contiguous()


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
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            **layer_kwargs: Any,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.grad_checkpointing = False
        self.downsample = Downsample(in_dim, dim, **dd) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[
            MixerLayer(dim, grid_size, drop_path=drop_path[j], **layer_kwargs, **dd) for j in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return x


class WeightsMismatchError(ValueError, RuntimeError):
    """Weights that do not fit the model (another architecture, class count or input channels).

    A ValueError, as this project reports a checkpoint that does not fit, and a RuntimeError, as
    `nn.Module.load_state_dict` reports one, so callers catching either keep working."""


# Set while `_create_dynamixer` has timm load pretrained weights: timm loads non-strictly after
# dropping the classifier it does not want, and that load may leave out only the classifier.
_TIMM_PRETRAINED_LOAD: contextvars.ContextVar[bool] = contextvars.ContextVar(
    'dynamixer_timm_pretrained_load', default=False)


@contextlib.contextmanager
def _timm_pretrained_load() -> Iterator[None]:
    token = _TIMM_PRETRAINED_LOAD.set(True)
    try:
        yield
    finally:
        _TIMM_PRETRAINED_LOAD.reset(token)


class DynaMixer(nn.Module):
    """DynaMixer network: (B, in_chans, H, W) images -> (B, num_classes) logits.

    `forward_features` returns the normed last-stage tokens, (B, H', W', C), channels last: the
    model declares ``output_fmt = 'NHWC'`` (and ``feature_dim = -1``), as timm's channels-last
    models do, so timm's tools read the channel axis right; `forward_head` takes that layout.
    The model is built for one input size (the generators are shaped by the token grid); the
    input is checked against it. A strict `load_state_dict` names weights that do not fit.
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
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)  # timm's factory kwargs, passed to every module
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
        # forward_features and the stages work channels last; timm reads these two (like
        # sequencer2d's) to find the channel axis of forward_features and forward_head(global_pool='')
        self.output_fmt = 'NHWC'
        self.feature_dim = -1
        self.grad_checkpointing = False

        self.stem = PatchEmbed(in_chans, embed_dims[0], patch_size, **dd)
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
                **dd,
            ))
            self.feature_info.append(dict(num_chs=dim, reduction=reduction, module=f'stages.{i}'))
            prev_dim, first = dim, first + depth
        self.stages = nn.Sequential(*stages)
        self.norm = norm_layer(self.num_features, **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()
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
        # the new head joins the model as it is: its device, dtype and train / eval mode
        p = next(self.parameters(), None)
        dd = dict(device=p.device, dtype=p.dtype) if p is not None else {}
        self.head = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.head.train(self.training)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """`nn.Module.load_state_dict`, naming weights that do not fit before anything is copied.

        A strict load raises `WeightsMismatchError` saying what differs (another architecture,
        with the variant the weights fit, or another class count) where torch lists keys. timm's
        pretrained load in `timm.create_model(..., pretrained=True)` is non-strict only to leave
        out the classifier it dropped for a new head: it is held to the same check, the
        classifier excepted. Any other non-strict load keeps torch's meaning.
        """
        if strict or _TIMM_PRETRAINED_LOAD.get():
            self._check_fit(state_dict, optional=() if strict else self._classifier_keys())
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _classifier_keys(self) -> Tuple[str, ...]:
        names = (getattr(self, 'pretrained_cfg', None) or {}).get('classifier') or 'head'
        names = (names,) if isinstance(names, str) else tuple(names)
        return tuple(f'{n}.{p}' for n in names for p in ('weight', 'bias'))

    def _check_fit(self, state_dict: Mapping[str, Any], optional: Sequence[str] = ()) -> None:
        """Raise WeightsMismatchError unless `state_dict` (this layout) loads; `optional` keys may be missing."""
        expected = self.state_dict()
        problem = layout.mismatch(state_dict, expected, optional=optional)
        if problem is not None:
            guess = layout.infer_variant(state_dict, MODEL_ARGS)
            if guess is not None and guess == (getattr(self, 'pretrained_cfg', None) or {}).get('architecture'):
                advice = (f' The checkpoint has the layers of {guess} but not all its weights: the file '
                          f'is incomplete or was edited.')
            else:
                advice = (f'{f" It fits {guess}." if guess else ""} Build the model the checkpoint was '
                          f'trained as (names: dynamixer.list_models()).')
            raw = layout.unwrap_state_dict(state_dict)
            hint = (' Convert it with dynamixer.checkpoint_filter_fn(state_dict, model) first (or load '
                    'it with dynamixer.load_model).' if raw.keys() != state_dict.keys() or
                    layout.is_authors_layout(raw) else '')
            raise WeightsMismatchError(
                f'checkpoint does not fit this model: {problem}. Checkpoint: {layout.describe(state_dict)}. '
                f'Model: {layout.describe(expected)}.{advice}{hint}')
        head_w, want = state_dict.get('head.weight'), expected.get('head.weight')
        if head_w is not None and want is not None and head_w.shape != want.shape:
            raise WeightsMismatchError(
                f'checkpoint classifier has {head_w.shape[0]} classes, the model {want.shape[0]}. '
                f'To keep the trained head pass num_classes={head_w.shape[0]} and '
                f'pretrained_cfg_overlay=dict(file=..., num_classes={head_w.shape[0]}); for a new '
                f'head pass num_classes=N (timm then drops the old one).')

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


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: DynaMixer) -> Dict[str, torch.Tensor]:
    """Convert a checkpoint (authors' layout or this project's) to `model`'s key names and token grid.

    Accepts a bare state dict or a training checkpoint dict ('state_dict_ema', 'state_dict', ...),
    with or without 'module.' prefixes. Weights trained at another input size are converted: the
    mixing generators (and static logits) are resampled to this model's token grid (see
    `dynamixer.resample`).

    The filter does not judge whether the weights fit: timm calls it before it drops the
    classifier weights a new head does not want and adapts the first conv to the model's
    in_chans, and `DynaMixer.load_state_dict`, where timm then loads them, raises
    `WeightsMismatchError` (a ValueError) naming any mismatch. Only the first conv's input
    channels are checked here, because timm's own check of them comes next: it adapts only from
    the channel count the pretrained cfg declares.
    """
    raw = layout.unwrap_state_dict(state_dict)
    # another input size changes only the token count N of the mixing generators: resample them
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    state_dict = resample.resample_to_shapes(layout.authors_to_ours(raw), shapes)
    _check_first_conv(state_dict, model)
    return state_dict


def _check_first_conv(state_dict: Mapping[str, Any], model: nn.Module) -> None:
    """Raise WeightsMismatchError for a first conv with input channels timm would refuse (neither
    the model's in_chans, loaded unchanged, nor the pretrained cfg's, adapted)."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    name = cfg.get('first_conv') or 'stem.proj'
    weight = state_dict.get(f'{name}.weight') if isinstance(name, str) else None
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        return   # nothing timm adapts; the load names what is wrong
    have, want = weight.shape[1], getattr(model, 'in_chans', 3)
    declared = (cfg.get('input_size') or (3,))[0]
    if have not in (want, declared):
        raise WeightsMismatchError(
            f'checkpoint does not fit this model: {name}.weight has {have} input channels, the model '
            f'takes {want}, and timm adapts only from the {declared} its pretrained cfg declares '
            f'(input_size). Build the model with in_chans={have} to load the weights unchanged.')


# --------------------------------------------------------------------------------------------
# Model configs and registration
# --------------------------------------------------------------------------------------------

MODEL_ARGS: Dict[str, Dict[str, Any]] = {
    'dynamixer_s': dict(
        depths=(4, 3, 8, 3), embed_dims=(192, 384, 384, 384), downsamples=(False, True, False, False),
        num_segments=(8, 16, 16, 16), reduced_dim=2, patch_size=7),
    'dynamixer_m': dict(
        depths=(4, 3, 14, 3), embed_dims=(256, 256, 512, 512), downsamples=(False, False, True, False),
        num_segments=(8, 8, 16, 16), reduced_dim=2, patch_size=7),
    'dynamixer_l': dict(
        depths=(8, 8, 16, 4), embed_dims=(256, 512, 512, 512), downsamples=(False, True, False, False),
        num_segments=(8, 16, 16, 16), reduced_dim=8, patch_size=7),
    # not published: a CPU-sized variant for 32x32 images (8x8 then 4x4 tokens)
    'dynamixer_nano': dict(
        img_size=32, patch_size=4, depths=(2, 2, 2, 2), embed_dims=(64, 128, 128, 128),
        downsamples=(False, True, False, False), num_segments=(4, 8, 8, 8), reduced_dim=2),
}


def _create_dynamixer(variant: str, pretrained: bool = False, **kwargs: Any) -> DynaMixer:
    model_args = dict(MODEL_ARGS[variant], **kwargs)
    out_indices = model_args.pop('out_indices', tuple(range(len(model_args['depths']))))
    if pretrained:
        files.check_pretrained_file(model_args.get('pretrained_cfg'), model_args.get('pretrained_cfg_overlay'))
    # the authors' checkpoints pickle their argparse.Namespace; allow just that under weights_only.
    # The weights' fit is judged where timm loads them (DynaMixer.load_state_dict), after it has
    # dropped a classifier it does not want; the context lets that non-strict load be checked too.
    with files.authors_pickle_globals(), (_timm_pretrained_load() if pretrained else contextlib.nullcontext()):
        return build_model_with_cfg(
            DynaMixer, variant, pretrained,
            pretrained_filter_fn=checkpoint_filter_fn,
            # 'getter' (forward_intermediates, NCHW maps) by default; flatten_sequential lets
            # feature_cls='list' / 'dict' / 'hook' find the stages (their maps stay NHWC, output_fmt)
            feature_cfg=dict(out_indices=out_indices, feature_cls='getter', flatten_sequential=True),
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

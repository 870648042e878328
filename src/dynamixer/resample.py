"""Carry DynaMixer weights to another input resolution by resampling the mixing generators.

Only the mixing operations depend on the input size: every ``mix_h`` / ``mix_w`` of a block owns a
generator ``Linear(N*d, N*N)`` (N = tokens along its axis, d = reduced features per segment),
or, for ``mixing='static'``, learned logits of shape (S, N, N). Everything else (patch embedding,
reductions, projections, MLPs, norms, head) is per token and loads unchanged.

The method (defaults: ``mode='linear'``, ``method='interpolate'``, ``temperature='none'``):

The generator computes, for one segment, the logit of input token i for output token j as

    G[i, j] = sum_t sum_k W[i*N + j, t*d + k] * r[t, k] + b[i*N + j]

so W is viewed as a 4-D array W[i, j, t, k] over three token axes (i input, j output, t the
token whose reduced features r[t] feed the generator) and the feature axis k, and b as b[i, j].
Token n of N is placed at the normalised position (n + 0.5) / N of its axis (the centre of its
patch row or column), the convention of ``F.interpolate(align_corners=False)``. Each token axis
is resampled to the new N' with a 1-D resampling matrix M (N' x N): linear interpolation, with an
anti-aliasing (triangle) filter when shrinking. The axes are separable, so

    W'[a, b, c, k] = sum_{i,j,t} Mo[a, i] Mo[b, j] Mt[c, t] W[i, j, t, k],   b'[a, b] = Mo b Mo^T

Scale. The logit is a sum over the N input tokens t. With N' tokens covering the same image, the
interpolated weights would sum N'/N times as many terms, so the t axis carries the factor N/N'
(``Mt = Mo * N / N'``): a feature map that is itself resampled (r' = M r) then gives logits that are
the resampled old logits, to interpolation accuracy. ``method='pinv'`` instead solves for the t
axis exactly: Mt = pinv(M^T), so that W' . (M r) = W . r for every r when enlarging (a least-squares
fit when shrinking), the "pseudo-inverse resize" known from FlexiViT's patch embeddings.

Softmax. The i axis is positional: the softmax over N' inputs then approximates the same
continuous mixing kernel over the image as the softmax over N inputs did (each old token's weight
is shared by the N'/N new tokens on its area), so no correction is needed for the spread. Note that
adding log(N/N') to every logit changes nothing (softmax is shift invariant); the only correction
that changes the result is a temperature, offered as ``temperature='log'`` (multiply W and b by
log N' / log N, which keeps the sharpness in tokens rather than in image area). Which works better is
measured in docs/resolution.md (benchmarks/resolution_transfer.py).

At the original size every function here returns its input unchanged, so resampling to the
size a model was trained at is exactly the identity.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import layout
from .grids import token_grids

__all__ = [
    'resampling_matrix', 'resample_generator', 'resample_static_logits', 'resample_state_dict',
    'resample_to_shapes', 'trained_img_size', 'MODES', 'METHODS', 'TEMPERATURES',
]

MODES = ('linear', 'cubic', 'nearest')
METHODS = ('interpolate', 'pinv')
TEMPERATURES = ('none', 'log')

# a mixing entry of our layout; groups: stage, axis, leaf
_OURS = re.compile(
    r'^stages\.(\d+)\.blocks\.\d+\.token_mixer\.mix_([hw])\.(generate\.weight|generate\.bias|static_logits)$')


def _check_options(mode: str, method: str, temperature: str) -> None:
    for value, allowed, name in ((mode, MODES, 'mode'), (method, METHODS, 'method'),
                                 (temperature, TEMPERATURES, 'temperature')):
        if value not in allowed:
            raise ValueError(f'{name} must be one of {allowed}, got {value!r}')


def resampling_matrix(
        n_old: int,
        n_new: int,
        mode: str = 'linear',
        antialias: bool = True,
        dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """The (n_new, n_old) matrix that resamples a length-n_old signal to length n_new.

    Samples sit at the centres (n + 0.5) / N of the unit interval (``align_corners=False``).
    ``mode``: 'linear', 'cubic' or 'nearest'; ``antialias`` low-pass filters when shrinking
    (linear and cubic). The identity matrix when n_new == n_old.
    """
    if mode not in MODES:
        raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
    if n_old < 1 or n_new < 1:
        raise ValueError(f'token counts must be positive, got {n_old} -> {n_new}')
    if n_new == n_old:
        return torch.eye(n_old, dtype=dtype)
    # resample the rows of an identity: row c becomes the response to a unit impulse at token c
    impulses = torch.eye(n_old, dtype=torch.float64).reshape(1, n_old, 1, n_old)
    if mode == 'nearest':
        out = F.interpolate(impulses, size=(1, n_new), mode='nearest-exact')
    else:
        out = F.interpolate(
            impulses, size=(1, n_new), mode='bilinear' if mode == 'linear' else 'bicubic',
            align_corners=False, antialias=antialias and n_new < n_old)
    return out[0, :, 0].T.contiguous().to(dtype)


def _input_axis_matrix(n_old: int, n_new: int, mode: str, method: str) -> torch.Tensor:
    """Matrix for the generator's input-token axis t (see the module docstring)."""
    m = resampling_matrix(n_old, n_new, mode)
    if method == 'pinv':
        # W' = pinv(M^T) W makes W' . (M r) = W . r (exact when enlarging, least squares when shrinking)
        return torch.linalg.pinv(m.T)
    return m * (n_old / n_new)


def _temperature(n_old: int, n_new: int, temperature: str) -> float:
    if temperature == 'log' and n_old > 1 and n_new > 1:
        return math.log(n_new) / math.log(n_old)
    return 1.0


def resample_generator(
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        n_new: int,
        mode: str = 'linear',
        method: str = 'interpolate',
        temperature: str = 'none',
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Resample one generator Linear(N*d, N*N) to N' = n_new tokens.

    Args:
        weight: (N*N, N*d), indexed [i*N + j, t*d + k] (i input token, j output token, t token
            whose reduced features k feed the generator).
        bias: (N*N,) indexed [i*N + j], or None.
        n_new: the new token count N'.
    Returns:
        weight (N'*N', N'*d) and bias (N'*N',), in the input's dtype; the inputs themselves
        when N' == N.
    """
    _check_options(mode, method, temperature)
    n = math.isqrt(weight.shape[0])
    if weight.dim() != 2 or n * n != weight.shape[0] or weight.shape[1] % n != 0:
        raise ValueError(
            f'a generator weight must have shape (N*N, N*d); got {tuple(weight.shape)}')
    if bias is not None and bias.shape != (n * n,):
        raise ValueError(f'generator bias must have shape ({n * n},) to match the weight; got {tuple(bias.shape)}')
    if n_new == n:
        return weight, bias
    d = weight.shape[1] // n
    mo = resampling_matrix(n, n_new, mode).to(weight.device)
    mt = _input_axis_matrix(n, n_new, mode, method).to(weight.device)
    tau = _temperature(n, n_new, temperature)
    w = weight.detach().to(torch.float64).reshape(n, n, n, d)
    # one axis at a time keeps the intermediates at most N'^3 d
    w = torch.einsum('ai,ijtk->ajtk', mo, w)
    w = torch.einsum('bj,ajtk->abtk', mo, w)
    w = torch.einsum('ct,abtk->abck', mt, w)
    new_weight = (w * tau).reshape(n_new * n_new, n_new * d).to(weight.dtype)
    new_bias = None
    if bias is not None:
        b = mo @ bias.detach().to(torch.float64).reshape(n, n) @ mo.T
        new_bias = (b * tau).reshape(-1).to(bias.dtype)
    return new_weight, new_bias


def resample_static_logits(
        logits: torch.Tensor,
        n_new: int,
        mode: str = 'linear',
        temperature: str = 'none',
) -> torch.Tensor:
    """Resample static mixing logits (S, N, N) [segment, input token, output token] to (S, N', N')."""
    _check_options(mode, 'interpolate', temperature)
    if logits.dim() != 3 or logits.shape[1] != logits.shape[2]:
        raise ValueError(f'static mixing logits must have shape (S, N, N); got {tuple(logits.shape)}')
    n = logits.shape[1]
    if n_new == n:
        return logits
    mo = resampling_matrix(n, n_new, mode).to(logits.device)
    out = mo @ logits.detach().to(torch.float64) @ mo.T
    return (out * _temperature(n, n_new, temperature)).to(logits.dtype)


def _generator_n(shape: Sequence[int]) -> Optional[Tuple[int, int]]:
    """(N, d) of a generator weight shape (N*N, N*d), or None if it is not one."""
    if len(shape) != 2:
        return None
    n = math.isqrt(shape[0])
    if n * n != shape[0] or shape[1] % n:
        return None
    return n, shape[1] // n


def _resample_entries(
        state_dict: Dict[str, torch.Tensor],
        target_n: Callable[[str], Optional[int]],
        mode: str,
        method: str,
        temperature: str,
) -> Dict[str, torch.Tensor]:
    """Resample every generator / static-logit entry whose key `target_n` maps to a new N."""
    out = dict(state_dict)
    for key, value in state_dict.items():
        if key.endswith('generate.weight'):
            n_new = target_n(key)
            if n_new is None:
                continue
            bias_key = key[:-len('weight')] + 'bias'
            weight, bias = resample_generator(
                value, state_dict.get(bias_key), n_new, mode=mode, method=method, temperature=temperature)
            out[key] = weight
            if bias is not None:
                out[bias_key] = bias
        elif key.endswith('static_logits'):
            n_new = target_n(key)
            if n_new is not None:
                out[key] = resample_static_logits(value, n_new, mode=mode, temperature=temperature)
    return out


def resample_to_shapes(
        state_dict: Dict[str, torch.Tensor],
        shapes: Mapping[str, Sequence[int]],
        mode: str = 'linear',
        method: str = 'interpolate',
        temperature: str = 'none',
) -> Dict[str, torch.Tensor]:
    """Resample the generators of a state dict (this project's layout) to the shapes a model expects.

    `shapes` maps keys to the model's tensor shapes (``{k: v.shape for k, v in
    model.state_dict().items()}``). An entry is resampled only when it differs from the model in
    its token count N alone (same reduced dim d, same segment count S); entries that differ in
    anything else are left for the caller to report as a different architecture.
    """
    _check_options(mode, method, temperature)

    def target_n(key: str) -> Optional[int]:
        have, want = state_dict[key].shape, shapes.get(key)
        if want is None or tuple(have) == tuple(want):
            return None
        if key.endswith('generate.weight'):
            a, b = _generator_n(have), _generator_n(want)
            if a is None or b is None or a[1] != b[1]:
                return None                             # a different reduced dim d: not ours to fix
            bias_key = key[:-len('weight')] + 'bias'
            if bias_key in state_dict and bias_key in shapes and state_dict[bias_key].shape != (a[0] ** 2,):
                return None
            return b[0]
        if len(have) == 3 == len(want) and have[0] == want[0] and have[1] == have[2] and want[1] == want[2]:
            return want[1]                              # static logits (S, N, N), same S
        return None

    return _resample_entries(state_dict, target_n, mode, method, temperature)


def _weights_grids(state_dict: Mapping[str, torch.Tensor], img_size: Tuple[int, int]) -> Callable[[str], Optional[int]]:
    """Per-key new token count for `img_size`, from the architecture the weights (our layout) describe."""
    stem = state_dict.get('stem.proj.weight')
    if stem is None:
        raise ValueError(
            'cannot tell the patch size: the state dict has neither stem.proj.weight nor '
            'patch_embed.proj.weight. Pass the model to resample for instead of an image size.')
    grids = token_grids(img_size, stem.shape[-1], layout.architecture(state_dict)['downsamples'])

    def target_n(key: str) -> Optional[int]:
        m = _OURS.match(key)
        if m is None:
            return None
        grid = grids[int(m.group(1))]
        return grid[0] if m.group(2) == 'h' else grid[1]

    return target_n


def trained_img_size(state_dict: Mapping[str, Any]) -> Optional[Tuple[int, int]]:
    """The input size (H, W) the weights were trained at, read from the first stage's generators
    and the patch size (either layout; None if the state dict does not say)."""
    sd = layout.unwrap_state_dict(dict(state_dict))
    stem = sd.get('stem.proj.weight', sd.get('patch_embed.proj.weight'))
    if stem is None:
        return None
    for prefix in ('stages.0.blocks.0.token_mixer', 'network.0.0.attn'):
        sizes: List[Optional[int]] = []
        for axis in ('h', 'w'):
            gen = sd.get(f'{prefix}.mix_{axis}.generate.weight')
            static = sd.get(f'{prefix}.mix_{axis}.static_logits')
            n_d = _generator_n(gen.shape) if gen is not None else None
            if n_d is not None:
                sizes.append(n_d[0])
            elif static is not None and static.dim() == 3:
                sizes.append(static.shape[-1])
            else:
                sizes.append(None)
        if all(sizes):
            # a transition before the first stage would halve its grid again
            down = 2 if 'stages.0.downsample.proj.weight' in sd else 1
            return tuple(int(n or 0) * stem.shape[-1] * down for n in sizes)
    return None


def resample_state_dict(
        state_dict: Mapping[str, Any],
        target: Union[int, Tuple[int, int], nn.Module],
        mode: str = 'linear',
        method: str = 'interpolate',
        temperature: str = 'none',
) -> Dict[str, torch.Tensor]:
    """Resample DynaMixer weights trained at one input size for another.

    Args:
        state_dict: a bare state dict (this project's layout or the authors'), or a training
            checkpoint dict (its EMA weights are used when present, as timm does).
        target: the new input size, int or (H, W) (the token grids are worked out from the
            architecture the weights describe; a size the architecture cannot take raises
            ValueError naming the nearest sizes that do), or the model to load into (a
            `DynaMixer`, e.g. ``timm.create_model(name, img_size=...)``; then the result is in
            this project's layout, ready for ``model.load_state_dict``).
        mode: 'linear' (default), 'cubic' or 'nearest' interpolation along each token axis.
        method: 'interpolate' (default; input-token axis interpolated and scaled by N/N') or
            'pinv' (pseudo-inverse of the resampling on the input-token axis).
        temperature: 'none' (default) or 'log' (logits scaled by log N' / log N).
    Returns:
        A new state dict in which every generator (``...mix_h.generate.weight`` (N*N, N*d) and
        ``.bias`` (N*N,), likewise ``mix_w``) and static-mixing ``static_logits`` (S, N, N) is
        resampled to the new token count; all other entries are the same tensors. Resampling to
        the size the weights were trained at returns them unchanged.
    """
    _check_options(mode, method, temperature)
    sd = layout.unwrap_state_dict(dict(state_dict))
    if isinstance(target, nn.Module):
        model = target
        if not _is_dynamixer(model):
            inner: Any = getattr(model, 'model', None)       # timm's features_only wrapper
            if not _is_dynamixer(inner):
                raise TypeError(f'target must be a DynaMixer model or an image size; got {type(model).__name__}')
            model = inner
        sd = layout.authors_to_ours(sd)
        shapes = {k: v.shape for k, v in model.state_dict().items()}
        return resample_to_shapes(sd, shapes, mode=mode, method=method, temperature=temperature)
    if isinstance(target, bool) or not isinstance(target, (int, tuple, list)):
        raise TypeError(f'target must be an image size (int or (H, W)) or a DynaMixer model; got {target!r}')
    img_size = (target, target) if isinstance(target, int) else tuple(target)
    if len(img_size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) for s in img_size):
        raise ValueError(f'image size must be an int or a pair of ints (H, W); got {target!r}')
    if layout.is_authors_layout(sd):   # resampled in our layout, returned in the authors'
        ours = layout.authors_to_ours(sd)
        resampled = _resample_entries(ours, _weights_grids(ours, img_size), mode, method, temperature)
        return layout.ours_to_authors(resampled)
    return _resample_entries(sd, _weights_grids(sd, img_size), mode, method, temperature)


def _is_dynamixer(model: Any) -> bool:
    """A DynaMixer network (checked by its structure: this module does not import the model)."""
    return isinstance(model, nn.Module) and all(hasattr(model, a) for a in ('stem', 'stages', 'grid_sizes'))

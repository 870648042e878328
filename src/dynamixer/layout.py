"""Checkpoint key layouts: the authors' release (spec section 4) and this project's, both ways.

Also what a state dict says about its architecture, read from key names and tensor shapes alone
(no model is built): `architecture`, `describe` (for error messages), `mismatch` (what keeps
weights from loading into a model) and `infer_variant` (which registered variant they are).

This project's layout (`model.py`)::

    stem.proj.*  stages.i.downsample.proj.*  stages.i.blocks.j.{norm1,token_mixer,norm2,mlp}.*  norm.*  head.*

The authors' layout: ``patch_embed.proj.*``; a flat list ``network.k`` of stages and transitions
in order (``network.k.proj.*`` for a transition, ``network.k.j.*`` for the layers of a stage) with
``attn`` for ``token_mixer``, ``compress`` for ``reduce``, ``out`` for an op's ``proj`` and
``mlp_c`` for ``mix_c``.
"""
from __future__ import annotations

import math
from typing import Any, Collection, Dict, Mapping, Optional, Tuple

import torch

__all__ = [
    'unwrap_state_dict', 'is_authors_layout', 'authors_to_ours', 'ours_to_authors',
    'architecture', 'describe', 'mismatch', 'infer_variant',
]

# (ours, authors) within a layer's keys; order matters ('.token_mixer.' last)
_RENAMES = (
    ('.token_mixer.mix_h.reduce.', '.attn.mix_h.compress.'),
    ('.token_mixer.mix_w.reduce.', '.attn.mix_w.compress.'),
    ('.token_mixer.mix_h.proj.', '.attn.mix_h.out.'),
    ('.token_mixer.mix_w.proj.', '.attn.mix_w.out.'),
    ('.token_mixer.mix_c.', '.attn.mlp_c.'),
    ('.token_mixer.', '.attn.'),
)


def unwrap_state_dict(checkpoint: Mapping[str, Any]) -> Dict[str, Any]:
    """A bare state dict from a training checkpoint; EMA weights win, 'module.' is stripped."""
    for key in ('state_dict_ema', 'model_ema', 'state_dict', 'model'):
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    return {(k[7:] if k.startswith('module.') else k): v for k, v in checkpoint.items()}


def is_authors_layout(state_dict: Mapping[str, Any]) -> bool:
    """Does the state dict use the authors' key names?"""
    return any(k.startswith(('network.', 'patch_embed.')) for k in state_dict)


def _authors_flat_list(state_dict: Mapping[str, Any]) -> Tuple[Dict[int, str], int]:
    """Map each authors' ``network.k`` to our prefix ('stages.i.downsample.' or 'stages.i.blocks.');
    a ``network.k`` that owns ``network.k.proj.*`` is a transition before the next stage."""
    flat = sorted({int(k.split('.')[1]) for k in state_dict
                   if k.startswith('network.') and k.split('.')[1].isdigit()})
    mapping: Dict[int, str] = {}
    stage = 0
    for k in flat:
        if any(key.startswith(f'network.{k}.proj.') for key in state_dict):
            mapping[k] = f'stages.{stage}.downsample.'
        else:
            mapping[k] = f'stages.{stage}.blocks.'
            stage += 1
    return mapping, stage


def authors_to_ours(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    """The authors' key names -> this project's (keys of other layouts pass through unchanged)."""
    mapping, _ = _authors_flat_list(state_dict)
    out = {}
    for k, v in state_dict.items():
        if k.startswith('patch_embed.'):
            k = 'stem.' + k[len('patch_embed.'):]
        elif k.startswith('network.') and k.split('.')[1].isdigit():
            idx = int(k.split('.')[1])
            k = mapping[idx] + k[len(f'network.{idx}.'):]
            for ours, theirs in _RENAMES:
                k = k.replace(theirs, ours)
        out[k] = v
    return out


def ours_to_authors(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    """This project's key names -> the authors' (the inverse of `authors_to_ours`)."""
    stages = sorted({int(k.split('.')[1]) for k in state_dict if k.startswith('stages.')})
    prefixes: Dict[str, str] = {}
    flat = 0
    for i in stages:
        if any(k.startswith(f'stages.{i}.downsample.') for k in state_dict):
            prefixes[f'stages.{i}.downsample.'] = f'network.{flat}.'
            flat += 1
        prefixes[f'stages.{i}.blocks.'] = f'network.{flat}.'
        flat += 1
    out = {}
    for k, v in state_dict.items():
        if k.startswith('stem.'):
            k = 'patch_embed.' + k[len('stem.'):]
        for ours, theirs in prefixes.items():
            if k.startswith(ours):
                k = theirs + k[len(ours):]
                for old, new in _RENAMES:
                    k = k.replace(old, new)
                break
        out[k] = v
    return out


def architecture(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    """What the weights (either layout) say about the architecture, from key names and shapes.

    Returns depths, embed_dims, downsamples, num_segments (tuples per stage), reduced_dim,
    patch_size, in_chans, num_classes, mixing ('dynamic' / 'static') and reweight; an entry the
    weights do not determine is None.
    """
    sd = authors_to_ours(unwrap_state_dict(state_dict))
    stages = sorted({int(k.split('.')[1]) for k in sd if k.startswith('stages.') and k.split('.')[1].isdigit()})
    depths, widths, downs, segments, ds = [], [], [], [], set()
    mixing, reweight = None, None
    for i in stages:
        blocks = {int(k.split('.')[3]) for k in sd
                  if k.startswith(f'stages.{i}.blocks.') and k.split('.')[3].isdigit()}
        depths.append(max(blocks) + 1 if blocks else 0)
        downs.append(f'stages.{i}.downsample.proj.weight' in sd)
        p = f'stages.{i}.blocks.0.'
        norm = sd.get(p + 'norm1.weight')
        widths.append(int(norm.shape[0]) if norm is not None else None)
        gen, red = sd.get(p + 'token_mixer.mix_h.generate.weight'), sd.get(p + 'token_mixer.mix_h.reduce.weight')
        static = sd.get(p + 'token_mixer.mix_h.static_logits')
        s = None
        if gen is not None and red is not None and gen.dim() == 2:
            mixing = 'dynamic'
            n = math.isqrt(gen.shape[0])
            if n > 0 and n * n == gen.shape[0] and gen.shape[1] % n == 0:
                d = gen.shape[1] // n
                ds.add(d)
                s = red.shape[0] // d if red.shape[0] % d == 0 else None
        elif static is not None and static.dim() == 3:
            mixing, s = 'static', int(static.shape[0])
        segments.append(s)
        if blocks:
            reweight = (p + 'token_mixer.reweight.fc1.weight') in sd
    stem, head = sd.get('stem.proj.weight'), sd.get('head.weight')
    return dict(
        depths=tuple(depths), embed_dims=tuple(widths), downsamples=tuple(downs), num_segments=tuple(segments),
        reduced_dim=ds.pop() if len(ds) == 1 else None,
        patch_size=int(stem.shape[-1]) if stem is not None and stem.dim() == 4 else None,
        in_chans=int(stem.shape[1]) if stem is not None and stem.dim() == 4 else None,
        num_classes=int(head.shape[0]) if head is not None else None,
        mixing=mixing, reweight=reweight)


def describe(state_dict: Mapping[str, Any]) -> str:
    """Architecture summary (layers and width per stage, transitions, classes) for error messages."""
    a = architecture(state_dict)
    transitions = [str(i + 1) for i, down in enumerate(a['downsamples']) if down]
    widths = tuple(-1 if w is None else w for w in a['embed_dims'])
    classes = f', {a["num_classes"]} classes' if a['num_classes'] is not None else ''
    return (f'layers per stage {a["depths"]}, widths {widths}, '
            f'transition before stage {", ".join(transitions) or "-"}{classes}')


def mismatch(state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
             first_conv: Optional[str] = None, optional: Collection[str] = ()) -> Optional[str]:
    """What keeps `state_dict` (our layout) from loading into a model with `expected`; None if it fits.

    The classifier's shape may differ (the caller explains a class count of its own), and so may
    the input channels of `first_conv`'s weight (timm adapts them to the model's in_chans). Keys
    in `optional` may be missing from `state_dict` (a classifier timm left out for a new head).
    """
    def allowed(k: str) -> bool:
        if k in ('head.weight', 'head.bias'):
            return True
        have, want = state_dict[k].shape, expected[k].shape
        return (first_conv is not None and k == first_conv + '.weight' and len(have) == len(want) == 4
                and have[0] == want[0] and have[2:] == want[2:])

    def shape(v: Any) -> Any:   # entries without a shape (a quantised Linear's packed params) are not compared
        return getattr(v, 'shape', None)

    missing = [k for k in expected if k not in state_dict and k not in optional]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [k for k in expected
                   if k in state_dict and shape(state_dict[k]) != shape(expected[k])
                   and shape(expected[k]) is not None and shape(state_dict[k]) is not None and not allowed(k)]
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
        # a different token count alone is resampled before this check: not a resolution change
        parts.append('the mixing generators differ in more than their token count (reduced '
                     'dimension d or segment count): a different variant')
    return '; '.join(parts)


_COMPARED = ('depths', 'embed_dims', 'downsamples', 'num_segments', 'reduced_dim', 'patch_size')


def infer_variant(state_dict: Mapping[str, Any], variants: Mapping[str, Mapping[str, Any]]) -> Optional[str]:
    """The first of `variants` (name -> model arguments, e.g. `model.MODEL_ARGS`) whose architecture
    the weights (either layout) have, read from their shapes; None when none fits.

    A variant's arguments must give depths, embed_dims, downsamples, num_segments, reduced_dim and
    patch_size; the weights must use dynamic mixing with re-weighting (the registered variants).
    """
    arch = architecture(state_dict)
    if arch['mixing'] != 'dynamic' or not arch['reweight']:
        return None
    for name, args in variants.items():
        if all(_normalise(args.get(key)) == _normalise(arch[key]) for key in _COMPARED):
            return name
    return None


def _normalise(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(bool(v) if isinstance(v, bool) else v for v in value)
    return value

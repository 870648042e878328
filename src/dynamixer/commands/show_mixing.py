"""`dynamixer show-mixing`: draw the mixing matrices a trained model generates for given images.

For one mixer layer (default the first), forward pre-hooks capture the inputs of the height and
width operations; ``DynaMixerOp.mixing_weights`` turns them into the matrices P, (..., S, N_in,
N_out), columns summing to 1. The height operation sees the grid transposed, (B, W, H, C), so it
has one set of S matrices per token column; the width operation one per token row. The figure
shows, per image, the input with the chosen column and row marked, then the S height-branch
matrices of that column and the S width-branch matrices of that row.
"""
import argparse
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from ..argtypes import OrWord, non_negative_int, positive_int
from ..checkpoint import load_model
from ..data import class_names_for, left_digit_datasets, load_image
from ..data.digits import make_left_digit_task
from ..errors import UsageError, require
from ..files import atomic_save_figure, check_output_file
from ..model import DynaMixerBlock, DynaMixerOp

__all__ = ['capture_mixing', 'load_images', 'plot_mixing']


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('checkpoint',
                        help='a training checkpoint (e.g. a run of dynamixer ablate: OUT/runs/VARIANT__seedK/last.pth)')
    parser.add_argument('images', nargs='*', help='image files (resized to the model\'s input size)')
    parser.add_argument('--digits', type=non_negative_int, default=0, metavar='N',
                        help='also draw N val canvases of the built-in left-digit task')
    parser.add_argument('--out', default='mixing.png', help='PNG to write (default: %(default)s)')
    parser.add_argument('--layer', default='stages.0.blocks.0',
                        help='mixer layer (or its token_mixer) to draw (default: %(default)s)')
    parser.add_argument('--row', default='auto', type=OrWord(non_negative_int, 'auto'),
                        help="token row for the width branch: an index or 'auto' (the row with the most ink)")
    parser.add_argument('--col', default='auto', type=OrWord(non_negative_int, 'auto'),
                        help="token column for the height branch: an index or 'auto' (the column with the most ink)")
    parser.add_argument('--max-segments', type=positive_int, default=4, help='segments drawn per branch')


def _block(model: torch.nn.Module, layer: str) -> DynaMixerBlock:
    try:
        m = model.get_submodule(layer)
    except AttributeError:
        names = [n for n, x in model.named_modules() if isinstance(x, DynaMixerBlock)]
        raise UsageError(f'--layer {layer!r} is not in the model; mixer blocks: '
                         f'{", ".join(n.rsplit(".token_mixer", 1)[0] for n in names)}') from None
    m = getattr(m, 'token_mixer', m)
    if not isinstance(m, DynaMixerBlock):
        raise UsageError(f'--layer {layer!r} is a {type(m).__name__}, not a mixer layer')
    return m


def capture_mixing(model: torch.nn.Module, x: torch.Tensor,
                   layer: str = 'stages.0.blocks.0') -> Tuple[torch.Tensor, torch.Tensor]:
    """Mixing matrices of one layer for images x (B, C, H, W).

    Returns (P_h, P_w): P_h (B, W', S, H', H') per token column, P_w (B, H', S, W', W') per token
    row, indexed [input token, output token]; every column sums to 1. For static mixing the
    matrices are broadcast: they are the same for every image, row and column.
    """
    block = _block(model, layer)
    seen: Dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(module: DynaMixerOp, args: Tuple[torch.Tensor, ...]) -> None:
            seen[name] = args[0].detach()
        return hook

    handles = [block.mix_h.register_forward_pre_hook(keep('h')),
               block.mix_w.register_forward_pre_hook(keep('w'))]
    try:
        with torch.no_grad():
            model.eval()(x)
            ph = block.mix_h.mixing_weights(seen['h'])  # input (B, W, H, C) -> (B, W, S, H, H)
            pw = block.mix_w.mixing_weights(seen['w'])  # input (B, H, W, C) -> (B, H, S, W, W)
    finally:
        for h in handles:
            h.remove()
    b, hh, ww = x.shape[0], block.mix_h.seq_len, block.mix_w.seq_len
    if ph.dim() == 3:  # static: (S, N, N), the same everywhere
        ph = ph.expand(b, ww, *ph.shape)
        pw = pw.expand(b, hh, *pw.shape)
    return ph, pw


def load_images(paths: Sequence[str], in_chans: int, img_size: Tuple[int, int]) -> torch.Tensor:
    """Image files -> (B, in_chans, H, W) floats in [0, 1] (not normalised)."""
    out = []
    for p in paths:
        img = load_image(p)  # DataError for a file that is not a readable image
        img = img.convert('L' if in_chans == 1 else 'RGB').resize((img_size[1], img_size[0]), Image.Resampling.BILINEAR)
        a = np.asarray(img, dtype=np.float32) / 255.0
        out.append(torch.from_numpy(a[None] if a.ndim == 2 else a.transpose(2, 0, 1)))
    return torch.stack(out) if out else torch.zeros(0, in_chans, *img_size)


def _auto_index(images: torch.Tensor, grid: int, axis: int) -> List[int]:
    """Per image, the token band (rows: axis=0, columns: axis=1) holding the most ink."""
    ink = images.mean(1)                                           # (B, H, W)
    prof = ink.sum(2 - axis)                                       # (B, H) or (B, W)
    bands = prof.unflatten(1, (grid, prof.shape[1] // grid)).sum(-1)
    return bands.argmax(1).tolist()


def plot_mixing(
        images: torch.Tensor,
        ph: torch.Tensor,
        pw: torch.Tensor,
        cols: Sequence[int],
        rows: Sequence[int],
        out: str,
        titles: Optional[Sequence[str]] = None,
        max_segments: int = 4,
        suptitle: str = '',
) -> str:
    """Draw, per image (a figure row): the image with the chosen token column (red) and row
    (cyan), the height-branch matrices of that column and the width-branch ones of that row."""
    matplotlib = require('matplotlib', None, 'the mixing figure')
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    b = images.shape[0]
    s = min(ph.shape[2], max_segments)
    n_h, n_w = ph.shape[-1], pw.shape[-1]
    mats_h = [ph[i, cols[i], :s] for i in range(b)]
    mats_w = [pw[i, rows[i], :s] for i in range(b)]
    vmax = float(max(torch.stack(mats_h).max(), torch.stack(mats_w).max()))
    fig, axes = plt.subplots(b, 1 + 2 * s, figsize=(2.1 * (1 + 2 * s) + 0.8, 2.3 * b + 0.6), squeeze=False)
    im = None
    for i in range(b):
        ax = axes[i, 0]
        img = images[i]
        ax.imshow((img[0] if img.shape[0] == 1 else img.permute(1, 2, 0).clamp(0, 1)).numpy(), cmap='gray')
        sy, sx = img.shape[1] / n_h, img.shape[2] / n_w
        ax.add_patch(Rectangle((cols[i] * sx - .5, -.5), sx, img.shape[1], fill=False, ec='red', lw=1.5))
        ax.add_patch(Rectangle((-.5, rows[i] * sy - .5), img.shape[2], sy, fill=False, ec='cyan', lw=1.5))
        ax.set_title((titles[i] + '\n' if titles else '') + f'col {cols[i]} (red), row {rows[i]} (cyan)', fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        for k in range(s):
            for j, (mat, name, idx, n) in enumerate(((mats_h[i][k], 'height', f'col {cols[i]}', n_h),
                                                     (mats_w[i][k], 'width', f'row {rows[i]}', n_w))):
                ax = axes[i, 1 + j * s + k]
                im = ax.imshow(mat.numpy(), cmap='viridis', vmin=0, vmax=vmax)
                ax.set_title(f'{name} branch, {idx}\nsegment {k}', fontsize=8)
                ax.set_xticks(range(n))
                ax.set_yticks(range(n))
                ax.tick_params(labelsize=6)
                ax.set_xlabel('output token j', fontsize=7)
                if k == 0:
                    ax.set_ylabel('input token i', fontsize=7)
    fig.tight_layout(rect=(0, 0, 0.93, 0.95 if suptitle else 1))
    cax = fig.add_axes((0.945, 0.1, 0.012, 0.8))
    assert im is not None  # at least one panel was drawn
    fig.colorbar(im, cax=cax).set_label('mixing weight P[i, j] (each column sums to 1)', fontsize=8)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    atomic_save_figure(fig, out, dpi=110)
    plt.close(fig)
    return out


def _digits_images(config: Dict[str, Any], n: int) -> Tuple[torch.Tensor, List[int]]:
    _, val = make_left_digit_task(0, n, canvas=int(config.get('canvas', 24)), align=int(config.get('align', 4)),
                                  seed=int(config.get('data_seed', 0)))
    return val.tensors[0], val.tensors[1].tolist()


def _normalisation(config: Dict[str, Any], model: torch.nn.Module) -> Tuple[List[float], List[float]]:
    """(mean, std) per channel the model was trained with."""
    if 'mean' in config and 'std' in config:  # checkpoints of dynamixer ablate before 0.2 recorded them
        return config['mean'], config['std']
    if config.get('dataset') == 'left-digit':  # the training canvases' statistics
        train, _ = left_digit_datasets(int(config['num_train']), 0, canvas=int(config['canvas']),
                                       align=int(config['align']), seed=int(config['data_seed']))
        return [train.mean], [train.std]
    timm_model: Any = model  # timm keeps the config in plain attributes
    mean, std = timm_model.pretrained_cfg['mean'], timm_model.pretrained_cfg['std']
    in_chans = timm_model.in_chans
    if len(mean) != in_chans:  # e.g. a 1-channel model with the RGB defaults
        mean, std = [sum(mean) / len(mean)] * in_chans, [sum(std) / len(std)] * in_chans
    return list(mean), list(std)


def run(args: argparse.Namespace) -> int:
    check_output_file(args.out, 'figure', 'mixing.png')
    model, info = load_model(args.checkpoint)
    config = info['config']
    timm_model: Any = model
    in_chans, img_size = timm_model.in_chans, timm_model.img_size
    images = load_images(args.images, in_chans, img_size)
    titles = [p.rsplit('/', 1)[-1] for p in args.images]
    if args.digits:
        if in_chans != 1 or tuple(img_size) != (int(config.get('canvas', 24)),) * 2:
            raise UsageError('--digits needs a model trained on the left-digit task (1 channel, canvas size)')
        extra, labels = _digits_images(config, args.digits)
        images = torch.cat([images, extra])
        titles += [f'val canvas {k}, label {y}' for k, y in enumerate(labels)]
    if len(images) == 0:
        raise UsageError('no images: give image files and/or --digits N')
    mean, std = _normalisation(config, model)
    x = (images - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)
    ph, pw = capture_mixing(model, x, args.layer)
    with torch.no_grad():
        pred = model(x).argmax(-1).tolist()
    names = class_names_for(info['num_classes'], info['class_names'])
    titles = [f'{t}\npredicted {names[p]}' for t, p in zip(titles, pred)]
    n_w, n_h = ph.shape[1], pw.shape[1]
    cols = _auto_index(images, n_w, 1) if args.col == 'auto' else [int(args.col)] * len(images)
    rows = _auto_index(images, n_h, 0) if args.row == 'auto' else [int(args.row)] * len(images)
    for c, r in zip(cols, rows):
        if not (0 <= c < n_w and 0 <= r < n_h):
            raise UsageError(f'--col/--row out of range: layer {args.layer} has {n_h} token rows and {n_w} columns')
    mixing = getattr(_block(model, args.layer).mix_h, 'mixing', 'dynamic')
    what = config.get('variant', info['model'])
    sup = (f'{what}: mixing matrices of {args.layer} ({mixing} mixing'
           + (', identical for every input' if mixing == 'static' else ', generated from each input') + ')')
    plot_mixing(images, ph, pw, cols, rows, args.out, titles, args.max_segments, sup)
    print(f'wrote {args.out}')
    return 0

"""`dynamixer info`: build every registered model, check it, print parameters and multiply-adds."""
import argparse
import time
from typing import Any, Dict, List

import timm
import torch

from ..measure import count_macs
from ..model import MODEL_ARGS

# reported ImageNet-1K top-1 of the published sizes (spec section 3)
REPORTED_TOP1 = {'dynamixer_s': 82.7, 'dynamixer_m': 83.7, 'dynamixer_l': 84.3}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--models', nargs='+', default=list(MODEL_ARGS), choices=list(MODEL_ARGS),
                        help='models to check (default: all)')


def model_stats(name: str) -> Dict[str, object]:
    """Build `name`, run one image through it and count parameters and multiply-adds."""
    model: Any = timm.create_model(name).eval()  # timm keeps pretrained_cfg as a plain attribute
    x = torch.randn(1, *model.pretrained_cfg['input_size'])
    start = time.perf_counter()
    with torch.no_grad():
        logits = model(x)
    seconds = time.perf_counter() - start
    if logits.shape != (1, model.num_classes) or not torch.isfinite(logits).all():
        raise RuntimeError(f'{name}: forward gave {tuple(logits.shape)} / non-finite logits')
    return dict(
        model=name,
        input=f'{x.shape[-2]}x{x.shape[-1]}',
        params=sum(p.numel() for p in model.parameters()),
        gmacs=count_macs(model, tuple(x.shape[1:])) / 1e9,
        top1=REPORTED_TOP1.get(name),
        seconds=seconds,
    )


def format_table(rows: List[Dict[str, object]]) -> str:
    lines = ['| model | input | params | GMACs | ImageNet top-1 (reported) |', '|---|---|---|---|---|']
    for r in rows:
        top1 = f"{r['top1']:.1f}" if r['top1'] is not None else '-'
        lines.append(f"| {r['model']} | {r['input']} | {r['params']:,} | {r['gmacs']:.3f} | {top1} |")
    return '\n'.join(lines)


def run(args: argparse.Namespace) -> int:
    rows = []
    for name in args.models:
        r = model_stats(name)
        print(f"ok  {name}: forward of one {r['input']} image in {r['seconds']:.2f}s", flush=True)
        rows.append(r)
    print()
    print(format_table(rows))
    return 0

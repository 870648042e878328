"""int8 accuracy: which parts of a trained DynaMixer to keep in float, and what int8 costs in top-1.

For a trained checkpoint, exports the float ONNX file, quantises it with ONNX Runtime in several
ways (dynamic with different parts kept in float, static QDQ calibrated on training images), and
evaluates every file on the validation set in ONNX Runtime: top-1, its change against the float
ONNX file, top-1 agreement with float, logit error (max and mean abs over the val set), and
file size. Optionally also the PyTorch int8 routes (`dynamixer.quantize.quantize_model`).

    # the digits model of `dynamixer train` (embedded digits, 360 val images)
    PYTHONPATH=src python benchmarks/int8_accuracy.py runs/digits-dynamixer_nano/last.pth --data digits
    # a model of `dynamixer ablate` (left-digit task, 2000 val canvases)
    PYTHONPATH=src python benchmarks/int8_accuracy.py ablation/runs/dynamic__seed0/last.pth --data left-digit

Accuracy does not depend on machine load; no speed is measured here (see docs/deploy.md).
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import torch

import dynamixer  # noqa: F401  (registers the models)
from dynamixer.checkpoint import load_model
from dynamixer.commands.export import export_onnx
from dynamixer.data import DigitsDataset, left_digit_datasets, preprocessing_transform, sample_images
from dynamixer.experiments import write_json
from dynamixer.inference import OnnxClassifier, preprocessing_config, save_preprocessing
from dynamixer.quantize import quantize_model, quantize_onnx

GRID = {  # name -> (mode, parts kept in float); dynamic quantisation never touches the mix matmul
    'dynamic, all int8': ('dynamic', ()),
    'dynamic, head float': ('dynamic', ('head',)),
    'dynamic, generator float': ('dynamic', ('generator',)),
    'dynamic, generator+head float': ('dynamic', ('generator', 'head')),
    'dynamic, generator+head+conv float': ('dynamic', ('generator', 'head', 'conv')),
    'dynamic, reduce+generator float': ('dynamic', ('reduce', 'generator')),
    'dynamic, conv float': ('dynamic', ('conv',)),
    'static, all int8': ('static', ()),
    'static, mix float': ('static', ('mix',)),
    'static, generator+mix float': ('static', ('generator', 'mix')),
    'static, generator+mix+head float': ('static', ('generator', 'mix', 'head')),
}


def val_and_calibration(data: str, model, config, ckpt: Dict, n_calib: int):
    """(val images (N, C, H, W), val labels (N,), calibration batches) for the data set."""
    if data == 'digits':
        tf = preprocessing_transform(config)
        val = DigitsDataset('val', size=int(model.img_size[0]), transform=tf)
        train = DigitsDataset('train', size=int(model.img_size[0]), transform=tf)
        x = torch.stack([val[i][0] for i in range(len(val))])
        y = torch.tensor(val.targets)
        idx = np.linspace(0, len(train) - 1, n_calib).astype(int)
        calib = torch.stack([train[int(i)][0] for i in idx])
    elif data == 'left-digit':
        cfg = ckpt.get('config', {})
        # normalised by the training canvases' statistics, as `dynamixer train --dataset left-digit`
        train, val = left_digit_datasets(cfg.get('num_train', 4000), cfg.get('num_val', 2000),
                                         canvas=cfg.get('canvas', 24), align=cfg.get('align', 4),
                                         seed=cfg.get('data_seed', 0))
        x = torch.stack([val[i][0] for i in range(len(val))])
        y = val.targets
        calib = torch.stack([train[i][0] for i in range(min(n_calib, len(train)))])
    else:
        raise SystemExit(f'unknown --data {data!r}')
    return x, y, list(calib.split(16))


def run_batches(fn, x: torch.Tensor, bs: int = 64) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([fn(x[i:i + bs]) for i in range(0, len(x), bs)]).float()


def row(name: str, logits: torch.Tensor, ref: torch.Tensor, y: torch.Tensor, size: float) -> Dict:
    top1 = 100.0 * float((logits.argmax(1) == y).float().mean())
    return dict(name=name, top1=top1, agree=100.0 * float((logits.argmax(1) == ref.argmax(1)).float().mean()),
                max_err=float((logits - ref).abs().max()), mean_err=float((logits - ref).abs().mean()),
                size_mib=size)


def main(argv: Sequence[str] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('checkpoint')
    ap.add_argument('--data', default='digits', choices=['digits', 'left-digit'])
    ap.add_argument('--calibration-size', type=int, default=256)
    ap.add_argument('--configs', nargs='+', default=list(GRID), help='names from the grid')
    ap.add_argument('--pytorch', action='store_true', help='also the PyTorch int8 routes (plain path)')
    ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--json', default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    model, info = load_model(args.checkpoint)
    model = model.eval()
    ckpt = torch.load(args.checkpoint, map_location='cpu', weights_only=False)
    ckpt = ckpt if isinstance(ckpt, dict) else {}
    config = preprocessing_config(model, info.get('class_names'), info.get('model'))
    x, y, calib = val_and_calibration(args.data, model, config, ckpt, args.calibration_size)
    rows: List[Dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        fp = Path(tmp) / 'float.onnx'
        export_onnx(model, fp)
        save_preprocessing(config, fp)
        ref_pt = run_batches(model, x)
        rows.append(row('PyTorch float32', ref_pt, ref_pt, y, float('nan')))
        ref = run_batches(OnnxClassifier(fp, threads=args.threads), x)
        rows.append(row('ONNX float32', ref, ref, y, fp.stat().st_size / 2 ** 20))
        print(f"{rows[-1]['name']}: top-1 {rows[-1]['top1']:.2f}", flush=True)
        for name in args.configs:
            mode, keep = GRID[name]
            dst = Path(tmp) / f'q{len(rows)}.onnx'
            t0 = time.perf_counter()
            r = quantize_onnx(fp, dst, mode=mode, calibration=calib if mode == 'static' else None, keep_float=keep)
            out = run_batches(OnnxClassifier(dst, threads=args.threads), x)
            rows.append(dict(row(name, out, ref, y, dst.stat().st_size / 2 ** 20),
                             quantized=r['quantized'], kept_float=r['kept_float'],
                             seconds=time.perf_counter() - t0))
            print(f"{name}: top-1 {rows[-1]['top1']:.2f}", flush=True)
        # real photos (scikit-learn's sample images) for 3-channel models: logit error vs float
        if model.in_chans == 3:
            tf = preprocessing_transform(config)
            real = torch.stack([tf(im) for im in sample_images(num_digits=0)])
            pr = run_batches(OnnxClassifier(fp), real)
            for name in args.configs[:3]:
                mode, keep = GRID[name]
                dst = Path(tmp) / 'real.onnx'
                quantize_onnx(fp, dst, mode=mode, calibration=calib if mode == 'static' else None, keep_float=keep)
                qr = run_batches(OnnxClassifier(dst), real)
                print(f'sample photos, {name}: max abs logit error {float((qr - pr).abs().max()):.3g}, '
                      f'top-1 agreement {int((qr.argmax(1) == pr.argmax(1)).sum())}/{len(pr)}')
    if args.pytorch:
        # swapped Linear modules run on the plain path (the dispatch takes only exact nn.Linear)
        for backend in ('torch.ao', 'torchao'):
            try:
                q = quantize_model(model, backend=backend)
            except ImportError as e:
                print(f'{backend}: {e}')
                continue
            rows.append(row(f'PyTorch int8 ({backend})', run_batches(q, x), ref_pt, y, float('nan')))
    print(f'\n{args.checkpoint} ({info.get("model")}, {args.data}, {len(y)} val images)\n')
    print('| file | top-1 (%) | change vs float | top-1 agreement (%) | max abs logit error | mean abs logit error '
          '| MiB | float MatMul/Gemm/Conv |')
    print('|---|---|---|---|---|---|---|---|')
    base = rows[1]['top1']
    for r in rows:
        print(f"| {r['name']} | {r['top1']:.2f} | {r['top1'] - base:+.2f} | {r['agree']:.2f} | {r['max_err']:.3g} | "
              f"{r['mean_err']:.3g} | {r['size_mib']:.1f} | "
              f"{', '.join(f'{k} {v}' for k, v in r.get('kept_float', {}).items()) or '-'} |")
    if args.json:
        write_json(rows, args.json)
    return 0


if __name__ == '__main__':
    sys.exit(main())

"""ONNX export of a DynaMixer: accuracy against PyTorch and CPU throughput, ONNX Runtime vs PyTorch.

Exports the model (random weights: speed and numerical agreement do not depend on training) with
`dynamixer.export.export_onnx`, measures the max abs logit error on random inputs and on real
images (scikit-learn's sample photos and digits through the eval transform), then times both
runtimes at each batch size in interleaved rounds (PyTorch, ORT, PyTorch, ...) so that load from
other processes hits both alike, and reports medians and the ORT/PyTorch throughput ratio.

    PYTHONPATH=src python benchmarks/bench_onnx.py --model dynamixer_s --batch-sizes 1 16 \
        --write docs/deploy.md

With --write, the table replaces the text between the BENCH_ONNX markers in that file.
"""
import argparse
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import timm
import onnxruntime as ort

import dynamixer
from dynamixer.commands.export import export_onnx, preprocessing_config, sample_batch

BEGIN, END = '<!-- BENCH_ONNX:BEGIN -->', '<!-- BENCH_ONNX:END -->'


def time_call(fn, iters: int) -> float:
    """Median seconds of `iters` calls."""
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--model', default='dynamixer_s')
    ap.add_argument('--batch-sizes', type=int, nargs='+', default=[1, 16])
    ap.add_argument('--rounds', type=int, default=5, help='interleaved rounds per batch size')
    ap.add_argument('--iters', type=int, default=3, help='timed calls per runtime per round')
    ap.add_argument('--threads', type=int, nargs='+', default=[1, os.cpu_count()],
                    help='intra-op thread counts to measure, the same for both runtimes')
    ap.add_argument('--write', default=None, help='markdown file whose BENCH_ONNX block to replace')
    args = ap.parse_args()

    torch.manual_seed(0)
    model = timm.create_model(args.model).eval()
    cfg = preprocessing_config(model)
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f'{args.model}.onnx'
        t0 = time.perf_counter()
        export_onnx(model, path)
        export_s = time.perf_counter() - t0
        size_mb = path.stat().st_size / 2 ** 20
        sessions = {}
        for n in args.threads:
            so = ort.SessionOptions()
            so.intra_op_num_threads = n
            so.inter_op_num_threads = 1
            sessions[n] = ort.InferenceSession(str(path), so, providers=['CPUExecutionProvider'])

        def ort_run(x, n=args.threads[0]):
            return sessions[n].run(['logits'], {'input': x})[0]

        # agreement with PyTorch
        gen = torch.Generator().manual_seed(0)
        x_rand = torch.randn(8, *cfg['input_size'], generator=gen)
        x_real = sample_batch(cfg)
        errors = {}
        with torch.no_grad():
            for name, x in (('random (8 images)', x_rand), (f'real ({len(x_real)} images)', x_real)):
                ref = model(x).numpy().astype(np.float64)
                errors[name] = float(np.abs(ort_run(x.numpy()).astype(np.float64) - ref).max())

        rows = []
        for n in args.threads:
            torch.set_num_threads(n)
            for bs in args.batch_sizes:
                x = torch.randn(bs, *cfg['input_size'])
                xn = x.numpy()
                with torch.inference_mode():
                    model(x), ort_run(xn, n)  # warm-up
                    pt, ox = [], []
                    for _ in range(args.rounds):
                        pt.append(time_call(lambda: model(x), args.iters))
                        ox.append(time_call(lambda: ort_run(xn, n), args.iters))
                pt_ips, ort_ips = bs / statistics.median(pt), bs / statistics.median(ox)
                rows.append((n, bs, pt_ips, ort_ips))
                print(f'threads {n}, batch {bs}: PyTorch {pt_ips:.2f} img/s, ONNX Runtime {ort_ips:.2f} '
                      f'img/s, ratio {ort_ips / pt_ips:.2f}', flush=True)

    uptime = subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()
    lines = [
        BEGIN,
        f'Measured by `benchmarks/bench_onnx.py --model {args.model} --batch-sizes '
        f'{" ".join(map(str, args.batch_sizes))} --threads {" ".join(map(str, args.threads))} '
        f'--rounds {args.rounds} --iters {args.iters}` '
        f'(random weights, {cfg["input_size"][1]}x{cfg["input_size"][2]} input, fp32).',
        '',
        f'- Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores; '
        f'torch {torch.__version__}, onnxruntime '
        f'{ort.__version__}, dynamixer {dynamixer.__version__}.',
        f'- Load: the machine is shared with other processes. Load average before: '
        f'{", ".join(f"{v:.2f}" for v in load_before)}; after: `{uptime}`.',
        f'- Export: {export_s:.1f} s, {size_mb:.1f} MiB ONNX file (opset 18, dynamo exporter).',
        '',
        '| ONNX Runtime vs PyTorch | max abs logit error |',
        '|---|---|',
    ]
    lines += [f'| {name} | {err:.2e} |' for name, err in errors.items()]
    lines += [
        '',
        '| threads | batch | PyTorch eager (img/s) | ONNX Runtime (img/s) | ORT / PyTorch |',
        '|---|---|---|---|---|',
    ]
    lines += [f'| {n} | {bs} | {p:.2f} | {o:.2f} | {o / p:.2f} |' for n, bs, p, o in rows]
    lines += [
        '',
        f'Medians over {args.rounds} interleaved rounds of {args.iters} calls each.',
        END,
    ]
    block = '\n'.join(lines)
    print(block)
    if args.write:
        doc = Path(args.write)
        text = doc.read_text()
        if BEGIN not in text or END not in text:
            raise SystemExit(f'{doc} has no {BEGIN} ... {END} block to replace')
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        doc.write_text(head + block + tail)
        print(f'wrote the table into {doc}')


if __name__ == '__main__':
    main()

"""ONNX Runtime int8 settings against speed: which quantiser settings make the int8 file fast.

Exports the model once (random weights: speed does not depend on training), quantises it with
each setting below through `dynamixer.quantize.quantize_onnx`, and times every file (and the float32
file) in ONNX Runtime in interleaved rounds, reporting medians and the ratio to float32. With
``--profile`` it also runs ONNX Runtime's profiler on each file once and prints the time per
operator type, which shows where an int8 file still spends its time.

    PYTHONPATH=src python benchmarks/int8_variants.py --model dynamixer_s --threads 1 --batch 16

Accuracy of the same settings: `benchmarks/int8_accuracy.py` (docs/deploy.md).
"""
import argparse
import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import onnxruntime as ort
import timm
import torch

import dynamixer  # noqa: F401  (registers the models)
from dynamixer.commands.export import export_onnx
from dynamixer.inference import INPUT_NAME, OUTPUT_NAME, ort_session, save_preprocessing
from dynamixer.measure import interleaved_rounds, machine_info, median
from dynamixer.quantize import DEFAULT_KEEP_FLOAT, quantize_onnx

# name -> quantize_onnx keyword arguments
SETTINGS = {
    'default (per channel, generator + head + conv float)': dict(keep_float=DEFAULT_KEEP_FLOAT),
    'per channel, generator + head float': dict(keep_float=('generator', 'head')),
    'per channel, all int8': dict(keep_float=()),
    'per tensor, generator + head + conv float': dict(keep_float=DEFAULT_KEEP_FLOAT, per_channel=False),
    'default, no pre-processing': dict(keep_float=DEFAULT_KEEP_FLOAT, preprocess=False),
    # calibrated on two random batches of the model's input size (made in main): for its speed
    # only (its accuracy: int8_accuracy.py)
    'static QDQ, generator + head + conv float': dict(mode='static', keep_float=DEFAULT_KEEP_FLOAT),
}


def op_times(path: Path, x: np.ndarray, threads: int) -> Dict[str, float]:
    """Milliseconds per operator type, the mean of two profiled runs (the first included)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = os.path.join(tmp, 'prof')
        sess = ort.InferenceSession(os.fspath(path), options, providers=['CPUExecutionProvider'])
        sess.run([OUTPUT_NAME], {INPUT_NAME: x})
        sess.run([OUTPUT_NAME], {INPUT_NAME: x})
        with open(sess.end_profiling(), encoding='utf-8') as f:
            events = json.load(f)
    per_op: Dict[str, float] = defaultdict(float)
    runs = 0
    for e in events:
        if e.get('cat') == 'Session' and e.get('name') == 'model_run':
            runs += 1
        if e.get('cat') == 'Node' and e.get('name', '').endswith('_kernel_time'):
            per_op[e['args']['op_name']] += e['dur'] / 1000.0
    return {k: v / max(runs, 1) for k, v in sorted(per_op.items(), key=lambda kv: -kv[1])}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--model', default='dynamixer_s')
    p.add_argument('--img-size', type=int, default=None, help="input size (default: the model's own)")
    p.add_argument('--batch', type=int, default=16)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--rounds', type=int, default=5)
    p.add_argument('--opsets', type=int, nargs='+', default=[20], help='export each of these opsets')
    p.add_argument('--settings', nargs='+', default=None, help='indices into SETTINGS (default: all)')
    p.add_argument('--profile', action='store_true', help='also print the time per ONNX operator type')
    p.add_argument('--no-spin', dest='spin', action='store_false',
                   help="ONNX Runtime's intra-op threads block instead of spinning after each run (each "
                        "session has its own pool; spinning pools of interleaved sessions compete for the cores)")
    p.add_argument('--workdir', default=None, help='keep the files here (default: a temporary folder)')
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = list(SETTINGS)
    if args.settings:
        names = [names[int(i)] for i in args.settings]

    tmp = tempfile.TemporaryDirectory()
    work = Path(args.workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    model = timm.create_model(args.model, **(dict(img_size=args.img_size) if args.img_size else {})).eval()
    size = (model.in_chans, *model.img_size)
    files: Dict[str, Path] = {}
    float_of: Dict[str, str] = {}  # file -> the float32 file it was quantised from
    for opset in args.opsets:
        tag = f' (opset {opset})' if len(args.opsets) > 1 else ''
        float_path = work / f'{args.model}.opset{opset}.onnx'
        if not float_path.exists():
            export_onnx(model, float_path, opset=opset)
            save_preprocessing(dict(input_name=INPUT_NAME, output_name=OUTPUT_NAME, input_size=list(size),
                                    num_classes=model.num_classes), float_path)
        files['float32' + tag] = float_path
        float_of['float32' + tag] = 'float32' + tag
        for name in names:
            dst = work / f'{args.model}.opset{opset}.int8-{list(SETTINGS).index(name)}.onnx'
            if not dst.exists():
                kwargs = dict(SETTINGS[name])
                if kwargs.get('mode') == 'static':
                    kwargs['calibration'] = [torch.randn(4, *size) for _ in range(2)]
                quantize_onnx(float_path, dst, **kwargs)
            files[name + tag] = dst
            float_of[name + tag] = 'float32' + tag
    sizes = {k: v.stat().st_size / 2 ** 20 for k, v in files.items()}

    x = np.random.default_rng(0).standard_normal((args.batch, *size)).astype(np.float32)
    sessions = {k: ort_session(v, args.threads, spin=args.spin) for k, v in files.items()}
    order = list(sessions)
    times = interleaved_rounds({k: (lambda s=s: s.run([OUTPUT_NAME], {INPUT_NAME: x})) for k, s in sessions.items()},
                               args.rounds, warmup=1)

    info = machine_info(torch.device('cpu'))
    print(f"{args.model}, batch {args.batch}, {args.threads} thread(s), onnxruntime {ort.__version__}, "
          f"{info.get('cpu')}; load average {info['load_avg']}; "
          f"medians of {args.rounds} interleaved rounds")
    print()
    print('| file | img/s | ms/batch | vs float32 | MiB |')
    print('|---|---|---|---|---|')
    for k in order:
        base = median(times[float_of[k]])
        t = median(times[k])
        print(f'| {k} | {args.batch / t:.2f} | {1000 * t:.0f} | {base / t:.2f}x | {sizes[k]:.1f} |')
    if args.profile:
        for k in order:
            ops = op_times(files[k], x, args.threads)
            total = sum(ops.values())
            top = ', '.join(f'{op} {ms:.0f}' for op, ms in list(ops.items())[:8])
            print(f'\n{k}: {total:.0f} ms in kernels; {top}')

    return 0


if __name__ == '__main__':
    raise SystemExit(main())

"""`dynamixer benchmark`: throughput and latency of DynaMixer and any timm model, per runtime.

For every model (``--models`` and ``--compare``, any name ``timm.create_model`` knows once this
package registered its own), batch size, precision and runtime, the command times inference and
(eager / torch.compile) training steps. All variants of one model and batch size are timed in
interleaved rounds (variant A, B, C, A, B, C, ...) so that load from other processes hits them
alike; reported are medians over the rounds. Results follow the column names of timm's
``benchmark.py`` result files (``infer_samples_per_sec``, ``infer_step_time`` in ms,
``infer_batch_size``, ``infer_img_size``, ``infer_gmacs``, ``param_count`` in millions, and the
``train_*`` counterparts), plus ``runtime``, ``precision``, ``channels_last``, ``device`` and
``threads``.

Runtimes: ``eager``; ``compile`` (torch.compile, default inductor); ``onnx`` (the model exported
by torch.onnx's dynamo exporter, run by ONNX Runtime on the CPU); ``int8`` (that ONNX file after
`dynamixer.quantize.quantize_onnx`, dynamic); ``int8-torch`` (`dynamixer.quantize.quantize_model`,
the torch.ao dynamic int8 Linear layers, eager). Multiply-adds are counted by
``torch.utils.flop_counter.FlopCounterMode`` (matmul / conv FLOPs / 2) on one image in float32.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import difflib
import inspect
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import timm

from .errors import DynaMixerError, require

__all__ = ['RUNTIMES', 'PRECISIONS', 'CSV_COLUMNS', 'MACS_TOOL', 'check_model_names', 'check_runtimes',
           'machine_info', 'count_macs', 'benchmark', 'write_csv', 'add_arguments', 'run']

RUNTIMES = ('eager', 'compile', 'onnx', 'int8', 'int8-torch')
PRECISIONS = {'float32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}
TRAINABLE = ('eager', 'compile')
MACS_TOOL = 'torch.utils.flop_counter.FlopCounterMode (matmul, bmm and conv FLOPs / 2), one float32 image'
CSV_COLUMNS = [
    'model', 'runtime', 'precision', 'channels_last', 'device', 'threads',
    'infer_samples_per_sec', 'infer_step_time', 'infer_batch_size', 'infer_img_size', 'infer_gmacs',
    'train_samples_per_sec', 'train_step_time', 'train_batch_size', 'train_img_size',
    'param_count', 'rounds', 'status',
]


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------

def check_model_names(names: Sequence[str]) -> None:
    """Raise DynaMixerError for names timm does not know, suggesting close ones."""
    known = timm.list_models()
    for name in names:
        if not timm.is_model(name):
            close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
            hint = f'did you mean {", ".join(close)}?' if close else \
                f'`python -c "import timm, dynamixer; print(timm.list_models(\'*{name[:4]}*\'))"` lists names'
            raise DynaMixerError(f'unknown model {name!r}: {hint}')


def check_runtimes(runtimes: Sequence[str], device: torch.device) -> None:
    """Fail early (naming the extra to install) when a runtime's optional package is missing."""
    for rt in runtimes:
        if rt not in RUNTIMES:
            raise DynaMixerError(f'unknown runtime {rt!r}; choose from {", ".join(RUNTIMES)}')
    if any(rt in ('onnx', 'int8') for rt in runtimes):
        require('onnxruntime', 'onnx', 'the onnx / int8 runtimes of dynamixer benchmark')
        require('onnx', 'onnx', 'the onnx / int8 runtimes of dynamixer benchmark')
        require('onnxscript', 'onnx', 'exporting to ONNX (dynamixer benchmark --runtimes onnx)')
    if 'compile' in runtimes and device.type == 'cuda':
        require('triton', 'triton', 'torch.compile on the GPU')


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------

def machine_info(device: torch.device) -> Dict[str, Any]:
    """Machine, library versions and threads, for the record printed before the table."""
    from . import __version__
    info: Dict[str, Any] = dict(
        machine=platform.machine(), system=platform.system(), python=platform.python_version(),
        cpus=os.cpu_count(), threads=torch.get_num_threads(), torch=torch.__version__, timm=timm.__version__,
        dynamixer=__version__, device=str(device), date=time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()))
    with contextlib.suppress(OSError):
        for line in open('/proc/cpuinfo', encoding='utf-8'):
            if line.startswith('model name'):
                info['cpu'] = line.split(':', 1)[1].strip()
                break
    with contextlib.suppress(AttributeError, OSError):
        info['load_avg'] = [round(v, 2) for v in os.getloadavg()]
    with contextlib.suppress(ImportError):
        import onnxruntime
        info['onnxruntime'] = onnxruntime.__version__
    if device.type == 'cuda':
        info['gpu'] = torch.cuda.get_device_name(device)
    return info


def count_macs(model: nn.Module, input_size: Sequence[int]) -> float:
    """Multiply-adds of one forward pass on one image (see MACS_TOOL)."""
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.randn(1, *input_size)
    model = model.eval()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x)
    return fc.get_total_flops() / 2


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _is_oom(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, torch.OutOfMemoryError) or 'out of memory' in text or 'failed to allocate' in text \
        or 'bad_alloc' in text


def _export_onnx(model: nn.Module, input_size: Sequence[int], path: Path) -> None:
    """Any image model to ONNX (input 'input', dynamic batch), for the onnx / int8 runtimes."""
    import warnings
    from .export import DEFAULT_OPSET, INPUT_NAME, OUTPUT_NAME
    batch = torch.export.Dim('batch', min=1)
    arg = next(iter(inspect.signature(model.forward).parameters))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        program = torch.onnx.export(model.eval(), (torch.randn(2, *input_size),), dynamo=True,
                                    input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                    dynamic_shapes={arg: {0: batch}}, opset_version=DEFAULT_OPSET, verbose=False)
    program.save(os.fspath(path))
    Path(os.fspath(path) + '.preprocessing.json').write_text(json.dumps(dict(
        input_name=INPUT_NAME, output_name=OUTPUT_NAME, input_size=list(input_size))))


class _Variant:
    """One (runtime, precision) of a model: `infer(batch)` and, for eager/compile, `train(batch)`
    callables built for a batch size."""

    def __init__(self, name: str, runtime: str, precision: str, model: nn.Module, device: torch.device,
                 channels_last: bool, threads: int, onnx_path: Optional[Path] = None):
        self.name, self.runtime, self.precision = name, runtime, precision
        self.model, self.device, self.channels_last = model, device, channels_last
        self.threads, self.onnx_path = threads, onnx_path
        self.session = None
        self.train_model: Optional[nn.Module] = None
        if onnx_path is not None:
            from .runtime import ort_session
            self.session = ort_session(onnx_path, threads)

    def _input(self, bs: int, input_size: Sequence[int]) -> torch.Tensor:
        x = torch.randn(bs, *input_size, device=self.device)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def infer(self, bs: int, input_size: Sequence[int]) -> Callable[[], Any]:
        x = self._input(bs, input_size)
        if self.session is not None:
            feed = {self.session.get_inputs()[0].name: x.cpu().numpy()}
            return lambda: self.session.run(None, feed)
        amp = PRECISIONS[self.precision]
        model = self.model

        def step() -> None:
            with torch.inference_mode(), torch.autocast(self.device.type, dtype=amp, enabled=amp is not None):
                model(x)
        return step

    def train(self, bs: int, input_size: Sequence[int], num_classes: int) -> Callable[[], Any]:
        x = self._input(bs, input_size)
        y = torch.randint(0, max(num_classes, 1), (bs,), device=self.device)
        amp = PRECISIONS[self.precision]
        model = self.train_model
        opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        scaler = torch.amp.GradScaler(self.device.type, enabled=amp is torch.float16)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            with torch.autocast(self.device.type, dtype=amp, enabled=amp is not None):
                loss = F.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        return step


def _wants(args: argparse.Namespace, kind: str) -> bool:
    """Does --bench (infer / train / both) ask for `kind`?"""
    return args.bench in (kind, 'both')


def _timed(fn: Callable[[], Any], device: torch.device, iters: int) -> float:
    """Seconds per call, over `iters` calls."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / iters


class _Progress:
    """One line, rewritten in place on a terminal (a line per update otherwise)."""

    def __init__(self, enabled: bool):
        self.enabled, self.tty = enabled, sys.stderr.isatty()
        self.width = 0

    def __call__(self, text: str) -> None:
        if not self.enabled:
            return
        if self.tty:
            sys.stderr.write('\r' + text.ljust(self.width))
            self.width = len(text)
        else:
            sys.stderr.write(text + '\n')
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled and self.tty and self.width:
            sys.stderr.write('\r' + ' ' * self.width + '\r')
            sys.stderr.flush()


def _build_variants(name: str, model: nn.Module, input_size: Sequence[int], args, device: torch.device,
                    tmp: Path, notes: List[str]) -> List[_Variant]:
    variants: List[_Variant] = []
    onnx_file: Optional[Path] = None
    for runtime in args.runtimes:
        for precision in args.precision:
            label = f'{runtime}/{precision}'
            if runtime in ('onnx', 'int8', 'int8-torch') and (precision != 'float32' or device.type != 'cpu'):
                if precision == 'float32':
                    notes.append(f'{name}: {runtime} runs on the CPU only; skipped on {device}')
                continue  # these runtimes have their own number formats: float32 input, CPU
            try:
                if runtime in ('eager', 'compile'):
                    m = model.to(device)
                    if args.channels_last:
                        m = m.to(memory_format=torch.channels_last)
                    v = _Variant(label, runtime, precision, torch.compile(m) if runtime == 'compile' else m,
                                 device, args.channels_last, args.threads)
                    if _wants(args, 'train'):
                        import copy
                        tm = copy.deepcopy(m).train()
                        v.train_model = torch.compile(tm) if runtime == 'compile' else tm
                elif runtime == 'int8-torch':
                    from .quantize import quantize_model
                    v = _Variant(label, runtime, precision, quantize_model(model, backend='torch.ao'), device,
                                 False, args.threads)
                else:
                    if onnx_file is None:
                        onnx_file = tmp / f'{name}.onnx'
                        _export_onnx(model, input_size, onnx_file)
                    path = onnx_file
                    if runtime == 'int8':
                        from .quantize import quantize_onnx
                        path = tmp / f'{name}.int8.onnx'
                        quantize_onnx(onnx_file, path)
                    v = _Variant(label, runtime, precision, model, device, False, args.threads, onnx_path=path)
            except DynaMixerError:
                raise
            except Exception as e:  # a runtime that cannot take this model: say so, go on
                notes.append(f'{name}: {label} could not be set up ({type(e).__name__}: {str(e)[:200]})')
                continue
            variants.append(v)
    return variants


def benchmark(args: argparse.Namespace, progress: Optional[Callable[[str], None]] = None) -> Tuple[List[Dict], List[str]]:
    """Run the benchmark described by parsed `args`; returns (rows, notes)."""
    device = torch.device(args.device)
    progress = progress or (lambda s: None)
    rows: List[Dict[str, Any]] = []
    notes: List[str] = []
    names = list(args.models) + list(args.compare or [])
    for mi, name in enumerate(names):
        torch.manual_seed(0)
        kwargs = dict(img_size=args.img_size) if args.img_size else {}
        model = timm.create_model(name, **kwargs).eval()
        from timm.data import resolve_data_config
        input_size = tuple(resolve_data_config({}, model=model)['input_size'])
        if args.img_size:
            input_size = (input_size[0], args.img_size, args.img_size)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        gmacs = count_macs(model, input_size) / 1e9
        num_classes = getattr(model, 'num_classes', 1000)
        with tempfile.TemporaryDirectory() as tmp:
            progress(f'[{mi + 1}/{len(names)}] {name}: preparing {", ".join(args.runtimes)}')
            variants = _build_variants(name, model, input_size, args, device, Path(tmp), notes)
            for bs in args.batch_sizes:
                fns: Dict[Tuple[str, str], Callable[[], Any]] = {}
                failed: Dict[str, str] = {}
                for v in variants:
                    try:
                        kinds = [('infer', v.infer(bs, input_size))]
                        if _wants(args, 'train') and v.runtime in TRAINABLE:
                            kinds.append(('train', v.train(bs, input_size, num_classes)))
                        if not _wants(args, 'infer'):
                            kinds = kinds[1:]
                        for kind, fn in kinds:
                            for _ in range(args.warmup):
                                fn()
                            _sync(device)
                            fns[(v.name, kind)] = fn
                    except Exception as e:  # out of memory, or a runtime that fails on this model
                        failed[v.name] = 'out of memory' if _is_oom(e) else f'{type(e).__name__}: {str(e)[:200]}'
                        if device.type == 'cuda':
                            torch.cuda.empty_cache()
                times: Dict[Tuple[str, str], List[float]] = {k: [] for k in fns}
                for r in range(args.rounds):
                    progress(f'[{mi + 1}/{len(names)}] {name} batch {bs}: round {r + 1}/{args.rounds}')
                    for key in (list(fns) if r % 2 == 0 else list(reversed(fns))):
                        if key[0] in failed:
                            continue
                        try:
                            times[key].append(_timed(fns[key], device, args.iters))
                        except Exception as e:
                            failed[key[0]] = 'out of memory' if _is_oom(e) else f'{type(e).__name__}: {e}'
                for v in variants:
                    row: Dict[str, Any] = dict(
                        model=name, runtime=v.runtime, precision=v.precision, channels_last=v.channels_last,
                        device=str(device), threads=args.threads or torch.get_num_threads(),
                        infer_img_size=input_size[-1], infer_gmacs=round(gmacs, 3), param_count=round(params, 2),
                        rounds=args.rounds, status='ok')
                    if v.name in failed:
                        row['status'] = failed[v.name]
                        notes.append(f'{name} batch {bs} {v.name}: {failed[v.name]}; skipped')
                    for kind in ('infer', 'train'):
                        t = times.get((v.name, kind))
                        if t and v.name not in failed:
                            step = statistics.median(t)
                            row[f'{kind}_samples_per_sec'] = round(bs / step, 2)
                            row[f'{kind}_step_time'] = round(1000 * step, 3)
                            row[f'{kind}_batch_size'] = bs
                            row[f'{kind}_img_size'] = input_size[-1]
                    rows.append(row)
    return rows, notes


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------

def write_csv(rows: Sequence[Dict[str, Any]], path: str) -> None:
    """Rows with CSV_COLUMNS (missing values empty)."""
    with open(path, 'w', newline='', encoding='utf-8') as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction='ignore')
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, '') for k in CSV_COLUMNS})


def markdown_table(rows: Sequence[Dict[str, Any]]) -> str:
    """The results as a markdown table (what BENCHMARKS.md shows)."""
    head = ('| model | runtime | precision | batch | infer img/s | infer ms/batch | train img/s | '
            'train ms/batch | GMACs | params (M) |')
    lines = [head, '|' + '---|' * 10]
    fmt = lambda v: '' if v is None or v == '' else (f'{v:.2f}' if isinstance(v, float) else str(v))  # noqa: E731
    for r in rows:
        bs = r.get('infer_batch_size') or r.get('train_batch_size') or ''
        status = '' if r['status'] == 'ok' else f" ({r['status']})"
        lines.append(f"| {r['model']} | {r['runtime']}{status} | {r['precision']}"
                     f"{' channels-last' if r['channels_last'] else ''} | {bs} | "
                     f"{fmt(r.get('infer_samples_per_sec'))} | {fmt(r.get('infer_step_time'))} | "
                     f"{fmt(r.get('train_samples_per_sec'))} | {fmt(r.get('train_step_time'))} | "
                     f"{r['infer_gmacs']:.2f} | {r['param_count']:.1f} |")
    return '\n'.join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--models', nargs='+', default=['dynamixer_s'], metavar='NAME',
                        help='models to measure (any timm name; default %(default)s)')
    parser.add_argument('--compare', nargs='*', default=[], metavar='NAME',
                        help='timm models measured beside them, e.g. resmlp_24_224 vit_small_patch16_224')
    parser.add_argument('--batch-sizes', nargs='+', type=int, default=[1, 16], metavar='N')
    parser.add_argument('--bench', default='both', choices=['infer', 'train', 'both'])
    parser.add_argument('--precision', nargs='+', default=['float32'], choices=list(PRECISIONS),
                        help='float32, or bf16 / fp16 autocast (AMP)')
    parser.add_argument('--channels-last', action='store_true', help='channels-last input and weights')
    parser.add_argument('--runtimes', nargs='+', default=['eager'], metavar='RUNTIME',
                        help=f'any of {", ".join(RUNTIMES)} (default eager)')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--threads', type=int, default=None,
                        help='intra-op threads for PyTorch and ONNX Runtime (default: torch\'s)')
    parser.add_argument('--img-size', type=int, default=None, help='input size (default: each model\'s)')
    parser.add_argument('--rounds', type=int, default=5, help='interleaved rounds; medians are reported')
    parser.add_argument('--iters', type=int, default=3, help='calls per variant per round')
    parser.add_argument('--warmup', type=int, default=2, help='untimed calls per variant first')
    parser.add_argument('--csv', default=None, metavar='FILE', help='write the rows here (timm\'s column names)')
    parser.add_argument('--json', default=None, metavar='FILE', help='write machine info and rows here')
    parser.add_argument('--no-progress', dest='progress', action='store_false', help='no progress line')


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise DynaMixerError('--device cuda: no CUDA device is available here; use --device cpu')
    check_model_names(list(args.models) + list(args.compare or []))
    check_runtimes(args.runtimes, device)
    bad = [b for b in args.batch_sizes if b < 1]
    if bad:
        raise DynaMixerError(f'batch sizes must be positive, got {bad}')
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info(device)
    print(f"machine: {info.get('cpu', info['machine'])}, {info['cpus']} CPUs"
          f"{', ' + info['gpu'] if 'gpu' in info else ''}; load average {info.get('load_avg')}")
    print(f"torch {info['torch']}, timm {info['timm']}, onnxruntime {info.get('onnxruntime', '-')}, "
          f"dynamixer {info['dynamixer']}, python {info['python']}; {info['threads']} threads; device {device}")
    print(f'multiply-adds: {MACS_TOOL}')
    print(f'timing: medians over {args.rounds} interleaved rounds of {args.iters} calls '
          f'(after {args.warmup} warm-up calls)')
    progress = _Progress(args.progress)
    try:
        rows, notes = benchmark(args, progress)
    finally:
        progress.done()
    print(markdown_table(rows))
    for n in notes:
        print(f'note: {n}')
    if args.csv:
        write_csv(rows, args.csv)
        print(f'wrote {args.csv}')
    if args.json:
        with open(args.json, 'w', encoding='utf-8') as f:
            json.dump(dict(info=info, args={k: v for k, v in vars(args).items() if not k.startswith('_')},
                           macs_tool=MACS_TOOL, notes=notes, results=rows), f, indent=1)
        print(f'wrote {args.json}')
    return 0

"""Measuring: the machine, timings in interleaved rounds, medians, multiply-adds, agreement, tables in docs.

`dynamixer benchmark`, `dynamixer ablate` and the scripts in benchmarks/ measure the same way:

- `machine_info`: what a figure was measured on (CPU, GPU, versions, threads, load, allocator).
- `interleaved_rounds`: every variant timed once per round, the order reversed every other round,
  so that load from other processes hits all variants alike; `median` of the rounds is reported.
  `wall_time` (seconds per call, device synchronised) and `cpu_usage` (this process's CPU time and
  page faults) are the timers.
- `count_macs`: multiply-adds per image (torch's FLOP counter / 2), forward or forward + backward.
- `matmul_rate`: the machine's matmul FLOP/s, timed in the same rounds as the models.
- `max_abs_error`, `relative_error`, `check_same_function`: how far two implementations agree.
- `update_markdown`: put a generated table between two marker lines of a document.
"""
import contextlib
import importlib
import os
import platform
import statistics
import time
from typing import Any, Callable, Dict, Hashable, Iterable, List, Mapping, Optional, Sequence, Tuple, TypeVar

import timm
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from . import __version__
from .errors import DynaMixerError
from .files import atomic_write_text

try:
    import resource  # Unix: user / system CPU time and page faults of this process
except ImportError:  # pragma: no cover (Windows)
    resource = None  # type: ignore[assignment]

__all__ = ['machine_info', 'load_average', 'sync', 'wall_time', 'cpu_usage', 'timed_with_usage',
           'interleaved_rounds', 'median', 'count_macs', 'matmul_rate', 'max_abs_error', 'relative_error',
           'check_same_function', 'MARKER', 'END_MARKER', 'check_markdown_section', 'update_markdown']

K = TypeVar('K', bound=Hashable)


# --------------------------------------------------------------------------------------------
# the machine
# --------------------------------------------------------------------------------------------

def load_average() -> Optional[List[float]]:
    """The 1, 5 and 15 minute load averages (None where the system has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def machine_info(device: Optional[torch.device] = None) -> Dict[str, Any]:
    """Machine, library versions, threads, load and the C allocator's settings: the record printed
    (and stored) with every measurement."""
    device = device or torch.device('cpu')
    info: Dict[str, Any] = dict(
        machine=platform.machine(), system=platform.system(), python=platform.python_version(),
        cpus=os.cpu_count(), threads=torch.get_num_threads(), torch=torch.__version__, timm=timm.__version__,
        dynamixer=__version__, device=str(device), date=time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()))
    with contextlib.suppress(OSError):
        with open('/proc/cpuinfo', encoding='utf-8') as f:
            for line in f:
                if line.startswith('model name'):
                    info['cpu'] = line.split(':', 1)[1].strip()
                    break
    info['load_avg'] = load_average()
    for module in ('onnxruntime', 'torchao'):
        with contextlib.suppress(ImportError):
            info[module] = importlib.import_module(module).__version__
    if device.type == 'cuda':
        info['gpu'] = torch.cuda.get_device_name(device)
    # the C allocator's settings change how often memory comes fresh from the OS (page faults)
    info['allocator_env'] = {k: v for k, v in os.environ.items() if k.startswith('MALLOC_') or k == 'LD_PRELOAD'}
    return info


# --------------------------------------------------------------------------------------------
# timers and rounds
# --------------------------------------------------------------------------------------------

def sync(device: Optional[torch.device]) -> None:
    """Wait for the device's queued work (CUDA); nothing on the CPU."""
    if device is not None and device.type == 'cuda':
        torch.cuda.synchronize(device)


def wall_time(fn: Callable[[], Any], device: Optional[torch.device] = None, iters: int = 1) -> float:
    """Wall-clock seconds per call of `fn`, over `iters` calls, the device synchronised around them."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / iters


def cpu_usage() -> Tuple[float, float, int]:
    """(user CPU s, system CPU s, minor page faults) of this process so far; zeros without `resource`."""
    if resource is None:
        return 0.0, 0.0, 0
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime, u.ru_stime, u.ru_minflt


def timed_with_usage(fn: Callable[[], Any], device: Optional[torch.device] = None
                     ) -> Tuple[float, float, Tuple[float, float, int]]:
    """One call of `fn`: (wall s, CPU s of this process, (user s, system s, minor page faults)).

    On a CPU shared with other work the wall clock mostly measures the scheduler's share; with one
    thread the process's CPU time measures the work itself, and its system part the page faults."""
    sync(device)
    u0 = cpu_usage()
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    sync(device)
    t1, c1 = time.perf_counter(), time.process_time()
    u1 = cpu_usage()
    return t1 - t0, c1 - c0, (u1[0] - u0[0], u1[1] - u0[1], u1[2] - u0[2])


def interleaved_rounds(
        fns: Mapping[K, Callable[[], Any]],
        rounds: int,
        *,
        warmup: int = 0,
        timer: Optional[Callable[[Callable[[], Any]], Any]] = None,
        after_round: Optional[Callable[[int], None]] = None,
        skip: Optional[Callable[[K], bool]] = None,
        on_error: Optional[Callable[[K, Exception], None]] = None,
) -> Dict[K, List[Any]]:
    """Time every function once per round, in order A, B, C, then C, B, A, ...; returns the
    timer's value (default: wall-clock seconds of one call) per function per round.

    `warmup` untimed calls of each function come first. `after_round(r)` runs after round r (e.g.
    to time a reference matmul in the same rounds). A function for which `skip(key)` is true is
    not called. With `on_error`, a function that raises is reported to it and not called again;
    without, the exception propagates."""
    timer = timer or wall_time
    names = list(fns)
    for k in names:
        for _ in range(warmup):
            fns[k]()
    times: Dict[K, List[Any]] = {k: [] for k in names}
    failed = set()
    for r in range(rounds):
        for k in (names if r % 2 == 0 else names[::-1]):
            if k in failed or (skip is not None and skip(k)):
                continue
            try:
                times[k].append(timer(fns[k]))
            except Exception as e:
                if on_error is None:
                    raise
                failed.add(k)
                on_error(k, e)
        if after_round is not None:
            after_round(r)
    return times


def median(values: Iterable[float]) -> float:
    """The median; NaN for no values."""
    v = list(values)
    return statistics.median(v) if v else float('nan')


# --------------------------------------------------------------------------------------------
# work: multiply-adds and the machine's matmul rate
# --------------------------------------------------------------------------------------------

def count_macs(model: nn.Module, input_size: Optional[Sequence[int]] = None, backward: bool = False) -> int:
    """Multiply-adds per image (matmuls, bmm and convolutions: torch's FLOP counter / 2) of one
    float32 image at `input_size` (C, H, W); default the model's own (``in_chans``, ``img_size``).

    Forward only in eval mode (the model is left in eval mode); with `backward`, forward and
    backward of a batch of one in the model's current mode (gradients are cleared after)."""
    if input_size is None:
        timm_model: Any = model  # timm models keep their input size as plain attributes
        input_size = (timm_model.in_chans, *timm_model.img_size)
    device = next(model.parameters(), torch.zeros(())).device
    x = torch.zeros(1, *input_size, device=device)
    with FlopCounterMode(display=False) as counter:
        if backward:
            model(x).sum().backward()
            model.zero_grad(set_to_none=True)
        else:
            model.eval()
            with torch.no_grad():
                model(x)
    return int(counter.get_total_flops() // 2)


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int) -> Callable[[], Tuple[float, float]]:
    """A timer of the machine's matmul rate: each call times one n x n x n matmul and returns its
    FLOP/s (per wall-clock second, per CPU second of this process)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b

    def run() -> Tuple[float, float]:
        wall, cpu, _ = timed_with_usage(lambda: a @ b, device)
        return 2 * n ** 3 / wall, 2 * n ** 3 / max(cpu, 1e-9)
    return run


# --------------------------------------------------------------------------------------------
# agreement of two implementations
# --------------------------------------------------------------------------------------------

def max_abs_error(a: Any, b: Any) -> float:
    """max |a - b| in float64 (tensors or numpy arrays)."""
    return float((torch.as_tensor(a).double() - torch.as_tensor(b).double()).abs().max())


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, in float64."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def check_same_function(model: nn.Module, reference: nn.Module, x: torch.Tensor, tol: float) -> Dict[str, float]:
    """Relative errors of `model` against `reference` on `x`: the outputs, the input gradient and
    the worst weight gradient (parameters in the same order). Raises DynaMixerError above `tol`."""
    errs = {}
    for m in (model, reference):
        m.zero_grad(set_to_none=True)
    xl, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    yl, yr = model(xl), reference(xr)
    errs['output'] = relative_error(yl, yr)
    w = torch.randn_like(yr)
    (yl * w).sum().backward()
    (yr * w).sum().backward()
    assert xl.grad is not None and xr.grad is not None
    errs['input_grad'] = relative_error(xl.grad, xr.grad)
    errs['weight_grads'] = max(relative_error(pl.grad, pr.grad)
                               for pl, pr in zip(model.parameters(), reference.parameters())
                               if pl.grad is not None and pr.grad is not None)
    for m in (model, reference):
        m.zero_grad(set_to_none=True)
    bad = {k: v for k, v in errs.items() if not v <= tol}
    if bad:
        raise DynaMixerError(f'the model and its reference differ: {bad} (tolerance {tol})')
    return errs


# --------------------------------------------------------------------------------------------
# tables in documents
# --------------------------------------------------------------------------------------------

MARKER = '<!-- dynamixer benchmark: {} -->'       # a generated table goes between this line ...
END_MARKER = '<!-- /dynamixer benchmark: {} -->'  # ... and this one


def check_markdown_section(doc: str, section: str) -> None:
    """Refuse, before anything is measured, a `doc` that exists without the section's markers."""
    start, end = MARKER.format(section), END_MARKER.format(section)
    if not os.path.isfile(doc):
        return
    with open(doc, encoding='utf-8') as f:
        old = f.read()
    i, j = old.find(start), old.find(end)
    if i < 0 or j < i:
        raise DynaMixerError(f'{doc} has no place for the table: add the two lines\n{start}\n{end}\n'
                             f'where it belongs (or choose another section)')


def update_markdown(doc: str, section: str, text: str) -> bool:
    """Put `text` between the section's marker lines in `doc` (MARKER / END_MARKER), atomically;
    a `doc` that does not exist is written with the markers. Returns True when an existing file
    was updated. DynaMixerError when the file exists without the markers."""
    start, end = MARKER.format(section), END_MARKER.format(section)
    block = f'{start}\n{text.rstrip()}\n{end}'
    if not os.path.exists(doc):
        atomic_write_text(block + '\n', doc)
        return False
    check_markdown_section(doc, section)
    with open(doc, encoding='utf-8') as f:
        old = f.read()
    i, j = old.find(start), old.find(end)
    atomic_write_text(old[:i] + block + old[j + len(end):], doc)
    return True

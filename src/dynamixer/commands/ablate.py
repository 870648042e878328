"""`dynamixer ablate`: does dynamic mixing help? Train a grid of variants, same recipe and data.

Every variant is the same timm model with different constructor options (``model_kwargs``); no
model code is copied. Every run is an ordinary `dynamixer.commands.train.train` run (its loop,
checkpoint format and flags) with the variant's options as ``model_options``. This module holds the
variants, the recipe, the tables and the plot; running the grid, reusing finished runs and sharing
them over ranks is `dynamixer.experiments`. Each (variant, seed) run trains from scratch with the
same data, the same recipe and, for a given seed, the same initialisation seed and batch order.
The command writes

    OUT/runs/<variant>__seed<k>.json   one finished run (top-1, losses, times, its config)
    OUT/runs/<variant>__seed<k>/       its `dynamixer train` run folder (last.pth, metrics, curves)
    OUT/runs.csv                       one row per run
    OUT/results.csv, OUT/results.md    one row per variant: top-1 mean / std / min / max over
                                       seeds, paired difference to the baseline, parameters,
                                       multiply-adds and images/s
    OUT/ablation.png                   the same as a plot

Finished runs whose config fingerprint matches are reused, so an interrupted grid resumes.

Under torchrun (WORLD_SIZE > 1) each rank trains its share of the runs (run i goes to rank
i % world_size), on cuda:LOCAL_RANK when a GPU is present; rank 0 gathers the results with
torch.distributed and writes the tables. The runs are distributed, not the batches: every run
is an ordinary single-device training, so results do not depend on the number of ranks.
"""
import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from typing import Any, Dict, List, NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist

import timm

from .. import experiments
from ..argtypes import non_negative_int, positive_int
from ..data import build_datasets
from ..engine import Process, count_macs, setup_process
from ..errors import UsageError, require
from ..files import check_output_folder
from ..model import MODEL_ARGS
from ..recipes import RANGES, resolve_config
from .train import train

# The grid. The baseline is dynamixer_nano as registered: S = (4, 8, 8, 8) per stage, d = 2,
# re-weighted block. Each other variant changes one option.
BASELINE = 'dynamic'
VARIANTS: Dict[str, Dict[str, Any]] = {
    'dynamic': {},
    'static': dict(mixing='static'),
    'plain-sum': dict(reweight=False),
    'd=1': dict(reduced_dim=1),
    'd=4': dict(reduced_dim=4),
    'd=8': dict(reduced_dim=8),
    'S=1': dict(num_segments=1),
    'S=2': dict(num_segments=2),
    'S=4': dict(num_segments=4),
    'S=8': dict(num_segments=8),
}
VARIANT_NOTES = {
    'dynamic': 'DynaMixer block (baseline: S=4,8,8,8, d=2, re-weighted)',
    'static': 'static mixing: learned N x N logits per segment, input-independent',
    'plain-sum': "plain sum of h, w, c (paper's Algorithm 1), no re-weighting",
}

# the default recipe, sized for a 2-core CPU (see docs/ablations.md)
DEFAULTS = dict(
    model='dynamixer_nano', epochs=7, batch_size=64, lr=1e-3, weight_decay=0.05, warmup_epochs=1,
    min_lr=1e-5, smoothing=0.1, drop_path=0.0, num_train=4000, num_val=2000, canvas=24, align=4,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    parser.add_argument('--data', default='digits',
                        help="'digits' or 'left-digit' (the built-in left-digit task from scikit-learn's "
                             "digits, offline; `dynamixer train --dataset left-digit`) or a folder with "
                             "train/ and val/ image-class folders")
    parser.add_argument('--out', default='ablation', help='output folder (default: ./ablation)')
    parser.add_argument('--variants', nargs='+', default=list(VARIANTS), metavar='NAME',
                        help=f'variants to train (default: all of {", ".join(VARIANTS)})')
    parser.add_argument('--add-variant', action='append', default=[], metavar='NAME=JSON',
                        help='extra variant: a name and the model options as JSON, e.g. '
                             '\'d=16={"reduced_dim": 16}\' (repeatable)')
    parser.add_argument('--seeds', nargs='+', type=RANGES['seed'], default=[0, 1, 2])
    parser.add_argument('--model', default=d['model'], help='timm model name (default: %(default)s)')
    parser.add_argument('--img-size', type=RANGES['img_size'], default=None,
                        help='input size (default: the canvas for digits, the model\'s for folders)')
    parser.add_argument('--epochs', type=RANGES['epochs'], default=d['epochs'])
    parser.add_argument('--batch-size', type=RANGES['batch_size'], default=d['batch_size'])
    parser.add_argument('--lr', type=RANGES['lr'], default=d['lr'])
    parser.add_argument('--weight-decay', type=RANGES['weight_decay'], default=d['weight_decay'])
    parser.add_argument('--warmup-epochs', type=RANGES['warmup_epochs'], default=d['warmup_epochs'])
    parser.add_argument('--min-lr', type=RANGES['min_lr'], default=d['min_lr'])
    parser.add_argument('--smoothing', '--label-smoothing', dest='smoothing', type=RANGES['smoothing'],
                        default=d['smoothing'],
                        help='label smoothing, as in `dynamixer train` (--label-smoothing: old spelling)')
    parser.add_argument('--drop-path', type=RANGES['drop_path'], default=d['drop_path'])
    parser.add_argument('--num-train', type=RANGES['num_train'], default=d['num_train'],
                        help='digits: training canvases')
    parser.add_argument('--num-val', type=RANGES['num_val'], default=d['num_val'], help='digits: val canvases')
    parser.add_argument('--canvas', type=RANGES['canvas'], default=d['canvas'], help='digits: canvas size')
    parser.add_argument('--align', type=RANGES['align'], default=d['align'],
                        help='digits: digit positions on multiples of this many pixels')
    parser.add_argument('--data-seed', type=RANGES['data_seed'], default=0,
                        help='digits: seed of the generated data set')
    parser.add_argument('--hflip', type=RANGES['hflip'], default=0.5,
                        help='folders: horizontal flip probability (never used for digits, where '
                             'left and right are the label)')
    parser.add_argument('--workers', type=RANGES['workers'], default=2, help='folders: data loader workers')
    parser.add_argument('--device', default='auto', help="'auto' (cuda:LOCAL_RANK if present), 'cpu', 'cuda:0'...")
    parser.add_argument('--amp', nargs='?', const='auto', default='none', choices=['auto', 'bf16', 'fp16', 'none'],
                        help="mixed precision, as in `dynamixer train` (default: none); a bare --amp (the "
                             "old switch) means 'auto': bf16 or fp16 on GPUs, off on CPUs")
    parser.add_argument('--threads', type=RANGES['threads'], default=None,
                        help='torch CPU threads per process (1 is fastest on a busy machine)')
    parser.add_argument('--no-checkpoints', action='store_true', help='do not save final weights')
    parser.add_argument('--fresh', action='store_true', help='retrain runs already in OUT/runs')
    parser.add_argument('--report-only', action='store_true',
                        help='train nothing: write the tables and plot from the runs in OUT/runs')
    parser.add_argument('--speed-batch', type=positive_int, default=64, help='batch for the images/s measurement')
    parser.add_argument('--speed-rounds', type=non_negative_int, default=30,
                        help='interleaved timing rounds per variant (0 skips the measurement)')


# --------------------------------------------------------------------------------------------
# one run: an ordinary `dynamixer train` run with the variant's model options
# --------------------------------------------------------------------------------------------

def is_left_digit(data: str) -> bool:
    return data in ('digits', 'left-digit')


def model_kwargs_for(options: Dict[str, Any], num_classes: int, in_chans: int, img_size: int,
                     drop_path: float, model: str) -> Dict[str, Any]:
    """The timm.create_model options of a variant. A single int `num_segments` is broadcast to
    every stage (the model takes one value per stage). Lists, not tuples: checkpoints stay plain."""
    kw = dict(options)
    if isinstance(kw.get('num_segments'), int):
        stages = len(MODEL_ARGS[model]['depths']) if model in MODEL_ARGS else 4
        kw['num_segments'] = [kw['num_segments']] * stages
    kw.update(num_classes=num_classes, in_chans=in_chans, img_size=img_size, drop_path_rate=drop_path)
    return kw


class DataShape(NamedTuple):
    num_train: int
    num_val: int
    class_names: List[str]
    in_chans: int
    img_size: int


def train_config(cfg: Dict[str, Any], options: Dict[str, Any], seed: int, shape: Optional[DataShape],
                 output: Optional[str]) -> Dict[str, Any]:
    """The `dynamixer train` settings of one (variant, seed) run: the ablation recipe (AdamW,
    cosine with warm-up from lr/1000, label smoothing, no mixup / EMA / auto-augment)."""
    overrides: Dict[str, Any] = dict(
        model=cfg['model'], epochs=cfg['epochs'], batch_size=cfg['batch_size'], lr=cfg['lr'],
        weight_decay=cfg['weight_decay'], warmup_epochs=cfg['warmup_epochs'], warmup_lr=cfg['lr'] * 1e-3,
        min_lr=cfg['min_lr'], smoothing=cfg['smoothing'], drop_path=cfg['drop_path'], opt='adamw',
        sched='cosine', auto_augment=None, seed=seed, output=output, amp=cfg['amp'], device=cfg['device'],
        threads=cfg['threads'] or 0, progress=False, save_safetensors=False, bad_images='off',
        val_batch_size=256)
    if is_left_digit(cfg['data']):
        overrides.update(dataset='left-digit', num_train=cfg['num_train'], num_val=cfg['num_val'],
                         canvas=cfg['canvas'], align=cfg['align'], data_seed=cfg['data_seed'],
                         img_size=cfg['img_size'], workers=0)
    else:
        overrides.update(dataset='', hflip=cfg['hflip'], workers=cfg['workers'],
                         img_size=shape.img_size if shape else cfg['img_size'])
    if shape is not None:
        kw = model_kwargs_for(options, len(shape.class_names), shape.in_chans, shape.img_size, 0.0, cfg['model'])
        overrides['model_options'] = {k: v for k, v in kw.items() if k not in ('num_classes', 'drop_path_rate')}
    return resolve_config('scratch', overrides=overrides)


def describe_data(cfg: Dict[str, Any]) -> DataShape:
    """Sizes, classes and input shape of the ablation's data (built once, as each run will)."""
    config = train_config(cfg, {}, 0, None, None)
    data = None if is_left_digit(cfg['data']) else cfg['data']
    train_set, val_set, names, report = build_datasets(config, data)
    if is_left_digit(cfg['data']):
        in_chans, img_size = 1, cfg['canvas']
    else:
        in_chans = 3
        img_size = cfg['img_size'] or timm.create_model(cfg['model']).pretrained_cfg['input_size'][-1]
    return DataShape(len(train_set), len(val_set), names, in_chans, img_size)


def train_run(name: str, options: Dict[str, Any], seed: int, cfg: Dict[str, Any], shape: DataShape,
              device: torch.device, output: Optional[str] = None) -> Dict[str, Any]:
    """Train one variant from scratch with one seed (`dynamix.train.train`, one process on
    `device`, run folder `output`; a temporary one when None); return its metrics."""
    with tempfile.TemporaryDirectory() as tmp:
        config = train_config(cfg, options, seed, shape, output or os.path.join(tmp, 'run'))
        data = None if is_left_digit(cfg['data']) else cfg['data']
        # OUT/runs is the grid's own: a run is retrained there only when its result is missing or
        # stale (another recipe) or --fresh asks, so it may replace what is in its folder
        result = train(config, data=data, process=Process(0, 1, device), overwrite=True)
    history = result['history']
    last = history[-1]
    seconds = sum(h['epoch_s'] for h in history)
    images = sum(h['images_per_s'] * h['epoch_s'] for h in history)
    kw = dict(config['model_options'], num_classes=len(shape.class_names), drop_path_rate=cfg['drop_path'])
    params = sum(p.numel() for p in timm.create_model(cfg['model'], **kw).parameters())
    return dict(variant=name, seed=seed, top1=last['val_top1'], val_loss=last['val_loss'],
                train_loss=last['train_loss'], train_seconds=seconds, train_images_per_s=images / seconds,
                params=params, model_kwargs=kw)


# --------------------------------------------------------------------------------------------
# cost and speed
# --------------------------------------------------------------------------------------------

def measure_speed(models: Dict[str, torch.nn.Module], input_size: Sequence[int], batch: int,
                  rounds: int, device: torch.device) -> Dict[str, float]:
    """Inference images/s of each model: the models are timed interleaved, round by round, in
    one process, so a change of machine load hits all of them alike; median over rounds."""
    x = torch.randn(batch, *input_size, device=device)
    times: Dict[str, List[float]] = {k: [] for k in models}
    with torch.no_grad():
        for m in models.values():  # warm-up
            m.eval().to(device)(x)
        for _ in range(rounds):
            for k, m in models.items():
                if device.type == 'cuda':
                    torch.cuda.synchronize(device)
                t = time.perf_counter()
                m(x)
                if device.type == 'cuda':
                    torch.cuda.synchronize(device)
                times[k].append(time.perf_counter() - t)
    return {k: batch / statistics.median(v) for k, v in times.items()}


# --------------------------------------------------------------------------------------------
# tables and plot
# --------------------------------------------------------------------------------------------

def summarize(runs: List[Dict[str, Any]], variants: Sequence[str], costs: Dict[str, Dict[str, Any]],
              baseline: str = BASELINE) -> List[Dict[str, Any]]:
    """One row per variant: top-1 over seeds (mean, sample std, min, max), the paired (same
    seed) difference to the baseline, and the variant's costs."""
    rows = []
    for s in experiments.summarize(runs, key=lambda r: r['variant'], metrics=('top1', 'train_images_per_s'),
                                   order=variants, baseline=baseline, paired=('top1',)):
        v = s['setting']
        row = dict(variant=v, options=json.dumps(VARIANTS.get(v, costs.get(v, {}).get('options', {}))),
                   seeds=s['seeds'], top1_mean=s['top1_mean'], top1_std=s['top1_std'], top1_min=s['top1_min'],
                   top1_max=s['top1_max'], top1_per_seed=' '.join(f'{a:.1f}' for a in s['top1_per_seed']),
                   delta_mean=s['top1_delta_mean'], delta_std=s['top1_delta_std'],
                   train_images_per_s=statistics.median(s['train_images_per_s_per_seed']))
        row.update({k: costs.get(v, {}).get(k, float('nan')) for k in ('params', 'macs', 'images_per_s')})
        rows.append(row)
    base = next((r for r in rows if r['variant'] == baseline), None)
    for r in rows:
        ok = base is not None and base['images_per_s'] == base['images_per_s'] and base['images_per_s'] > 0
        r['speed_vs_baseline'] = r['images_per_s'] / base['images_per_s'] if ok else float('nan')
    return rows


RUN_FIELDS = ['variant', 'seed', 'top1', 'val_loss', 'train_loss', 'train_seconds', 'train_images_per_s', 'params']
RESULT_FIELDS = ['variant', 'options', 'seeds', 'top1_mean', 'top1_std', 'top1_min', 'top1_max', 'top1_per_seed',
                 'delta_mean', 'delta_std', 'params', 'macs', 'images_per_s', 'speed_vs_baseline',
                 'train_images_per_s']


def write_tables(out: str, runs: List[Dict[str, Any]], rows: List[Dict[str, Any]], cfg: Dict[str, Any]) -> None:
    """OUT/runs.csv, results.csv and results.md, each written atomically."""
    fmt = experiments.format_number
    experiments.write_csv(sorted(runs, key=lambda r: (r['variant'], r['seed'])),
                          os.path.join(out, 'runs.csv'), RUN_FIELDS)
    experiments.write_csv(rows, os.path.join(out, 'results.csv'), RESULT_FIELDS)
    table = experiments.markdown_table(
        ['variant', 'top-1 % mean ± std (n)', 'per seed', f'Δ vs {BASELINE} (paired)', 'params', 'MMACs',
         'images/s (inference)', f'speed vs {BASELINE}', 'train images/s'],
        [[r['variant'], f"{experiments.format_mean_std(r['top1_mean'], r['top1_std'])} ({r['seeds']})",
          r['top1_per_seed'],
          '-' if r['variant'] == BASELINE else experiments.format_mean_std(r['delta_mean'], r['delta_std'], sign=True),
          fmt(r['params'], ',.0f'), fmt(r['macs'] / 1e6, '.2f'), fmt(r['images_per_s'], '.0f'),
          fmt(r['speed_vs_baseline'], '.2f'), fmt(r['train_images_per_s'], '.0f')] for r in rows])
    notes = [f"- `{r['variant']}`: {VARIANT_NOTES.get(r['variant'], 'model options ' + r['options'])}" for r in rows]
    recipe = {k: cfg[k] for k in ('data', 'model', 'epochs', 'batch_size', 'lr', 'weight_decay', 'warmup_epochs',
                                  'smoothing', 'drop_path', 'num_train', 'num_val', 'canvas', 'align', 'data_seed')}
    experiments.write_markdown('\n'.join([
        '# Ablation results', '',
        f'Recipe: `{json.dumps(recipe)}`; seeds {cfg["seeds"]}.', '',
        table,
        'Δ is the mean ± std over seeds of (variant - baseline) for the same seed. Parameters and '
        'multiply-adds (FlopCounterMode / 2) are per image; images/s is inference at batch '
        f'{cfg["speed_batch"]}, timed interleaved in one process (median of {cfg["speed_rounds"]} rounds); '
        'train images/s is the median over seeds of the training runs (affected by machine load).', '',
        'Variants:', *notes, '']), os.path.join(out, 'results.md'))


def plot(out: str, runs: List[Dict[str, Any]], rows: List[Dict[str, Any]], title: str = '') -> str:
    """Two panels: top-1 of every run with mean ± std per variant; mean top-1 against MMACs."""
    matplotlib = require('matplotlib', None, 'the ablation plot')
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw=dict(width_ratios=[1.4, 1]))
    names = [r['variant'] for r in rows]
    base = next((r for r in rows if r['variant'] == BASELINE), None)
    if base is not None and base['top1_std'] == base['top1_std']:
        ax.axhspan(base['top1_mean'] - base['top1_std'], base['top1_mean'] + base['top1_std'],
                   color='tab:blue', alpha=0.12, label=f'{BASELINE} mean ± std')
    for i, r in enumerate(rows):
        acc = [x['top1'] for x in runs if x['variant'] == r['variant']]
        ax.scatter([i - 0.15] * len(acc), acc, s=14, color='0.5', zorder=2, label='one seed' if i == 0 else None)
        ax.errorbar(i + 0.1, r['top1_mean'], yerr=0 if r['top1_std'] != r['top1_std'] else r['top1_std'],
                    fmt='o', color='tab:red' if r['variant'] == BASELINE else 'k', capsize=4, zorder=3,
                    label='mean ± std' if i == 0 else None)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha='right')
    ax.set_ylabel('val top-1 (%)')
    ax.set_title('top-1 per variant (dots: seeds)')
    ax.grid(axis='y', alpha=0.3)
    ax.legend(loc='lower right', fontsize=8)
    # labels alternate above / below along the cost axis, so close points stay readable
    for k, r in enumerate(sorted(rows, key=lambda r: r['macs'])):
        if r['macs'] != r['macs']:
            continue
        bx.errorbar(r['macs'] / 1e6, r['top1_mean'], yerr=0 if r['top1_std'] != r['top1_std'] else r['top1_std'],
                    fmt='o', capsize=3, color='tab:red' if r['variant'] == BASELINE else 'k')
        bx.annotate(r['variant'], (r['macs'] / 1e6, r['top1_mean']), textcoords='offset points',
                    xytext=(4, 5) if k % 2 == 0 else (4, -12), fontsize=8)
    bx.set_xlabel('multiply-adds per image (M)')
    bx.set_ylabel('val top-1 (%), mean ± std')
    bx.set_title('accuracy against cost')
    bx.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = os.path.join(out, 'ablation.png')
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------

def _parse_extra(specs: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    extra = {}
    for spec in specs:
        name, sep, js = spec.partition('={')
        try:
            if not sep:
                raise ValueError
            options = json.loads('{' + js)
            if not isinstance(options, dict):
                raise ValueError
        except ValueError:
            raise UsageError(f'--add-variant {spec!r}: expected NAME={{JSON options}}, '
                             f'e.g. \'d=16={{"reduced_dim": 16}}\'') from None
        extra[name] = options
    return extra


GRID_OPTIONS = ('out', 'variants', 'seeds', 'device', 'threads', 'workers', 'no_checkpoints', 'fresh',
                'speed_batch', 'speed_rounds', 'add_variant', 'report_only')


def recipe_of(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The settings a run's result depends on (its fingerprint): not where or how fast it runs."""
    return {k: v for k, v in cfg.items() if k not in GRID_OPTIONS}


def run(args: argparse.Namespace) -> int:
    cfg = {k: v for k, v in vars(args).items() if not k.startswith('_') and k != 'command'}
    grid = dict(VARIANTS)
    grid.update(_parse_extra(args.add_variant))
    unknown = [v for v in args.variants if v not in grid]
    if unknown:
        raise UsageError(f'unknown variant(s) {unknown}; choose from {list(grid)} or add one with --add-variant')
    variants = list(dict.fromkeys(args.variants + list(_parse_extra(args.add_variant))))
    cfg['variants'] = variants
    logging.basicConfig(level=logging.INFO, format='%(message)s')  # the runs' epoch lines
    check_output_folder(args.out, 'ablation folder (--out)')
    return _run_grid(args, cfg, grid, variants)


def _run_grid(args: argparse.Namespace, cfg: Dict[str, Any], grid: Dict[str, Dict[str, Any]],
              variants: List[str]) -> int:
    # ranks wait for the slowest share: a long timeout
    process = setup_process(args.device, args.threads or 0, timeout_s=48 * 3600)
    rank, world, device = process.rank, process.world, process.device

    def log(msg: str) -> None:
        print(f'[rank {rank}] {msg}' if world > 1 else msg, flush=True)

    out = args.out
    data = describe_data(cfg)
    log(f'data: {data.num_train} train / {data.num_val} val images, {len(data.class_names)} classes, '
        f'{data.img_size}x{data.img_size}x{data.in_chans}; device {device}; {world} process(es)')

    # seed-major order: a partial grid has every variant with the first seeds
    jobs = [experiments.Job(v, grid[v], s) for s in args.seeds for v in variants]
    wall = time.perf_counter()

    def train_job(job: experiments.Job) -> Dict[str, Any]:
        folder = None if args.no_checkpoints else os.path.join(out, 'runs', job.name)
        return train_run(job.setting, job.options, job.seed, cfg, data, device, folder)

    def finished(job: experiments.Job, r: Dict[str, Any], runs: List[Dict[str, Any]]) -> None:
        log(f'{job.setting} seed {job.seed}: top-1 {r["top1"]:.2f} in {r["train_seconds"]:.0f}s '
            f'(elapsed {time.perf_counter() - wall:.0f}s)')
        if world == 1:  # keep the tables current, so an interrupted grid still has results
            report(out, runs, variants, grid, cfg, data, device, speed=False)

    runs = experiments.run_grid(jobs, train_job, os.path.join(out, 'runs'), recipe_of(cfg), fresh=args.fresh,
                                train=not args.report_only, rank=rank, world=world, on_record=finished, log=log)
    runs = experiments.gather(runs, world)
    if rank == 0:
        report(out, runs, variants, grid, cfg, data, device, speed=args.speed_rounds > 0)
        log(f'{len(runs)} runs in {time.perf_counter() - wall:.0f}s; wrote {out}/results.md, '
            f'results.csv, runs.csv, ablation.png')
        with open(os.path.join(out, 'results.md')) as f:
            print(f.read())
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


def report(out: str, runs: List[Dict[str, Any]], variants: Sequence[str], grid: Dict[str, Dict[str, Any]],
           cfg: Dict[str, Any], data: DataShape, device: torch.device,
           speed: bool) -> List[Dict[str, Any]]:
    """The grid's report: costs of the variants present in `runs` (parameters, multiply-adds and,
    with `speed`, inference images/s), then runs.csv, results.csv/.md, config.json and the plot."""
    classes, in_chans, img_size = data.class_names, data.in_chans, data.img_size
    present = [v for v in variants if any(r['variant'] == v for r in runs)]
    models = {}
    costs: Dict[str, Dict[str, Any]] = {}
    for v in present:
        kw = model_kwargs_for(grid[v], len(classes), in_chans, img_size, 0.0, cfg['model'])
        torch.manual_seed(0)
        m = timm.create_model(cfg['model'], **kw)
        costs[v] = dict(options=grid[v], params=sum(p.numel() for p in m.parameters()),
                        macs=count_macs(m, (in_chans, img_size, img_size)), images_per_s=float('nan'))
        models[v] = m
    if speed and models:
        for v, ips in measure_speed(models, (in_chans, img_size, img_size), cfg['speed_batch'],
                                    cfg['speed_rounds'], device).items():
            costs[v]['images_per_s'] = ips
    rows = summarize(runs, present, costs)
    experiments.write_json(dict(cfg, grid={v: grid[v] for v in variants}), os.path.join(out, 'config.json'))
    write_tables(out, runs, rows, cfg)
    plot(out, runs, rows, title=f'{cfg["model"]} on {cfg["data"]}: {len(runs)} runs, {cfg["epochs"]} epochs')
    return rows

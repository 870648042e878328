"""What a training run leaves behind: progress bar, epoch lines, metrics.csv/.json, a plot,
TensorBoard events, and files written atomically (a crash while writing never destroys the previous
version).
"""
from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import yaml
from tqdm import tqdm

from . import files
from .errors import require
from .files import OutputError, atomic_save_figure, atomic_torch_save, atomic_write_text, safetensors_metadata

__all__ = ['RunLog', 'atomic_torch_save', 'atomic_write_text', 'save_safetensors', 'plot_history']

_logger = logging.getLogger('dynamixer.train')


def save_safetensors(model: torch.nn.Module, path: str, config: Dict[str, Any], class_names: Sequence[str]) -> None:
    """The model's weights as safetensors with the shared metadata schema (`files.safetensors_metadata`:
    model name, its arguments, class names), so `dynamixer predict model.safetensors` knows them."""
    meta = safetensors_metadata(config['model'], config.get('model_kwargs', {}), class_names)
    files.save_safetensors(model.state_dict(), path, meta)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str, refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass


class RunLog:
    """Logging of one run, on the main process only (`enabled`)."""

    FIELDS = ['epoch', 'step', 'lr', 'train_loss', 'val_loss', 'val_top1', 'val_top5',
              'ema_loss', 'ema_top1', 'ema_top5', 'images_per_s', 'epoch_s']

    def __init__(self, output: str, config: Dict[str, Any], enabled: bool = True, tensorboard: bool = False,
                 history: Optional[List[Dict[str, Any]]] = None, fields: Optional[Sequence[str]] = None,
                 summary: Optional[Callable[[Dict[str, Any]], str]] = None,
                 plot: Optional[Callable[[List[Dict[str, Any]], str], None]] = None):
        """`fields` (metrics.csv columns, in order), `summary` (metrics -> the epoch's log line) and
        `plot` (history, path -> curves.png) default to classification's; other tasks pass theirs."""
        self.output = output
        self.fields = list(fields or self.FIELDS)
        self.summary = summary or _classification_summary
        self.plot = plot or plot_history
        self.enabled = enabled
        self.history: List[Dict[str, Any]] = list(history or [])
        self.writer = None
        if not enabled:
            return
        try:
            os.makedirs(output, exist_ok=True)
        except OSError as e:
            raise OutputError(f'cannot make the run folder {output}: {e.strerror or e}') from None
        atomic_write_text(yaml.safe_dump(config, sort_keys=False), os.path.join(output, 'config.yaml'))
        if tensorboard:
            require('tensorboard', 'tensorboard', '--tensorboard')
            from torch.utils.tensorboard import SummaryWriter  # imports tensorboard, an optional extra
            self.writer = SummaryWriter(os.path.join(output, 'tensorboard'))

    def info(self, text: str) -> None:
        if self.enabled:
            _logger.info(text)

    def write_bad_images(self, bad: List[Tuple[str, str]]) -> None:
        text = ''.join(f'{p}\t{r}\n' for p, r in bad)
        atomic_write_text(text, os.path.join(self.output, 'bad_images.txt'))
        _logger.warning('%d unreadable images were skipped; the list is in %s', len(bad),
                        os.path.join(self.output, 'bad_images.txt'))

    def progress(self, total: int, desc: str, show: bool = True):
        if not (self.enabled and show):
            return _NoBar()
        # redirected to a file: a line every 30 s rather than a flood of carriage returns
        tty = sys.stderr.isatty()
        return tqdm(total=total, desc=desc, leave=not tty, dynamic_ncols=True, unit='step',
                    mininterval=0.1 if tty else 30.0)

    @staticmethod
    def advance(bar, loss: float, lr: float, ips: float) -> None:
        bar.update(1)
        bar.set_postfix_str(f'loss {loss:.4f}  lr {lr:.2e}  {ips:.0f} img/s', refresh=False)

    def epoch(self, metrics: Dict[str, Any]) -> None:
        """Record one epoch: summary line, CSV, JSON, TensorBoard."""
        self.history.append(dict(metrics))
        if not self.enabled:
            return
        m = metrics
        _logger.info(self.summary(m))
        self._write_tables()
        if self.writer is not None:
            for k, v in m.items():
                if k not in ('epoch', 'step'):
                    self.writer.add_scalar(k, v, m['epoch'])
            self.writer.flush()

    def _write_tables(self) -> None:
        fields = [f for f in self.fields if any(f in h for h in self.history)]
        lines = [','.join(fields)]
        for h in self.history:
            lines.append(','.join('' if h.get(f) is None else f'{h[f]:.6g}' if isinstance(h[f], float) else str(h[f])
                                  for f in fields))
        atomic_write_text('\n'.join(lines) + '\n', os.path.join(self.output, 'metrics.csv'))
        atomic_write_text(json.dumps(self.history, indent=1), os.path.join(self.output, 'metrics.json'))

    def finish(self) -> None:
        if not self.enabled:
            return
        if self.history:
            self.plot(self.history, os.path.join(self.output, 'curves.png'))
        if self.writer is not None:
            self.writer.close()


def _classification_summary(m: Dict[str, Any]) -> str:
    line = (f"epoch {m['epoch']:>3}  train loss {m['train_loss']:.4f}  val loss {m['val_loss']:.4f}  "
            f"top-1 {m['val_top1']:6.2f}%  top-5 {m['val_top5']:6.2f}%")
    if 'ema_top1' in m:
        line += f"  EMA top-1 {m['ema_top1']:6.2f}%"
    return line + f"  lr {m['lr']:.2e}  {m['images_per_s']:.0f} img/s  {m['epoch_s']:.1f} s"


def plot_history(history: List[Dict[str, Any]], path: str) -> None:
    """Loss (train, val) and accuracy (top-1, top-5, EMA top-1) per epoch, as a PNG."""
    matplotlib = require('matplotlib', None, 'the training curves plot')
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    epochs = [h['epoch'] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    ax_loss.plot(epochs, [h['train_loss'] for h in history], 'o-', label='train (augmented, smoothed targets)')
    ax_loss.plot(epochs, [h['val_loss'] for h in history], 's-', label='validation')
    if 'ema_loss' in history[-1]:
        ax_loss.plot(epochs, [h.get('ema_loss') for h in history], '^--', label='validation (EMA)')
    ax_loss.set(title='Loss', xlabel='epoch', ylabel='cross-entropy')
    ax_acc.plot(epochs, [h['val_top1'] for h in history], 's-', label='top-1')
    ax_acc.plot(epochs, [h['val_top5'] for h in history], 'o-', label='top-5')
    if 'ema_top1' in history[-1]:
        ax_acc.plot(epochs, [h.get('ema_top1') for h in history], '^--', label='top-1 (EMA)')
    best = max(history, key=lambda h: h['val_top1'])
    ax_acc.plot([best['epoch']], [best['val_top1']], 'k*', markersize=12,
                label=f"best top-1 {best['val_top1']:.1f}% (epoch {best['epoch']})")
    values = [v for h in history for v in (h['val_top1'], h['val_top5'], h.get('ema_top1')) if v is not None]
    ax_acc.set(title='Validation accuracy', xlabel='epoch', ylabel='%', ylim=(max(0.0, min(values) - 5), 100.5))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
        if len(epochs) < 15:
            ax.set_xticks(epochs)
    fig.tight_layout()
    atomic_save_figure(fig, path)
    plt.close(fig)

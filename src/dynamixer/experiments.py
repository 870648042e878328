"""Experiment grids: run every (setting, seed), reuse finished runs, summarize over seeds, write tables.

`dynamixer ablate` (model variants) and `dynamixer dense` (detector / backbone / pyramid
combinations) are both a grid of named settings x seeds whose runs are independent. This module
holds what they share:

- `run_grid`: run each job once, keeping one JSON record per finished run in a folder; a record
  whose fingerprint (recipe, setting, options, seed) matches is reused, so an interrupted grid
  resumes. The jobs can be shared over torchrun ranks (job i on rank i % world) or run in an
  executor's worker processes.
- `summarize`: mean, sample std, min and max of metrics over seeds per setting, and the paired
  (same seed) difference to a baseline setting.
- `write_csv`, `write_markdown`, `markdown_table`, `format_mean_std`: the tables, written atomically.
"""
import concurrent.futures
import csv
import hashlib
import io
import json
import math
import os
import statistics
from typing import Any, Callable, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence

import torch.distributed as dist

from .files import atomic_write_text

__all__ = ['Job', 'fingerprint', 'run_grid', 'gather', 'mean_std', 'summarize', 'format_mean_std',
           'markdown_table', 'as_csv', 'write_csv', 'write_markdown', 'write_json', 'read_json']

Record = Dict[str, Any]


class Job(NamedTuple):
    """One run of a grid: the setting's name, its options (JSON-able) and the seed."""
    setting: str
    options: Any
    seed: int

    @property
    def name(self) -> str:
        """File stem of the run's record and folder: ``<setting>__seed<k>``."""
        return f'{self.setting}__seed{self.seed}'


def fingerprint(recipe: Mapping[str, Any], job: Job) -> str:
    """Hash of everything a run's result depends on; a stored record is reused only when it matches."""
    blob = json.dumps(dict(recipe=dict(recipe), name=job.setting, options=job.options, seed=job.seed),
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def write_json(obj: Any, path: str) -> None:
    """`obj` as indented JSON, written atomically."""
    atomic_write_text(json.dumps(obj, indent=1), path)


def run_grid(
        jobs: Sequence[Job],
        run: Callable[[Job], Record],
        folder: str,
        recipe: Mapping[str, Any],
        *,
        fresh: bool = False,
        train: bool = True,
        rank: int = 0,
        world: int = 1,
        executor: Optional[concurrent.futures.Executor] = None,
        on_record: Optional[Callable[[Job, Record, List[Record]], None]] = None,
        log: Callable[[str], None] = print,
) -> List[Record]:
    """Run this rank's share of `jobs` (job i when i % world == rank) and return their records.

    `run(job)` returns the record (a JSON-able dict) of one run; it is saved as
    ``folder/<job.name>.json`` with its ``fingerprint`` added. A saved record with the same
    fingerprint is reused unless `fresh`; with `train` False nothing new is run (report only).
    With an `executor`, `run` is submitted to it (it must then be picklable) and records arrive as
    runs finish. `on_record(job, record, records)` is called after each new run with the records so
    far (reused and new, in job order), e.g. to rewrite the tables so that an interrupted grid still
    has its results. Records come back in job order.
    """
    os.makedirs(folder, exist_ok=True)
    mine = list(jobs)[rank::world]
    records: Dict[int, Record] = {}
    todo = []
    for i, job in enumerate(mine):
        fp = fingerprint(recipe, job)
        path = os.path.join(folder, job.name + '.json')
        tag = f'[{i + 1}/{len(mine)}] {job.setting} seed {job.seed}'
        if not fresh and os.path.exists(path):
            old = read_json(path)
            if old.get('fingerprint') == fp:
                log(f'{tag}: reusing {path}')
                records[i] = old
                continue
        if not train:
            log(f'{tag}: not run yet (report only)')
            continue
        todo.append((i, job, fp, path, tag))

    def done(i: int, job: Job, fp: str, path: str, tag: str, record: Record) -> None:
        record['fingerprint'] = fp
        write_json(record, path)
        records[i] = record
        if on_record is not None:
            on_record(job, record, [records[k] for k in sorted(records)])

    if executor is None:
        for i, job, fp, path, tag in todo:
            log(f'{tag}: options {job.options}')
            done(i, job, fp, path, tag, run(job))
    else:
        futures = {executor.submit(run, job): (i, job, fp, path, tag) for i, job, fp, path, tag in todo}
        for future in concurrent.futures.as_completed(futures):
            done(*futures[future], future.result())
    return [records[i] for i in sorted(records)]


def gather(records: List[Record], world: int) -> List[Record]:
    """Every rank's records, on every rank (torch.distributed.all_gather_object); as is for one process."""
    if world == 1:
        return records
    parts: List[Optional[List[Record]]] = [None] * world
    dist.all_gather_object(parts, records)
    return [r for part in parts for r in (part or [])]


# --------------------------------------------------------------------------------------------
# summaries over seeds
# --------------------------------------------------------------------------------------------

NAN = float('nan')


def mean_std(values: Iterable[float]) -> tuple:
    """(mean, sample std) of `values`; std is NaN for one value, both NaN for none."""
    v = list(values)
    if not v:
        return NAN, NAN
    return statistics.mean(v), statistics.stdev(v) if len(v) > 1 else NAN


def summarize(
        records: Sequence[Record],
        key: Callable[[Record], str],
        metrics: Sequence[str],
        order: Optional[Sequence[str]] = None,
        baseline: Optional[str] = None,
        paired: Sequence[str] = (),
) -> List[Record]:
    """One row per setting (``key(record)``; in `order`, else first appearance) over its seeds.

    For each metric m found in the records: ``m_mean``, ``m_std`` (sample; NaN for one seed),
    ``m_min``, ``m_max`` and ``m_per_seed`` (the values in seed order). For each metric in `paired`
    and a `baseline` setting: ``m_delta_mean`` and ``m_delta_std``, the mean and std over the seeds
    both have of (setting - baseline) for the same seed (NaN for the baseline itself). Also
    ``setting`` and ``seeds`` (how many)."""
    groups: Dict[str, Dict[int, Record]] = {}
    for r in records:
        groups.setdefault(key(r), {})[r['seed']] = r
    names = [n for n in (order if order is not None else groups) if n in groups]
    rows = []
    for name in names:
        by_seed = groups[name]
        seeds = sorted(by_seed)
        row: Record = dict(setting=name, seeds=len(seeds))
        for m in metrics:
            vals = [by_seed[s][m] for s in seeds if m in by_seed[s]]
            if not vals:
                continue
            row[m + '_mean'], row[m + '_std'] = mean_std(vals)
            row[m + '_min'], row[m + '_max'] = min(vals), max(vals)
            row[m + '_per_seed'] = vals
        base = groups.get(baseline) if baseline is not None else None
        for m in paired:
            diffs = [by_seed[s][m] - base[s][m] for s in seeds if base is not None and s in base
                     and m in by_seed[s] and m in base[s]] if name != baseline else []
            row[m + '_delta_mean'], row[m + '_delta_std'] = mean_std(diffs)
        rows.append(row)
    return rows


def format_mean_std(mean: float, std: float, spec: str = '.1f', sign: bool = False) -> str:
    """'48.0 ± 11.3'; '-' for a missing mean, '48.0 ± -' for a missing std (one seed)."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return '-'
    return f'{format(mean, ("+" if sign else "") + spec)} ± {format_number(std, spec)}'


def format_number(x: Optional[float], spec: str) -> str:
    """`x` formatted with `spec`, '-' when missing (None or NaN)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return '-'
    return format(x, spec)


# --------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------

def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table: the header, the rule, one line per row (cells as str)."""
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
    return '\n'.join(lines) + '\n'


def as_csv(rows: Sequence[Mapping[str, Any]], fields: Optional[Sequence[str]] = None) -> str:
    """CSV text of `rows`; columns `fields` (others ignored), else every key in order of appearance.
    Lists become space-separated values."""
    fields = list(fields) if fields is not None else list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction='ignore', lineterminator='\n')
    w.writeheader()
    for r in rows:
        w.writerow({k: ' '.join(map(str, v)) if isinstance(v, (list, tuple)) else v for k, v in r.items()})
    return buf.getvalue()


def write_csv(rows: Sequence[Mapping[str, Any]], path: str, fields: Optional[Sequence[str]] = None) -> None:
    """`rows` as CSV at `path`, written atomically (see `as_csv`)."""
    atomic_write_text(as_csv(rows, fields), path)


def write_markdown(text: str, path: str) -> None:
    """A markdown page, written atomically."""
    atomic_write_text(text if text.endswith('\n') else text + '\n', path)

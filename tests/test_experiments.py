"""dynamixer.experiments: running a grid with reuse of finished runs, summaries over seeds, tables."""
import concurrent.futures
import csv
import json
import math

import numpy as np
import pytest

from dynamixer import experiments
from dynamixer.experiments import Job


def _square(job: Job) -> dict:
    return dict(setting=job.setting, seed=job.seed, value=job.options['x'] ** 2 + job.seed)


def test_run_grid_runs_each_job_once_and_reuses_finished_runs(tmp_path):
    jobs = [Job(name, dict(x=x), s) for s in (0, 1) for name, x in (('a', 1), ('b', 2))]
    calls, seen = [], []

    def run(job):
        calls.append(job.name)
        return _square(job)

    records = experiments.run_grid(jobs, run, str(tmp_path), dict(lr=1), log=lambda m: None,
                                   on_record=lambda job, r, so_far: seen.append(len(so_far)))
    assert [r['value'] for r in records] == [1, 4, 2, 5] and calls == ['a__seed0', 'b__seed0', 'a__seed1', 'b__seed1']
    assert seen == [1, 2, 3, 4]
    saved = json.loads((tmp_path / 'b__seed1.json').read_text())
    assert saved['value'] == 5 and saved['fingerprint'] == experiments.fingerprint(dict(lr=1), jobs[3])
    # same recipe: everything reused; another recipe: everything runs again; report only: nothing runs
    calls.clear()
    assert experiments.run_grid(jobs, run, str(tmp_path), dict(lr=1), log=lambda m: None) == records
    assert calls == []
    assert experiments.run_grid(jobs, run, str(tmp_path), dict(lr=2), train=False, log=lambda m: None) == []
    experiments.run_grid(jobs, run, str(tmp_path), dict(lr=2), log=lambda m: None)
    assert len(calls) == 4
    calls.clear()
    experiments.run_grid(jobs, run, str(tmp_path), dict(lr=2), fresh=True, log=lambda m: None)
    assert len(calls) == 4


def test_run_grid_shares_jobs_over_ranks_and_executors(tmp_path):
    jobs = [Job('a', dict(x=x), s) for x, s in ((1, 0), (2, 1), (3, 2))]
    rank1 = experiments.run_grid(jobs, _square, str(tmp_path / 'r'), {}, rank=1, world=2, log=lambda m: None)
    assert [r['seed'] for r in rank1] == [1]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        records = experiments.run_grid(jobs, _square, str(tmp_path / 'p'), {}, executor=pool, log=lambda m: None)
    assert [r['value'] for r in records] == [1, 5, 11]


def test_summarize_means_spreads_and_paired_differences():
    records = [dict(v='base', seed=s, top1=a) for s, a in ((0, 50.), (1, 60.))]
    records += [dict(v='other', seed=s, top1=a, extra=1.0) for s, a in ((0, 40.), (1, 56.), (2, 70.))]
    rows = {r['setting']: r for r in experiments.summarize(records, key=lambda r: r['v'], metrics=('top1', 'extra'),
                                                           baseline='base', paired=('top1',))}
    other = rows['other']
    assert other['seeds'] == 3 and other['top1_mean'] == pytest.approx(np.mean([40, 56, 70]))
    assert other['top1_std'] == pytest.approx(np.std([40, 56, 70], ddof=1))
    assert (other['top1_min'], other['top1_max'], other['top1_per_seed']) == (40., 70., [40., 56., 70.])
    assert other['top1_delta_mean'] == -7.0                      # seeds 0 and 1 only: (-10 + -4) / 2
    assert other['top1_delta_std'] == pytest.approx(np.std([-10, -4], ddof=1))
    assert math.isnan(rows['base']['top1_delta_mean']) and 'extra_mean' not in rows['base']
    one = experiments.summarize(records[:1], key=lambda r: r['v'], metrics=('top1',))
    assert math.isnan(one[0]['top1_std'])
    assert experiments.format_mean_std(48.0, float('nan')) == '48.0 ± -'
    assert experiments.format_mean_std(-7.0, 4.24, sign=True) == '-7.0 ± 4.2'
    assert experiments.format_mean_std(float('nan'), 1.0) == '-'


def test_tables_are_written_whole(tmp_path):
    rows = [dict(a=1, b=[1.5, 2.5]), dict(a=2, c='x')]
    experiments.write_csv(rows, str(tmp_path / 't.csv'))
    with open(tmp_path / 't.csv') as f:
        assert list(csv.DictReader(f)) == [dict(a='1', b='1.5 2.5', c=''), dict(a='2', b='', c='x')]
    experiments.write_csv(rows, str(tmp_path / 'only_a.csv'), fields=['a'])
    assert (tmp_path / 'only_a.csv').read_text() == 'a\n1\n2\n'
    table = experiments.markdown_table(['x', 'y'], [[1, 'a'], [2, 'b']])
    assert table == '| x | y |\n|---|---|\n| 1 | a |\n| 2 | b |\n'
    experiments.write_markdown('# t', str(tmp_path / 't.md'))
    assert (tmp_path / 't.md').read_text() == '# t\n'
    assert [p.name for p in tmp_path.iterdir() if p.suffix == '.tmp'] == []

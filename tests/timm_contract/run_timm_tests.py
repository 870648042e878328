"""Run timm's own model tests (tests/test_models.py of the installed timm's source release)
against every DynaMixer model, and report.

    PYTHONPATH=src python tests/timm_contract/run_timm_tests.py [--cache DIR] [-- PYTEST ARGS]

The script downloads the source distribution of the installed timm version from PyPI (``pip
download timm==X --no-deps --no-binary :all:``; cached in --cache, nothing of timm's is copied
into this repository), extracts its tests/test_models.py, and runs it with ``-p dynamixer`` (so
``timm.list_models`` sees the DynaMixer models) and ``-k dynamixer`` (only they), together with
timm_module_lists.py (the timm tests that pick their models by timm's own module names, called
for the DynaMixer models). It prints pytest's summary and the wall time; the exit status is
pytest's. Arguments after ``--`` go to pytest (e.g. ``-- -k 'dynamixer_nano'``, which replaces
the default ``-k dynamixer``; ``-x``; ``-n 4`` with pytest-xdist).
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import timm

HERE = Path(__file__).resolve().parent
SRC = HERE.parents[1] / 'src'


def fetch_test_file(version: str, cache: Path) -> Path:
    """tests/test_models.py of timm `version`'s sdist, downloaded once into `cache`."""
    target = cache / f'timm-{version}-tests' / 'test_models.py'
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    sdist = cache / f'timm-{version}.tar.gz'
    if not sdist.is_file():
        subprocess.run([sys.executable, '-m', 'pip', 'download', f'timm=={version}', '--no-deps',
                        '--no-binary', ':all:', '--quiet', '-d', str(cache)], check=True)
    member = f'timm-{version}/tests/test_models.py'
    with tarfile.open(sdist) as tar:
        data = tar.extractfile(member)
        if data is None:
            raise SystemExit(f'{sdist} has no {member}')
        target.parent.mkdir(parents=True, exist_ok=True)
        # only the test file, in a folder of its own: next to the sdist's timm/ package, pytest
        # would import that copy of timm instead of the installed one
        with tempfile.NamedTemporaryFile('wb', dir=target.parent, delete=False) as tmp:
            tmp.write(data.read())
        os.replace(tmp.name, target)
    return target


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index('--') + 1:] if '--' in argv else []
    own = argv[:argv.index('--')] if '--' in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--cache', type=Path, default=Path(tempfile.gettempdir()) / 'dynamixer-timm-tests',
                        help='where the timm sdist and its test file are kept (default: %(default)s)')
    args = parser.parse_args(own)

    # the installed timm's version decides which test file fits
    test_file = fetch_test_file(timm.__version__, args.cache)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(SRC), os.environ.get('PYTHONPATH')])))
    selection = [] if any(a == '-k' or a.startswith('-k') for a in extra) else ['-k', 'dynamixer']
    cmd = [sys.executable, '-m', 'pytest', test_file.name, str(HERE / 'timm_module_lists.py'),
           '-p', 'dynamixer', *selection, '--rootdir', str(test_file.parent), '-p', 'no:cacheprovider',
           '-W', 'ignore::pytest.PytestUnknownMarkWarning', '-q', '-rfEs', '--durations=10', *extra]
    print(f'timm {timm.__version__}: {test_file}\n$ {shlex.join(cmd)}', flush=True)
    start = time.monotonic()
    status = subprocess.run(cmd, cwd=test_file.parent, env=env).returncode
    load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan')
    print(f'timm {timm.__version__} test_models.py on the DynaMixer models: exit status {status}, '
          f'{time.monotonic() - start:.0f} s wall (load average {load:.1f} on {os.cpu_count()} CPUs)')
    return status


if __name__ == '__main__':
    sys.exit(main())

"""conftest.py's `exclusive` marker: under `pytest -n 2` such a test runs with no other test beside it,
while the other tests still run two at a time."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

pytest.importorskip('xdist')

CONFTEST = pathlib.Path(__file__).with_name('conftest.py')

# Each test sleeps and appends "name start end" to $INTERVALS.
MODULE = """
import os, time
import pytest

def _record(name):
  start = time.time()
  time.sleep(0.4)
  with open(os.environ['INTERVALS'], 'a') as f:
    f.write(f'{{name}} {{start}} {{time.time()}}\\n')

{tests}
"""


def _module(prefix: str, count: int, exclusive: bool) -> str:
  mark = '@pytest.mark.exclusive\n' if exclusive else ''
  return MODULE.format(tests='\n'.join(
      f"{mark}def test_{prefix}{i}():\n  _record('{prefix}{i}')\n" for i in range(count)))


def test_exclusive_tests_run_alone_and_the_others_in_parallel(tmp_path):
  shutil.copy(CONFTEST, tmp_path / 'conftest.py')
  (tmp_path / 'pytest.ini').write_text(
      '[pytest]\nmarkers =\n  exclusive: alone\naddopts = --dist=load\n')
  # Tests one by one to whichever worker is free: both are busy all along, the exclusive tests
  # (collected first) included.
  (tmp_path / 'test_alone.py').write_text(_module('x', 3, exclusive=True))
  (tmp_path / 'test_shared.py').write_text(_module('s', 10, exclusive=False))
  intervals = tmp_path / 'intervals.txt'
  env = dict(os.environ, INTERVALS=str(intervals))
  proc = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-n', '2', '-p', 'no:cacheprovider'],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  runs = [line.split() for line in intervals.read_text().splitlines()]
  runs = [(name, float(a), float(b)) for name, a, b in runs]
  assert len(runs) == 13

  def overlap(r, s):
    return r[1] < s[2] and s[1] < r[2]

  for r in runs:
    if r[0].startswith('x'):
      beside = [s[0] for s in runs if s is not r and overlap(r, s)]
      assert not beside, f'{r[0]} ran beside {beside}'
  shared = [r for r in runs if not r[0].startswith('x')]
  assert any(overlap(r, s) for r in shared for s in shared if r[0] < s[0]), runs

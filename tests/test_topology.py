"""The same run on any topology: a run on 1 process x 4 devices continues on 2 x 2 and on 1 x 2.

Every job here is the real program, `python -m deeplab_jax.main`, started by
`launch/local_multiprocess.py` (N processes x D CPU devices, gloo collectives over localhost) on the
real input pipeline and the embedded `deeplab_shapes/tiny` dataset, with BatchNorm training
everywhere (backbone included): sync BatchNorm over processes, not only over the devices of one,
and `config.train.ordered_reductions` (every cross-device sum added in device order).

- 1x4 trains 12 steps, with a checkpoint at step 6, and evaluates.
- Its checkpoint of step 6 resumes on 2x2 (the same 4 devices in another process layout) and trains
  and evaluates to step 12: bit-identical per-step losses, final variables and evaluation.
- It also resumes on 1x2 (elastic resume: 2 devices, the same global batch) and continues to step 12
  within float32 rounding.
- On 3 devices the global batch of 4 cannot be split: the resume stops with an error naming both.

The batches are bit-identical on every topology (tests/test_input_pipeline.py). On 1x2 each device
adds up two rows where it added one, so float32 rounding differs from the 1x4 run's. A randomly
initialised tiny model with BatchNorm everywhere is extremely sensitive to that rounding: its
gradient is dominated by directions BatchNorm makes (nearly) irrelevant, whose values are
cancellation noise, so at the tiny config's own learning rate (0.05) such runs drift apart by
percents within three steps. The jobs therefore train at a learning rate of 1e-4, and the 1x2
tolerances are those of float32 rounding (measured: losses within 3.3e-6 relative). The runs on 4
devices are bit-identical at any learning rate (also measured at the tiny config's 0.05).

Each job costs 40-60 s, most of it compiling the train step (a second process of a job never hits
JAX's persistent compilation cache on CPU: the cache key holds the process's own topology), so the
2x2 run is the 1x4 run's continuation rather than a run of its own.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from flax import traverse_util

from deeplab_jax import checkpoint, metrics
from deeplab_jax.datasets import shapes

pytestmark = pytest.mark.exclusive  # Multi-process jobs (see conftest.py).

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCHER = REPO / 'launch' / 'local_multiprocess.py'
CONFIG_FILE = REPO / 'configs' / 'tiny.py'
NUM_STEPS, RESUME_STEP = 12, 6
BASE_LR = 1e-4
LOSS_RTOL = 1e-5  # Per-step losses of a resume on another number of devices.
VARIABLE_RTOL, VARIABLE_ATOL = 1e-3, 1e-4  # Final params and BatchNorm statistics.


def start_job(workdir: pathlib.Path, data_dir: str, processes: int, devices: int,
              *overrides: str, mode: str = 'train_and_eval') -> subprocess.Popen:
  """`python -m deeplab_jax.main` as `processes` x `devices` (per process), 12 steps, eval at 12.

  No decoder and dense ASPP: less for every job to compile; image pooling's and the backbone's
  BatchNorms still reduce over the whole global batch.
  """
  args = [f'--config={CONFIG_FILE}', f'--workdir={workdir}', f'--config.data.data_dir={data_dir}',
          f'--mode={mode}', f'--config.train.num_steps={NUM_STEPS}',
          f'--config.train.checkpoint_every={RESUME_STEP}', '--config.train.keep_checkpoints=10',
          f'--config.eval.every={NUM_STEPS}', '--config.model.decoder=False',
          '--config.model.aspp_separable=False', '--config.model.aspp_channels=8',
          "--config.eval.trimap_widths=()", '--config.eval.plots=False',
          f'--config.optim.base_lr={BASE_LR}', '--config.train.ordered_reductions=True',
          *overrides]
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(workdir.parent / 'xla_cache'),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  env.pop('XLA_FLAGS', None)  # The launcher sets each process's device count.
  return subprocess.Popen(
      [sys.executable, str(LAUNCHER), f'--num_processes={processes}',
       f'--devices_per_process={devices}', f'--log_dir={workdir}.logs', '--timeout_s=600', '--',
       *args], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run_jobs(*jobs: tuple) -> None:
  """Run `start_job(*job)` for each job, one after another; each must succeed.

  Not at the same time: gloo's CPU collectives poll, and a multi-process job sharing two cores with
  another job's compile can stall for minutes.
  """
  for job in jobs:
    assert start_job(*job).wait(timeout=660) == 0, f'{job[0].name}:\n{_log_tails(job[0])}'


def run_failing_job(*job, **kwargs) -> str:
  """Run one job that must fail; returns its logs."""
  assert start_job(*job, **kwargs).wait(timeout=660) != 0
  return _logs(job[0])


def _logs(workdir: pathlib.Path) -> str:
  return '\n'.join(p.read_text(errors='replace') for p in _log_files(workdir))


def _log_tails(workdir: pathlib.Path, chars: int = 3000) -> str:
  """The end of each process's log, to see where each one stopped."""
  return '\n'.join(f'--- {p.name}:\n{p.read_text(errors="replace")[-chars:]}'
                   for p in _log_files(workdir))


def _log_files(workdir: pathlib.Path) -> list[pathlib.Path]:
  return sorted(pathlib.Path(f'{workdir}.logs').glob('*.log'))


def resume_from(source: pathlib.Path, workdir: pathlib.Path, step: int) -> None:
  """A workdir holding only checkpoint `step` of `source`, as if that run had stopped there."""
  shutil.copytree(source / checkpoint.CHECKPOINT_SUBDIR / str(step),
                  workdir / checkpoint.CHECKPOINT_SUBDIR / str(step))


@dataclasses.dataclass
class Runs:
  one_by_four: pathlib.Path
  two_by_two: pathlib.Path  # 1x4's step 6, trained and evaluated to step 12 on 2x2.
  one_by_two: pathlib.Path  # 1x4's step 6, trained to step 12 on 1x2.
  root: pathlib.Path
  data_dir: str


@pytest.fixture(scope='module')
def runs(tmp_path_factory) -> Runs:
  root = tmp_path_factory.mktemp('topology')
  data_dir = str(root / 'tfds')
  shapes.ensure_prepared(data_dir, config='tiny')  # Before any job: a multi-process job never builds.
  paths = Runs(root / '1x4', root / '1x4_then_2x2', root / '1x4_then_1x2', root, data_dir)
  run_jobs((paths.one_by_four, data_dir, 1, 4))
  for workdir in (paths.two_by_two, paths.one_by_two):
    resume_from(paths.one_by_four, workdir, RESUME_STEP)
  run_jobs((paths.two_by_two, data_dir, 2, 2), (paths.one_by_two, data_dir, 1, 2, '--mode=train'))
  return paths


def losses(workdir: pathlib.Path) -> dict[int, dict[str, float]]:
  return {r['step']: r for r in metrics.read_metrics(workdir) if 'train/loss' in r}


def assert_same_steps(a: dict[int, dict], b: dict[int, dict], steps: range, exact: bool) -> None:
  """The runs' logged training metrics at `steps`: bit-identical, or losses within LOSS_RTOL."""
  assert sorted(b) == list(steps)
  for step in steps:
    if exact:
      assert b[step] == a[step], f'step {step}'
      continue
    for key in ('train/loss', 'train/learning_rate'):
      np.testing.assert_allclose(b[step][key], a[step][key], rtol=LOSS_RTOL,
                                 err_msg=f'{key} at step {step}')


def assert_same_variables(a: pathlib.Path, b: pathlib.Path, exact: bool) -> None:
  va, step_a = checkpoint.restore_variables(str(a))
  vb, step_b = checkpoint.restore_variables(str(b))
  assert step_a == step_b == NUM_STEPS
  fa, fb = (traverse_util.flatten_dict(v, sep='/') for v in (va, vb))
  assert set(fa) == set(fb)
  for k, v in fa.items():
    if exact:
      np.testing.assert_array_equal(fb[k], v, err_msg=k)
    else:
      np.testing.assert_allclose(fb[k], v, rtol=VARIABLE_RTOL, atol=VARIABLE_ATOL, err_msg=k)


def eval_result(workdir: pathlib.Path) -> dict:
  return json.loads((workdir / 'eval' / f'validation_{NUM_STEPS}.json').read_text())


def test_a_two_by_two_job_continues_the_one_by_four_run_bit_identically(runs):
  log = _logs(runs.two_by_two)
  assert 'JAX process 1/2' in log and 'on 4 devices' in log  # One job over both processes.
  assert f'Resuming from checkpoint step {RESUME_STEP}' in log
  # Process 0 alone writes metrics.jsonl and the eval results: every step is there exactly once.
  steps = range(RESUME_STEP + 1, NUM_STEPS + 1)
  assert [r['step'] for r in metrics.read_metrics(runs.two_by_two) if 'train/loss' in r] == list(steps)
  assert (runs.two_by_two / 'eval' / f'validation_{NUM_STEPS}.json').is_file()
  # All processes wrote the checkpoints together: full training states.
  assert any(k.startswith('opt_state') for k in checkpoint.stored_shapes(str(runs.two_by_two)))
  assert_same_steps(losses(runs.one_by_four), losses(runs.two_by_two), steps, exact=True)
  assert_same_variables(runs.one_by_four, runs.two_by_two, exact=True)
  # The same variables evaluated by 1x4 and by 2x2: the same confusion matrix.
  a, b = eval_result(runs.one_by_four), eval_result(runs.two_by_two)
  assert a['num_pixels'] == b['num_pixels'] > 0
  for key in ('miou', 'pixel_accuracy', 'per_class_iou'):
    assert b[key] == a[key], key


def test_an_elastic_resume_on_two_devices_continues_within_float32_rounding(runs):
  assert f'Resuming from checkpoint step {RESUME_STEP}' in _logs(runs.one_by_two)
  assert_same_steps(losses(runs.one_by_four), losses(runs.one_by_two),
                    range(RESUME_STEP + 1, NUM_STEPS + 1), exact=False)
  assert_same_variables(runs.one_by_four, runs.one_by_two, exact=False)


def test_a_resume_whose_global_batch_does_not_divide_fails_clearly(runs):
  workdir = runs.root / '1x4_then_1x3'
  resume_from(runs.one_by_four, workdir, RESUME_STEP)
  log = run_failing_job(workdir, runs.data_dir, 1, 3, mode='train')
  assert ('config.train.batch_size=4 is the global batch over all 3 devices' in log
          and 'a resumed run keeps its global batch' in log), log[-4000:]
  assert checkpoint.available_steps(workdir) == [RESUME_STEP]  # Nothing was trained or written.


def test_a_resume_with_another_global_batch_is_refused(runs):
  workdir = runs.root / 'other_batch'
  resume_from(runs.one_by_four, workdir, RESUME_STEP)
  log = run_failing_job(workdir, runs.data_dir, 1, 4, '--config.train.batch_size=8', mode='train')
  assert 'continues a run with global batch 4, but config.train.batch_size=8' in log

"""Reliability: graceful stop on SIGTERM / SIGINT, kill -9 (also mid checkpoint write), exact resume,
non-finite loss, host memory over a long run.

One tiny config (a file, as `main.py` reads it) on `deeplab_shapes/tiny`, trained through the real
input pipeline. An uninterrupted in-process run is the reference: every interrupted-and-resumed run
must reproduce its per-step losses and final parameters to 1e-6. The compiled train step is shared
with the subprocesses through JAX's persistent compilation cache, so each compiles it at most once.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import jax
import numpy as np
import pytest
from flax import traverse_util

from deeplab_jax import checkpoint, input_pipeline, metrics, train
from deeplab_jax.datasets import shapes

NUM_STEPS = 40

CONFIG_FILE = """
from deeplab_jax import defaults


def get_config():
  c = defaults.get_base_config()
  m = c.model
  m.backbone = 'resnet_v1_50_beta'
  m.width_multiplier = 0.0625
  m.aspp_channels = 8
  m.decoder_channels = 8
  m.low_level_channels = 4
  m.num_classes = 6
  m.atrous_rates = (1, 2)  # Below the 3x3 feature map of a 33x33 crop at output stride 16.
  m.bn_decay = 0.9
  c.data.dataset = 'deeplab_shapes/tiny'
  c.data.data_dir = {data_dir!r}
  c.data.train_split = 'train'
  c.data.shuffle_buffer = 32
  c.train.batch_size = 4
  c.train.crop_size = (33, 33)
  c.train.num_steps = {num_steps}
  c.train.log_every = 1
  c.train.checkpoint_every = 1000
  c.optim.base_lr = 0.02
  c.eval.crop_size = (65, 65)
  c.eval.batch_size = 4
  return c
"""


def _use_compilation_cache() -> str:
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update('jax_compilation_cache_dir', tempfile.mkdtemp(prefix='deeplab_jax_xla_'))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
    jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  return jax.config.jax_compilation_cache_dir


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  """(config file, config, reference losses by step, reference final params)."""
  root = tmp_path_factory.mktemp('reliability')
  data_dir = str(root / 'tfds')
  shapes.ensure_prepared(data_dir, config='tiny')
  path = root / 'tiny_config.py'
  path.write_text(CONFIG_FILE.format(data_dir=data_dir, num_steps=NUM_STEPS))
  spec = importlib.util.spec_from_file_location('tiny_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  _use_compilation_cache()
  workdir = root / 'uninterrupted'
  state = train.train_and_evaluate(config, workdir, run_eval=False)
  return path, config, _losses(workdir), _params(state)


def _losses(workdir) -> dict[int, float]:
  """Loss by step; a step logged twice (redone after a kill) must have had the same loss."""
  losses = {}
  for r in metrics.read_metrics(workdir):
    if 'train/loss' in r:
      if r['step'] in losses:
        np.testing.assert_allclose(r['train/loss'], losses[r['step']], rtol=1e-6, atol=1e-6)
      losses[r['step']] = r['train/loss']
  return losses


def _params(state) -> dict[str, np.ndarray]:
  return traverse_util.flatten_dict(jax.device_get(state.params), sep='/')


def _assert_same_run(workdir, state, setup) -> None:
  _, _, ref_losses, ref_params = setup
  losses = _losses(workdir)
  assert sorted(losses) == list(range(1, NUM_STEPS + 1))
  for step, loss in ref_losses.items():
    np.testing.assert_allclose(losses[step], loss, rtol=1e-6, atol=1e-6, err_msg=f'step {step}')
  params = _params(state)
  assert set(params) == set(ref_params)
  for k, v in ref_params.items():
    np.testing.assert_allclose(params[k], v, rtol=1e-6, atol=1e-6, err_msg=k)


class _Job:
  """`python -m deeplab_jax.main` in a subprocess, its output collected line by line."""

  def __init__(self, config_path, workdir, *overrides: str):
    env = dict(os.environ, PYTHONUNBUFFERED='1',
               JAX_COMPILATION_CACHE_DIR=_use_compilation_cache(),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
    self.proc = subprocess.Popen(
        [sys.executable, '-m', 'deeplab_jax.main', f'--config={config_path}',
         f'--workdir={workdir}', '--mode=train', *overrides],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    self.lines: list[str] = []
    self._wanted: str | None = None
    self._seen = threading.Event()
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self) -> None:
    for line in self.proc.stdout:
      self.lines.append(line)
      if self._wanted and self._wanted in line:
        self._seen.set()
    self._seen.set()  # Exited: stop waiting.

  def wait_for(self, text: str, timeout: float) -> None:
    self._wanted = text
    if not any(text in line for line in self.lines):
      self._seen.wait(timeout)
    assert any(text in line for line in self.lines), f'{text!r} never appeared:\n{self.output}'

  def finish(self, timeout: float) -> int:
    rc = self.proc.wait(timeout)
    self._reader.join(10)
    return rc

  @property
  def output(self) -> str:
    return ''.join(self.lines[-60:])


def test_sigterm_checkpoints_exits_0_and_the_resumed_run_is_exact(setup, tmp_path):
  config_path, config, _, _ = setup
  workdir = tmp_path / 'preempted'
  job = _Job(config_path, workdir)
  job.wait_for('step 3:', timeout=240)
  job.proc.send_signal(signal.SIGTERM)
  signalled = time.monotonic()
  rc = job.finish(timeout=60)
  took = time.monotonic() - signalled
  assert rc == 0, job.output
  stopped = [line for line in job.lines if 'Stopped by SIGTERM after step' in line]
  assert stopped, job.output
  step = int(stopped[0].split('after step ')[1].split(':')[0])
  assert 3 <= step < NUM_STEPS
  assert checkpoint.available_steps(workdir) == [step]
  assert f'checkpoint {step} is saved' in stopped[0]
  assert took < 30, f'{took:.1f} s from SIGTERM to exit'
  state = train.train_and_evaluate(config, workdir, run_eval=False)
  _assert_same_run(workdir, state, setup)


def test_sigint_stops_after_the_step_and_the_resumed_run_is_exact(setup, tmp_path):
  _, config, _, _ = setup
  workdir = tmp_path / 'interrupted'

  def interrupted(config, **kwargs):
    for i, batch in enumerate(input_pipeline.create_train_iterator(config, **kwargs)):
      if i == 6:  # While fetching the batch of step 7.
        os.kill(os.getpid(), signal.SIGINT)
      yield batch

  before = signal.getsignal(signal.SIGINT)
  state = train.train_and_evaluate(config, workdir, run_eval=False,
                                   create_train_iterator=interrupted)
  assert signal.getsignal(signal.SIGINT) is before  # The handler is restored.
  assert int(state.step) == 7
  assert checkpoint.available_steps(workdir) == [7]
  state = train.train_and_evaluate(config, workdir, run_eval=False)
  _assert_same_run(workdir, state, setup)


def test_kill_9_mid_training_resumes_from_the_last_complete_checkpoint(setup, tmp_path):
  config_path, config, _, _ = setup
  workdir = tmp_path / 'killed'
  # A checkpoint every step: an async write is in flight almost all the time.
  job = _Job(config_path, workdir, '--config.train.checkpoint_every=1')
  job.wait_for('step 4:', timeout=240)
  job.proc.kill()
  job.finish(timeout=30)
  steps = checkpoint.available_steps(workdir)
  assert steps and steps[-1] >= 1, job.output
  names = os.listdir(checkpoint.checkpoint_dir(workdir))
  assert all(n.isdigit() or '.orbax-checkpoint-tmp' in n for n in names), names
  state = train.train_and_evaluate(config, workdir, run_eval=False)
  _assert_same_run(workdir, state, setup)
  assert not [n for n in os.listdir(checkpoint.checkpoint_dir(workdir)) if not n.isdigit()]


PARTIAL_SAVE = """
import os, signal, sys
import numpy as np
from deeplab_jax import checkpoint
manager = checkpoint.create_manager(sys.argv[1], keep=5, keep_best=False)
stats = {'bn': {'mean': np.zeros((4,), np.float32)}}
small = {'params': {'w': np.ones((4, 4), np.float32)}, 'batch_stats': stats}
checkpoint.save_tree(manager, 1, small)
manager.wait_until_finished()
big = {'params': {'w': np.ones((64, 1024, 1024), np.float32)}, 'batch_stats': stats}
checkpoint.save_tree(manager, 2, big)  # Returns once the write has started in the background.
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_kill_9_during_an_async_checkpoint_write_never_loads_the_partial_one(tmp_path):
  workdir = tmp_path / 'partial'
  proc = subprocess.run([sys.executable, '-c', PARTIAL_SAVE, str(workdir)], capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  directory = checkpoint.checkpoint_dir(workdir)
  partial = [n for n in os.listdir(directory) if n.startswith('2.orbax-checkpoint-tmp')]
  assert partial and '2' not in os.listdir(directory), os.listdir(directory)
  assert checkpoint.available_steps(workdir) == [1]
  assert checkpoint.latest_step(workdir) == 1
  variables, step = checkpoint.restore_variables(workdir)
  assert step == 1 and variables['params']['w'].shape == (4, 4)
  # The next training run's manager sees step 1 only and removes the leftover.
  manager = checkpoint.create_manager(workdir, keep=5, keep_best=False)
  try:
    assert manager.latest_step() == 1
    checkpoint.save_tree(manager, 3, variables)
    manager.wait_until_finished()
  finally:
    manager.close()
  assert sorted(os.listdir(directory)) == ['1', '3']


def test_overflowing_loss_stops_naming_the_step_and_keeps_the_good_checkpoint(setup, tmp_path):
  """Finite but absurd inputs (1e38) overflow inside the network at step 5; the loop notices at the
  next checkpoint step (6), saves nothing from step 5 on and names step 5."""
  _, config, _, _ = setup
  config = config.copy_and_resolve_references()
  config.train.log_every = 100
  config.train.checkpoint_every = 2

  def overflowing(config, **kwargs):
    for i, batch in enumerate(input_pipeline.create_train_iterator(config, **kwargs)):
      yield dict(batch, image=batch['image'] * np.float32(1e36)) if i == 4 else batch

  workdir = tmp_path / 'diverged'
  with pytest.raises(train.NonFiniteLossError, match=r'Non-finite loss or gradient at step 5; '
                     r'training stopped and that state was not saved \(the last good checkpoint '
                     r'is step 4 in .*\)\. Lower config.optim.base_lr'):
    train.train_and_evaluate(config, workdir, run_eval=False, create_train_iterator=overflowing)
  assert checkpoint.available_steps(workdir) == [2, 4]
  variables, _ = checkpoint.restore_variables(workdir)
  assert all(np.isfinite(v).all() for v in jax.tree.leaves(variables))

"""Reliability: graceful stop on SIGTERM / SIGINT, kill -9 (also mid checkpoint write), exact resume,
non-finite loss, flat host memory, multi-process stop agreement.

One tiny config (a file, as `main.py` reads it) on `deeplab_shapes/tiny`, trained through the real
input pipeline. An uninterrupted in-process run of 100 steps is both the memory soak (live memory
sampled every 5 steps, checkpoints every 25) and the reference: interrupted-and-resumed runs must
reproduce its per-step losses and final parameters to 1e-6. Every run compiles the same train step,
shared through JAX's persistent compilation cache (subprocesses included), so it compiles once.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import jax
import numpy as np
import pytest
import scipy.stats
from flax import traverse_util

from deeplab_jax import checkpoint, input_pipeline, metrics, preemption, train
from deeplab_jax.datasets import shapes
from deeplab_jax.errors import NonFiniteLossError
from deeplab_jax.tools import soak

NUM_STEPS = 100
# Catches a leak of >= 150 KB a step. Over these 100 steps the native allocations of XLA and tf.data
# still settle by a few MB per 100 steps; the long-run figure of the embedded config comes from
# `python -m deeplab_jax.tools.soak --config=configs/shapes.py --steps=2500` (docs/performance.md).
SOAK_MAX_MB_PER_100_STEPS = 15.0

CONFIG_FILE = """
from deeplab_jax import config


def get_config():
  c = config.tiny_config(data_dir={data_dir!r})
  c.model.aspp_channels = c.model.decoder_channels = 8  # Narrower than tiny: less to compile.
  c.model.low_level_channels = 4
  c.model.atrous_rates = (1, 2)  # Below the 3x3 feature map of a 33x33 crop at output stride 16.
  c.eval.trimap_widths = ()
  c.data.shuffle_buffer = 32
  c.train.num_steps = {num_steps}
  c.train.log_every = 1
  c.train.checkpoint_every = 1000
  c.optim.base_lr = 0.02
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
  """(config file, config, reference losses by step, reference final params, soak report)."""
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
  soak_config = config.copy_and_resolve_references()
  soak_config.train.checkpoint_every = 25  # Checkpoint steps do not change the numbers.
  workdir = root / 'uninterrupted'
  report, state = soak.soak(soak_config, workdir, every=5, warmup=0.25, run_eval=False)
  return path, config, _losses(workdir), _params(state), report


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
  _, _, ref_losses, ref_params, _ = setup
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
    self.log = f'{workdir}.{int(time.time() * 1000)}.log'
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
    with open(self.log, 'w') as log:
      for line in self.proc.stdout:
        self.lines.append(line)
        log.write(line)
        log.flush()
        if self._wanted and self._wanted in line:
          self._seen.set()
    self._seen.set()  # Exited: stop waiting.

  def wait_for(self, text: str, timeout: float) -> None:
    """Until a line contains `text` (or the job exits, or `timeout` seconds pass)."""
    self._seen.clear()
    self._wanted = text
    if not any(text in line for line in self.lines) and self.proc.poll() is None:
      self._seen.wait(timeout)
    assert any(text in line for line in self.lines), f'{text!r} never appeared:\n{self.output}'

  def finish(self, timeout: float) -> int:
    rc = self.proc.wait(timeout)
    self._reader.join(10)
    return rc

  @property
  def output(self) -> str:
    """The job's own log lines (not orbax's), for failure messages; the full log is in `log`."""
    own = [line for line in self.lines if 'deeplab_jax' in line or ' main.py' in line
           or ' train.py' in line or 'Error' in line or 'Traceback' in line]
    return f'(full log: {self.log})\n' + ''.join(own[-40:])


def test_kill_9_then_sigterm_then_resume_reproduces_the_uninterrupted_run(setup, tmp_path):
  """The job is killed (-9) while writing a checkpoint every step, rerun and preempted (SIGTERM: exit
  status 0 within seconds, with a durable checkpoint), then rerun to the end."""
  config_path, config, _, _, _ = setup
  workdir = tmp_path / 'preempted'
  killed = _Job(config_path, workdir, '--config.train.checkpoint_every=1')
  killed.wait_for('step 4:', timeout=240)
  killed.proc.kill()
  killed.finish(timeout=30)
  complete = checkpoint.available_steps(workdir)
  assert complete, killed.output
  names = os.listdir(checkpoint.checkpoint_dir(workdir))
  assert all(n.isdigit() or '.orbax-checkpoint-tmp' in n for n in names), names

  preempted = _Job(config_path, workdir)
  preempted.wait_for(f'Resuming from checkpoint step {complete[-1]} ', timeout=240)
  preempted.wait_for(f'step {complete[-1] + 2}:', timeout=240)
  preempted.proc.send_signal(signal.SIGTERM)
  signalled = time.monotonic()
  rc = preempted.finish(timeout=60)
  took = time.monotonic() - signalled
  assert rc == 0, preempted.output
  stopped = [line for line in preempted.lines if 'Stopped by SIGTERM after step' in line]
  assert stopped, preempted.output
  step = int(stopped[0].split('after step ')[1].split(':')[0])
  assert complete[-1] + 2 <= step < NUM_STEPS and f'checkpoint {step} is saved' in stopped[0]
  assert checkpoint.latest_step(workdir) == step
  assert took < 30, f'{took:.1f} s from SIGTERM to exit'
  assert not [n for n in os.listdir(checkpoint.checkpoint_dir(workdir)) if not n.isdigit()]

  state = train.train_and_evaluate(config, workdir, run_eval=False)
  _assert_same_run(workdir, state, setup)


def test_sigint_stops_after_the_current_step_with_a_checkpoint(setup, tmp_path):
  _, config, ref_losses, _, _ = setup
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
  assert int(state.step) == 7 and checkpoint.available_steps(workdir) == [7]
  losses = _losses(workdir)
  assert sorted(losses) == list(range(1, 8))
  for step, loss in losses.items():
    np.testing.assert_allclose(loss, ref_losses[step], rtol=1e-6, atol=1e-6)


def test_soak_slope_is_theil_sen():
  rng = np.random.default_rng(0)
  steps = np.arange(0, 400, 10)
  mb = 900 + 0.03 * steps + rng.normal(0, 5, steps.shape)
  mb[[3, 17, 30]] += 200  # Outliers (a shuffle buffer refilling) barely move it.
  expected = scipy.stats.theilslopes(mb, steps).slope * 100
  assert soak.slope_per_100_steps(list(zip(steps, mb, strict=True))) == pytest.approx(expected, rel=1e-9)
  assert abs(expected - 3.0) < 0.5
  assert soak.slope_per_100_steps([(5, 1.0)]) == 0.0


def test_host_memory_stays_flat(setup):
  report = setup[-1]
  assert report['steps'] == NUM_STEPS and len(report['samples']) >= 10
  assert abs(report['slope_mb_per_100_steps']) < SOAK_MAX_MB_PER_100_STEPS, report


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
  _, config, _, _, _ = setup
  config = config.copy_and_resolve_references()
  config.train.log_every = 100
  config.train.checkpoint_every = 2

  def overflowing(config, **kwargs):
    for i, batch in enumerate(input_pipeline.create_train_iterator(config, **kwargs)):
      yield dict(batch, image=batch['image'] * np.float32(1e36)) if i == 4 else batch

  workdir = tmp_path / 'diverged'
  with pytest.raises(NonFiniteLossError, match=r'Non-finite loss or gradient at step 5; '
                     r'training stopped and that state was not saved \(the last good checkpoint '
                     r'is step 4 in .*\)\. Lower config.optim.base_lr'):
    train.train_and_evaluate(config, workdir, run_eval=False, create_train_iterator=overflowing)
  assert checkpoint.available_steps(workdir) == [2, 4]
  variables, _ = checkpoint.restore_variables(workdir)
  assert all(np.isfinite(v).all() for v in jax.tree.leaves(variables))


def test_a_second_signal_takes_the_default_action():
  before = signal.getsignal(signal.SIGINT)
  with preemption.StopSignals() as stop:
    assert not stop.should_stop(1)
    signal.raise_signal(signal.SIGINT)
    assert stop.received == 'SIGINT' and stop.should_stop(2)
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C twice: stop now.
      signal.raise_signal(signal.SIGINT)
  assert signal.getsignal(signal.SIGINT) is before


STOP_LOOP = """
import sys, time
import jax
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2,
                           process_id=int(sys.argv[2]))
from deeplab_jax import preemption


with preemption.StopSignals(sync_every=5) as stop:
  print('ready', flush=True)
  for step in range(1, 600):
    time.sleep(0.05)  # A training step.
    if stop.should_stop(step):
      print(f'stop {step} {stop.received}', flush=True)
      break
"""


@pytest.mark.exclusive
@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT], ids=['SIGTERM', 'SIGINT'])
def test_processes_of_a_multiprocess_job_stop_at_the_same_step(sig):
  """A signal to one process stops all of them after the same step (else collectives would hang):
  SIGTERM through JAX's preemption sync manager, SIGINT at the next `sync_every` step."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    address = f'127.0.0.1:{s.getsockname()[1]}'
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='', PYTHONUNBUFFERED='1')
  procs = [subprocess.Popen([sys.executable, '-c', STOP_LOOP, address, str(i)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
  try:
    for p in procs:
      while (line := p.stdout.readline()) and line.strip() != 'ready':
        pass
      assert line, p.communicate()[0][-2000:]
    procs[1].send_signal(sig)
    outputs = [p.communicate(timeout=120)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  stops = [[line.split() for line in out.splitlines() if line.startswith('stop ')] for out in outputs]
  assert all(len(s) == 1 for s in stops), outputs
  assert stops[0][0][1] == stops[1][0][1], stops  # The same step on both.
  assert [p.returncode for p in procs] == [0, 0], outputs
  if sig == signal.SIGINT:
    assert int(stops[0][0][1]) % 5 == 0

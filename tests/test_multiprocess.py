"""Multi-process training: 2 processes x 2 CPU devices train and evaluate exactly as 1 process x 4.

The 2x2 job is `python -m deeplab_jax.main` started by `launch/local_multiprocess.py` (which sets
the `DEEPLAB_*` variables that `deeplab_jax.distributed.initialize` reads; gloo CPU collectives over
localhost). The reference runs meanwhile in this process (conftest forces 4 CPU devices) on the
same global batches: rows [0, B/2) from process 0's shard and [B/2, B) from process 1's, as the 2x2
job assembles them. Both read the embedded `deeplab_shapes/tiny` dataset, prepared once beforehand.

The backbone's BatchNorm is frozen in this comparison (the head's BatchNorm still trains with
statistics over the global batch, across processes): at initialisation on 33x33 crops of the flat
synthetic images, the backbone's batch statistics make the gradient so ill-conditioned that even 1
and 4 devices of one process, whose results differ only by float rounding, give gradient norms 1%
apart; with it frozen they agree to ~1e-6, so a 1e-5 tolerance catches real errors.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from flax import traverse_util

from deeplab_jax import checkpoint, distributed, input_pipeline, metrics, train
from deeplab_jax.datasets import shapes

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCHER = REPO / 'launch' / 'local_multiprocess.py'
CONFIG_FILE = REPO / 'configs' / 'shapes.py'
NUM_STEPS = 3
OVERRIDES = {
  'data.dataset': 'deeplab_shapes/tiny',  # 24 train / 8 validation images of 48-64 px.
  'model.backbone': 'resnet_v1_50_beta',
  'model.width_multiplier': 0.0625,
  'model.aspp_channels': 16,
  'model.atrous_rates': (1, 2),  # Rates that fit the 3x3 feature maps of 33x33 crops.
  # Less to compile (three processes compile it); what is tested is the distribution. Image
  # pooling stays: its BatchNorm reduces over the batch alone, across both processes.
  'model.aspp_separable': False,
  'model.decoder': False,
  'model.freeze_backbone_bn': True,  # See the module docstring.
  'train.batch_size': 4,
  'train.crop_size': (33, 33),
  'train.num_steps': NUM_STEPS,
  'train.log_every': 1,
  'train.checkpoint_every': NUM_STEPS,
  'optim.warmup_steps': 0,
  'eval.crop_size': (65, 65),
  'eval.batch_size': 4,
  'eval.every': NUM_STEPS,
  'eval.num_summary_images': 1,
}


def _cli_value(value) -> str:
  if isinstance(value, tuple):
    return '(' + ','.join(str(v) for v in value) + ')'
  return str(value)


def _config(data_dir: str):
  """configs/shapes.py with OVERRIDES, as `--config=configs/shapes.py --config.x=y` gives it."""
  spec = importlib.util.spec_from_file_location('shapes_config', CONFIG_FILE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.update_from_flattened_dict({**OVERRIDES, 'data.data_dir': data_dir})
  return config


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory) -> str:
  """`deeplab_shapes/tiny` built once, before any process reads it (they must not race to build)."""
  path = str(tmp_path_factory.mktemp('tfds'))
  shapes.ensure_prepared(path, config='tiny')
  return path


def _log_tail(log_dir: pathlib.Path, chars: int = 3000) -> str:
  parts = []
  for log in sorted(log_dir.glob('process_*.log')):
    parts.append(f'--- {log.name} ---\n{log.read_text(errors="replace")[-chars:]}')
  return '\n'.join(parts)


def two_process_batches(config, *, mean_pixel, process_index=0, process_count=1, start_step=0):
  """The global batches of a 2-process job: process 0's rows, then process 1's."""
  del process_index, process_count
  shards = [input_pipeline.create_train_iterator(config, mean_pixel=mean_pixel, process_index=i,
                                                 process_count=2, start_step=start_step)
            for i in range(2)]
  while True:
    parts = [next(shard) for shard in shards]
    yield {k: np.concatenate([p[k] for p in parts]) for k in ('image', 'label')}


@dataclasses.dataclass
class Runs:
  mp_workdir: str  # 2 processes x 2 devices, through the launcher.
  log_dir: pathlib.Path  # Its process_I.log files.
  single_workdir: str  # 1 process x 4 devices, in this process.


@pytest.fixture(scope='module')
def runs(data_dir, tmp_path_factory) -> Runs:
  """Both trainings (3 steps, evaluation and checkpoint at the end), run at the same time: the
  2x2 job in the background while this process trains the reference."""
  assert jax.device_count() == 4 and jax.process_count() == 1  # conftest forces 4 CPU devices.
  root = tmp_path_factory.mktemp('multiprocess')
  mp_workdir, log_dir, single_workdir = root / '2x2', root / 'logs', root / '1x4'
  args = [f'--config={CONFIG_FILE}', f'--workdir={mp_workdir}',
          f'--config.data.data_dir={data_dir}']
  args += [f'--config.{k}={_cli_value(v)}' for k, v in OVERRIDES.items()]
  job = subprocess.Popen(
      [sys.executable, str(LAUNCHER), '--num_processes=2', '--devices_per_process=2',
       f'--log_dir={log_dir}', '--timeout_s=900', '--', *args],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    train.train_and_evaluate(_config(data_dir), single_workdir,
                             create_train_iterator=two_process_batches)
    output, _ = job.communicate(timeout=960)
  finally:
    if job.poll() is None:
      job.terminate()  # The launcher stops its processes.
      job.wait(timeout=60)
  assert job.returncode == 0, (f'2x2 job failed ({job.returncode}):\n{output[-2000:]}\n'
                               f'{_log_tail(log_dir)}')
  return Runs(str(mp_workdir), log_dir, str(single_workdir))


def _train_records(workdir: str) -> list[dict]:
  return [r for r in metrics.read_metrics(workdir) if 'train/loss' in r]


def _eval_result(workdir: str) -> dict:
  with open(os.path.join(workdir, 'eval', f'validation_{NUM_STEPS}.json')) as f:
    return json.load(f)


def test_two_processes_ran_as_one_job_of_four_devices(runs):
  workdir, log_dir = runs.mp_workdir, runs.log_dir
  logs = [(log_dir / f'process_{i}.log').read_text(errors='replace') for i in range(2)]
  for i, log in enumerate(logs):
    assert f'JAX process {i}/2' in log
    assert 'on 4 devices' in log  # The mesh spans both processes' devices.
  # Process 0 alone writes metrics.jsonl and the eval JSON: every step is there exactly once.
  assert [r['step'] for r in _train_records(workdir)] == list(range(1, NUM_STEPS + 1))
  assert sorted(os.listdir(os.path.join(workdir, 'eval'))) == [
      f'validation_{NUM_STEPS}', f'validation_{NUM_STEPS}.json']  # Prediction PNGs, results.
  # All processes wrote one checkpoint together: a full training state.
  assert checkpoint.available_steps(workdir) == [NUM_STEPS]
  assert any(k.startswith('opt_state') for k in checkpoint.stored_shapes(workdir))


def test_two_by_two_trains_exactly_as_one_by_four(runs):
  mp, single = _train_records(runs.mp_workdir), _train_records(runs.single_workdir)
  assert [r['step'] for r in mp] == [r['step'] for r in single] == list(range(1, NUM_STEPS + 1))
  # Step 1 is the same batch on the same initial parameters: equal up to summation order.
  np.testing.assert_allclose(mp[0]['train/loss'], single[0]['train/loss'], rtol=1e-6)
  for a, b in zip(mp, single, strict=True):
    for k in ('train/loss', 'train/grad_norm', 'train/pixel_accuracy', 'train/learning_rate'):
      np.testing.assert_allclose(a[k], b[k], rtol=1e-5, err_msg=f'{k} at step {a["step"]}')
  # The final model variables (params and BatchNorm statistics) from the checkpoints.
  mp_vars, mp_step = checkpoint.restore_variables(runs.mp_workdir)
  single_vars, single_step = checkpoint.restore_variables(runs.single_workdir)
  assert mp_step == single_step == NUM_STEPS
  flat_mp = traverse_util.flatten_dict(mp_vars, sep='/')
  flat_single = traverse_util.flatten_dict(single_vars, sep='/')
  assert set(flat_mp) == set(flat_single)
  for k, v in flat_single.items():
    np.testing.assert_allclose(flat_mp[k], v, rtol=1e-5, atol=1e-6, err_msg=k)


def test_two_by_two_evaluates_the_whole_split_as_one_by_four(runs, data_dir):
  mp, single = _eval_result(runs.mp_workdir), _eval_result(runs.single_workdir)
  # Each process evaluated half of the images: the confusion matrix is summed over both.
  builder = tfds.builder('deeplab_shapes/tiny', data_dir=data_dir)
  labelled = sum(int(np.count_nonzero(x['segmentation_mask'] != 255))
                 for x in tfds.as_numpy(builder.as_dataset(split='validation')))
  assert mp['num_pixels'] == single['num_pixels'] == labelled
  assert mp['miou'] == pytest.approx(single['miou'], rel=1e-6)
  assert mp['pixel_accuracy'] == pytest.approx(single['pixel_accuracy'], rel=1e-6)
  assert mp['per_class_iou'] == pytest.approx(single['per_class_iou'], rel=1e-6, nan_ok=True)


# ------------------------------------------------------------------------------- launcher, init


def test_launcher_stops_the_job_when_one_process_fails(tmp_path):
  (tmp_path / 'job.py').write_text(textwrap.dedent("""
      import os, sys, time
      rank = int(os.environ['DEEPLAB_PROCESS_ID'])
      print('rank', rank, 'of', os.environ['DEEPLAB_NUM_PROCESSES'],
            os.environ['DEEPLAB_COORDINATOR_ADDRESS'], os.environ['XLA_FLAGS'], sys.argv[1:])
      if rank == 1:
        sys.exit(3)
      time.sleep(120)  # Would wait forever for rank 1 in a collective.
  """))
  env = {**os.environ, 'PYTHONPATH': str(tmp_path)}
  start = time.monotonic()
  result = subprocess.run(
      [sys.executable, str(LAUNCHER), '--num_processes=2', '--devices_per_process=3',
       '--module=job', '--', '--x=1'], env=env, capture_output=True, text=True, timeout=90)
  assert result.returncode == 3
  assert time.monotonic() - start < 60
  assert '[p0] rank 0 of 2 127.0.0.1:' in result.stdout
  assert '--xla_force_host_platform_device_count=3' in result.stdout
  assert "['--x=1']" in result.stdout
  assert 'process 1 exited with status 3' in result.stderr


def test_initialize_is_a_no_op_for_one_process_and_names_missing_settings(monkeypatch):
  for name in (distributed.ENV_COORDINATOR_ADDRESS, distributed.ENV_NUM_PROCESSES,
               distributed.ENV_PROCESS_ID):
    monkeypatch.delenv(name, raising=False)
  assert distributed.initialize() is False  # No settings, no cluster: single process.
  assert distributed.initialize(num_processes=1) is False
  monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, '2')
  with pytest.raises(ValueError, match='missing: coordinator_address, process_id'):
    distributed.initialize()
  with pytest.raises(ValueError, match=r'process_id=2 must be in \[0, num_processes=2\)'):
    distributed.initialize('127.0.0.1:1234', process_id=2)
  assert jax.process_count() == 1


def _stub(directory: pathlib.Path, name: str, body: str = '') -> None:
  """An executable `name` on PATH that appends its command line to $STUB_LOG."""
  path = directory / name
  path.write_text(f'#!/bin/bash\nprintf "%s\\n" "{name} $*" >> "$STUB_LOG"\n{body}\n')
  path.chmod(0o755)


def test_tpu_pod_script_runs_main_on_all_workers(tmp_path):
  _stub(tmp_path, 'gcloud', '[[ "$*" == *" describe "* ]] && exit 1; exit 0')
  log = tmp_path / 'log'
  env = {**os.environ, 'PATH': f'{tmp_path}:{os.environ["PATH"]}', 'STUB_LOG': str(log),
         'PROJECT': 'p', 'ZONE': 'us-central2-b', 'TPU_NAME': 'pod', 'ACCELERATOR_TYPE': 'v4-32',
         'WORKDIR': 'gs://bucket/wd', 'DATA_DIR': 'gs://bucket/tfds',
         'REPO_URL': 'https://example.com/deeplab_jax.git', 'CONFIG': 'configs/voc_xception.py'}
  subprocess.run(['bash', str(REPO / 'launch' / 'tpu_pod.sh'), 'all',
                  '--config.train.num_steps=10'], env=env, check=True, timeout=60)
  calls = log.read_text()
  assert 'tpu-vm create pod --zone us-central2-b --project p --accelerator-type v4-32' in calls
  assert 'git clone -q https://example.com/deeplab_jax.git deeplab_jax' in calls
  train_call = [c for c in calls.split('gcloud ') if 'deeplab_jax.main' in c]
  assert len(train_call) == 1 and '--worker=all' in train_call[0]
  for arg in ('--config=configs/voc_xception.py', '--workdir=gs://bucket/wd',
              '--config.data.data_dir=gs://bucket/tfds', '--config.train.num_steps=10'):
    assert arg in train_call[0]
  env['WORKDIR'] = '/local/disk'  # Hosts do not share it: refused.
  result = subprocess.run(['bash', str(REPO / 'launch' / 'tpu_pod.sh'), 'train'], env=env,
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 2 and 'gs://' in result.stderr


@pytest.mark.parametrize('per, tasks, device_ids', [('gpu', 4, ''), ('node', 1, '0,1,2,3')])
def test_slurm_script_starts_one_process_per_gpu_or_node(tmp_path, per, tasks, device_ids):
  _stub(tmp_path, 'srun', 'echo "JAX_LOCAL_DEVICE_IDS=${JAX_LOCAL_DEVICE_IDS:-}" >> "$STUB_LOG"')
  log = tmp_path / 'log'
  env = {**os.environ, 'PATH': f'{tmp_path}:{os.environ["PATH"]}', 'STUB_LOG': str(log),
         'SLURM_JOB_ID': '7', 'SLURM_JOB_NUM_NODES': '2', 'SLURM_GPUS_ON_NODE': '4',
         'SLURM_SUBMIT_DIR': str(REPO), 'DEEPLAB_PROCESS_PER': per, 'VENV': '/venv'}
  env.pop('JAX_LOCAL_DEVICE_IDS', None)
  subprocess.run(['bash', str(REPO / 'launch' / 'slurm_gpu.sbatch'), '--config=c.py',
                  '--workdir=/shared/wd'], env=env, check=True, timeout=60, capture_output=True)
  calls = log.read_text()
  assert (f'srun --nodes=2 --ntasks-per-node={tasks} --ntasks={2 * tasks} --kill-on-bad-exit=1 '
          '/venv/bin/python -m deeplab_jax.main --config=c.py --workdir=/shared/wd') in calls
  assert f'JAX_LOCAL_DEVICE_IDS={device_ids}\n' in calls

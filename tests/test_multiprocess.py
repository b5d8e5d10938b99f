"""Multi-process start-up and launchers: the local launcher, `distributed.initialize`, the TPU pod
and SLURM scripts. Training and evaluation across processes (2 x 2 against 1 x 4, elastic resume)
are in tests/test_topology.py.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys
import textwrap
import time

import jax
import pytest

from deeplab_jax import distributed

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCHER = REPO / 'launch' / 'local_multiprocess.py'


# ------------------------------------------------------------------------------- launcher, init


@pytest.mark.exclusive
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


def test_cpu_processes_get_huge_pages_unless_the_caller_chose_its_own_tunables():
  spec = importlib.util.spec_from_file_location('local_multiprocess', LAUNCHER)
  launcher = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(launcher)
  settings = dict(process_id=1, num_processes=2, coordinator='127.0.0.1:1')
  cpu = launcher.process_env({'XLA_FLAGS': '--xla_foo=1'}, devices_per_process=2, **settings)
  assert cpu['GLIBC_TUNABLES'] == 'glibc.malloc.hugetlb=1'
  assert cpu['XLA_FLAGS'].split() == ['--xla_foo=1', '--xla_force_host_platform_device_count=2']
  assert cpu['DEEPLAB_PROCESS_ID'] == '1' and cpu['JAX_PLATFORMS'] == 'cpu'
  own = launcher.process_env({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'}, devices_per_process=2,
                             **settings)
  assert own['GLIBC_TUNABLES'] == 'glibc.malloc.arena_max=2'
  accelerators = launcher.process_env({}, devices_per_process=None, **settings)
  assert 'GLIBC_TUNABLES' not in accelerators and 'JAX_PLATFORMS' not in accelerators


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
